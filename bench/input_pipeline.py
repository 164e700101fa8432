"""Training input pipeline throughput (triplets/s) for 0 and 2 grain workers.

    python bench/input_pipeline.py [--root data] [--image_size 224 --hires_size 448] [--json FILE]

Uses <root>/Synthetic (generated with the default sizes if missing) and builds it into
<root>/tfds if needed. Each triplet is three decoded images, each resized twice (view + hires).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from asen_jax import allocator  # noqa: E402

allocator.preload()   # before jax starts: see asen_jax/allocator.py

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

from absl import flags  # noqa: E402

from asen_jax import data as data_lib  # noqa: E402
from asen_jax.data import synthetic  # noqa: E402
from configs import common  # noqa: E402


def _rate(config, workers, steps, warmup):
  it = iter(data_lib.make_train_loader(config, seed=0, worker_count=workers))
  try:
    t0 = time.perf_counter()
    for _ in range(warmup):
      next(it)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
      batch = next(it)
      del batch
    dt = time.perf_counter() - t0
  finally:
    it.close()
  return steps * config.train.batch_size / dt, first


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--root", default="data")
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--hires_size", type=int, default=448)
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
  parser.add_argument("--json", default="", help="also write the rates to this JSON file")
  args = parser.parse_args()
  flags.FLAGS.mark_as_parsed()

  c = common.base_config("global")
  c.data.name, c.data.root, c.data.folder = "synthetic", args.root, "Synthetic"
  c.data.tfds_dir = os.path.join(args.root, "tfds")
  c.data.image_size, c.data.hires_size = args.image_size, args.hires_size
  c.train.batch_size = args.batch_size
  if not os.path.isdir(os.path.join(args.root, "Synthetic")):
    t0 = time.perf_counter()
    synthetic.generate(args.root, workers=min(2, os.cpu_count() or 1))
    print(f"generated default synthetic set in {time.perf_counter() - t0:.1f}s")
  t0 = time.perf_counter()
  data_lib.prepare_dataset(c)
  print(f"prepare_dataset: {time.perf_counter() - t0:.1f}s")
  print(f"cpus={os.cpu_count()} image_size={args.image_size} hires_size={args.hires_size} "
        f"batch={args.batch_size} steps={args.steps}")
  rates = []
  for workers in args.workers:
    rate, first = _rate(c, workers, args.steps, args.warmup)
    print(f"workers={workers}: {rate:8.1f} triplets/s  ({rate / args.batch_size:.2f} steps/s; "
          f"first {args.warmup} batches {first:.1f}s)", flush=True)
    # Each triplet is three images, each decoded into a view and a hires view.
    rates.append({"workers": workers, "triplets_per_s": rate, "images_per_s": 3 * rate,
                  "first_batches_s": first})
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"cpus": os.cpu_count(), "image_size": args.image_size,
                 "hires_size": args.hires_size, "batch_size": args.batch_size,
                 "steps": args.steps, "rates": rates}, f, indent=1)


if __name__ == "__main__":
  main()
