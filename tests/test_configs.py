"""Config overrides (`configs/<dataset>.py:<stage>,key=value,...`)."""
import pytest

from configs import common
from configs import synthetic


def test_overrides_set_top_level_and_nested_fields():
  c = synthetic.get_config("joint,seed=3,train.lr=0.5,data.root='elsewhere',pretrain.pooling=mask")
  assert (c.stage, c.seed, c.train.lr, c.data.root, c.pretrain.pooling) == (
      "joint", 3, 0.5, "elsewhere", "mask")
  assert synthetic.get_config("global").seed == 0


@pytest.mark.parametrize("arg, message", [
    ("global,sed=1", "the config has no field 'sed'; its fields are data, eval,"),
    ("global,train.lrr=1", "train has no field 'lrr'; its fields are batch_size,"),
    ("global,seed.x=1", "'seed.x': seed is a value, not a group of fields"),
    ("global,train", "is not of the form key=value"),
    ("stage2", "stage must be one of"),
])
def test_bad_overrides_say_what_is_wrong(arg, message):
  with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("(", r"\(")):
    synthetic.get_config(arg)


def test_parse_arg_keeps_strings_and_reads_literals():
  stage, overrides = common.parse_arg("joint,a=1,b=1e-3,c=foo,d=True,e='x=y'")
  assert stage == "joint"
  assert overrides == {"a": 1, "b": 1e-3, "c": "foo", "d": True, "e": "x=y"}
