"""Embedding extraction of a split's query and candidate lines, and the MAP of a split.

Used by train.py (validation MAP every epoch) and evaluate.py. Embeddings are computed on the device
mesh (batch on 'data'), each image's backbones once for all its lines; the host sees them once per
batch.
"""
import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
from tqdm import tqdm

from asen_jax import checkpoint as ckpt_lib
from asen_jax import config_checks
from asen_jax import trees
from asen_jax import data as data_lib
from asen_jax import model as model_lib
from asen_jax import parallel
from asen_jax import pointing
from asen_jax import retrieval
from asen_jax import roi
from asen_jax import viz
from asen_jax.data import builder
from asen_jax.data import image_batches


def gather_lines(mesh, line_image, per_image):
  """Per-image rows [D * k, ...] -> per-line rows [D * s, ...]; each device's s lines index its
  own k images (`line_image`, int [D * s]), so no row crosses devices."""
  take = jax.shard_map(lambda x, i: x[i], mesh=mesh, in_specs=(P("data"), P("data")),
                       out_specs=P("data"))
  return take(per_image, line_image)


def retrieval_embedding(variables, images, hires, line_image, attributes, *, model, mesh, joint,
                        frame_size, local_size, threshold, beta):
  """uint8 views of images, lines (image within its device's chunk, attribute) -> per line
  (retrieval embedding, global attention map, RoI box in frame pixels).

  The global backbone and the ASA projection run once per image; the rest once per line.
  """
  gather = functools.partial(gather_lines, mesh, line_image)
  g, attmap = model.apply(variables, model_lib.normalize_images(images), attributes,
                          gather=gather, method="embed_global")
  if not joint:
    boxes = jnp.broadcast_to(jnp.array([0, 0, frame_size, frame_size], jnp.float32),
                             (attributes.shape[0], 4))
    return model_lib.l2_normalize(g.astype(jnp.float32)), attmap, boxes
  crops, boxes = roi.roi_crops(attmap, gather(hires), frame_size, local_size, threshold)
  l, _ = model.apply(variables, model_lib.normalize_images(crops), attributes, method="embed_local")
  emb = model_lib.fused_embedding(g.astype(jnp.float32), l.astype(jnp.float32), beta)
  return emb, attmap, boxes


