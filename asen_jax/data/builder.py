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
import concurrent.futures
import io
import json
import os
from typing import NamedTuple

from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds
from tqdm import tqdm

BUILDER_NAME = "asen_fashion"
VERSION = "1.0.0"
SPLITS = ("train", "valid", "test")
EVAL_SPLITS = ("valid", "test")

# Attribute lists of the public datasets (names as in configs/, counts from the papers).
BUILTIN = {
    "fashionai": (("skirt_length", "sleeve_length", "coat_length", "pant_length", "collar_design",
                   "lapel_design", "neckline_design", "neck_design"),
                  (6, 9, 8, 6, 5, 5, 10, 5)),
    "darn": (("clothes_category", "clothes_button", "clothes_color", "clothes_length",
              "clothes_pattern", "clothes_shape", "collar_shape", "sleeve_length", "sleeve_shape"),
             (20, 13, 55, 7, 28, 11, 26, 8, 17)),
    "deepfashion": (("texture", "fabric", "shape", "part", "style"), (156, 218, 180, 216, 230)),
}
SOURCES = {
    "fashionai": "the FashionAI Global Challenge 2018 attribute subsets",
    "darn": "the DARN image URL lists",
    "deepfashion": "DeepFashion 'Category and Attribute Prediction'",
    "synthetic": "`python -m asen_jax.data.synthetic --out <data.root>`",
}
CONFIG_NAMES = ("fashionai", "darn", "deepfashion", "synthetic")
LAYOUT = ("filenames_{train,valid,test}.txt, label_train.txt, query_{valid,test}.txt, "
          "candidate_{valid,test}.txt and the image files they list")
_REQUIRED = ("filenames_train.txt", "filenames_valid.txt", "filenames_test.txt", "label_train.txt",
             "query_valid.txt", "query_test.txt", "candidate_valid.txt", "candidate_test.txt")


class DatasetInfo(NamedTuple):
  name: str
  attributes: tuple     # names, in attribute-index order
  num_values: tuple     # values per attribute
  value_names: tuple    # per attribute, a tuple of value names


def _check_name(name):
  if name not in CONFIG_NAMES:
    raise ValueError(f"data.name={name!r} is not a dataset this project knows; use one of "
                     f"{', '.join(CONFIG_NAMES)}.")


def check_layout(folder, name):
  """Raises one FileNotFoundError naming the expected layout when a split file is missing."""
  _check_name(name)
  if name == "synthetic":
    where = f"synthetic data comes from {SOURCES['synthetic']}"
  else:
    where = (f"{name} images come from {SOURCES[name]} (not downloadable here; a synthetic set "
             f"comes from {SOURCES['synthetic']})")
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"Dataset folder {folder} does not exist: it must hold {LAYOUT}; "
                            f"{where}.")
  required = _REQUIRED + (("meta.json",) if name == "synthetic" else ())
  for fname in required:
    if not os.path.isfile(os.path.join(folder, fname)):
      raise FileNotFoundError(f"Dataset folder {folder} has no {fname}: it must hold {LAYOUT}"
                              f"{' and meta.json' if name == 'synthetic' else ''}; {where}.")


def attribute_list(folder, name):
  """(attributes, num_values, value_names, meta_or_None) for a config, before any build."""
  _check_name(name)
  if name == "synthetic":
    path = os.path.join(folder, "meta.json")
    if not os.path.isfile(path):
      check_layout(folder, name)
    with open(path) as f:
      meta = json.load(f)
    return (tuple(meta["attributes"]), tuple(meta["num_values"]),
            tuple(tuple(v) for v in meta["value_names"]), meta)
  attributes, num_values = BUILTIN[name]
  value_names = tuple(tuple(f"{a}_{v}" for v in range(k)) for a, k in zip(attributes, num_values))
  return attributes, num_values, value_names, None


def _read_lines(path):
  with open(path) as f:
    return [(i + 1, line.split()) for i, line in enumerate(f) if line.strip()]


def _read_filenames(folder, split):
  path = os.path.join(folder, f"filenames_{split}.txt")
  with open(path) as f:
    names = [line.strip() for line in f]
  while names and not names[-1]:
    names.pop()
  for lineno, name in enumerate(names, 1):
    if not name:
      raise ValueError(f"{path}:{lineno}: empty line; every line must name one image file.")
  return names


def _parse_labels(path, num_values, num_images, pairs_per_line=None):
  """[(fid, attr, value, 'file:line')] from 'fid a v [a v ...]' lines, range-checked."""
  out = []
  for lineno, tokens in _read_lines(path):
    where = f"{path}:{lineno}"
    try:
      ints = [int(t) for t in tokens]
    except ValueError:
      raise ValueError(f"{where}: expected integers 'fid attr value ...', got "
                       f"{' '.join(tokens)!r}.") from None
    wrong_count = pairs_per_line and len(ints) != 1 + 2 * pairs_per_line
    if len(ints) < 3 or len(ints) % 2 == 0 or wrong_count:
      form = "'fid attr value'" if pairs_per_line == 1 else "'fid attr value [attr value ...]'"
      raise ValueError(f"{where}: expected {form}, got {' '.join(tokens)!r}.")
    fid = ints[0]
    if not 0 <= fid < num_images:
      raise ValueError(f"{where}: image id {fid} is out of range 0..{num_images - 1} of the "
                       "split's filenames file; fix the line.")
    for a, v in zip(ints[1::2], ints[2::2]):
      if not 0 <= a < len(num_values):
        raise ValueError(f"{where}: attribute {a} is out of range 0..{len(num_values) - 1} for "
                         f"the configured {len(num_values)} attributes; fix the line or the "
                         "attribute list.")
      if not 0 <= v < num_values[a]:
        raise ValueError(f"{where}: value {v} of attribute {a} is out of range "
                         f"0..{num_values[a] - 1}; fix the line or the attribute list.")
      out.append((fid, a, v, where))
  return out


