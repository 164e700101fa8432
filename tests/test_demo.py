"""The demo's stand-in for ImageNet weights: the record next to a pretrained backbone, when the
demo reuses a file and when it pretrains, and the file shipped in assets/."""
import json
import os
import shutil

import numpy as np
import pytest

from asen_jax import convert
from asen_jax import end_to_end
from asen_jax import pretrain
from asen_jax.data import synthetic
from configs import synthetic as synthetic_config
from tests.tiny_synthetic import make_data, tiny_config

PRETRAIN = {"pretrain.batch_size": 16, "pretrain.steps": 3}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  return make_data(tmp_path_factory, seed=6)


@pytest.fixture(scope="module")
def made(data_root, tmp_path_factory):
  """A backbone pretrained for 3 steps on the tiny data, with its record."""
  out = str(tmp_path_factory.mktemp("made") / "backbone.npz")
  pretrain.pretrain_backbone(tiny_config(data_root, "global", PRETRAIN), out, log=lambda s: None)
  return out


def test_record_says_what_the_file_was_made_from(data_root, made):
  config = tiny_config(data_root, "global", PRETRAIN)
  with open(pretrain.record_path(made)) as f:
    record = json.load(f)
  assert record["settings"] == {"arch": "resnet18", "width": 0.0625, "output_stride": 8,
                                "image_size": 32, "steps": 3, "batch_size": 16,
                                "lr": config.pretrain.lr, "pooling": "mask", "seed": 0}
  assert record["file_sha256"] == pretrain.file_sha256(made)
  assert record["data_sha256"] == pretrain.data_fingerprint(config)
  assert pretrain.why_not_reusable(made, config) is None


def test_other_settings_data_or_bytes_are_named(data_root, made, tmp_path):
  why = pretrain.why_not_reusable(made, tiny_config(data_root, "global",
                                                    {**PRETRAIN, "pretrain.steps": 4, "seed": 2}))
  assert why == "it was pretrained with steps=3 (the config has 4), seed=0 (the config has 2)"
  # One image's bytes differ: another data set.
  other = tmp_path / "other"
  shutil.copytree(data_root / "Synthetic", other / "Synthetic")
  with open(other / "Synthetic" / "filenames_train.txt") as f:
    first = f.readline().strip()
  with open(other / "Synthetic" / first, "ab") as f:
    f.write(b"\0")
  config = tiny_config(data_root, "global", {**PRETRAIN, "data.root": str(other),
                                             "data.tfds_dir": str(other / "tfds")})
  assert pretrain.why_not_reusable(made, config) == (
      f"it was pretrained on other training data than {other}/Synthetic")
  # The weights were replaced after the record was written.
  copy = str(tmp_path / "copy.npz")
  shutil.copyfile(pretrain.record_path(made), pretrain.record_path(copy))
  with np.load(made) as f:
    weights = {k: f[k] * (1.5 if k == "conv1.weight" else 1.0) for k in f.files}
  np.savez(copy, **weights)
  assert pretrain.why_not_reusable(copy, tiny_config(data_root, "global", PRETRAIN)) == (
      f"{copy} is not the file its record describes (sha256 differs)")
  assert "is missing" in pretrain.why_not_reusable(str(tmp_path / "none.npz"), config)


def test_demo_copies_a_fitting_file_and_pretrains_otherwise(data_root, made, tmp_path, capsys):
  config = tiny_config(data_root, "global", PRETRAIN)
  target = str(tmp_path / "run" / "backbone.npz")
  assert end_to_end.ensure_backbone(config, target, shipped=made) == "shipped"
  assert pretrain.file_sha256(target) == pretrain.file_sha256(made)
  assert pretrain.why_not_reusable(target, config) is None
  # A later run reuses the workdir's copy ...
  assert end_to_end.ensure_backbone(config, target, shipped=made) == "workdir"
  # ... but not under other pretraining settings: one sentence, the file kept.
  other = tiny_config(data_root, "global", {**PRETRAIN, "pretrain.steps": 4})
  with pytest.raises(ValueError, match=r"^The backbone .*backbone\.npz does not fit this run: it "
                     r"was pretrained with steps=3 \(the config has 4\); delete it"):
    end_to_end.ensure_backbone(other, target, shipped=made)
  # A shipped file that does not fit is not used: the demo says why and pretrains.
  capsys.readouterr()
  fresh = str(tmp_path / "run2" / "backbone.npz")
  assert end_to_end.ensure_backbone(other, fresh, shipped=made) == "pretrained"
  assert "Not using the shipped backbone: it was pretrained with steps=3" in capsys.readouterr().out
  assert pretrain.why_not_reusable(fresh, other) is None
  # --pretrain pretrains even where the shipped file fits.
  forced = str(tmp_path / "run3" / "backbone.npz")
  assert end_to_end.ensure_backbone(config, forced, shipped=made, force_pretrain=True) == "pretrained"
  # ... but never replaces the one a workdir's stages started from.
  capsys.readouterr()
  assert end_to_end.ensure_backbone(config, forced, shipped=made, force_pretrain=True) == "workdir"
  assert "--pretrain does not replace" in capsys.readouterr().out


def test_shipped_backbone_is_the_one_the_demo_would_pretrain(tmp_path):
  # The asset must match the demo's config and the data the demo generates: otherwise the demo
  # silently pretrains (minutes longer). Regenerate it with `python demo.py --pretrain` and copy
  # runs/demo/backbone.{npz,json} to assets/synthetic_backbone.{npz,json}.
  shipped = end_to_end.SHIPPED_BACKBONE
  assert os.path.isfile(shipped), shipped
  # Only the training split matters; it depends on the seed and its own size alone.
  synthetic.generate(str(tmp_path), num_train=3000, num_valid=12, num_test=12, workers=2)
  config, _ = synthetic_config.demo_configs(str(tmp_path), shipped)
  assert pretrain.why_not_reusable(shipped, config) is None
  bb = convert.load_backbone_file(shipped, config.model.global_backbone, 3, config.model.width)
  assert bb["params"]["conv1"]["kernel"].shape == (7, 7, 3, 16)
