"""DeepFashion (5 attribute types), the paper's settings. Usage: --config configs/deepfashion.py:global|joint."""
from configs import common


def get_config(arg="global"):
  stage, overrides = common.parse_arg(arg)
  c = common.base_config(stage)
  c.data.name = "deepfashion"
  c.data.folder = "DeepFashion"
  c.data.attributes = ("texture", "fabric", "shape", "part", "style")
  c.data.num_values = (156, 218, 180, 216, 230)
  return common.apply_overrides(c, overrides)
