"""Times the jitted training step: compile time, step time and triplets/s.

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


def bench(size, stage):
  if size == "paper":
    config = fashionai.get_config(stage)
  else:
    config = synthetic.get_config(stage)
    # The generator's attribute lists, so that no dataset has to exist for the benchmark.
    config.data.attributes = synthetic_data.ATTRIBUTES
    config.data.num_values = tuple(len(v) for v in synthetic_data.VALUE_NAMES)
  config.train.batch_size = _BATCH.value
  config.model.compute_dtype = _DTYPE.value
  joint = stage == "joint"
  model = model_lib.build_model(config.model, len(config.data.attributes), with_local=joint)
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
  t0 = time.perf_counter()
  for _ in range(_STEPS.value):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  step_s = (time.perf_counter() - t0) / _STEPS.value
  print(f"{size:<10}{stage:<8}{s:>4}/{config.model.local_size:<4}"
        f"{config.model.global_backbone}/{config.model.local_backbone} w={config.model.width:<6}"
        f"init {init_s:6.1f}s  compile {compile_s:6.1f}s  step {step_s * 1e3:8.1f} ms  "
        f"{b / step_s:8.1f} triplets/s", flush=True)


def main(argv):
  del argv
  print(f"JAX {jax.__version__} on {jax.device_count()} x {jax.devices()[0].device_kind}, "
        f"batch {_BATCH.value} triplets, {_DTYPE.value}", flush=True)
  for size in _SIZES.value:
    for stage in _STAGES.value:
      bench(size, stage)


if __name__ == "__main__":
  app.run(main)
