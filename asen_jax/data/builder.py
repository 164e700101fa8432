"""TFDS builder for the official ASEN split-file layout, and dataset metadata.

The builder `asen_fashion` has one config per dataset (fashionai, darn, deepfashion, synthetic).
It reads the user's folder (`manual_dir` = <data.root>/<data.folder>), writes array_record
shards and is read back with `tfds` data sources, all without TensorFlow. One record per line
of `filenames_<split>.txt`, in file order (shuffling disabled, so record order = image id order):
  image     the encoded bytes exactly as found on disk (read with SkipDecoding)
  image_id  the 0-based line number in filenames_<split>.txt
  labels    int32[A], value per attribute, -1 where the split files give none
  boxes     float32[A, 4], ground-truth region per attribute (x0, y0, x1, y1, original pixels),
            -1 where unknown (only the synthetic set has boxes)
  width, height, filename
The dataset's metadata.json keeps the attribute list, the train labels and the query/candidate
lists per split, and the images skipped as corrupt (`data.skip_corrupt`).
"""
import json
import os
from typing import NamedTuple

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from asen_jax.data import layout
from asen_jax.data.layout import EVAL_SPLITS
from asen_jax.data.layout import SPLITS

BUILDER_NAME = "asen_fashion"
VERSION = "1.0.0"


class DatasetInfo(NamedTuple):
  name: str
  attributes: tuple     # names, in attribute-index order
  num_values: tuple     # values per attribute
  value_names: tuple    # per attribute, a tuple of value names


class AsenFashion(tfds.core.GeneratorBasedBuilder):
  """The ASEN fashion attribute datasets from their official split files."""

  VERSION = tfds.core.Version(VERSION)
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=n, description=layout.SOURCES[n])
                     for n in layout.CONFIG_NAMES]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (f"Point manual_dir at the dataset folder; it must hold "
                                  f"{layout.LAYOUT}. Sources: {layout.SOURCES}.")

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # tfds 4.9.10 resolves this through `importlib_resources`, a Python<3.9 backport that its
    # own requirements do not install on 3.11; the module file is what it looks for.
    return epath.Path(__file__)

  def __init__(self, *, attributes=(), num_values=(), skip_corrupt=False, verbose=True,
               **kwargs):
    self._attributes, self._num_values = tuple(attributes), tuple(num_values)
    self._skip_corrupt = skip_corrupt
    self._verbose = verbose
    super().__init__(**kwargs)

  def _info(self):
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "image_id": np.int32,
        "filename": tfds.features.Text(),
        "width": np.int32,
        "height": np.int32,
        "labels": tfds.features.Tensor(shape=(None,), dtype=np.int32),
        "boxes": tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
    })
    return tfds.core.DatasetInfo(builder=self, description=__doc__, features=features,
                                 metadata=tfds.core.MetadataDict(), disable_shuffling=True)

  def _split_generators(self, dl_manager):
    folder = os.fspath(dl_manager.manual_dir)
    src = layout.read_source(folder, self.builder_config.name, self._attributes,
                             self._num_values, self._skip_corrupt, self._verbose)
    splits = src["splits"]
    train = splits["train"]
    train_labels = [(int(fid), a, int(v)) for fid in np.flatnonzero(train.keep)
                    for a, v in enumerate(train.labels[fid]) if v >= 0]
    lists = {kind: {s: [t for t in lines if splits[s].keep[t[0]]] for s, lines in per.items()}
             for kind, per in src["lists"].items()}
    dropped = {kind: {s: len(src["lists"][kind][s]) - len(lists[kind][s]) for s in EVAL_SPLITS}
               for kind in lists}
    self.info.metadata.update({
        "source": os.path.abspath(folder),
        "attributes": list(src["attributes"]), "num_values": list(src["num_values"]),
        "value_names": [list(v) for v in src["value_names"]],
        "has_boxes": src["boxes"] is not None,
        "num_lines": {s: len(splits[s].filenames) for s in SPLITS},
        "skipped": {s: [list(t) for t in splits[s].skipped] for s in SPLITS},
        "dropped_lines": dropped,
        "train_labels": [list(t) for t in train_labels],
        "query": {s: [list(t) for t in v] for s, v in lists["query"].items()},
        "candidate": {s: [list(t) for t in v] for s, v in lists["candidate"].items()},
    })
    boxes = src["boxes"] or {}
    return {s: self._generate_examples(folder, splits[s], boxes.get(s), len(src["attributes"]))
            for s in SPLITS}

  def _generate_examples(self, folder, split, boxes, num_attributes):
    for fid, fname in enumerate(split.filenames):
      if not split.keep[fid]:
        continue
      with open(os.path.join(folder, fname), "rb") as f:
        data = f.read()
      box = boxes[fid] if boxes is not None else np.full((num_attributes, 4), -1, np.float32)
      yield fid, {"image": data, "image_id": fid, "filename": fname,
                  "width": split.sizes[fid, 0], "height": split.sizes[fid, 1],
                  "labels": split.labels[fid], "boxes": box}


def builder_dir(config):
  return os.path.join(config.data.tfds_dir, BUILDER_NAME, config.data.name, VERSION)


def is_built(config):
  return os.path.isfile(os.path.join(builder_dir(config), "dataset_info.json"))


SOURCE_RECORD = "source_files.json"


