"""A loaded model that embeds image files per attribute, and the fingerprint of model and config.

Images get the evaluation's views (data/views.py) and run through evaluation's EmbedFn on the
device mesh: the global backbone once per image, heads and local branch once per attribute.
Joint checkpoints give the fused embedding, stage-1 ones the global one.
"""
import concurrent.futures
import hashlib
import json
import os

import numpy as np
from PIL import Image
from tqdm import tqdm

from asen_jax import data as data_lib
from asen_jax import evaluation
from asen_jax import parallel
from asen_jax import trees
from asen_jax.data import views

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# The config fields, besides the weights, that change an embedding.
EMBEDDING_FIELDS = ("data.image_size", "data.hires_size", "model.local_size",
                    "model.roi_threshold", "model.compute_dtype", "eval.beta")


def list_images(paths):
  """Absolute paths of the image files among `paths` (files, or folders searched recursively),
  sorted within each folder; one sentence when a path is missing or a folder holds none."""
  out = []
  for path in paths:
    path = os.path.abspath(path)
    if os.path.isfile(path):
      out.append(path)
    elif os.path.isdir(path):
      found = sorted(os.path.join(d, f) for d, _, files in os.walk(path) for f in files
                     if f.lower().endswith(IMAGE_SUFFIXES))
      if not found:
        raise ValueError(f"The folder {path} holds no image files ({', '.join(IMAGE_SUFFIXES)}); "
                         "point to a folder of catalog images.")
      out.extend(found)
    else:
      raise FileNotFoundError(f"{path} does not exist; pass image files or folders of them.")
  return list(dict.fromkeys(out))


def load_image_views(path, image_size, hires_size):
  """(view, hires) uint8 views of an image file, as evaluation makes them; one sentence when the
  file is empty or not an image."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise ValueError(f"Cannot read the image {path}: {e.strerror}.") from None
  if not data:
    raise ValueError(f"The image file {path} is empty; replace or remove it.")
  try:
    return views.load_view(data, image_size, hires_size)
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise ValueError(f"{path} is not a readable image ({type(e).__name__}); replace or remove "
                     "it.") from None


def config_fields(config):
  return {f: config[f.split(".")[0]][f.split(".")[1]] for f in EMBEDDING_FIELDS}


def fingerprint(variables, config, attributes, joint):
  """sha256 (hex, 16 chars) of the weights, the embedding's config fields and the attributes."""
  h = hashlib.sha256()
  h.update(json.dumps({"fields": config_fields(config), "attributes": list(attributes),
                       "joint": joint}, sort_keys=True).encode())
  for part in ("params", "batch_stats"):
    for key, value in sorted(trees.flatten_tree(variables.get(part, {})).items()):
      a = np.ascontiguousarray(value)
      h.update(f"{part}/{key}:{a.dtype}:{a.shape}".encode())
      h.update(a.tobytes())
  return h.hexdigest()[:16]


def resolve_attributes(config, meta):
  """Attribute names: the checkpoint's, else (official files) the config's or its dataset's."""
  if meta.get("attributes"):
    return tuple(meta["attributes"])
  if config.data.attributes:
    return tuple(config.data.attributes)
  return tuple(data_lib.dataset_info(config).attributes)


