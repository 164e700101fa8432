"""Weight files and converters: strict errors, file formats, the two conversion tools."""
import collections
import importlib.util
import os
import sys

import jax
import numpy as np
import pytest
import torch

from asen_jax import checkpoint as ckpt_lib
from asen_jax import convert
from asen_jax import torch_pickle
from asen_jax import trees
from configs import fashionai
from tests import torch_reference as tr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_tool(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def small_resnet34_state_dict():
  return {k: v.clone() for k, v in tr.ResNet("resnet34", 3, 0.25).state_dict().items()}


# ------------------------------------------------------------------------------ merge_params


def test_merge_params_returns_loaded_in_init_dtypes():
  ref = {"a": {"w": jax.ShapeDtypeStruct((2, 3), np.float32)}, "b": np.zeros(4, np.int32)}
  loaded = {"a": {"w": np.arange(6.0).reshape(2, 3)}, "b": np.arange(4.0)}
  out = trees.merge_params(ref, loaded, "x.npz")
  assert out["a"]["w"].dtype == np.float32 and out["b"].dtype == np.int32
  np.testing.assert_array_equal(out["a"]["w"], loaded["a"]["w"])


def test_merge_params_names_every_mismatch():
  ref = {"a": {"w": np.zeros((2, 3)), "b": np.zeros(3)}, "c": np.zeros(1)}
  loaded = {"a": {"w": np.zeros((3, 2)), "extra": np.zeros(5)}, "c": np.zeros(1)}
  with pytest.raises(ValueError) as e:
    trees.merge_params(ref, loaded, "ckpt/model.npz")
  for words in ("ckpt/model.npz does not match", "1 missing key(s) (a/b (3,))",
                "1 unexpected key(s) (a/extra (5,))", "a/w: file (3, 2), model (2, 3)"):
    assert words in str(e.value)


def test_merge_params_dont_load_keeps_init_values():
  init = {"g": {"w": np.ones(2)}, "local": {"w": np.full(3, 7.0)}}
  # 'local' is neither required nor checked: absent here, and its extra key is ignored.
  out = trees.merge_params(init, {"g": {"w": np.zeros(2)}, "local": {"x": np.zeros(1)}}, "f",
                             dont_load=("local/.*",))
  np.testing.assert_array_equal(out["g"]["w"], [0, 0])
  np.testing.assert_array_equal(out["local"]["w"], [7, 7, 7])
  with pytest.raises(ValueError, match=r"missing key\(s\) \(g/w"):
    trees.merge_params(init, {}, "f", dont_load=("local/.*",))


def test_merge_params_truncates_long_lists():
  ref = {f"k{i:02d}": np.zeros(1) for i in range(20)}
  with pytest.raises(ValueError, match=r"20 missing key\(s\) \(k00 \(1,\), .*k07 \(1,\), "
                                       r"\.\.\. 12 more\)"):
    trees.merge_params(ref, {}, "f")


# ------------------------------------------------------------------------------ reading files


def test_read_weight_file_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"Weight file .*nope.pth does not exist; check"):
    convert.read_weight_file(tmp_path / "nope.pth")
  (tmp_path / "w.h5").write_bytes(b"x")
  with pytest.raises(ValueError, match=r"w.h5 has an unknown extension; use .pth, .pth.tar, "
                                       r".npz or .safetensors\."):
    convert.read_weight_file(tmp_path / "w.h5")
  (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
  with pytest.raises(ValueError, match=r"Could not read weight file .*broken.pth \("):
    convert.read_weight_file(tmp_path / "broken.pth")
  torch.save([1, 2], tmp_path / "list.pth")
  with pytest.raises(ValueError, match=r"list.pth holds a list, not a state dict"):
    convert.read_weight_file(tmp_path / "list.pth")


@pytest.mark.parametrize("fmt", ["pth", "pth.tar:model", "pth.tar:state_dict", "module.",
                                 "npz", "safetensors"])
def test_read_weight_file_formats(tmp_path, fmt):
  sd = {"conv1.weight": torch.randn(4, 3, 7, 7), "bn1.num_batches_tracked": torch.tensor(5),
        "fc.weight": torch.randn(3, 2).t()}  # non-contiguous
  want = {k: v.numpy() for k, v in sd.items()}
  path = str(tmp_path / f"w.{fmt.split(':')[0].rstrip('.')}")
  if fmt == "module.":
    path = str(tmp_path / "w.pth")
    torch.save({"module." + k: v for k, v in sd.items()}, path)
  elif fmt.startswith("pth.tar"):
    torch.save({"epoch": 3, fmt.split(":")[1]: sd, "mAP": np.float64(0.5)}, path)
  elif fmt == "pth":
    torch.save(sd, path)
  elif fmt == "npz":
    np.savez(path, **want)
  else:
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
    save_file({k: np.ascontiguousarray(v) for k, v in want.items()}, path)
  got = convert.read_weight_file(path)
  assert sorted(got) == sorted(want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])
    assert got[k].dtype == want[k].dtype


