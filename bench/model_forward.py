"""Images/s of the ASEN++ embeddings: the two branches alone, and the evaluation of a split.

  python bench/model_forward.py [--batch 32] [--iters 10] [--dtype float32|bfloat16] [--size demo]
  python bench/model_forward.py --split_images 32 [--size paper|demo] [--stage joint|global]
      [--eval_batch 16] [--lines_per_image 5] [--reps 3] [--per_line] [--torch]

Without --split_images: eval-mode forward (`embed_global` / `embed_local`) at the paper's sizes,
jitted, one warm-up call, timed with block_until_ready.
With it: a synthetic test split of that many images (5 lines each, over the query and candidate
files; --lines_per_image keeps fewer, 1 as in FashionAI) is embedded by `evaluation.embed_split`
(each image decoded and run through the global backbone once), at the paper's model sizes
(configs/fashionai.py, random weights) or the demo's (configs/synthetic.py, the shipped backbone
in both branches, random heads); --per_line also times the earlier way, every line on its own
(tests/per_line_reference.py), interleaved with it on the same weights, and checks both give the
same embeddings and MAP; --torch times the PyTorch reference model (tests/torch_reference.py)
per line on the same views (model only: views decoded beforehand, crops centred).
Runs on the default JAX backend (CPU here, GPU/TPU where installed). --json FILE also writes
the figures.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from asen_jax import allocator  # noqa: E402

allocator.preload()   # before jax starts: see asen_jax/allocator.py

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402  pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top

from asen_jax import data as data_lib  # noqa: E402  pylint: disable=g-import-not-at-top
from asen_jax import end_to_end  # noqa: E402  pylint: disable=g-import-not-at-top
from asen_jax import evaluation  # noqa: E402  pylint: disable=g-import-not-at-top
from asen_jax import model as model_lib  # noqa: E402  pylint: disable=g-import-not-at-top
from asen_jax import parallel  # noqa: E402  pylint: disable=g-import-not-at-top
from asen_jax import retrieval  # noqa: E402  pylint: disable=g-import-not-at-top
from asen_jax import warm_start  # noqa: E402  pylint: disable=g-import-not-at-top
from asen_jax.data import builder  # noqa: E402  pylint: disable=g-import-not-at-top
from asen_jax.data import synthetic  # noqa: E402  pylint: disable=g-import-not-at-top
from configs import common  # noqa: E402  pylint: disable=g-import-not-at-top
from configs import fashionai  # noqa: E402  pylint: disable=g-import-not-at-top
from configs import synthetic as synthetic_config  # noqa: E402  pylint: disable=g-import-not-at-top


def write_json(args, record):
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
                 "dtype": args.dtype, **record}, f, indent=1)


def time_forward(args):
  base = (synthetic_config.get_config("joint") if args.size == "demo"
          else common.base_config("joint"))
  config, image_size = base.model, base.data.image_size
  model = model_lib.build_model(config, 8, with_local=True, dtype=args.dtype)
  t0 = time.perf_counter()
  variables = jax.block_until_ready(model_lib.init_variables(
      model, jax.random.key(0), image_size, config.local_size))
  print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), dtype {args.dtype}, "
        f"batch {args.batch}; init {time.perf_counter() - t0:.1f}s")
  rng = np.random.RandomState(0)
  attrs = jnp.asarray(rng.randint(0, 8, args.batch), jnp.int32)
  record = {"mode": "forward", "size": args.size, "batch": args.batch}
  for method, size in (("embed_global", image_size), ("embed_local", config.local_size)):
    fn = jax.jit(lambda v, x, a, m=method: model.apply(v, x, a, method=m))
    x = jnp.asarray(rng.randn(args.batch, size, size, 3), jnp.float32)
    t0 = time.perf_counter()
    jax.block_until_ready(fn(variables, x, attrs))  # compile + warm-up
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.iters):
      out = fn(variables, x, attrs)
    jax.block_until_ready(out)
    dt = (time.perf_counter() - t0) / args.iters
    print(f"{method:12s} {size}x{size}: {args.batch / dt:9.1f} images/s "
          f"({dt * 1e3:.1f} ms/batch; first call {compile_s:.1f}s)")
    record[method] = {"image_size": size, "images_per_s": args.batch / dt,
                      "first_call_s": compile_s}
  write_json(args, record)


def split_config(args, root):
  """The synthetic config on the data in `root`, at the paper's or the demo's sizes."""
  c = synthetic_config.get_config(args.stage)
  if args.size == "paper":
    paper = fashionai.get_config(args.stage)
    for field in model_lib.MODEL_FIELDS + ("local_size", "roi_threshold"):
      c.model[field] = paper.model[field]
    for field in ("image_size", "hires_size", "decode_cache_mb"):
      c.data[field] = paper.data[field]
  c.model.compute_dtype = args.dtype
  c.data.root, c.data.tfds_dir = root, os.path.join(root, "tfds")
  c.eval.batch_size = args.eval_batch
  return c


def overall_map(q, c, num_attributes):
  return retrieval.mean_average_precision(
      q["emb"], q["attribute"], q["value"], c["emb"], c["attribute"], c["value"],
      num_attributes=num_attributes)["map_overall"]


def time_split(args, root):
  from tests import per_line_reference  # pylint: disable=g-import-not-at-top
  synthetic.generate(root, seed=0, num_train=8, num_valid=8, num_test=args.split_images)
  for which in ("query", "candidate"):   # image i keeps attributes i, i + 1, ... (mod 5)
    path = os.path.join(root, "Synthetic", f"{which}_test.txt")
    with open(path) as f:
      rows = [line.split() for line in f if line.strip()]
    with open(path, "w") as f:
      f.writelines(" ".join(r) + "\n" for r in rows
                   if (int(r[1]) - int(r[0])) % 5 < args.lines_per_image)
  config = split_config(args, root)
  with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
    data_lib.prepare_dataset(config, verbose=False)
  info = data_lib.dataset_info(config)
  joint = args.stage == "joint"
  model = model_lib.build_model(config.model, len(info.attributes), with_local=joint)
  mesh = parallel.make_mesh()
  variables = model_lib.init_variables(model, jax.random.key(0), config.data.image_size,
                                       config.model.local_size)
  if args.size == "demo":   # random backbones put every cosine near 0.99: near-ties everywhere
    files = config.model.init_backbones
    files.global_file = files.local_file = end_to_end.SHIPPED_BACKBONE
    variables = warm_start.load_backbones(config, variables, joint)
  variables = parallel.replicate(mesh, variables)
  lines = sum(len(builder.eval_lines(config, "test", w)) for w in ("query", "candidate"))
  print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), {args.size} size "
        f"({config.model.global_backbone} at {config.data.image_size}, hires "
        f"{config.data.hires_size}, {config.model.local_backbone} at {config.model.local_size}), "
        f"stage {args.stage}, dtype {args.dtype}, eval.batch_size {args.eval_batch}; "
        f"{args.split_images} images, {lines} lines")

  embed_fn = evaluation.make_embed_fn(config, model, joint, mesh)
  line_fn = per_line_reference.make_line_embed_fn(config, model, joint, mesh)

  def by_image():
    q, c = evaluation.embed_split(config, variables, embed_fn, mesh, "test")
    return [{k: getattr(e, k) for k in ("emb", "attribute", "value")} for e in (q, c)]

  def by_line():
    return [per_line_reference.embed_file(config, variables, line_fn, mesh, "test", w)
            for w in ("query", "candidate")]

  paths = {"by image": by_image, **({"per line": by_line} if args.per_line else {})}
  times, outs = {k: [] for k in paths}, {}
  for name, fn in paths.items():   # compile and warm up (and fill the decode cache, if any)
    t0 = time.perf_counter()
    outs[name] = fn()
    print(f"{name:9s} first pass {time.perf_counter() - t0:.1f}s")
  for _ in range(args.reps):       # interleaved, so drift hits both
    for name, fn in paths.items():
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
  for name, ts in times.items():
    best = min(ts)
    print(f"{name:9s} {args.split_images / best:8.2f} images/s {lines / best:8.2f} lines/s "
          f"(best of {len(ts)}: {best:.2f}s; all {', '.join(f'{t:.2f}' for t in ts)})")
  best = min(times["by image"])
  write_json(args, {"mode": "split", "size": args.size, "stage": args.stage,
                    "images": args.split_images, "lines": lines, "eval_batch": args.eval_batch,
                    "images_per_s": args.split_images / best, "lines_per_s": lines / best})
  if args.per_line:
    ratio = min(times["per line"]) / min(times["by image"])
    diff = max(float(np.abs(a["emb"] - b["emb"]).max())
               for a, b in zip(outs["by image"], outs["per line"]))
    maps = [overall_map(*outs[k], len(info.attributes)) for k in ("by image", "per line")]
    print(f"per line / by image: {ratio:.2f}x; max |emb difference| {diff:.2e}; MAP "
          f"{maps[0]:.6f} vs {maps[1]:.6f} (difference {abs(maps[0] - maps[1]):.1e})")
  if args.torch:
    torch_s = time_torch(config, len(info.attributes), joint, args.eval_batch)
    print(f"torch     {lines / torch_s:8.2f} lines/s ({torch_s:.2f}s, model only, per line); "
          f"torch / by image: {torch_s / min(times['by image']):.2f}x")


def time_torch(config, num_attributes, joint, batch):
  """Seconds of the PyTorch reference over every line of the split (best of two passes)."""
  import torch  # pylint: disable=g-import-not-at-top
  from tests import torch_reference  # pylint: disable=g-import-not-at-top
  m = config.model
  net = torch_reference.random_asenpp(
      num_attributes, global_size=config.data.image_size, local_size=m.local_size,
      global_backbone=m.global_backbone, local_backbone=m.local_backbone, width=m.width,
      attr_dim=m.attr_dim, global_common_dim=m.global_common_dim,
      local_common_dim=m.local_common_dim, reduction=m.reduction, embed_dim=m.embed_dim,
      with_local=joint).eval()
  torch.set_num_threads(os.cpu_count() or 1)
  batches = []
  for which in ("query", "candidate"):
    for b in data_lib.make_eval_stream(config, "test", which, batch_size=batch):
      keep = np.asarray(b["mask"])
      views = np.asarray(model_lib.normalize_images(np.asarray(b["image"])[keep]))
      r, s = config.data.hires_size, m.local_size   # a centred crop stands in for the RoI
      crops = np.asarray(model_lib.normalize_images(
          np.asarray(b["hires"])[keep][:, (r - s) // 2:(r + s) // 2, (r - s) // 2:(r + s) // 2]))
      batches.append([torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
                      for x in (views, crops)]
                     + [torch.from_numpy(np.asarray(b["attribute"])[keep]).long()])
  best = float("inf")
  with torch.no_grad():
    for _ in range(2):
      t0 = time.perf_counter()
      for views, crops, attrs in batches:
        net(views, attrs, "global")
        if joint:
          net(crops, attrs, "local")
      best = min(best, time.perf_counter() - t0)
  return best


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--split_images", type=int, default=0,
                      help="time the embedding of a synthetic split of this many images")
  parser.add_argument("--size", choices=("paper", "demo"), default="paper")
  parser.add_argument("--stage", choices=("global", "joint"), default="joint")
  parser.add_argument("--eval_batch", type=int, default=16, help="eval.batch_size (images)")
  parser.add_argument("--lines_per_image", type=int, default=5, choices=range(1, 6))
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--per_line", action="store_true",
                      help="also time the per-line embedding, interleaved")
  parser.add_argument("--torch", action="store_true", help="also time the PyTorch reference")
  parser.add_argument("--json", default="", help="also write the figures to this JSON file")
  args = parser.parse_args()
  if args.split_images:
    root = tempfile.mkdtemp(prefix="asen_bench_")
    try:
      time_split(args, root)
    finally:
      shutil.rmtree(root, ignore_errors=True)
  else:
    time_forward(args)


if __name__ == "__main__":
  main()
