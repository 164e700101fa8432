"""Attribute-specific retrieval metrics: MAP and random-ranking MAP.

MAP protocol (ASEN/ASEN++): queries and candidates are grouped by attribute; each
query is ranked against ALL candidates of its attribute by dot product; a candidate
is relevant when its value equals the query's; AP is taken over the full ranking,
`sum_k P@k * rel_k / n_relevant` (0 when nothing is relevant). Attribute MAP is the
mean AP of its queries; overall MAP is the query-weighted mean of attribute MAPs
(= the mean AP over all queries).

Tie rule: candidates are ranked by (score descending, candidate index ascending),
where the index is the row in the candidate arrays passed in. Scores are float32
dot products computed at `Precision.HIGHEST` (no TF32/bf16 passes on GPU/TPU).

The device work is one jitted call per attribute, all dispatched before any result is
fetched. A call gathers the attribute's candidates once (by ascending index, padded to a
bucketed count: < 6.25% padding, few distinct shapes) and scores its queries in chunks of
at most `chunk_size` rows, so memory stays at a few `[chunk, candidates_of_attr]` arrays.
A chunk is ranked by ONE single-operand sort of uint64 keys packing (order-preserving bits
of the score, candidate index, relevance bit): the key order is exactly the tie rule, and
AP follows from a cumulative sum of the sorted relevance bits. The keys need 64-bit
integers, so the call runs under a local `jax.enable_x64` (every input is explicitly 32-bit).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np


# --------------------------------------------------------------------------- #
# Input checking (host side; labels are small, embeddings stay where they are).
# --------------------------------------------------------------------------- #


def check_labels(x: Any, name: str, n: int | None = None) -> np.ndarray:
  arr = np.asarray(x)
  if arr.ndim != 1:
    raise ValueError(f"{name} must be a 1-D array of integers, got shape {arr.shape}.")
  if n is not None and arr.shape[0] != n:
    raise ValueError(
        f"{name} has {arr.shape[0]} entries but there are {n} rows; pass one per row.")
  if arr.dtype.kind not in "iubf" or (
      arr.dtype.kind == "f" and not np.all(np.equal(np.mod(arr, 1), 0))):
    raise ValueError(f"{name} must hold integer indices, got dtype {arr.dtype}; map names or "
                     "fractional labels to integer indices first.")
  return arr.astype(np.int64)


def check_mask(mask: Any, name: str, n: int) -> np.ndarray:
  if mask is None:
    return np.ones((n,), bool)
  arr = np.asarray(mask)
  if arr.shape != (n,):
    raise ValueError(f"{name} must be a boolean array of shape ({n},), got shape {arr.shape}.")
  return arr.astype(bool)


def _embeddings(x: Any, name: str) -> jax.Array:
  emb = jnp.asarray(x, dtype=jnp.float32)
  if emb.ndim != 2:
    raise ValueError(f"{name} must be a 2-D array [rows, dim], got shape {emb.shape}.")
  # Embeddings sharded over a mesh (a data-parallel embedding pass) are replicated on that
  # mesh: a row gather from a sharded array inside the kernel has no unambiguous sharding.
  sharding = getattr(emb, "sharding", None)
  if isinstance(sharding, jax.sharding.NamedSharding) and not sharding.is_fully_replicated:
    emb = jax.device_put(emb, jax.sharding.NamedSharding(sharding.mesh, jax.P()))
  return emb


def check_attribute_range(attr: np.ndarray, valid: np.ndarray, name: str,
                          num_attributes: int | None):
  a = attr[valid]
  if a.size and a.min() < 0:
    raise ValueError(f"{name} holds a negative attribute index ({a.min()}) in an unmasked row; "
                     "mask padded rows out instead.")
  if num_attributes is not None and a.size and a.max() >= num_attributes:
    raise ValueError(f"{name} holds attribute index {a.max()} but num_attributes is "
                     f"{num_attributes}; pass the dataset's attribute count.")


# --------------------------------------------------------------------------- #
# Device kernel.
# --------------------------------------------------------------------------- #


def _rank_keys(scores_rm, rel_rm, slot_ok_m):
  """uint64 keys whose ascending order is (score desc, column asc); bit 0 holds relevance.

  Needs x64. Columns must list candidates by ascending index, so the column breaks ties.
  """
  # -0.0 -> +0.0 first: equal scores must tie, and the index then decides.
  bits = jax.lax.bitcast_convert_type(jnp.where(scores_rm == 0, 0.0, scores_rm), jnp.uint32)
  # Bits grow with |score|: flip the positive ones (below 2**31) so keys grow as scores fall.
  desc = jnp.where(bits >> 31 == 1, bits, ~bits & jnp.uint32(0x7FFFFFFF))
  desc = jnp.where(slot_ok_m[None, :], desc, jnp.uint32(0xFFFFFFFF))  # padding after -inf
  col = jnp.arange(scores_rm.shape[1], dtype=jnp.uint64)
  return (desc.astype(jnp.uint64) << 32) | (col << 1) | rel_rm.astype(jnp.uint64)


@jax.jit
def _attribute_ap(query_emb_qd, cand_emb_nd, rows_kr, qval_kr, cand_rows_m, cand_val_m):
  """AP of the query rows `rows_kr` (chunks of one attribute, -1 = padding) -> float32 [K, R].

  `cand_rows_m` lists the attribute's candidates by ascending index (-1 = padding).
  """
  slot_ok_m = cand_rows_m >= 0
  c_md = cand_emb_nd[jnp.maximum(cand_rows_m, 0)]  # gathered once for all chunks
  ranks = jnp.arange(1, cand_rows_m.shape[0] + 1, dtype=jnp.float32)

  def one_chunk(args):
    rows_r, qv_r = args
    q_rd = query_emb_qd[jnp.maximum(rows_r, 0)]
    scores_rm = jnp.dot(q_rd, c_md.T, precision=jax.lax.Precision.HIGHEST)
    rel_rm = (qv_r[:, None] == cand_val_m[None, :]) & slot_ok_m[None, :]
    # One single-operand integer sort: far cheaper than a stable (score, relevance) sort.
    keys = _rank_keys(scores_rm, rel_rm, slot_ok_m)
    # XLA:CPU sorts on one thread; independent halves can run on two.
    h = keys.shape[0] // 2
    keys = (jnp.concatenate([jax.lax.sort(keys[:h], dimension=1),
                             jax.lax.sort(keys[h:], dimension=1)]) if h else
            jax.lax.sort(keys, dimension=1))
    rel_sorted = (keys & 1).astype(jnp.float32)
    hits = jnp.cumsum(rel_sorted, axis=1)  # integer-valued, exact in float32 below 2**24
    n_rel = hits[:, -1]
    ap = jnp.sum(rel_sorted * (hits / ranks), axis=1) / jnp.maximum(n_rel, 1.0)
    # A NaN or inf in any row used makes its scores non-finite: checked here, in the same pass.
    return ap, jnp.isfinite(scores_rm).all()

  ap, finite = jax.lax.map(one_chunk, (rows_kr, qval_kr))
  return ap, finite.all()


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _bucket(n: int) -> int:
  """Round up to a multiple of 8 and of 1/16 of n's power of two: < 6.25% padding, few shapes."""
  return _round_up(max(n, 1), max(8, 1 << max(n.bit_length() - 5, 0)))


