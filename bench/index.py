"""Benchmark: the search index kinds, and search with a model, on this machine's CPUs.

1. Vectors (2,048-d random unit vectors, queries too): for each kind, bytes per (image,
   attribute), build time, single-query latency (median, p99) and recall@10 against flat, on a
   FashionAI-test-sized catalog (8 attributes, 14,400 candidates) and on one attribute of a
   100,000-image catalog.
2. --demo runs/demo (a finished `python demo.py`): test MAP through each kind next to the exact
   MAP of evaluation's embeddings; a 1,000-image folder indexed with the demo's joint model; a
   query on the warm model, the query image's embedding included (median, p99).

3. --paper_images N: the paper-size model (random weights) indexes N synthetic images; warm
   queries on it.

  python bench/index.py [--demo runs/demo] [--data_root data] [--paper_images 1000]
      [--vectors both|fashionai|100k|none] [--train_size 20000] [--queries 200]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from asen_jax import allocator  # noqa: E402

allocator.preload()   # before jax starts: see asen_jax/allocator.py

import argparse  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from asen_jax.search import faiss_index  # noqa: E402
from asen_jax.search import quality  # noqa: E402

CANDIDATES_PER_ATTR = tuple(4 * q for q in (422, 623, 535, 422, 341, 289, 703, 265))


def unit(rng, n, dim):
  x = rng.standard_normal((n, dim), dtype=np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def latency(ix, queries, nprobe):
  times = []
  for q in queries:
    t0 = time.perf_counter()
    faiss_index.search(ix, q[None], 10, nprobe)
    times.append(time.perf_counter() - t0)
  return 1e3 * np.median(times), 1e3 * np.percentile(times, 99)


def bench_vectors(name, sizes, dim, n_queries, nprobe, train_size, seed=0):
  rng = np.random.default_rng(seed)
  catalogs = [unit(rng, n, dim) for n in sizes]
  queries = unit(rng, n_queries, dim)
  print(f"\n{name}: {len(sizes)} attribute(s), {sum(sizes):,} vectors of {dim} float32, "
        f"{n_queries} single queries, top 10, quantisers trained on <= {train_size:,} vectors")
  print(f"{'kind':<6}{'bytes/vector':>14}{'of flat':>9}{'build s':>9}{'median ms':>11}"
        f"{'p99 ms':>9}{'recall@10':>11}")
  exact = {}
  for kind in faiss_index.KINDS:
    spec = faiss_index.IndexSpec(kind, dim, pq_bytes=64, train_size=train_size)
    t0 = time.perf_counter()
    indexes = [faiss_index.build(spec, x, np.arange(len(x))) for x in catalogs]
    build_s = time.perf_counter() - t0
    lat = np.array([latency(ix, queries, nprobe) for ix in indexes]).mean(axis=0)
    recall = []
    for a, ix in enumerate(indexes):
      ids = faiss_index.search(ix, queries, 10, nprobe)[1]
      exact.setdefault(a, ids)
      recall.append(quality.recall_at_k(exact[a], ids))
    size = faiss_index.code_bytes(indexes[0])
    print(f"{kind:<6}{size:>14,}{size / (4 * dim):>9.3f}{build_s:>9.2f}{lat[0]:>11.3f}"
          f"{lat[1]:>9.3f}{np.mean(recall):>11.3f}")


def bench_demo(workdir, data_root, n_queries):
  from asen_jax import evaluation  # pylint: disable=g-import-not-at-top
  from asen_jax import retrieval  # pylint: disable=g-import-not-at-top
  from asen_jax.search import service  # pylint: disable=g-import-not-at-top
  from asen_jax.search import store  # pylint: disable=g-import-not-at-top
  index_dir = os.path.join(workdir, "index")
  searcher = service.Searcher(index_dir)
  emb = searcher.embedder
  config = emb.config
  queries, cands = evaluation.embed_split(config, emb.variables, emb.embed_fn, emb.mesh, "test")
  names = list(emb.attributes)
  exact = retrieval.mean_average_precision(
      queries.emb, queries.attribute, queries.value, cands.emb, cands.attribute, cands.value,
      num_attributes=len(names), attribute_names=names)
  dim = cands.emb.shape[1]
  print(f"\nTest MAP (%) of the demo's joint model ({workdir}) through each index kind; "
        f"{dim}-d fused embeddings, {len(cands.emb)} candidates, {len(queries.emb)} queries")
  kinds = [("flat", {}), ("sq8", {}), ("pq", {"pq_bytes": dim // 4}),
           ("pq", {"pq_bytes": dim // 16}), ("ivf", {"pq_bytes": dim // 4})]
  print(f"{'kind':<10}{'bytes/vector':>14}{'of flat':>9}" + "".join(f"{n:>10}" for n in names)
        + f"{'overall':>10}{'loss':>8}")
  print(f"{'exact':<10}{4 * dim:>14}{1:>9.3f}" + "".join(
      f"{exact['map_per_attribute'][n]:>10.2f}" for n in names)
        + f"{exact['map_overall']:>10.2f}{0:>8.2f}")
  for kind, extra in kinds:
    spec = faiss_index.IndexSpec(kind, dim, **extra)
    per, total = {}, 0.0
    for a, n in enumerate(names):
      rows = np.flatnonzero(cands.attribute == a)
      ix = faiss_index.build(spec, cands.emb[rows], np.arange(len(rows)))
      q = queries.attribute == a
      per[n] = quality.map_through_index(ix, queries.emb[q], queries.value[q],
                                         cands.value[rows], nprobe=16)
      total += per[n] * q.sum()
    overall = total / len(queries.emb)
    label = kind if kind in ("flat", "sq8") else f"{kind} {spec.pq_bytes}B"
    size = faiss_index.code_bytes(ix)
    print(f"{label:<10}{size:>14}{size / (4 * dim):>9.3f}" + "".join(f"{per[n]:>10.2f}"
                                                                      for n in names)
          + f"{overall:>10.2f}{exact['map_overall'] - overall:>8.2f}")

  folder = os.path.join(data_root, "Synthetic", "images")
  files = sorted(os.path.join(d, f) for s in ("test", "valid")
                 for d, _, fs in os.walk(os.path.join(folder, s)) for f in fs)[:1000]
  tmp = tempfile.mkdtemp(prefix="bench_index_")
  try:
    for f in files:
      dst = os.path.join(tmp, "catalog", os.path.basename(os.path.dirname(f)),
                         os.path.basename(f))
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      shutil.copyfile(f, dst)
    t0 = time.perf_counter()
    service.build(config, searcher.index.meta["checkpoint"], os.path.join(tmp, "index"),
                  {"kind": "flat"}, images=[os.path.join(tmp, "catalog")])
    build_s = time.perf_counter() - t0
    folder_index = store.read(os.path.join(tmp, "index"))
    print(f"\nA {len(files)}-image folder, {len(names)} attributes, flat: indexed in "
          f"{build_s:.1f} s (model load, compile and embedding included), "
          f"{len(folder_index.items)} images")
  finally:
    shutil.rmtree(tmp, ignore_errors=True)

  paths = [p for _, p in searcher.index.live_items()]
  med, p99 = _timed_queries(searcher, paths, names, n_queries)
  print(f"A query on the warm model (decode, embed the query image, search one attribute of "
        f"about {len(cands.emb) // len(names)} images, top 10): median {med:.1f} ms, p99 "
        f"{p99:.1f} ms over {n_queries} queries")


def _timed_queries(searcher, paths, names, n_queries):
  searcher.query(paths[0], names[0], 10)   # compiles the one-image step
  times = []
  for i in range(n_queries):
    t0 = time.perf_counter()
    searcher.query(paths[i % len(paths)], names[i % len(names)], 10)
    times.append(time.perf_counter() - t0)
  return 1e3 * np.median(times), 1e3 * np.percentile(times, 99)


def bench_paper_size(data_root, n_images, n_queries):
  """The paper's model (ResNet-50 + ResNet-34, 224 px, 8 FashionAI attributes, random weights):
  a folder of synthetic images indexed, then warm queries."""
  import jax  # pylint: disable=g-import-not-at-top
  from asen_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from asen_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  from asen_jax.search import service  # pylint: disable=g-import-not-at-top
  from configs import fashionai  # pylint: disable=g-import-not-at-top
  config = fashionai.get_config("joint")
  names = list(config.data.attributes)
  model = model_lib.build_model(config.model, len(names), with_local=True)
  variables = model_lib.init_variables(model, jax.random.key(0))
  tmp = tempfile.mkdtemp(prefix="bench_index_paper_")
  try:
    ckpt_lib.save_model_variables(os.path.join(tmp, "ckpt"), jax.device_get(variables), {
        "attributes": names, "stage": "joint", "model": config.model.to_dict()})
    folder = os.path.join(data_root, "Synthetic", "images")
    files = sorted(os.path.join(d, f) for s in ("test", "valid", "train")
                   for d, _, fs in os.walk(os.path.join(folder, s)) for f in fs)[:n_images]
    t0 = time.perf_counter()
    index = service.build(config, os.path.join(tmp, "ckpt"), os.path.join(tmp, "index"),
                          {"kind": "flat"}, images=files)
    build_s = time.perf_counter() - t0
    searcher = service.Searcher(os.path.join(tmp, "index"))
    med, p99 = _timed_queries(searcher, files, names, n_queries)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  print(f"\nPaper-size model (random weights, {len(names)} attributes, fused "
        f"{2 * config.model.embed_dim}-d): {len(index.items)} images indexed in {build_s:.1f} s "
        f"({1e3 * build_s / len(index.items):.0f} ms an image, model load and compile included); "
        f"a warm query (decode, embed, search one attribute): median {med:.0f} ms, p99 "
        f"{p99:.0f} ms over {n_queries} queries")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--demo", default=None, help="A finished demo workdir (runs/demo).")
  parser.add_argument("--data_root", default="data", help="The demo's --data_root.")
  parser.add_argument("--vectors", default="both", choices=["both", "fashionai", "100k", "none"],
                      help="Which random-vector catalogs to time.")
  parser.add_argument("--train_size", type=int, default=20_000,
                      help="Vectors that train the quantisers of the random-vector catalogs.")
  parser.add_argument("--paper_images", type=int, default=0,
                      help="Also index this many synthetic images with the paper-size model.")
  parser.add_argument("--queries", type=int, default=200)
  parser.add_argument("--nprobe", type=int, default=16)
  args = parser.parse_args()
  if args.vectors in ("both", "fashionai"):
    bench_vectors("FashionAI-test-sized catalog", CANDIDATES_PER_ATTR, 2048, args.queries,
                  args.nprobe, args.train_size)
  if args.vectors in ("both", "100k"):
    bench_vectors("One attribute of a 100,000-image catalog", (100_000,), 2048, args.queries,
                  args.nprobe, args.train_size)
  if args.demo:
    bench_demo(args.demo, args.data_root, args.queries)
  if args.paper_images:
    bench_paper_size(args.data_root, args.paper_images, min(args.queries, 50))


if __name__ == "__main__":
  main()