@pytest.mark.parametrize("zipped", [True, False])
def test_builtin_reader_matches_torch_load(tmp_path, zipped):
  sd = collections.OrderedDict(
      w=torch.randn(5, 4), wt=torch.randn(4, 6).t(), sliced=torch.arange(20.0)[3:11],
      n=torch.tensor(7), h=torch.randn(3).half(), b=torch.randn(2, 2).bfloat16(),
      flag=torch.tensor([True, False]))
  path = str(tmp_path / "ckpt.pth.tar")
  torch.save({"epoch": 1, "model": sd, "mAP": np.float64(0.25)}, path,
             _use_new_zipfile_serialization=zipped)
  got = torch_pickle.load(path)
  assert got["epoch"] == 1 and got["mAP"] == 0.25
  for k, v in sd.items():
    want = v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
    np.testing.assert_array_equal(np.asarray(got["model"][k], want.dtype), want)
    assert got["model"][k].shape == want.shape


def test_read_weight_file_without_torch(tmp_path, monkeypatch):
  sd = small_resnet34_state_dict()
  path = str(tmp_path / "checkpoint.pth.tar")
  torch.save({"epoch": 2, "model": sd, "mAP": np.float64(0.3)}, path)
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
  got = convert.read_weight_file(path)
  assert sorted(got) == sorted(sd)
  for k, v in sd.items():
    np.testing.assert_array_equal(got[k], v.numpy())


def test_builtin_reader_refuses_other_globals(tmp_path):
  path = str(tmp_path / "evil.pth")
  torch.save({"x": collections.Counter("ab")}, path)
  with pytest.raises(Exception, match="collections.Counter is not allowed"):
    torch_pickle.load(path)


# ------------------------------------------------------------------------------ torchvision


def test_torchvision_wrong_arch_names_keys():
  with pytest.raises(ValueError) as e:
    convert.torchvision_to_backbone(small_resnet34_state_dict(), "resnet50", 3, 0.25,
                                    source="resnet34.pth")
  msg = str(e.value)
  assert msg.startswith("resnet34.pth does not match resnet50 (3 stages, width 0.25): ")
  assert "missing key(s) (layer1.0.bn3.bias (64,)" in msg
  assert "misshaped key(s) (layer1.0.conv1.weight: file (16, 16, 3, 3), model (16, 16, 1, 1)" \
      in msg
  assert len(msg) < 2000 and "... 62 more)" in msg  # truncated, not every key


def test_torchvision_wrong_width_and_extra_key():
  sd = small_resnet34_state_dict()
  with pytest.raises(ValueError, match=r"misshaped key\(s\) \(bn1.bias: file \(16,\), model "
                                       r"\(64,\), bn1.running_mean"):
    convert.torchvision_to_backbone(sd, "resnet34")
  sd["layer3.0.extra.weight"] = torch.zeros(3)
  del sd["layer2.1.bn2.running_var"]
  with pytest.raises(ValueError, match=r"1 missing key\(s\) \(layer2.1.bn2.running_var "
                                       r"\(32,\)\); 1 unexpected key\(s\) "
                                       r"\(layer3.0.extra.weight \(3,\)\)"):
    convert.torchvision_to_backbone(sd, "resnet34", width=0.25)


def test_convert_torchvision_tool(tmp_path, capsys):
  tool = load_tool("convert_torchvision")
  sd = small_resnet34_state_dict()
  full = dict(sd, **{"layer4.0.conv1.weight": torch.zeros(1), "fc.bias": torch.zeros(10)})
  torch.save(full, tmp_path / "r34.pth")
  # The tool is for width-1 torchvision files; a small one shows as misshaped, with the key.
  with pytest.raises(SystemExit, match=r"Error: .*r34.pth does not match resnet34 \(3 stages, "
                                       r"width 1.0\): .*conv1.weight: file \(16, 3, 7, 7\)"):
    tool.main(["--arch", "resnet34", "--input", str(tmp_path / "r34.pth"),
               "--output", str(tmp_path / "r34.npz")])
  tool.main(["--arch", "resnet34", "--input", str(tmp_path / "r34.pth"), "--width", "0.25",
             "--output", str(tmp_path / "r34.npz")])
  assert "Wrote " in capsys.readouterr().out
  kept = tool.convert_file("resnet34", str(tmp_path / "r34.pth"), str(tmp_path / "r34.npz"),
                           width=0.25)
  assert not any(k.startswith(("layer4", "fc")) or "num_batches" in k for k in kept)
  assert len(kept) == len([k for k in sd if "num_batches" not in k])
  with np.load(tmp_path / "r34.npz") as f:
    assert sorted(f.files) == sorted(kept)
  direct = convert.torchvision_to_backbone(sd, "resnet34", width=0.25)
  via_npz = convert.load_backbone_file(tmp_path / "r34.npz", "resnet34", width=0.25)
  jax.tree.map(np.testing.assert_array_equal, via_npz, direct)


