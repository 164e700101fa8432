"""DARN (9 attributes), the paper's settings. Usage: --config configs/darn.py:global|joint."""
from configs import common


def get_config(arg="global"):
  stage, overrides = common.parse_arg(arg)
  c = common.base_config(stage)
  c.data.name = "darn"
  c.data.folder = "DARN"
  c.data.attributes = ("clothes_category", "clothes_button", "clothes_color", "clothes_length",
                       "clothes_pattern", "clothes_shape", "collar_shape", "sleeve_length",
                       "sleeve_shape")
  c.data.num_values = (20, 13, 55, 7, 28, 11, 26, 8, 17)
  return common.apply_overrides(c, overrides)
