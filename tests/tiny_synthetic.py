"""A tiny model on a tiny synthetic data set, shared by the training tests: every number they
check is exact, not the speed of learning."""
from asen_jax import data as data_lib
from asen_jax.data import synthetic
from configs import common
from configs import synthetic as synthetic_config

TINY = {"model.global_backbone": "resnet18", "model.local_backbone": "resnet18",
        "data.image_size": 32, "data.hires_size": 64, "model.local_size": 32,
        "model.width": 0.0625, "model.attr_dim": 16, "model.global_common_dim": 16,
        "model.local_common_dim": 8, "model.embed_dim": 32, "train.batch_size": 8,
        "train.triplets_per_epoch": 8000, "eval.batch_size": 8}


def make_data(tmp_path_factory, seed=3):
  """40/20/20 synthetic images in a fresh folder; returns it."""
  root = tmp_path_factory.mktemp("data")
  synthetic.generate(str(root), seed=seed, num_train=40, num_valid=20, num_test=20)
  return root


def tiny_config(data_root, stage, extra=None):
  """The synthetic config with TINY (and `extra`, {dotted field: value}); its dataset built."""
  config = synthetic_config.get_config(stage)
  common.apply_overrides(config, {**TINY, "data.root": str(data_root),
                                  "data.tfds_dir": f"{data_root}/tfds", **(extra or {})})
  data_lib.prepare_dataset(config)
  return config
