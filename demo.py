"""The whole ASEN++ job on the built-in synthetic garments, end to end, on a CPU.

  python demo.py [--workdir runs/demo] [--data_root data] [--pretrain] [--overrides seed=1]

Generates <data_root>/Synthetic (unless it exists), builds the tfds dataset, takes the stand-in
for ImageNet weights (assets/synthetic_backbone.npz when its record matches the config and the
data, else -- or with --pretrain -- pretrains one by attribute classification), trains stage 1
(global branch) into <workdir>/global and stage 2 (joint, from stage 1) into <workdir>/joint,
evaluates both on the test split, writes pictures of the joint model into <workdir>/pictures and
the numbers into <workdir>/results.json, prints one table, indexes the test split for search
(<workdir>/index) and prints the commands that query it. Running it again reuses finished steps.
"""
from asen_jax import allocator

allocator.preload()   # before jax starts: see asen_jax/allocator.py

import os

from absl import flags
from absl import logging

from asen_jax import cli
from configs import common
from configs import synthetic

_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Run folder of the two stages.")
_DATA_ROOT = flags.DEFINE_string("data_root", "data", "Folder that holds (or gets) Synthetic/.")
_PRETRAIN = flags.DEFINE_bool("pretrain", False, "Pretrain the backbone (2-3 minutes) even where "
                               "the shipped one (assets/synthetic_backbone.npz) fits.")
_OVERRIDES = flags.DEFINE_string("overrides", "", "Config overrides for both stages, "
                                 "e.g. 'seed=1' or 'train.max_steps=50' for a quick look.")


def main(argv):
  del argv
  # The tqdm bars show progress; orbax's per-checkpoint warnings and the 'no ImageNet weights'
  # note (the demo trains from scratch on purpose) would only bury them.
  logging.set_verbosity(logging.ERROR)
  from asen_jax import end_to_end  # pylint: disable=g-import-not-at-top
  try:
    configs = synthetic.demo_configs(_DATA_ROOT.value,
                                     os.path.join(_WORKDIR.value, "backbone.npz"),
                                     common.parse_overrides(_OVERRIDES.value))
    results = end_to_end.run_demo(*configs, _WORKDIR.value, force_pretrain=_PRETRAIN.value)
  except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as e:
    raise SystemExit(f"demo.py: {e}") from None
  print()
  print("Test-split MAP (%) on the synthetic garments. global: the stage-1 model; ASEN++: the "
        "joint model (beta-fused global + local);\nASEN++ global branch: the joint model without "
        "its local branch.")
  print(end_to_end.format_demo_table(results))
  pictures = os.path.join(_WORKDIR.value, "pictures")
  print(f"\nPictures: {pictures}/attention_grid.png and one retrieval panel per query in "
        f"{pictures}/; numbers, with pointing per attribute value: "
        f"{os.path.join(_WORKDIR.value, 'results.json')} "
        f"({results['timings']['total_s'] / 60:.1f} min).")
  index = os.path.join(_WORKDIR.value, "index")
  image = os.path.join(_DATA_ROOT.value, "Synthetic", "images", "test", "000000.jpg")
  print(f"\nSearch the test split by attribute ({index}; index step "
        f"{results['timings']['index_s']:.0f} s), from the command line or in a browser "
        f"(docs/search.md):\n"
        f"  python search.py query --index {index} --image {image} --attribute neckline "
        f"--top_k 5 --picture {os.path.join(_WORKDIR.value, 'query.png')}\n"
        f"  python app.py --index {index}")


if __name__ == "__main__":
  cli.run(main, "demo.py")
