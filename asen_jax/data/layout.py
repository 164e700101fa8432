"""The official ASEN split-file layout of a dataset folder: checked, parsed, every image decoded.

<folder>/filenames_{train,valid,test}.txt  one image path per line; the 0-based line is the id
<folder>/label_train.txt                   "fid a1 v1 [a2 v2 ...]"
<folder>/{query,candidate}_{valid,test}.txt  "fid attr value"
Every error names the file and line and says what to fix.
"""
import concurrent.futures
import io
import json
import os
from typing import NamedTuple

import numpy as np
from PIL import Image
from tqdm import tqdm

SPLITS = ("train", "valid", "test")
EVAL_SPLITS = ("valid", "test")

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


def check_name(name):
  if name not in CONFIG_NAMES:
    raise ValueError(f"data.name={name!r} is not a dataset this project knows; use one of "
                     f"{', '.join(CONFIG_NAMES)}.")


def check_layout(folder, name):
  """Raises one FileNotFoundError naming the expected layout when a split file is missing."""
  check_name(name)
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


def attribute_list(folder, name, attributes=(), num_values=()):
  """(attributes, num_values, value_names, meta_or_None) before any build: the synthetic set's
  from its meta.json, a public dataset's as its config names them (configs/<dataset>.py)."""
  check_name(name)
  if name == "synthetic":
    path = os.path.join(folder, "meta.json")
    if not os.path.isfile(path):
      check_layout(folder, name)
    with open(path) as f:
      meta = json.load(f)
    return (tuple(meta["attributes"]), tuple(meta["num_values"]),
            tuple(tuple(v) for v in meta["value_names"]), meta)
  if not attributes or len(attributes) != len(num_values):
    raise ValueError(f"The {name} config names {len(attributes)} attributes and "
                     f"{len(num_values)} value counts; set data.attributes and data.num_values "
                     f"(configs/{name}.py has them).")
  value_names = tuple(tuple(f"{a}_{v}" for v in range(k)) for a, k in zip(attributes, num_values))
  return tuple(attributes), tuple(num_values), value_names, None


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


def read_source(folder, name, attributes=(), num_values=(), skip_corrupt=False, verbose=True):
  """Parses and checks the official layout; decodes every image once to catch corrupt ones."""
  check_layout(folder, name)
  attributes, num_values, value_names, meta = attribute_list(folder, name, attributes,
                                                             num_values)
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
