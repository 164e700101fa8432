"""The built-in synthetic-garments dataset: tiny backbones so the demo trains in minutes on CPU.

Generate the data first: `python -m asen_jax.data.synthetic --out data`.
Usage: --config configs/synthetic.py:global|joint[,key=value...].
"""
from configs import common


def get_config(arg="global"):
  stage, overrides = common.parse_arg(arg)
  c = common.base_config(stage)
  c.data.name = "synthetic"
  c.data.folder = "Synthetic"
  c.data.attributes = ()            # read from data/Synthetic/meta.json
  c.data.num_values = ()
  c.data.image_size = 112           # global view; 7 x 7 attention map
  c.data.hires_size = 224           # the RoI crop is taken from this 2x view
  c.data.worker_count = 0

  c.model.width = 0.125             # backbone channels / 8
  c.model.attr_dim = 64
  c.model.global_common_dim = 64
  c.model.local_common_dim = 32
  c.model.embed_dim = 128
  c.model.local_size = 64

  c.train.batch_size = 16
  c.train.triplets_per_epoch = 1600  # 100 steps per epoch
  c.train.log_every = 10
  c.train.checkpoint_every = 100
  c.train.lr = 1e-3 if stage == "global" else 1e-3
  c.train.lr_global = 1e-3 if stage == "global" else 1e-4
  c.train.epochs = 3 if stage == "global" else 2
  c.train.decay_every_epochs = 1
  c.eval.batch_size = 64
  return common.apply_overrides(c, overrides)