# --------------------------------------------------------------------------- #
# Public API.
# --------------------------------------------------------------------------- #


def average_precision(query_emb, query_attr, query_val, cand_emb, cand_attr, cand_val, *,
                      query_mask=None, cand_mask=None, chunk_size: int = 256,
                      num_attributes: int | None = None) -> np.ndarray:
  """Per-query AP under the ASEN protocol -> float64 [Q] (NaN for masked-out queries).

  Args:
    query_emb: [Q, D] embeddings (host or device array); cand_emb: [N, D].
    query_attr, query_val / cand_attr, cand_val: int [Q] / [N] attribute and value indices.
    query_mask, cand_mask: optional bool [Q] / [N]; False rows (eval padding) are ignored.
    chunk_size: queries scored at once; bounds memory to chunk_size x max candidates per attribute.
    num_attributes: when given, attribute indices must lie below it.
  """
  if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
  q_emb = _embeddings(query_emb, "query_emb")
  c_emb = _embeddings(cand_emb, "cand_emb")
  if q_emb.shape[1] != c_emb.shape[1]:
    raise ValueError(f"query_emb has dimension {q_emb.shape[1]} but cand_emb has "
                     f"{c_emb.shape[1]}; embed both with the same model and mode.")
  num_q, num_c = q_emb.shape[0], c_emb.shape[0]
  q_attr = check_labels(query_attr, "query_attr", num_q)
  q_val = check_labels(query_val, "query_val", num_q)
  c_attr = check_labels(cand_attr, "cand_attr", num_c)
  c_val = check_labels(cand_val, "cand_val", num_c)
  q_ok = check_mask(query_mask, "query_mask", num_q)
  c_ok = check_mask(cand_mask, "cand_mask", num_c)
  check_attribute_range(q_attr, q_ok, "query_attr", num_attributes)
  check_attribute_range(c_attr, c_ok, "cand_attr", num_attributes)

  ap_q = np.full((num_q,), np.nan, np.float64)
  if not q_ok.any():
    return ap_q

  # Values are compared for equality only: remap to a dense int32 range so int64
  # labels survive the default 32-bit JAX mode.
  _, dense = np.unique(np.concatenate([q_val, c_val]), return_inverse=True)
  q_val32 = dense[:num_q].astype(np.int32)
  c_val32 = dense[num_q:].astype(np.int32)

  pending = []
  for a in np.unique(q_attr[q_ok]):
    rows = np.flatnonzero(q_ok & (q_attr == a))
    cands = np.flatnonzero(c_ok & (c_attr == a))  # ascending: the column order breaks ties
    if not len(cands):
      ap_q[rows] = 0.0  # nothing to retrieve, nothing relevant
      continue
    # Each attribute is scored against its own candidates only, padded to a bucketed size;
    # its queries are split into near-equal chunks of at most chunk_size rows.
    cand_rows = np.full((_bucket(len(cands)),), -1, np.int32)
    cand_rows[:len(cands)] = cands
    num_chunks = -(-len(rows) // int(chunk_size))
    per_chunk = min(int(chunk_size), _round_up(-(-len(rows) // num_chunks), 8))
    rows_kr = np.full((num_chunks * per_chunk,), -1, np.int32)
    rows_kr[:len(rows)] = rows
    rows_kr = rows_kr.reshape(num_chunks, per_chunk)
    qval_kr = q_val32[np.maximum(rows_kr, 0)]
    with jax.enable_x64(True):  # the rank keys are uint64; every input is explicitly 32-bit
      ap_kr = _attribute_ap(q_emb, c_emb, rows_kr, qval_kr, cand_rows, c_val32[cand_rows])
    pending.append((rows_kr, ap_kr))  # dispatched asynchronously; fetched below
  for rows_kr, (ap_kr, finite) in pending:
    # NaN/inf would sort unpredictably and silently corrupt the ranking.
    if not bool(finite):
      raise ValueError("query_emb or cand_emb holds NaN or inf values; check the model "
                       "outputs (e.g. a diverged checkpoint) before evaluating.")
    real = rows_kr >= 0
    ap_q[rows_kr[real]] = np.asarray(jax.device_get(ap_kr), np.float64)[real]
  return ap_q


def _summarise(ap_q: np.ndarray, q_attr: np.ndarray, q_ok: np.ndarray, num_attributes: int,
               attribute_names: Sequence[str] | None, key: str) -> dict[str, Any]:
  """Per-attribute and query-weighted overall means, in percent."""
  names = attribute_names_list(attribute_names, num_attributes)
  per_attr, counts = {}, {}
  for a, name in enumerate(names):
    sel = q_ok & (q_attr == a)
    counts[name] = int(sel.sum())
    per_attr[name] = float(100.0 * ap_q[sel].mean()) if counts[name] else float("nan")
  if not q_ok.any():
    raise ValueError("No queries to evaluate: every query is masked out; check query_mask "
                     "and the query split file.")
  return {f"{key}_overall": float(100.0 * ap_q[q_ok].mean()),
          f"{key}_per_attribute": per_attr,
          "num_queries": counts}


def attribute_names_list(attribute_names, num_attributes: int) -> list[str]:
  if not isinstance(num_attributes, (int, np.integer)) or num_attributes < 1:
    raise ValueError(f"num_attributes must be a positive integer, got {num_attributes!r}.")
  if attribute_names is None:
    return [f"attribute_{a}" for a in range(num_attributes)]
  names = [str(n) for n in attribute_names]
  if len(names) != num_attributes:
    raise ValueError(f"attribute_names has {len(names)} names but num_attributes is "
                     f"{num_attributes}; pass one name per attribute.")
  if len(set(names)) != len(names):
    raise ValueError(f"attribute_names has duplicates: {names}; names must be unique.")
  return names


def mean_average_precision(query_emb, query_attr, query_val, cand_emb, cand_attr, cand_val,
                           num_attributes: int, attribute_names: Sequence[str] | None = None, *,
                           query_mask=None, cand_mask=None, chunk_size: int = 256
                           ) -> dict[str, Any]:
  """ASEN MAP -> dict(map_overall=%, map_per_attribute={name: %}, num_queries={name: int}).

  Attributes without queries report count 0 and NaN MAP and carry no weight.
  """
  names = attribute_names_list(attribute_names, num_attributes)
  ap_q = average_precision(query_emb, query_attr, query_val, cand_emb, cand_attr, cand_val,
                           query_mask=query_mask, cand_mask=cand_mask, chunk_size=chunk_size,
                           num_attributes=num_attributes)
  # Only masked-out queries have no AP.
  return _summarise(ap_q, np.asarray(query_attr).astype(np.int64), ~np.isnan(ap_q),
                    num_attributes, names, "map")


def expected_random_ap(num_candidates, num_relevant) -> np.ndarray:
  """Exact E[AP] of a uniformly random ranking of N candidates with R relevant (broadcasts).

  E[P@k * rel_k] = (R/N) * (1 + (k-1)(R-1)/(N-1)) / k, so summing over k and dividing by R,
  E[AP] = (H_N + (R-1)/(N-1) * (N - H_N)) / N with H_N the N-th harmonic number
  (1 when N = R = 1; 0 when R = 0).
  """
  n = np.asarray(num_candidates, np.float64)
  r = np.asarray(num_relevant, np.float64)
  if np.any(r > n) or np.any(r < 0):
    raise ValueError("num_relevant must lie in [0, num_candidates].")
  n_max = int(n.max()) if n.size else 0
  harmonic = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, n_max + 1))])
  h_n = harmonic[n.astype(np.int64)]
  safe_n = np.maximum(n, 1.0)
  frac = np.where(n > 1, (r - 1) / np.maximum(n - 1, 1.0), 0.0)
  e_ap = (h_n + frac * (n - h_n)) / safe_n
  return np.where(r > 0, e_ap, 0.0)


