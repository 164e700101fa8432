"""Benchmark: jitted JAX MAP vs a NumPy per-query loop on a FashionAI-test-sized problem.

8 attributes, 3,600 queries (the test split's per-attribute counts), 14,400 candidates
(4 per query, same attribute mix), 2,048-d L2-normalised random embeddings.

  python bench/map_speed.py [--ref_queries 400] [--chunk_size 256] [--repeats 3] [--json FILE]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from asen_jax import allocator  # noqa: E402

allocator.preload()   # before jax starts: see asen_jax/allocator.py

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from asen_jax import retrieval  # noqa: E402

QUERIES_PER_ATTR = (422, 623, 535, 422, 341, 289, 703, 265)   # FashionAI test split
VALUES_PER_ATTR = (6, 9, 8, 6, 5, 5, 10, 5)


def make_problem(dim: int, cands_per_query: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  q_attr = np.repeat(np.arange(8), QUERIES_PER_ATTR)
  c_attr = np.repeat(np.arange(8), np.array(QUERIES_PER_ATTR) * cands_per_query)
  nv = np.array(VALUES_PER_ATTR)
  q_val = rng.integers(0, nv[q_attr])
  c_val = rng.integers(0, nv[c_attr])

  def emb(n):
    x = rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)

  return emb(len(q_attr)), q_attr, q_val, emb(len(c_attr)), c_attr, c_val


def numpy_reference_ap(q_emb, q_attr, q_val, c_emb, c_attr, c_val, rows):
  """The per-query loop: score one query against its attribute's candidates, stable sort, AP."""
  groups = {a: np.flatnonzero(c_attr == a) for a in np.unique(c_attr)}
  cand_emb = {a: c_emb[g] for a, g in groups.items()}   # gathered once, as a fair loop would
  cand_val = {a: c_val[g] for a, g in groups.items()}
  out = np.zeros(len(rows))
  for j, i in enumerate(rows):
    a = q_attr[i]
    scores = cand_emb[a] @ q_emb[i]
    rel = cand_val[a][np.argsort(-scores, kind="stable")] == q_val[i]
    n_rel = rel.sum()
    if n_rel:
      hits = np.cumsum(rel)
      out[j] = np.sum(hits[rel] / (np.flatnonzero(rel) + 1)) / n_rel
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--dim", type=int, default=2048)
  p.add_argument("--cands_per_query", type=int, default=4)
  p.add_argument("--chunk_size", type=int, default=256)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--ref_queries", type=int, default=400,
                 help="queries timed for the NumPy loop (0 = all); the rest is extrapolated")
  p.add_argument("--json", default="", help="also write the figures to this JSON file")
  args = p.parse_args()

  q_emb, q_attr, q_val, c_emb, c_attr, c_val = make_problem(args.dim, args.cands_per_query)
  n_q, n_c = len(q_attr), len(c_attr)
  print(f"backend={jax.default_backend()} devices={jax.devices()[0].device_kind} "
        f"queries={n_q} candidates={n_c} dim={args.dim} chunk={args.chunk_size}")

  # Embeddings live on the device already in evaluation; keep the host->device copy out.
  q_dev, c_dev = jax.device_put(q_emb), jax.device_put(c_emb)
  jax.block_until_ready((q_dev, c_dev))

  def run_jax():
    return retrieval.average_precision(q_dev, q_attr, q_val, c_dev, c_attr, c_val,
                                       chunk_size=args.chunk_size)

  t0 = time.perf_counter()
  ap_jax = run_jax()   # includes compilation
  first = time.perf_counter() - t0
  times = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    run_jax()
    times.append(time.perf_counter() - t0)
  steady = min(times)
  print(f"JAX MAP: first call {first:.3f}s (compile ~{first - steady:.3f}s), "
        f"steady {steady:.3f}s (best of {args.repeats}: "
        f"{', '.join(f'{t:.3f}' for t in times)})")

  rng = np.random.default_rng(1)
  if args.ref_queries and args.ref_queries < n_q:
    rows = np.sort(rng.choice(n_q, size=args.ref_queries, replace=False))
  else:
    rows = np.arange(n_q)
  t0 = time.perf_counter()
  ap_ref = numpy_reference_ap(q_emb, q_attr, q_val, c_emb, c_attr, c_val, rows)
  ref_time = time.perf_counter() - t0
  ref_full = ref_time * n_q / len(rows)
  how = ("measured on all queries" if len(rows) == n_q else
         f"measured {ref_time:.3f}s on {len(rows)} queries, EXTRAPOLATED to {n_q}")
  print(f"NumPy per-query loop: {ref_full:.3f}s ({how})")
  print(f"speed-up (NumPy / JAX steady): {ref_full / steady:.1f}x")
  diff = np.abs(ap_jax[rows] - ap_ref).max()
  print(f"max |AP_jax - AP_numpy| on the compared queries: {diff:.2e}; "
        f"MAP (all queries) = {100 * ap_jax.mean():.3f}%, expected for random ranking = "
        f"{retrieval.random_ranking_map(q_attr, q_val, c_attr, c_val, 8):.3f}%")
  # BLAS and XLA round float32 dot products differently, which can swap near-tied candidates.
  # Multiples of 2**-6 give exact scores in any summation order (and many exact ties), so
  # this difference is the ranking's and AP's alone.
  q_exact, c_exact = (np.round(x * 64) / 64 for x in (q_emb, c_emb))
  ap_exact = retrieval.average_precision(jax.device_put(q_exact), q_attr, q_val,
                                         jax.device_put(c_exact), c_attr, c_val,
                                         chunk_size=args.chunk_size)
  ref_exact = numpy_reference_ap(q_exact, q_attr, q_val, c_exact, c_attr, c_val, rows)
  exact_diff = float(np.abs(ap_exact[rows] - ref_exact).max())
  print(f"same, with exactly representable scores (embeddings rounded to multiples of 2**-6): "
        f"{exact_diff:.2e}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
                 "queries": n_q, "candidates": n_c, "dim": args.dim, "first_call_s": first,
                 "steady_s": steady, "numpy_s": ref_full, "numpy_extrapolated": len(rows) != n_q,
                 "speedup": ref_full / steady, "max_ap_diff": float(diff),
                 "max_ap_diff_exact_scores": exact_diff}, f, indent=1)


if __name__ == "__main__":
  main()