def _check_image(path):
  """(width, height) or raises OSError/ValueError with the reason."""
  with open(path, "rb") as f:
    data = f.read()
  with Image.open(io.BytesIO(data)) as im:
    im.load()   # full decode: truncated files fail here, not at training time
    return im.size


class _Split(NamedTuple):
  filenames: list
  labels: np.ndarray     # [num_lines, A] int32, -1 unknown
  keep: np.ndarray       # [num_lines] bool, False for skipped corrupt images
  sizes: np.ndarray      # [num_lines, 2] (width, height)
  skipped: list          # [(fid, filename, reason)]


def read_source(folder, name, skip_corrupt=False, verbose=True):
  """Parses and checks the official layout; decodes every image once to catch corrupt ones."""
  check_layout(folder, name)
  attributes, num_values, value_names, meta = attribute_list(folder, name)
  splits, lists = {}, {"query": {}, "candidate": {}}
  for split in SPLITS:
    filenames = _read_filenames(folder, split)
    labels = np.full((len(filenames), len(attributes)), -1, np.int32)
    if split == "train":
      sources = [os.path.join(folder, "label_train.txt")]
    else:
      sources = [os.path.join(folder, f"{k}_{split}.txt") for k in ("query", "candidate")]
    for src in sources:
      parsed = _parse_labels(src, num_values, len(filenames), None if split == "train" else 1)
      for fid, a, v, where in parsed:
        if labels[fid, a] not in (-1, v):
          raise ValueError(f"{where}: image {fid} has value {v} for attribute {a} but another "
                           f"line gives {labels[fid, a]}; fix one of them.")
        labels[fid, a] = v
      if split != "train":
        kind = "query" if os.path.basename(src).startswith("query") else "candidate"
        lists[kind][split] = [(fid, a, v) for fid, a, v, _ in parsed]
    if meta is not None and split in meta.get("splits", {}):
      expected = len(meta["splits"][split]["labels"])
      if expected != len(filenames):
        raise ValueError(f"{folder}/meta.json lists {expected} {split} images but "
                         f"filenames_{split}.txt has {len(filenames)}; regenerate the set.")
    sizes = np.zeros((len(filenames), 2), np.int32)
    keep = np.ones(len(filenames), bool)
    skipped = []
    paths = [os.path.join(folder, fn) for fn in filenames]
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
      futures = [pool.submit(_check_image, p) for p in paths]
      bar = tqdm(futures, desc=f"Checking {split} images", disable=not verbose, leave=False)
      for fid, future in enumerate(bar):
        try:
          sizes[fid] = future.result()
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
          reason = f"{type(e).__name__}: {e}"
          if not skip_corrupt:
            for f in futures:
              f.cancel()
            raise ValueError(f"Cannot read image {paths[fid]} (line {fid + 1} of "
                             f"filenames_{split}.txt): {reason}; replace or remove it, or set "
                             "data.skip_corrupt=True to skip unreadable images.") from None
          keep[fid] = False
          skipped.append((fid, filenames[fid], reason))
    if skipped and verbose:
      print(f"Skipped {len(skipped)} unreadable {split} images (data.skip_corrupt=True), "
            f"e.g. {skipped[0][1]}: {skipped[0][2]}", flush=True)
    splits[split] = _Split(filenames, labels, keep, sizes, skipped)
  boxes = None
  if meta is not None:
    boxes = {s: np.asarray(meta["splits"][s]["boxes"], np.float32) for s in SPLITS}
  return dict(attributes=attributes, num_values=num_values, value_names=value_names,
              splits=splits, lists=lists, boxes=boxes)


class AsenFashion(tfds.core.GeneratorBasedBuilder):
  """The ASEN fashion attribute datasets from their official split files."""

  VERSION = tfds.core.Version(VERSION)
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=n, description=SOURCES[n]) for n in CONFIG_NAMES]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (f"Point manual_dir at the dataset folder; it must hold {LAYOUT}. "
                                  f"Sources: {SOURCES}.")

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # tfds 4.9.10 resolves this through `importlib_resources`, a Python<3.9 backport that its
    # own requirements do not install on 3.11; the module file is what it looks for.
    return epath.Path(__file__)

  def __init__(self, *, skip_corrupt=False, verbose=True, **kwargs):
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
    src = read_source(folder, self.builder_config.name, self._skip_corrupt, self._verbose)
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


def prepare_dataset(config, verbose=True):
  """Builds <data.root>/<data.folder> into data.tfds_dir unless already built; returns the path."""
  _check_name(config.data.name)
  path = builder_dir(config)
  folder = os.path.join(config.data.root, config.data.folder)
  if is_built(config):
    source = load_metadata(config).get("source")
    if verbose and source and os.path.abspath(folder) != source:
      print(f"Note: {path} was built from {source}, not {folder}; delete it to rebuild.")
    return path
  check_layout(folder, config.data.name)
  builder = AsenFashion(config=config.data.name, data_dir=config.data.tfds_dir,
                        file_format="array_record", skip_corrupt=config.data.skip_corrupt,
                        verbose=verbose)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=folder))
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
  _check_name(config.data.name)
  folder = os.path.join(config.data.root, config.data.folder)
  if is_built(config):
    meta = load_metadata(config)
    attributes, num_values = tuple(meta["attributes"]), tuple(meta["num_values"])
    value_names = tuple(tuple(v) for v in meta["value_names"])
    where = f"the dataset built at {builder_dir(config)}"
  else:
    attributes, num_values, value_names, _ = attribute_list(folder, config.data.name)
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

