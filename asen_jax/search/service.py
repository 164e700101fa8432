"""Build, add to, remove from and query an attribute-specific search index (behind search.py and
app.py). A catalog is a dataset split (each attribute indexes the images of its candidate lines)
or image files (each indexes every image)."""
import json
import os

import ml_collections
import numpy as np
from PIL import Image

from asen_jax import pointing
from asen_jax import viz
from asen_jax.data import builder
from asen_jax.search import embedder as embedder_lib
from asen_jax.search import faiss_index
from asen_jax.search import store


def config_of(index):
  return ml_collections.ConfigDict(json.loads(index.meta["config"]))


def check_model(index, emb, where):
  """One sentence when `emb` (an Embedder) is not the model and config the index was built with."""
  if emb.fingerprint != index.meta["fingerprint"]:
    raise ValueError(f"The index {where} was built with another model or config (fingerprint "
                     f"{index.meta['fingerprint']}, checkpoint {index.meta['checkpoint']}), not "
                     f"with {emb.checkpoint} (fingerprint {emb.fingerprint}); use the model it "
                     "was built with, or build a new index.")


def load_embedder(index, where, config=None, checkpoint=None):
  """The model an index was built with (or the given one, which must be the same)."""
  checkpoint = checkpoint or index.meta["checkpoint"]
  emb = embedder_lib.Embedder(config or config_of(index), checkpoint)
  check_model(index, emb, where)
  return emb


def _split_catalog(config, emb, split, attributes=None, items=()):
  """(paths, image ids, {attribute: (item ids, vectors)}) of a split's candidate lines, of every
  attribute or of `attributes` (indices); images already among `items` (paths) keep their ids,
  the others are numbered after them."""
  folder = os.path.join(config.data.root, config.data.folder)
  with open(os.path.join(folder, f"filenames_{split}.txt")) as f:
    names = [line.strip() for line in f]
  cands = emb.embed_split_candidates(split, attributes)
  image_ids = list(dict.fromkeys(cands.image_id.tolist()))
  paths = [os.path.abspath(os.path.join(folder, names[f])) for f in image_ids]
  item_of_path = {p: i for i, p in enumerate(items) if p is not None}
  new = [(f, p) for f, p in zip(image_ids, paths) if p not in item_of_path]
  item_of_path.update({p: len(items) + i for i, (_, p) in enumerate(new)})
  item_of = {f: item_of_path[p] for f, p in zip(image_ids, paths)}
  per_attr = {}
  for a in (range(len(emb.attributes)) if attributes is None else attributes):
    rows = np.flatnonzero(cands.attribute == a)
    per_attr[a] = (np.array([item_of[f] for f in cands.image_id[rows]], np.int64), cands.emb[rows])
  return [p for _, p in new], [f for f, _ in new], per_attr


def model_columns(index, emb):
  """Per index attribute (by name), its position in the model's attributes."""
  return [emb.attribute_index(name) for name in index.attributes]


def build(config, checkpoint, index_dir, spec_args, *, split=None, images=None, nprobe=16,
          batch_size=None, before_commit=None):
  """Embeds a catalog (a split, or files and folders `images`) and writes a new index."""
  if (split is None) == (not images):
    raise ValueError("Pass a catalog: either --split (valid or test) or --images (files or "
                     "folders), not both.")
  paths = embedder_lib.list_images(images) if images else None
  emb = embedder_lib.Embedder(config, checkpoint)
  spec = faiss_index.IndexSpec(dim=emb.dim, **spec_args)
  faiss_index.check_spec(spec)
  if split is not None:
    builder.prepare_dataset(config)
    counts = np.bincount(builder.eval_lines(config, split, "candidate")[:, 1],
                         minlength=len(emb.attributes))
  else:
    counts = np.full(len(emb.attributes), len(paths))
  if counts.min() < faiss_index.min_train_vectors(spec):
    raise ValueError(f"A {spec.kind} index needs at least {faiss_index.min_train_vectors(spec)} "
                     f"images per attribute to train, this catalog has {counts.min()}; use "
                     "--kind=flat or --kind=sq8 for a catalog this small.")
  if split is not None:
    paths, image_ids, per_attr = _split_catalog(config, emb, split)
    catalog = {"split": split, "image_ids": image_ids}
  else:
    vectors = emb.embed_files(paths, batch_size)
    ids = np.arange(len(paths), dtype=np.int64)
    per_attr = {a: (ids, vectors[:, a]) for a in range(len(emb.attributes))}
    catalog = {"images": [os.path.abspath(p) for p in images]}
  meta = store.new_meta(attributes=emb.attributes, fingerprint=emb.fingerprint,
                        checkpoint=checkpoint, stage="joint" if emb.joint else "global",
                        config_json=config.to_json_best_effort(), spec=spec, nprobe=nprobe,
                        catalog=catalog)
  meta["items"] = list(paths)
  indexes = [faiss_index.build(spec, per_attr[a][1], per_attr[a][0])
             for a in range(len(emb.attributes))]
  index = store.SearchIndex(meta, indexes)
  store.write(index, index_dir, before_commit)
  return index


def add(index_dir, images, *, config=None, checkpoint=None, batch_size=None, before_commit=None):
  """Embeds new image files (or folders) and adds them to every attribute's index."""
  index = store.read(index_dir)
  paths = embedder_lib.list_images(images)
  known = set(p for _, p in index.live_items())
  again = [p for p in paths if p in known]
  if again:
    raise ValueError(f"{again[0]} is already in the index {index_dir} ({len(again)} of the new "
                     "images are); remove them first to re-embed them.")
  emb = load_embedder(index, index_dir, config, checkpoint)
  vectors = emb.embed_files(paths, batch_size)
  ids = np.arange(len(index.items), len(index.items) + len(paths), dtype=np.int64)
  for a, faiss_ix in zip(model_columns(index, emb), index.indexes):
    faiss_index.add(faiss_ix, vectors[:, a], ids)
  index.meta["items"] = index.items + paths
  store.write(index, index_dir, before_commit)
  return len(paths)


