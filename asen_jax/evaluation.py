"""Embedding extraction over the evaluation streams, and the MAP of a split.

Used by train.py (validation MAP every epoch) and evaluate.py. Embeddings are computed on the device
mesh (batch on 'data'); the host only sees them once per batch.
"""
import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
from tqdm import tqdm

from asen_jax import checkpoint as ckpt_lib
from asen_jax import trees
from asen_jax import data as data_lib
from asen_jax import model as model_lib
from asen_jax import parallel
from asen_jax import pointing
from asen_jax import retrieval
from asen_jax import roi
from asen_jax import viz


def retrieval_embedding(variables, images, hires, attributes, *, model, joint, frame_size,
                        local_size, threshold, beta):
  """uint8 views -> (retrieval embedding, global attention map, RoI boxes in frame pixels)."""
  x = model_lib.normalize_images(images)
  g, attmap = model.apply(variables, x, attributes, method="embed_global")
  if not joint:
    boxes = jnp.broadcast_to(jnp.array([0, 0, frame_size, frame_size], jnp.float32),
                             (x.shape[0], 4))
    return model_lib.l2_normalize(g.astype(jnp.float32)), attmap, boxes
  crops, boxes = roi.roi_crops(attmap, hires, frame_size, local_size, threshold)
  l, _ = model.apply(variables, model_lib.normalize_images(crops), attributes, method="embed_local")
  emb = model_lib.fused_embedding(g.astype(jnp.float32), l.astype(jnp.float32), beta)
  return emb, attmap, boxes


def make_embed_fn(config, model, joint, mesh):
  fn = functools.partial(
      retrieval_embedding, model=model, joint=joint, frame_size=config.data.image_size,
      local_size=config.model.local_size, threshold=config.model.roi_threshold,
      beta=config.eval.beta)
  return jax.jit(fn, out_shardings=parallel.batch_sharding(mesh))


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


def embed_stream(config, variables, embed_fn, mesh, split, which, desc=None):
  """Runs `embed_fn` over every line of a split's query or candidate file."""
  batch_size = config.eval.batch_size
  parallel.check_batch_size(batch_size, "eval.batch_size", mesh)
  shard_index, shard_count = jax.process_index(), jax.process_count()
  local_batch = batch_size // shard_count
  stream = data_lib.make_eval_stream(config, split, which, batch_size=local_batch,
                                     shard_index=shard_index, shard_count=shard_count)
  total = data_lib.eval_stream_length(config, split, which, batch_size=local_batch,
                                      shard_count=shard_count)
  parts = {k: [] for k in ("emb", "attribute", "value", "image_id", "attmap", "box", "gt_box",
                           "mask")}
  bar = tqdm(stream, total=total, desc=desc or f"{split} {which}", leave=False,
             disable=jax.process_index() != 0)
  for batch in bar:
    images, hires, attrs = parallel.shard_batch(
        mesh, (batch["image"], batch["hires"], batch["attribute"]))
    emb, attmap, box = embed_fn(variables, images, hires, attrs)
    outs = dict(emb=emb, attmap=attmap, box=box)
    if shard_count > 1:
      outs = multihost_utils.process_allgather(outs, tiled=True)
      host = multihost_utils.process_allgather(
          {k: batch[k] for k in ("attribute", "value", "image_id", "box", "mask")}, tiled=True)
    else:
      host = batch
    for k, v in jax.device_get(outs).items():
      parts[k].append(np.asarray(v))
    for k_out, k_in in (("attribute", "attribute"), ("value", "value"), ("image_id", "image_id"),
                        ("gt_box", "box"), ("mask", "mask")):
      parts[k_out].append(np.asarray(host[k_in]))
  cat = {k: np.concatenate(v) for k, v in parts.items()}
  keep = cat.pop("mask").astype(bool)
  return Embedded(**{k: v[keep] for k, v in cat.items()})


def evaluate_split(config, variables, embed_fn, mesh, split, attribute_names, value_names=None):
  """MAP (and pointing accuracy when boxes are known) of one split; returns (results, q, c)."""
  queries = embed_stream(config, variables, embed_fn, mesh, split, "query")
  cands = embed_stream(config, variables, embed_fn, mesh, split, "candidate")
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
  """(model, variables, joint, meta) from a workdir/checkpoint folder or an official .pth.tar."""
  variables, meta = ckpt_lib.load_model(path, prefer="best")
  ckpt_lib.check_attributes(meta, attributes, f"Checkpoint {path}")
  joint = "local" in variables["params"]
  model = model_lib.build_model(ml_collections.ConfigDict({**config.model.to_dict(), **meta["model"]}),
                                len(attributes), with_local=joint,
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
  parallel.process0_first(lambda: data_lib.prepare_dataset(config), "prepare_dataset")
  info = data_lib.dataset_info(config)
  model, variables, joint, meta = load_for_eval(config, checkpoint_path, info.attributes)
  mesh = parallel.make_mesh()
  variables = parallel.replicate(mesh, variables)
  embed_fn = make_embed_fn(config, model, joint, mesh)
  results, queries, cands = evaluate_split(config, variables, embed_fn, mesh, split,
                                           info.attributes, info.value_names)
  results.update(split=split, stage="joint" if joint else "global", checkpoint=checkpoint_path,
                 beta=config.eval.beta if joint else None)
  if joint and config.eval.beta > 0:   # beta = 0 leaves no global block to rank by
    results["global_branch"] = global_branch_map(queries, cands, model.embed_dim,
                                                 info.attributes)
  if viz_dir and jax.process_index() == 0:
    results["pictures"] = viz.write_pictures(config, split, queries, cands, info, viz_dir,
                                             viz_queries, variables=variables,
                                             embed_fn=embed_fn, mesh=mesh)
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
