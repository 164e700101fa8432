"""evaluate.py: official checkpoints vs converted ones, MAP against a PyTorch reference, errors."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from asen_jax import checkpoint as ckpt_lib
from asen_jax import data as data_lib
from asen_jax import evaluation
from asen_jax import model as model_lib
from asen_jax.data import synthetic
from configs import common
from configs import synthetic as synthetic_config
from tests import torch_reference as tr
from tools import convert_official

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = dict(global_backbone="resnet18", local_backbone="resnet18", width=0.25, attr_dim=32,
             global_common_dim=16, local_common_dim=8, embed_dim=32)
SIZES = {"data.image_size": 64, "data.hires_size": 128, "model.local_size": 32,
         "eval.batch_size": 8}


def make_config(root, stage, folder="Synthetic", tfds="tfds"):
  return common.apply_overrides(synthetic_config.get_config(stage), {
      **SIZES, **{f"model.{k}": v for k, v in MODEL.items()}, "data.root": str(root),
      "data.folder": folder, "data.tfds_dir": f"{root}/{tfds}"})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("evaldata")
  synthetic.generate(str(root), seed=5, num_train=20, num_valid=20, num_test=30)
  config = make_config(root, "joint")
  data_lib.prepare_dataset(config)
  net = tr.random_asenpp(5, seed=3, global_size=64, local_size=32, **MODEL)
  sd = net.state_dict()
  joint_path = str(root / "model_best.pth.tar")
  torch.save({"epoch": 3, "model": sd, "mAP": 0.5}, joint_path)
  global_path = str(root / "checkpoint.pth.tar")
  torch.save({"epoch": 3, "model": {k: v for k, v in sd.items() if ".local." not in k},
              "mAP": 0.5}, global_path)
  return root, config, net, joint_path, global_path


def _numpy_map(q_emb, q_attr, q_val, c_emb, c_attr, c_val):
  """Per-query loop reference: mean AP over all queries, in %."""
  aps = []
  for e, a, v in zip(q_emb, q_attr, q_val):
    idx = np.flatnonzero(c_attr == a)
    order = idx[np.argsort(-(c_emb[idx] @ e), kind="stable")]
    rel = (c_val[order] == v).astype(np.float64)
    hits = np.cumsum(rel)
    aps.append(np.sum(hits / np.arange(1, len(rel) + 1) * rel) / max(rel.sum(), 1))
  return 100 * float(np.mean(aps))


def test_stage1_official_checkpoint_map_equals_pytorch_reference(setup):
  root, _, net, _, global_path = setup
  config = make_config(root, "global")
  results = evaluation.run_evaluation(config, global_path, "test")
  assert results["stage"] == "global"
  rows = {}
  for which in ("query", "candidate"):
    embs, attrs, vals = [], [], []
    for batch in data_lib.make_eval_stream(config, "test", which, batch_size=8):
      keep = np.asarray(batch["mask"])
      x = np.asarray(model_lib.normalize_images(np.asarray(batch["image"])))[keep]
      with torch.no_grad():
        emb, _ = net(torch.from_numpy(x.transpose(0, 3, 1, 2)),
                     torch.from_numpy(np.asarray(batch["attribute"])[keep]).long(), "global")
      emb = emb.numpy()
      embs.append(emb / np.linalg.norm(emb, axis=1, keepdims=True))
      attrs.append(np.asarray(batch["attribute"])[keep])
      vals.append(np.asarray(batch["value"])[keep])
    rows[which] = [np.concatenate(x) for x in (embs, attrs, vals)]
  expected = _numpy_map(*rows["query"], *rows["candidate"])
  assert results["map_overall"] == pytest.approx(expected, abs=1e-3)
  assert sum(results["num_queries"].values()) == len(rows["query"][0])


def test_official_and_converted_checkpoints_give_the_same_map(setup, tmp_path):
  root, config, _, joint_path, global_path = setup
  from_pth = evaluation.run_evaluation(config, joint_path, "test")
  assert from_pth["stage"] == "joint"
  converted = str(tmp_path / "converted")
  convert_official.convert_checkpoint(joint_path, config, converted)
  output, viz_dir = tmp_path / "results.json", tmp_path / "viz"
  run = subprocess.run(
      [sys.executable, os.path.join(ROOT, "evaluate.py"),
       f"--config={os.path.join(ROOT, 'configs', 'synthetic.py')}:joint",
       f"--checkpoint={converted}", "--split=test", f"--output={output}",
       f"--viz_dir={viz_dir}", "--viz_queries=1"]
      + [f"--config.{k}={v}" for k, v in {**SIZES, "data.root": root,
                                           "data.tfds_dir": f"{root}/tfds"}.items()]
      + [f"--config.model.{k}={v}" for k, v in MODEL.items()],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "overall" in run.stdout and "random ranking" in run.stdout
  assert "without local branch" in run.stdout
  with open(output) as f:
    from_orbax = json.load(f)
  assert from_orbax["map_overall"] == pytest.approx(from_pth["map_overall"], abs=1e-6)
  for name, value in from_pth["map_per_attribute"].items():
    assert from_orbax["map_per_attribute"][name] == pytest.approx(value, abs=1e-6)
  assert from_orbax["num_queries"] == from_pth["num_queries"]
  # Without its local branch, the joint model is the stage-1 checkpoint (the same state dict
  # minus '.local.'), whose MAP matches the PyTorch reference (the test above).
  alone = evaluation.run_evaluation(make_config(root, "global"), global_path, "test")
  assert "global_branch" not in alone
  assert from_pth["global_branch"]["map_overall"] == pytest.approx(alone["map_overall"], abs=1e-3)
  for name, value in alone["map_per_attribute"].items():
    assert from_pth["global_branch"]["map_per_attribute"][name] == pytest.approx(value, abs=1e-3)
  assert from_orbax["global_branch"]["map_overall"] == pytest.approx(
      from_pth["global_branch"]["map_overall"], abs=1e-6)
  assert from_pth["global_branch"]["map_overall"] != pytest.approx(from_pth["map_overall"],
                                                                   abs=1e-3)
  pointing = from_orbax["pointing_accuracy"]
  assert set(pointing["pointing_per_attribute"]) == set(from_orbax["map_per_attribute"])
  # Per value, named as the dataset names them.
  with open(os.path.join(root, "Synthetic", "meta.json")) as f:
    meta = json.load(f)
  for a, name in enumerate(meta["attributes"]):
    per_value = pointing["pointing_per_value"][name]
    assert set(per_value) <= set(meta["value_names"][a]) and per_value
    assert set(pointing["peak_per_value"][name]) == set(per_value)
  pictures = sorted(os.listdir(viz_dir))
  assert "attention_grid.png" in pictures and len(pictures) == 1 + 5  # one query per attribute


def test_checkpoint_of_other_attributes_is_one_sentence(setup, tmp_path):
  root, config, _, _, _ = setup
  other = str(tmp_path / "other")
  ckpt_lib.save_model_variables(other, {"params": {}, "batch_stats": {}},
                                {"attributes": ["sleeve", "collar"], "stage": "global"})
  with pytest.raises(ValueError, match=r"trained on attributes \['sleeve', 'collar'\].* config "
                     r"has \['colour', 'length', 'pattern', 'neckline', 'button'\]"):
    evaluation.run_evaluation(config, other, "test")
  net = tr.random_asenpp(3, seed=1, global_size=64, local_size=32, with_local=False, **MODEL)
  path = str(tmp_path / "three.pth.tar")
  torch.save({"epoch": 1, "model": net.state_dict(), "mAP": 0.1}, path)
  with pytest.raises(ValueError, match=r"three.pth.tar has 3 attributes but the config has 5"):
    evaluation.run_evaluation(config, path, "test")


def test_missing_split_file_is_one_sentence(setup, tmp_path):
  root, _, _, joint_path, _ = setup
  shutil.copytree(root / "Synthetic", tmp_path / "Broken")
  os.remove(tmp_path / "Broken" / "query_test.txt")
  config = make_config(tmp_path, "joint", folder="Broken")
  with pytest.raises(FileNotFoundError, match="query_test.txt"):
    evaluation.run_evaluation(config, joint_path, "test")