def extend(index_dir, config, checkpoint, *, batch_size=None, before_commit=None):
  """Adds the attributes that an `extend` checkpoint has and the index lacks, embedding the
  catalog for them only; the old attributes' indexes stay as they are. The checkpoint must hold
  the index's model for its attributes (every weight and their table rows), which the
  fingerprint checks. Returns the names added."""
  index = store.read(index_dir)
  emb = embedder_lib.Embedder(config, checkpoint)
  missing = [a for a in index.attributes if a not in emb.attributes]
  if missing:
    raise ValueError(f"{checkpoint} has no attribute {missing[0]!r}, which the index "
                     f"{index_dir} holds; extend the index with a checkpoint that `train.py "
                     "...:extend` made from the index's model.")
  new = [a for a in emb.attributes if a not in index.attributes]
  if not new:
    raise ValueError(f"{checkpoint} has no attribute that the index {index_dir} lacks "
                     f"({', '.join(index.attributes)}); to index new images, use "
                     "`search.py add`.")
  if emb.fingerprint_of(index.attributes) != index.meta["fingerprint"]:
    raise ValueError(f"{checkpoint} is not the index's model ({index.meta['checkpoint']}) with "
                     f"attributes added: weights or embedding settings of {index_dir}'s "
                     "attributes differ, so their embeddings would change; build a new index "
                     "with `search.py build`.")
  spec = faiss_index.IndexSpec(**index.meta["spec"])
  columns = [emb.attribute_index(a) for a in new]
  catalog = index.meta["catalog"]
  if "split" in catalog:
    builder.prepare_dataset(config)
    paths, image_ids, per_attr = _split_catalog(config, emb, catalog["split"], columns,
                                                index.items)
    catalog["image_ids"] = catalog["image_ids"] + image_ids
  else:
    live = index.live_items()
    vectors = emb.embed_files([p for _, p in live], batch_size, attributes=columns)
    ids = np.array([i for i, _ in live], np.int64)
    paths, per_attr = [], {a: (ids, vectors[:, j]) for j, a in enumerate(columns)}
  for name, a in zip(new, columns):
    ids, vectors = per_attr[a]
    if len(vectors) < faiss_index.min_train_vectors(spec):
      raise ValueError(f"The {spec.kind} index needs at least "
                       f"{faiss_index.min_train_vectors(spec)} images of {name!r} to train, the "
                       f"catalog has {len(vectors)}; build a flat or sq8 index.")
    index.indexes.append(faiss_index.build(spec, vectors, ids))
  index.meta.update(attributes=index.attributes + new, items=index.items + paths,
                    extended_from={"fingerprint": index.meta["fingerprint"],
                                   "checkpoint": index.meta["checkpoint"]},
                    fingerprint=emb.fingerprint, checkpoint=os.path.abspath(checkpoint),
                    config=config.to_json_best_effort())
  store.write(index, index_dir, before_commit)
  return new


def remove(index_dir, images):
  """Removes image files (or every image under a folder) from every attribute's index."""
  index = store.read(index_dir)
  targets = [os.path.abspath(p) for p in images]
  gone = [i for i, p in index.live_items()
          if any(p == t or p.startswith(t.rstrip(os.sep) + os.sep) for t in targets)]
  if not gone:
    raise ValueError(f"None of {', '.join(targets)} is in the index {index_dir}; give indexed "
                     "files or folders that hold them (paths are compared as absolute paths).")
  for faiss_ix in index.indexes:
    faiss_index.remove(faiss_ix, gone)
  for i in gone:
    index.items[i] = None
  store.write(index, index_dir)
  return len(gone)


class Searcher:
  """An index and its model, loaded once: queries embed an image and search one attribute."""

  def __init__(self, index_dir, config=None, checkpoint=None):
    self.index_dir = index_dir
    self.index = store.read(index_dir)
    self.embedder = load_embedder(self.index, index_dir, config, checkpoint)

  @property
  def attributes(self):
    return list(self.index.attributes)

  def query(self, image_path, attribute, top_k=10, nprobe=None):
    """(results [{rank, score, path}], query embedding's extras {attmap, box, view})."""
    a = self.embedder.attribute_index(attribute)
    if top_k < 1:
      raise ValueError(f"--top_k={top_k} must be at least 1.")
    emb, attmap, box, view = self.embedder.embed_query(os.path.abspath(image_path), a)
    nprobe = self.index.meta["nprobe"] if nprobe is None else nprobe
    faiss_ix = self.index.indexes[self.index.attributes.index(attribute)]
    scores, ids = faiss_index.search(faiss_ix, emb[None], top_k, nprobe)
    results = [{"rank": r + 1, "score": float(s), "path": self.index.items[i]}
               for r, (s, i) in enumerate(zip(scores[0], ids[0])) if i >= 0]
    return results, {"attmap": attmap, "box": box, "view": view}

  def picture(self, results, extras, attribute, tile=160):
    """The query's view with its attention map and RoI box, then the top K with scores."""
    tiles = []
    for r in results:
      with Image.open(r["path"]) as im:
        tiles.append(np.asarray(im.convert("RGB")))
    return viz.retrieval_panel(
        extras["view"], extras["attmap"], extras["box"], tiles, [None] * len(results),
        [r["score"] for r in results], f"{attribute}: top {len(results)}", tile=tile,
        stride=pointing.attention_stride(self.embedder.config))