# ------------------------------------------------------------------------------ official


@pytest.fixture(scope="module")
def official_sd():
  """Stage-2 official state dict of a width-0.25 model with FashionAI's 8 attributes."""
  return {k: v.clone() for k, v in tr.random_asenpp(8, seed=21, width=0.25).state_dict().items()}


def test_official_key_layout(official_sd):
  assert official_sd["choices.global.attrnet.attr_embedding.weight"].shape == (8, 512)
  assert "choices.local.attrnet.attr_embedding.weight" in official_sd
  assert official_sd["choices.global.attnnet.fc1.weight"].shape == (128, 256 + 512)
  assert "choices.local.basenet.layer3.5.conv2.weight" in official_sd
  assert "choices.global.basenet.layer3.0.downsample.1.running_var" in official_sd


def test_official_errors(official_sd):
  with pytest.raises(ValueError, match=r"m.pth is not an official ASEN\+\+ state dict: it has "
                                       r"no key choices.global.attrnet.attr_embedding.weight\."):
    convert.official_to_variables(small_resnet34_state_dict(), "m.pth")
  sd = dict(official_sd)
  sd["choices.local.attrnet.attr_embedding.weight"] = sd[
      "choices.local.attrnet.attr_embedding.weight"] + 1
  with pytest.raises(ValueError, match=r"m.pth: choices.global.attrnet.attr_embedding.weight "
                                       r"and choices.local.attrnet.attr_embedding.weight differ"):
    convert.official_to_variables(sd, "m.pth")
  sd = dict(official_sd)
  sd["choices.global.attnnet.fc2.weight"] = torch.zeros(256, 64)
  with pytest.raises(ValueError, match=r"m.pth does not match an ASEN\+\+ model \(8 attributes, "
                                       r"stage 2\): 1 misshaped key\(s\) \(choices.global."
                                       r"attnnet.fc2.weight: file \(256, 64\), model \(256, 128\)"):
    convert.official_to_variables(sd, "m.pth")


def _config(width):
  config = fashionai.get_config("joint")
  config.model.width = width
  return config


def test_convert_official_tool_roundtrip(official_sd, tmp_path):
  tool = load_tool("convert_official")
  path = str(tmp_path / "model_best.pth.tar")
  torch.save({"epoch": 20, "model": official_sd, "mAP": 0.7}, path)
  variables, meta = tool.convert_checkpoint(path, _config(0.25), str(tmp_path / "out"))
  assert meta["stage"] == "joint" and len(meta["attributes"]) == 8
  loaded = ckpt_lib.load_model_variables(str(tmp_path / "out"))
  got, got_meta = loaded[0], loaded[1]
  assert got_meta["attributes"] == list(fashionai.get_config("joint").data.attributes)
  assert got_meta["model"]["width"] == 0.25 and got_meta["num_values"][6] == 10
  assert got_meta["bn_stats"] == "per_role"   # the official trainer's statistics
  jax.tree.map(np.testing.assert_array_equal, got, variables)
  np.testing.assert_array_equal(
      got["params"]["local"]["head"]["fc1"]["kernel"],
      official_sd["choices.local.attnnet.fc1.weight"].numpy().T)


def test_convert_official_tool_mismatches(official_sd, tmp_path):
  tool = load_tool("convert_official")
  stage1 = {k: v for k, v in official_sd.items() if k.startswith("choices.global.")}
  stage1["choices.global.attrnet.attr_embedding.weight"] = torch.zeros(5, 512)
  path = str(tmp_path / "five.pth.tar")
  torch.save({"epoch": 1, "model": stage1, "mAP": 0.1}, path)
  with pytest.raises(ValueError, match=r"five.pth.tar has 5 attributes but the config has 8"):
    tool.convert_checkpoint(path, _config(0.25), str(tmp_path / "out"))
  path = str(tmp_path / "m.pth.tar")
  torch.save({"epoch": 1, "model": official_sd}, path)
  with pytest.raises(ValueError, match=r"m.pth.tar does not match config.model: width = 0.25 in "
                                       r"the file, 1.0 in the config"):
    tool.convert_checkpoint(path, _config(1.0), str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")
