"""checkpoint.load_model: the one way to load a model, from our folders and official files."""
import numpy as np
import pytest
import torch

from asen_jax import checkpoint as ckpt_lib
from tests import torch_reference as tr

SMALL = dict(global_backbone="resnet18", local_backbone="resnet18", width=0.0625, attr_dim=16,
             global_common_dim=16, local_common_dim=8, embed_dim=32)


def test_our_folder_old_meta_gets_the_defaults(tmp_path):
  variables = {"params": {"w": np.arange(3.0)}, "batch_stats": {}}
  # Written before model.global_output_stride existed: it means the paper's stride.
  ckpt_lib.save_model_variables(str(tmp_path / "c"), variables,
                                {"attributes": ["a", "b"], "stage": "global",
                                 "model": {"width": 0.5}}, step=7)
  loaded, meta = ckpt_lib.load_model(str(tmp_path / "c"))
  np.testing.assert_array_equal(loaded["params"]["w"], [0, 1, 2])
  assert meta["model"] == {"width": 0.5, "global_output_stride": 0}
  assert (meta["step"], meta["num_attributes"], meta["stage"]) == (7, 2, "global")
  ckpt_lib.check_attributes(meta, ["a", "b"], "c")
  with pytest.raises(ValueError, match=r"was trained on attributes \['a', 'b'\], but the config "
                                       r"has \['a'\]"):
    ckpt_lib.check_attributes(meta, ["a"], "c")


def test_official_file_is_read_with_its_architecture(tmp_path):
  net = tr.ASENPP(3, **SMALL)
  path = str(tmp_path / "model_best.pth.tar")
  torch.save({"epoch": 1, "model": net.state_dict(), "mAP": 0.5}, path)
  variables, meta = ckpt_lib.load_model(path)
  assert meta["stage"] == "joint" and meta["attributes"] is None and meta["step"] is None
  assert meta["model"]["global_common_dim"] == 16 and meta["num_attributes"] == 3
  np.testing.assert_array_equal(variables["params"]["attr_embedding"]["embedding"],
                                net.choices["global"].attrnet.attr_embedding.weight.detach())
  with pytest.raises(ValueError, match="has 3 attributes but the config has 2"):
    ckpt_lib.check_attributes(meta, ["a", "b"], path)
