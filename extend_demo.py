"""Stage extend on the synthetic garments: an attribute held out of everything, then added.

  python extend_demo.py [--hold_out length,button] [--workdir runs/extend_demo] [--data_root data]
      [--demo_dir runs/demo]

Per held-out attribute: the split files without it, the backbone stand-in pretrained without it,
stages 1 and 2 on the other attributes, then `extend` (360 steps, a fifth of the demo's 1,800)
adds it; its test MAP is set against a random ranking and the five-attribute demo model (run
by demo.py into --demo_dir first when its results.json is missing). Reuses finished steps.
"""
from asen_jax import allocator

allocator.preload()   # before jax starts: see asen_jax/allocator.py

import json
import os

from absl import app
from absl import flags
from absl import logging

from configs import common

_HOLD_OUT = flags.DEFINE_list("hold_out", ["length", "button"], "Attributes to hold out, each "
                              "in its own run.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/extend_demo", "Run folder, one subfolder per "
                               "held-out attribute.")
_DATA_ROOT = flags.DEFINE_string("data_root", "data", "Folder that holds (or gets) Synthetic/.")
_DEMO_DIR = flags.DEFINE_string("demo_dir", "runs/demo", "The five-attribute demo's workdir.")
_OVERRIDES = flags.DEFINE_string("overrides", "", "Config overrides for every stage.")


def main(argv):
  del argv
  logging.set_verbosity(logging.ERROR)
  from asen_jax import end_to_end  # pylint: disable=g-import-not-at-top
  from asen_jax import extend_demo
  from configs import synthetic
  try:
    overrides = common.parse_overrides(_OVERRIDES.value)
    five_path = os.path.join(_DEMO_DIR.value, "results.json")
    if not os.path.isfile(five_path):
      print(f"The five-attribute demo model -> {_DEMO_DIR.value}", flush=True)
      end_to_end.run_demo(*synthetic.demo_configs(
          _DATA_ROOT.value, os.path.join(_DEMO_DIR.value, "backbone.npz"), overrides),
          _DEMO_DIR.value)
    with open(five_path) as f:
      five = json.load(f)
    rows = extend_demo.run(_DATA_ROOT.value, _WORKDIR.value, _HOLD_OUT.value, five, overrides)
  except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as e:
    raise SystemExit(f"extend_demo.py: {e}") from None
  print("\nTest-split MAP (%) of each held-out attribute after `extend`; gap closed: (extended - "
        "random) / (five-attribute - random).")
  print(extend_demo.format_table(rows))


if __name__ == "__main__":
  app.run(main)
