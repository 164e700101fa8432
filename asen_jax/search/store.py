"""An index folder on disk: one FAISS index per attribute plus meta.json, replaced atomically.

  <dir>/CURRENT            the name of the live version folder
  <dir>/v<N>/meta.json     items (paths; None once removed), attributes, fingerprint, config, spec
  <dir>/v<N>/attr_<a>.faiss
A write goes to a hidden temporary folder, becomes v<N+1>, and only then does CURRENT (swapped
with os.replace) point at it: a build or add that dies midway leaves the previous index as it was.
"""
import dataclasses
import json
import os
import shutil
import tempfile

from asen_jax.search import faiss_index

FORMAT = 1
_CURRENT = "CURRENT"


@dataclasses.dataclass
class SearchIndex:
  """What an index folder holds; `indexes[a]` is attribute a's FAISS index over item ids."""
  meta: dict
  indexes: list

  @property
  def attributes(self):
    return self.meta["attributes"]

  @property
  def items(self):
    return self.meta["items"]

  def live_items(self):
    return [(i, p) for i, p in enumerate(self.items) if p is not None]


def new_meta(*, attributes, fingerprint, checkpoint, stage, config_json, spec, nprobe, catalog):
  return {"format": FORMAT, "attributes": list(attributes), "fingerprint": fingerprint,
          "checkpoint": os.path.abspath(checkpoint), "stage": stage, "config": config_json,
          "spec": spec.to_dict(), "nprobe": nprobe, "catalog": catalog, "items": []}


def _current_version(directory):
  path = os.path.join(directory, _CURRENT)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return f.read().strip()


def exists(directory):
  return _current_version(directory) is not None


def read(directory):
  """The live SearchIndex of `directory`; one sentence when there is none."""
  version = _current_version(directory)
  if version is None:
    raise FileNotFoundError(f"No search index in {os.path.abspath(directory)}; build one with "
                            "`python search.py build --index ...` (or check the path).")
  folder = os.path.join(directory, version)
  with open(os.path.join(folder, "meta.json")) as f:
    meta = json.load(f)
  if meta.get("format") != FORMAT:
    raise ValueError(f"The index in {directory} has format {meta.get('format')}, this code reads "
                     f"format {FORMAT}; rebuild it.")
  indexes = [faiss_index.read(os.path.join(folder, f"attr_{a}.faiss"))
             for a in range(len(meta["attributes"]))]
  return SearchIndex(meta, indexes)


def write(index, directory, before_commit=None):
  """Writes `index` as the next version of `directory` and makes it live; returns its folder.

  `before_commit(tmp_folder)` runs after the files are written and before the switch (tests use
  it to interrupt a write at the worst moment).
  """
  os.makedirs(directory, exist_ok=True)
  old = _current_version(directory)
  number = int(old[1:]) + 1 if old else 1
  tmp = tempfile.mkdtemp(prefix=".writing-", dir=directory)
  for a, faiss_ix in enumerate(index.indexes):
    faiss_index.write(faiss_ix, os.path.join(tmp, f"attr_{a}.faiss"))
  with open(os.path.join(tmp, "meta.json"), "w") as f:
    json.dump(index.meta, f)
  if before_commit is not None:
    before_commit(tmp)
  version = f"v{number}"
  final = os.path.join(directory, version)
  shutil.rmtree(final, ignore_errors=True)   # a version an interrupted write left unnamed
  os.rename(tmp, final)
  pointer = os.path.join(directory, f".{_CURRENT}.tmp")
  with open(pointer, "w") as f:
    f.write(version + "\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(pointer, os.path.join(directory, _CURRENT))   # the atomic switch
  for name in os.listdir(directory):   # earlier versions and leftovers of interrupted writes
    stale = name.startswith(".writing-") or (name[:1] == "v" and name[1:].isdigit())
    if stale and name != version:
      shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
  return final
