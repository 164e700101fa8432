"""Trains ASEN++: `python train.py --config configs/fashionai.py:global --workdir runs/fa_global`.

Stage 2: `python train.py --config configs/fashionai.py:joint --workdir runs/fa_joint
--init_from runs/fa_global`. Running the same command again resumes where it stopped.
"""
from asen_jax import allocator

allocator.preload()   # before jax starts: see asen_jax/allocator.py

from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from asen_jax import cli
from asen_jax import distributed  # --distributed and the cluster flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "configs/<dataset>.py:<stage>; fields: --config.<field>=<value>",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: checkpoints, metrics, config.")
_INIT_FROM = flags.DEFINE_string("init_from", None, "Stage-1 workdir/checkpoint (or an official "
                                 ".pth.tar) whose model variables initialise this run.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  try:
    distributed.initialize_from_flags()
  except ValueError as e:
    raise SystemExit(f"train.py: {e}") from None
  from asen_jax import trainer  # After distributed init.
  logging.info("JAX %d process(es), %d device(s): %s", jax.process_count(), jax.device_count(),
               jax.devices()[0].platform)
  cli.check_writable(_WORKDIR.value, "Workdir")
  try:
    trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value, init_from=_INIT_FROM.value)
  except jax.errors.JaxRuntimeError as e:
    sentence = distributed.failure_sentence(
        e, "start the same command on every host again to resume from the last checkpoint.")
    if sentence is None:
      raise
    raise SystemExit(f"train.py: {sentence}") from None


if __name__ == "__main__":
  cli.run(main, "train.py")
