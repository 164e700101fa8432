"""Evaluates attribute-specific retrieval (MAP) of a checkpoint.

  python evaluate.py --config configs/fashionai.py:joint --checkpoint runs/fa_joint --split test \
      --output results.json --viz_dir pictures

--checkpoint: a training workdir (its best checkpoint), a checkpoint folder of this project, or an
official ASEN++ `model_best.pth.tar` / `checkpoint.pth.tar` (stage 1 or 2).
"""
from asen_jax import allocator

allocator.preload()   # before jax starts: see asen_jax/allocator.py

import json
import os

from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from asen_jax import cli
from asen_jax import distributed  # --distributed and the cluster flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "configs/<dataset>.py:<stage>; fields: --config.<field>=<value>",
    lock_config=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Workdir, checkpoint folder or .pth.tar.")
_SPLIT = flags.DEFINE_enum("split", "test", ["valid", "test"], "Split to evaluate.")
_OUTPUT = flags.DEFINE_string("output", None, "Write the results as JSON here.")
_VIZ_DIR = flags.DEFINE_string("viz_dir", None, "Write retrieval pictures (PNG) here.")
_VIZ_QUERIES = flags.DEFINE_integer("viz_queries", 3, "Pictures per attribute.")
flags.mark_flags_as_required(["config", "checkpoint"])


def main(argv):
  del argv
  try:
    distributed.initialize_from_flags()
  except ValueError as e:
    raise SystemExit(f"evaluate.py: {e}") from None
  from asen_jax import evaluation  # After distributed init.
  # Checked before the work: an evaluation never loses its results to an unwritable path.
  if _OUTPUT.value:
    cli.check_writable(_OUTPUT.value, "--output", is_dir=False)
  if _VIZ_DIR.value:
    cli.check_writable(_VIZ_DIR.value, "--viz_dir")
  try:
    results = evaluation.run_evaluation(_CONFIG.value, _CHECKPOINT.value, _SPLIT.value,
                                        viz_dir=_VIZ_DIR.value, viz_queries=_VIZ_QUERIES.value)
  except jax.errors.JaxRuntimeError as e:
    sentence = distributed.failure_sentence(e, "start the same command on every host again.")
    if sentence is None:
      raise
    raise SystemExit(f"evaluate.py: {sentence}") from None
  if jax.process_index() == 0:
    print(evaluation.format_table(results))
    if _OUTPUT.value:
      os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
      with open(_OUTPUT.value, "w") as f:
        json.dump(results, f, indent=2)
      logging.info("Wrote %s", _OUTPUT.value)


if __name__ == "__main__":
  cli.run(main, "evaluate.py")
