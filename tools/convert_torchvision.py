"""Converts a torchvision ResNet .pth into a torch-free .npz (stem + layers 1..num_stages).

  python tools/convert_torchvision.py --arch resnet50 --input resnet50-19c8e357.pth \
      --output resnet50.npz

Keys keep their torchvision names (layer4, fc and num_batches_tracked are dropped); the file is
checked against the Flax backbone before it is written, and training reads it through
`config.model.init_backbones.{global,local}_file` on machines without torch.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from asen_jax import convert  # noqa: E402  pylint: disable=g-import-not-at-top
from asen_jax import resnet  # noqa: E402  pylint: disable=g-import-not-at-top


def convert_file(arch, input_path, output_path, num_stages=3, width=1.0):
  """Writes the kept torchvision keys of `input_path` to `output_path`; returns them."""
  state_dict = convert.read_weight_file(input_path)
  # Strict check first: a wrong arch or a non-ResNet file fails here with the key list.
  convert.torchvision_to_backbone(state_dict, arch, num_stages, width, source=input_path)
  prefixes = ("conv1.", "bn1.") + tuple(f"layer{i}." for i in range(1, num_stages + 1))
  kept = {k: np.asarray(v, np.float32) for k, v in state_dict.items()
          if k.startswith(prefixes) and not k.endswith("num_batches_tracked")}
  os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
  if output_path.endswith(".safetensors"):
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
    save_file(kept, output_path)
  elif output_path.endswith(".npz"):
    np.savez(output_path, **kept)
  else:
    raise ValueError(f"Output {output_path} must end in .npz or .safetensors.")
  return kept


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--arch", required=True, choices=sorted(resnet.ARCHS))
  parser.add_argument("--input", required=True, help="torchvision .pth file")
  parser.add_argument("--output", required=True, help=".npz or .safetensors to write")
  parser.add_argument("--num_stages", type=int, default=3, help="3 for ASEN++ (no layer4)")
  parser.add_argument("--width", type=float, default=1.0,
                      help="channel multiplier of the file's network (1.0 for torchvision)")
  args = parser.parse_args(argv)
  try:
    kept = convert_file(args.arch, args.input, args.output, args.num_stages, args.width)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"Error: {e}")
  n = sum(v.size for k, v in kept.items() if "running_" not in k)
  print(f"Wrote {args.output}: {len(kept)} arrays, {n:,} parameters "
        f"({args.arch} stem + layers 1-{args.num_stages}).")


if __name__ == "__main__":
  main()