def source_files(folder, skip=()):
  """{relative path: [size, mtime_ns]} of every file under `folder` (hidden ones and the `skip`
  folders aside): enough to notice an edit, a deletion or an addition after a build."""
  out, skip = {}, {os.path.abspath(p) for p in skip}
  for root, dirs, files in os.walk(folder):
    dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                     and os.path.abspath(os.path.join(root, d)) not in skip)
    for name in files:
      if not name.startswith("."):
        p = os.path.join(root, name)
        st = os.stat(p)
        out[os.path.relpath(p, folder)] = [st.st_size, st.st_mtime_ns]
  return out


def _check_source(config, folder, path):
  """One sentence when the built dataset at `path` came from another folder, or from this one
  before it changed."""
  rebuild = (f"delete {path} to rebuild it from {folder}, or set data.tfds_dir to another "
             "folder")
  source = load_metadata(config).get("source")
  if source and os.path.abspath(folder) != source:
    raise ValueError(f"The dataset at {path} was built from {source}, but the config reads "
                     f"{folder}; {rebuild}.")
  record = os.path.join(path, SOURCE_RECORD)
  if not os.path.isfile(record) or not os.path.isdir(folder):
    return   # built before the record existed, or the source is not on this machine
  with open(record) as f:
    then = json.load(f)
  now = source_files(folder, skip=[config.data.tfds_dir])
  changed = sorted(k for k in set(then) | set(now) if then.get(k) != now.get(k))
  if changed:
    what = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
    raise ValueError(f"{folder} changed after the dataset at {path} was built from it ({what}); "
                     f"{rebuild}.")


def prepare_dataset(config, verbose=True):
  """Builds <data.root>/<data.folder> into data.tfds_dir unless already built; returns the path.
  A build records its source's files; a later run on a changed source stops with one sentence."""
  layout.check_name(config.data.name)
  path = builder_dir(config)
  folder = os.path.join(config.data.root, config.data.folder)
  if is_built(config):
    _check_source(config, folder, path)
    return path
  layout.check_layout(folder, config.data.name)
  if verbose:
    print(f"Building the {config.data.name} dataset from {folder} into {path}.", flush=True)
  # Taken before the build reads anything: an edit during the build shows next time.
  files = source_files(folder, skip=[config.data.tfds_dir])
  builder = AsenFashion(config=config.data.name, data_dir=config.data.tfds_dir,
                        file_format="array_record", attributes=config.data.attributes,
                        num_values=config.data.num_values,
                        skip_corrupt=config.data.skip_corrupt, verbose=verbose)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=folder))
  with open(os.path.join(path, SOURCE_RECORD), "w") as f:
    json.dump(files, f)
  return path


_METADATA_CACHE = {}


def load_metadata(config):
  """The built dataset's metadata.json as a dict (cached per path and mtime)."""
  path = os.path.join(builder_dir(config), "metadata.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No built dataset at {builder_dir(config)}; call "
                            "prepare_dataset(config) (train.py does) to build it first.")
  key = (path, os.path.getmtime(path))
  if key not in _METADATA_CACHE:
    with open(path) as f:
      _METADATA_CACHE[key] = json.load(f)
  return _METADATA_CACHE[key]


def dataset_info(config):
  """DatasetInfo of the configured dataset, checked against data.attributes/num_values."""
  layout.check_name(config.data.name)
  folder = os.path.join(config.data.root, config.data.folder)
  if is_built(config):
    meta = load_metadata(config)
    attributes, num_values = tuple(meta["attributes"]), tuple(meta["num_values"])
    value_names = tuple(tuple(v) for v in meta["value_names"])
    where = f"the dataset built at {builder_dir(config)}"
  else:
    attributes, num_values, value_names, _ = layout.attribute_list(
        folder, config.data.name, config.data.attributes, config.data.num_values)
    where = (f"{folder}/meta.json" if config.data.name == "synthetic"
             else f"the {config.data.name} attribute list")
  if config.data.attributes and tuple(config.data.attributes) != attributes:
    raise ValueError(f"data.attributes {tuple(config.data.attributes)} do not match {where}: "
                     f"{attributes}; fix the config or rebuild the dataset.")
  if config.data.num_values and tuple(config.data.num_values) != num_values:
    raise ValueError(f"data.num_values {tuple(config.data.num_values)} do not match {where}: "
                     f"{num_values}; fix the config or rebuild the dataset.")
  return DatasetInfo(config.data.name, attributes, num_values, value_names)


def split_source(config, split):
  """Random-access tfds data source of one split; records hold raw image bytes."""
  builder = tfds.builder_from_directory(builder_dir(config))
  return builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})


def record_index(config, split):
  """int64[num_lines]: record index of each image id, -1 for images skipped as corrupt."""
  meta = load_metadata(config)
  n = meta["num_lines"][split]
  keep = np.ones(n, bool)
  keep[[t[0] for t in meta["skipped"][split]]] = False
  index = np.full(n, -1, np.int64)
  index[keep] = np.arange(int(keep.sum()))
  return index


def train_labels(config):
  """int32[K, 3] rows (record index, attribute, value) of the train split."""
  meta = load_metadata(config)
  rows = np.asarray(meta["train_labels"], np.int64).reshape(-1, 3)
  rows[:, 0] = record_index(config, "train")[rows[:, 0]]
  return rows.astype(np.int32)


def eval_lines(config, split, which):
  """int32[N, 3] rows (image id, attribute, value) of query_<split>.txt or candidate_<split>.txt."""
  if split not in EVAL_SPLITS or which not in ("query", "candidate"):
    raise ValueError(f"Evaluation streams exist for split in {EVAL_SPLITS} and which in "
                     f"('query', 'candidate'), got split={split!r}, which={which!r}.")
  return np.asarray(load_metadata(config)[which][split], np.int32).reshape(-1, 3)

