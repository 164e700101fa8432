"""FAISS indexes of unit embeddings under inner product: flat, sq8, pq and IVF-PQ, with ids.

Every kind is wrapped so that vectors carry our item ids (add with ids, remove by id). The
quantised kinds learn from the vectors they are built with (a sample of at most `train_size`).
"""
import dataclasses
import math

import faiss
import numpy as np

KINDS = ("flat", "sq8", "pq", "ivf")


@dataclasses.dataclass(frozen=True)
class IndexSpec:
  """How to build one index: kind, dimension, PQ bytes a vector, IVF lists (0: by catalog
  size), and at most how many vectors train the quantisers."""
  kind: str
  dim: int
  pq_bytes: int = 64
  nlist: int = 0
  train_size: int = 100_000

  def to_dict(self):
    return dataclasses.asdict(self)


def check_spec(spec):
  """One sentence when a spec cannot be built (raised before any embedding is computed)."""
  if spec.kind not in KINDS:
    raise ValueError(f"Unknown index kind {spec.kind!r}; use one of {', '.join(KINDS)}.")
  if spec.kind in ("pq", "ivf") and (spec.pq_bytes < 1 or spec.dim % spec.pq_bytes):
    divisors = [m for m in (8, 16, 32, 64, 128, 256) if spec.dim % m == 0 and m <= spec.dim]
    raise ValueError(f"--pq_bytes={spec.pq_bytes} must divide the embedding size {spec.dim}; "
                     f"use one of {divisors}.")


def min_train_vectors(spec):
  """Vectors needed to train the quantisers (8-bit codes: 256 centroids per sub-space)."""
  return {"flat": 0, "sq8": 1, "pq": 256, "ivf": 256}[spec.kind]


def _nlist(spec, n):
  # About 4 sqrt(n) lists, each trained on at least 39 vectors (FAISS's rule of thumb).
  return spec.nlist or int(max(1, min(4 * math.sqrt(n), n // 39)))


def build(spec, vectors, ids, seed=0):
  """A new index of `spec` trained on (a sample of) `vectors` float32 [n, dim], holding them
  under int64 `ids`."""
  check_spec(spec)
  x = np.ascontiguousarray(vectors, np.float32)
  ip = faiss.METRIC_INNER_PRODUCT
  if spec.kind == "flat":
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(spec.dim))
  elif spec.kind == "sq8":
    index = faiss.IndexIDMap2(faiss.IndexScalarQuantizer(spec.dim, faiss.ScalarQuantizer.QT_8bit,
                                                         ip))
  elif spec.kind == "pq":
    index = faiss.IndexIDMap2(faiss.IndexPQ(spec.dim, spec.pq_bytes, 8, ip))
  else:
    quantizer = faiss.IndexFlatIP(spec.dim)
    # FAISS's Python wrapper keeps `quantizer` alive as long as the IVF index.
    index = faiss.IndexIVFPQ(quantizer, spec.dim, _nlist(spec, len(x)), spec.pq_bytes, 8, ip)
  if len(x) < min_train_vectors(spec):
    raise ValueError(f"A {spec.kind} index needs at least {min_train_vectors(spec)} vectors to "
                     f"train its 256 centroids per code byte, got {len(x)}; use --kind=flat or "
                     "--kind=sq8 for a catalog this small.")
  if not index.is_trained:
    for cp in _clusterings(index):
      cp.min_points_per_centroid = 1   # small catalogs train on what they have, without warnings
    rng = np.random.default_rng(seed)
    sample = x if len(x) <= spec.train_size else x[np.sort(rng.choice(len(x), spec.train_size,
                                                                      replace=False))]
    index.train(sample)
  add(index, x, ids)
  return index


def _clusterings(index):
  inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
  return [x.cp for x in (getattr(inner, "pq", None), inner) if x is not None and hasattr(x, "cp")]


def add(index, vectors, ids):
  if len(vectors):
    index.add_with_ids(np.ascontiguousarray(vectors, np.float32),
                       np.ascontiguousarray(ids, np.int64))


def remove(index, ids):
  """Removes the vectors of `ids`; returns how many were there."""
  return int(index.remove_ids(np.ascontiguousarray(ids, np.int64)))


def search(index, queries, k, nprobe=None):
  """(scores float32 [q, k], ids int64 [q, k]) best first; id -1 where fewer than k came back
  (an IVF index visits only `nprobe` lists)."""
  if nprobe is not None and isinstance(index, faiss.IndexIVF):
    index.nprobe = int(nprobe)
  k = max(1, min(int(k), index.ntotal))
  return index.search(np.ascontiguousarray(queries, np.float32), k)


def code_bytes(index):
  """Bytes of one stored vector's code (the ids, 8 bytes each, come on top)."""
  inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
  return int(inner.sa_code_size())


def write(index, path):
  faiss.write_index(index, path)


def read(path):
  return faiss.read_index(path)
