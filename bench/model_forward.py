"""Images/s of the ASEN++ global (224, ResNet-50) and local (112, ResNet-34) embeddings.

  python bench/model_forward.py [--batch 32] [--iters 10] [--dtype float32|bfloat16]

Eval-mode forward (`embed_global` / `embed_local`), jitted, one warm-up call, timed with
block_until_ready. Runs on the default JAX backend (CPU here, GPU/TPU where installed).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402  pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top

from asen_jax import model as model_lib  # noqa: E402  pylint: disable=g-import-not-at-top
from configs import common  # noqa: E402  pylint: disable=g-import-not-at-top


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--dtype", default="float32")
  args = parser.parse_args()

  config = common.base_config("joint").model
  model = model_lib.build_model(config, 8, with_local=True, dtype=args.dtype)
  t0 = time.perf_counter()
  variables = jax.block_until_ready(model_lib.init_variables(model, jax.random.key(0)))
  print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), dtype {args.dtype}, "
        f"batch {args.batch}; init {time.perf_counter() - t0:.1f}s")
  rng = np.random.RandomState(0)
  attrs = jnp.asarray(rng.randint(0, 8, args.batch), jnp.int32)
  for method, size in (("embed_global", 224), ("embed_local", config.local_size)):
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


if __name__ == "__main__":
  main()