@dataclasses.dataclass(frozen=True)
class EmbedFn:
  """A model's jitted `retrieval_embedding` on a mesh; `hires` is only read by joint models."""
  fn: Callable
  joint: bool
  mesh: jax.sharding.Mesh

  def __call__(self, variables, images, hires, line_image, attributes):
    """Arrays sharded on 'data' (parallel.shard_batch) -> per-line (emb, attmap, box), sharded."""
    return self.fn(variables, images, hires if self.joint else None, line_image, attributes)

  def embed_lines(self, variables, images, hires, line_image, attributes):
    """Host arrays of a few images and their lines -> host per-line outputs. With several
    processes every process calls it with the same arrays."""
    devices = self.mesh.size
    packing = image_batches.pack_lines(line_image, -(-len(images) // devices), devices)
    ids, line = np.maximum(packing.image_id.reshape(-1), 0), packing.line.reshape(-1)
    arrays = (images[ids], hires[ids] if self.joint else None, packing.slot_image.reshape(-1),
              np.asarray(attributes, np.int32)[np.maximum(line, 0)])
    outs = parallel.to_host(self(variables, *parallel.put_global(self.mesh, arrays)))
    return tuple(_by_line(np.asarray(o), line, len(line_image)) for o in outs)


def _by_line(slots, line, count):
  """Rows of line slots -> rows in line order (padding slots, line -1, dropped)."""
  keep = line >= 0
  out = np.empty((count,) + slots.shape[1:], slots.dtype)
  out[line[keep]] = slots[keep]
  return out


def make_embed_fn(config, model, joint, mesh):
  fn = functools.partial(
      retrieval_embedding, model=model, mesh=mesh, joint=joint,
      frame_size=config.data.image_size, local_size=config.model.local_size,
      threshold=config.model.roi_threshold, beta=config.eval.beta)
  return EmbedFn(jax.jit(fn, out_shardings=parallel.batch_sharding(mesh)), joint, mesh)


@dataclasses.dataclass
class Embedded:
  """Host arrays for every line of a query or candidate file (padding removed)."""
  emb: np.ndarray
  attribute: np.ndarray
  value: np.ndarray
  image_id: np.ndarray
  attmap: np.ndarray
  box: np.ndarray       # RoI box, frame pixels (x0, y0, x1, y1)
  gt_box: np.ndarray    # ground-truth box in [0, 1] view coordinates, -1 when unknown


def embed_split(config, variables, embed_fn, mesh, split, desc=None, attributes=None):
  """(queries, candidates): every line of a split's two files (or those of `attributes`,
  indices), each image loaded and run through the backbones once (eval.batch_size images a
  step)."""
  batch_size = config.eval.batch_size
  parallel.check_batch_size(batch_size, "eval.batch_size", mesh)
  files = [builder.eval_lines(config, split, which) for which in ("query", "candidate")]
  if attributes is not None:
    files = [f[np.isin(f[:, 1], attributes)] for f in files]
  table = np.concatenate(files)
  devices, per_device = mesh.size, batch_size // mesh.size   # images of a step, of a device
  per_process = devices // jax.process_count()                # devices of a process
  packing = image_batches.pack_lines(table[:, 0], per_device, devices)
  steps, slots = packing.num_chunks // devices, packing.line.shape[1]
  mine = packing.chunks_of_process(devices, jax.process_index(), jax.process_count())
  slot_image = packing.slot_image[mine].reshape(steps, -1)
  attrs = table[np.maximum(packing.line[mine], 0), 1].reshape(steps, -1)
  image_row = np.arange(per_process * slots) // slots * per_device + slot_image  # [steps, L * s]
  stream = image_batches.make_image_stream(config, split, packing.image_id[mine],
                                           batch_size=per_process * per_device)
  parts = {k: [] for k in ("emb", "attmap", "box", "gt_box")}

  def collect(outs, gt_box):
    for k, v in {**parallel.to_host(outs), "gt_box": parallel.to_host(gt_box)}.items():
      parts[k].append(np.asarray(v))

  pending = None
  bar = tqdm(stream, total=steps, desc=desc or split, leave=False,
             disable=jax.process_index() != 0)
  for t, batch in enumerate(bar):
    hires = batch["hires"] if embed_fn.joint else None   # only joint models crop
    arrays = parallel.shard_batch(mesh, (batch["image"], hires, slot_image[t], attrs[t]))
    emb, attmap, box = embed_fn(variables, *arrays)
    if pending is not None:   # fetched after the next step is queued, so the device never waits
      collect(*pending)
    pending = dict(emb=emb, attmap=attmap, box=box), batch["boxes"][image_row[t], attrs[t]]
  collect(*pending)
  out = {k: _by_line(np.concatenate(v), packing.line.reshape(-1), len(table))
         for k, v in parts.items()}
  split_at = len(files[0])
  return tuple(
      Embedded(attribute=lines[:, 1].copy(), value=lines[:, 2].copy(), image_id=lines[:, 0].copy(),
               **{k: v[rows] for k, v in out.items()})
      for lines, rows in ((files[0], slice(0, split_at)), (files[1], slice(split_at, None))))


def evaluate_split(config, variables, embed_fn, mesh, split, attribute_names, value_names=None):
  """MAP (and pointing accuracy when boxes are known) of one split; returns (results, q, c)."""
  queries, cands = embed_split(config, variables, embed_fn, mesh, split)
  num_attributes = len(attribute_names)
  results = retrieval.mean_average_precision(
      queries.emb, queries.attribute, queries.value, cands.emb, cands.attribute, cands.value,
      num_attributes=num_attributes, attribute_names=attribute_names)
  results["map_random"] = float(retrieval.random_ranking_map(
      queries.attribute, queries.value, cands.attribute, cands.value, num_attributes))
  if (queries.gt_box >= 0).all(axis=1).any():
    args = (np.concatenate([queries.attmap, cands.attmap]),
            np.concatenate([queries.gt_box, cands.gt_box]),
            np.concatenate([queries.attribute, cands.attribute]), num_attributes)
    # Each cell at its receptive field's centre (also per value: which values the attention
    # finds); and, for comparison, where the paper's way of drawing a map (bilinear, half-pixel
    # centres) puts it (pointing.cell_centres).
    results["pointing_accuracy"] = pointing.pointing_accuracy(
        *args, attribute_names=attribute_names, stride=pointing.attention_stride(config),
        values_b=np.concatenate([queries.value, cands.value]), value_names=value_names)
    results["pointing_accuracy_drawn"] = pointing.pointing_accuracy(
        *args, attribute_names=attribute_names)
  return results, queries, cands


def load_for_eval(config, path, attributes):
  """(model, variables, joint, meta) from a workdir/checkpoint folder or an official .pth.tar;
  `attributes` None: whatever the checkpoint was trained on."""
  variables, meta = ckpt_lib.load_model(path, prefer="best")
  if attributes is not None:
    ckpt_lib.check_attributes(meta, attributes, f"Checkpoint {path}")
  joint = "local" in variables["params"]
  model = model_lib.build_model(ml_collections.ConfigDict({**config.model.to_dict(), **meta["model"]}),
                                meta["num_attributes"], with_local=joint,
                                dtype=jnp.dtype(config.model.compute_dtype))
  reference = jax.eval_shape(lambda: model_lib.init_variables(
      model, jax.random.key(0), config.data.image_size, config.model.local_size))
  variables = {k: trees.merge_params(reference[k], variables[k], path)
               for k in ("params", "batch_stats")}
  return model, variables, joint, meta


def global_branch_map(queries, cands, embed_dim, attribute_names):
  """MAP of a joint model without its local branch, from the same pass: the fused embedding's
  first `embed_dim` entries are sqrt(beta) l2n(global), which rank as the global branch alone."""
  res = retrieval.mean_average_precision(
      queries.emb[:, :embed_dim], queries.attribute, queries.value, cands.emb[:, :embed_dim],
      cands.attribute, cands.value, num_attributes=len(attribute_names),
      attribute_names=attribute_names)
  return {k: res[k] for k in ("map_overall", "map_per_attribute")}


def run_evaluation(config, checkpoint_path, split, viz_dir=None, viz_queries=3):
  """Embeds a split with a checkpoint, returns the results dict (MAP in %)."""
  mesh = parallel.make_mesh()
  config_checks.check(config, num_devices=mesh.size)
  parallel.process0_first(lambda: data_lib.prepare_dataset(config), "prepare_dataset")
  info = data_lib.dataset_info(config)
  model, variables, joint, meta = load_for_eval(config, checkpoint_path, info.attributes)
  config_checks.check_views(meta.get("views"), config, joint, f"Checkpoint {checkpoint_path}")
  variables = parallel.replicate(mesh, variables)
  embed_fn = make_embed_fn(config, model, joint, mesh)
  results, queries, cands = evaluate_split(config, variables, embed_fn, mesh, split,
                                           info.attributes, info.value_names)
  results.update(split=split, stage="joint" if joint else "global", checkpoint=checkpoint_path,
                 beta=config.eval.beta if joint else None)
  if joint and config.eval.beta > 0:   # beta = 0 leaves no global block to rank by
    results["global_branch"] = global_branch_map(queries, cands, model.embed_dim,
                                                 info.attributes)
  if viz_dir:   # every process: the attention grid runs the model on the global mesh
    paths = viz.write_pictures(config, split, queries, cands, info, viz_dir, viz_queries,
                               variables=variables, embed_fn=embed_fn,
                               write=jax.process_index() == 0)
    if jax.process_index() == 0:
      results["pictures"] = paths
  return results


def format_table(results):
  """A plain-text table of per-attribute MAP (and pointing accuracy) plus the overall line."""
  pointing = results.get("pointing_accuracy", {})
  per_attr_pa = pointing.get("pointing_per_attribute", {}) if pointing else {}
  lines = [f"{'attribute':<24}{'queries':>9}{'MAP %':>9}" + (f"{'pointing %':>12}"
                                                              if pointing else "")]
  for name, value in results["map_per_attribute"].items():
    row = f"{name:<24}{results['num_queries'][name]:>9d}{value:>9.2f}"
    if pointing:
      row += f"{per_attr_pa.get(name, float('nan')):>12.2f}"
    lines.append(row)
  total = sum(results["num_queries"].values())
  row = f"{'overall':<24}{total:>9d}{results['map_overall']:>9.2f}"
  if pointing:
    row += f"{pointing['pointing_overall']:>12.2f}"
  lines.append(row)
  if "global_branch" in results:
    lines.append(f"{'without local branch':<24}{'':>9}"
                 f"{results['global_branch']['map_overall']:>9.2f}")
  lines.append(f"{'random ranking':<24}{'':>9}{results['map_random']:>9.2f}")
  return "\n".join(lines)