def random_ranking_map(query_attr, query_val, cand_attr, cand_val, num_attributes: int,
                       attribute_names: Sequence[str] | None = None, *, query_mask=None,
                       cand_mask=None, per_attribute: bool = False) -> float | dict[str, Any]:
  """Exact expected MAP (%) of a uniformly random ranking under the same protocol.

  Returns the overall value as a float, or with `per_attribute=True` a dict laid out like
  mean_average_precision's (map_overall, map_per_attribute, num_queries).
  """
  names = attribute_names_list(attribute_names, num_attributes)
  q_attr = check_labels(query_attr, "query_attr")
  q_val = check_labels(query_val, "query_val", q_attr.shape[0])
  c_attr = check_labels(cand_attr, "cand_attr")
  c_val = check_labels(cand_val, "cand_val", c_attr.shape[0])
  q_ok = check_mask(query_mask, "query_mask", q_attr.shape[0])
  c_ok = check_mask(cand_mask, "cand_mask", c_attr.shape[0])
  check_attribute_range(q_attr, q_ok, "query_attr", num_attributes)
  check_attribute_range(c_attr, c_ok, "cand_attr", num_attributes)
  # Count candidates per attribute and per (attribute, value) pair.
  n_per_attr = np.bincount(c_attr[c_ok], minlength=num_attributes)
  _, dense = np.unique(np.concatenate([q_val, c_val]), return_inverse=True)
  width = int(dense.max()) + 1 if dense.size else 1
  key_q = np.where(q_ok, q_attr, 0) * width + dense[:q_attr.shape[0]]
  key_c = c_attr[c_ok] * width + dense[q_attr.shape[0]:][c_ok]
  uniq, cnt = np.unique(key_c, return_counts=True)
  uniq = np.append(uniq, -1)  # sentinel: keys absent from the candidates count 0
  cnt = np.append(cnt, 0)
  pos = np.minimum(np.searchsorted(uniq[:-1], key_q), len(uniq) - 1)
  r_q = np.where(uniq[pos] == key_q, cnt[pos], 0)
  n_q = n_per_attr[np.where(q_ok, q_attr, 0)]
  ap_q = np.where(q_ok, expected_random_ap(n_q, r_q), np.nan)
  res = _summarise(ap_q, q_attr, q_ok, num_attributes, names, "map")
  return res if per_attribute else res["map_overall"]


__all__ = [
    "average_precision", "mean_average_precision", "expected_random_ap", "random_ranking_map",
]
