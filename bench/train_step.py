"""Times the jitted training step: compile time, step time and triplets/s, per BatchNorm grouping.

  python bench/train_step.py [--sizes paper,synthetic] [--stages global,joint] [--steps 5]

paper: batch 16, 224 global view (448 hires view), 112 RoI crop, ResNet-50/34 (FashionAI config).
synthetic: configs/synthetic.py. Batches are random uint8 images on the device mesh (no input
pipeline; bench/input_pipeline.py measures that), so this is the model + RoI + optimiser cost.
"""
import os
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from asen_jax import model as model_lib  # noqa: E402
from asen_jax import parallel  # noqa: E402
from asen_jax import trainer  # noqa: E402
from asen_jax.data import synthetic as synthetic_data  # noqa: E402
from configs import fashionai  # noqa: E402
from configs import synthetic  # noqa: E402

_SIZES = flags.DEFINE_list("sizes", ["paper", "synthetic"], "paper and/or synthetic")
_STAGES = flags.DEFINE_list("stages", ["global", "joint"], "global and/or joint")
_STEPS = flags.DEFINE_integer("steps", 5, "timed steps after the first (compiling) one")
_BATCH = flags.DEFINE_integer("batch_size", 16, "triplets per step")
_DTYPE = flags.DEFINE_string("dtype", "float32", "compute dtype (bfloat16 on GPU/TPU)")
_BN_STATS = flags.DEFINE_list("bn_stats", ["per_role", "batch"],
                              "train.bn_stats variants, timed side by side")


def prepare(size, stage, bn_stats):
  """(compiled step, state, batch, config, init seconds, compile seconds)."""
  if size == "paper":
    config = fashionai.get_config(stage)
  else:
    config = synthetic.get_config(stage)
    # The generator's attribute lists, so that no dataset has to exist for the benchmark.
    config.data.attributes = synthetic_data.ATTRIBUTES
    config.data.num_values = tuple(len(v) for v in synthetic_data.VALUE_NAMES)
  config.train.batch_size = _BATCH.value
  config.model.compute_dtype = _DTYPE.value
  config.train.bn_stats = bn_stats
  joint = stage == "joint"
  model = model_lib.build_model(config.model, len(config.data.attributes), with_local=joint,
                                bn_roles=trainer.BN_STATS[bn_stats])
  tx = trainer.make_optimizer(config, joint)
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.train.batch_size, mesh=mesh)
  t0 = time.perf_counter()
  variables = model_lib.init_variables(model, jax.random.key(0), config.data.image_size,
                                       config.model.local_size)
  init_s = time.perf_counter() - t0
  state = trainer.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                             batch_stats=variables["batch_stats"],
                             opt_state=tx.init(variables["params"]))
  state = parallel.replicate(mesh, state)
  rng = np.random.default_rng(0)
  b, s, r = config.train.batch_size, config.data.image_size, config.data.hires_size
  batch = parallel.shard_batch(mesh, {
      "images": rng.integers(0, 256, (b, 3, s, s, 3), dtype=np.uint8),
      "hires": rng.integers(0, 256, (b, 3, r, r, 3), dtype=np.uint8),
      "attribute": rng.integers(0, len(config.data.attributes), (b,), dtype=np.int32)})
  step_fn = trainer.make_train_step(config, model, tx, joint, mesh)
  t0 = time.perf_counter()
  compiled = step_fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  state, metrics = compiled(state, batch)  # warm-up
  jax.block_until_ready(metrics)
  return compiled, state, batch, config, init_s, compile_s


def bench(size, stage):
  """Times the bn_stats variants of one step, interleaved so that both see the same machine."""
  runs = {bn: prepare(size, stage, bn) for bn in _BN_STATS.value}
  states = {bn: run[1] for bn, run in runs.items()}
  times = {bn: [] for bn in runs}
  for _ in range(_STEPS.value):
    for bn, (compiled, _, batch, *_) in runs.items():
      t0 = time.perf_counter()
      states[bn], metrics = compiled(states[bn], batch)
      jax.block_until_ready(metrics)
      times[bn].append(time.perf_counter() - t0)
  for bn, (_, _, _, config, init_s, compile_s) in runs.items():
    step_s = float(np.median(times[bn]))
    print(f"{size:<10}{stage:<8}{config.data.image_size:>4}/{config.model.local_size:<4}"
          f"{config.model.global_backbone}/{config.model.local_backbone} w={config.model.width:<6}"
          f"bn_stats={bn:<9}init {init_s:6.1f}s  compile {compile_s:6.1f}s  "
          f"step {step_s * 1e3:8.1f} ms  {config.train.batch_size / step_s:8.1f} triplets/s",
          flush=True)
  if len(runs) == 2:
    first, second = runs
    print(f"{'':18}step time {first} / {second}: "
          f"{np.median(times[first]) / np.median(times[second]):.3f}", flush=True)


def main(argv):
  del argv
  print(f"JAX {jax.__version__} on {jax.device_count()} x {jax.devices()[0].device_kind}, "
        f"batch {_BATCH.value} triplets, {_DTYPE.value}, median of {_STEPS.value} steps",
        flush=True)
  for size in _SIZES.value:
    for stage in _STAGES.value:
      bench(size, stage)


if __name__ == "__main__":
  app.run(main)
