"""Pretrains a backbone by attribute classification: a stand-in for ImageNet weights.

  python tools/pretrain_backbone.py --config configs/synthetic.py:global \
      --output runs/synthetic/backbone.npz

Trains config.model.global_backbone (or --arch) at config.data.image_size on the training
split's attribute labels for config.pretrain.steps steps and writes a torchvision-keyed .npz,
with a .json record next to it (settings, sha256 of the training split and of the weights).
Pass it to both stages as ImageNet weights would be:
  --config configs/synthetic.py:global --config.model.init_backbones.global_file=<file>
  --config configs/synthetic.py:joint --config.model.init_backbones.local_file=<file>
Only for datasets without ImageNet weights at hand (the synthetic demo); with real weights,
convert them with tools/convert_torchvision.py instead.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from asen_jax import allocator  # noqa: E402

allocator.preload()   # before jax starts: see asen_jax/allocator.py

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from asen_jax import cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "configs/<dataset>.py:<stage>; fields: --config.<field>=<value>",
    lock_config=True)
_OUTPUT = flags.DEFINE_string("output", None, "Where to write the backbone (.npz).")
_ARCH = flags.DEFINE_string("arch", None, "Backbone (default: config.model.global_backbone).")
flags.mark_flags_as_required(["config", "output"])


def main(argv):
  del argv
  from asen_jax import pretrain  # pylint: disable=g-import-not-at-top
  try:
    pretrain.pretrain_backbone(_CONFIG.value, _OUTPUT.value, arch=_ARCH.value)
  except (ValueError, FileNotFoundError, FloatingPointError) as e:
    raise SystemExit(f"pretrain_backbone.py: {e}") from None


if __name__ == "__main__":
  cli.run(main, "pretrain_backbone.py")
