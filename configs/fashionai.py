"""FashionAI (8 attributes), the paper's settings. Usage: --config configs/fashionai.py:global|joint."""
from configs import common


def get_config(arg="global"):
  stage, overrides = common.parse_arg(arg)
  c = common.base_config(stage)
  c.data.name = "fashionai"
  c.data.folder = "FashionAI"
  c.data.attributes = ("skirt_length", "sleeve_length", "coat_length", "pant_length",
                       "collar_design", "lapel_design", "neckline_design", "neck_design")
  c.data.num_values = (6, 9, 8, 6, 5, 5, 10, 5)
  return common.apply_overrides(c, overrides)