class Embedder:
  """A checkpoint loaded once, replicated on the mesh, ready to embed files and queries."""

  def __init__(self, config, checkpoint):
    model, variables, joint, meta = evaluation.load_for_eval(config, checkpoint, None)
    self.attributes = resolve_attributes(config, meta)
    if len(self.attributes) != meta["num_attributes"]:
      raise ValueError(f"{checkpoint} has {meta['num_attributes']} attributes but the config "
                       f"names {len(self.attributes)}; use the config of its dataset.")
    self.config, self.checkpoint, self.joint = config, checkpoint, joint
    self._host_variables = variables
    self.fingerprint = fingerprint(variables, config, self.attributes, joint)
    self.mesh = parallel.make_mesh()
    self.variables = parallel.replicate(self.mesh, variables)
    self.embed_fn = evaluation.make_embed_fn(config, model, joint, self.mesh)
    self.dim = model.embed_dim * (2 if joint else 1)

  def fingerprint_of(self, names):
    """The fingerprint this model would have with only the attributes `names` (its table's rows
    of them, in that order): an index built for those attributes by a model that shared every
    other weight and those rows has it."""
    rows = np.asarray([self.attribute_index(n) for n in names])
    params = dict(self._host_variables["params"])
    params["attr_embedding"] = {"embedding": np.asarray(
        params["attr_embedding"]["embedding"])[rows]}
    return fingerprint({**self._host_variables, "params": params}, self.config, names, self.joint)

  def attribute_index(self, name):
    if name not in self.attributes:
      raise ValueError(f"Unknown attribute {name!r}; this model knows "
                       f"{', '.join(self.attributes)}.")
    return self.attributes.index(name)

  def views(self, path):
    return load_image_views(path, self.config.data.image_size, self.config.data.hires_size)

  def embed_views(self, images, hires, attributes_per_image):
    """uint8 views [n, ...] -> (emb [n, A', d], attmap [n, A', h, w], box [n, A', 4] in frame
    pixels) for the A' attributes (indices) of every image."""
    n, attrs = len(images), np.asarray(attributes_per_image, np.int32)
    outs = self.embed_fn.embed_lines(self.variables, images, hires, np.repeat(np.arange(n),
                                     len(attrs)), np.tile(attrs, n))
    return tuple(o.reshape((n, len(attrs)) + o.shape[1:]) for o in outs)

  def embed_files(self, paths, batch_size=None, desc="embedding", attributes=None):
    """float32 [n, A, d]: every file's embedding for every attribute (or for `attributes`,
    indices), `batch_size` images a step (default eval.batch_size; the last batch padded so
    that nothing compiles twice)."""
    batch_size = batch_size or self.config.eval.batch_size
    parallel.check_batch_size(batch_size, "eval.batch_size", self.mesh)
    all_attrs = np.asarray(range(len(self.attributes)) if attributes is None else attributes,
                           np.int32)
    out = np.zeros((len(paths), len(all_attrs), self.dim), np.float32)
    threads = max(1, min(8, os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
      starts = range(0, len(paths), batch_size)
      loads = [pool.map(self.views, paths[s:s + batch_size]) for s in starts[:2]]
      for i, s in enumerate(tqdm(starts, desc=desc, unit="batch", leave=False)):
        got = list(loads[i])
        if i + 2 < len(starts):   # decode two batches ahead of the device
          loads.append(pool.map(self.views, paths[starts[i + 2]:starts[i + 2] + batch_size]))
        pad = batch_size - len(got)
        images = np.stack([g[0] for g in got] + [np.zeros_like(got[0][0])] * pad)
        hires = np.stack([g[1] for g in got] + [np.zeros_like(got[0][1])] * pad)
        emb, _, _ = self.embed_views(images, hires, all_attrs)
        out[s:s + len(got)] = emb[:len(got)]
    return out

  def embed_query(self, path, attribute):
    """(emb [d], attmap [h, w], box [4] in [0, 1] view coordinates, view uint8) of one file."""
    view, hires = self.views(path)
    emb, attmap, box = self.embed_views(view[None], hires[None], [attribute])
    return emb[0, 0], attmap[0, 0], box[0, 0] / float(self.config.data.image_size), view

  def embed_split_candidates(self, split, attributes=None):
    """evaluation.embed_split's candidate lines of a split (image ids, attributes, embeddings),
    of every attribute or of `attributes` (indices)."""
    parallel.process0_first(lambda: data_lib.prepare_dataset(self.config), "prepare_dataset")
    _, cands = evaluation.embed_split(self.config, self.variables, self.embed_fn, self.mesh,
                                      split, desc=f"embedding {split}", attributes=attributes)
    return cands
