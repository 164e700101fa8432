"""The built-in synthetic garments: small ResNet-18s, so that the demo trains in minutes on a CPU.

Usage: --config configs/synthetic.py:global|joint|extend (after `python -m asen_jax.data.synthetic
--out data`; demo.py does it all). Where and why it departs from the paper, with the
measurements: docs/synthetic.md.
"""
import os

from configs import common


def get_config(arg="global"):
  stage, overrides = common.parse_arg(arg)
  joint = stage == "joint"
  c = common.base_config(stage)
  c.data.name = "synthetic"
  c.data.folder = "Synthetic"
  c.data.attributes = ()            # read from data/Synthetic/meta.json
  c.data.num_values = ()
  c.data.image_size = 96
  # Stage 1 never crops, so it decodes no larger view than it sees.
  c.data.hires_size = 96 if stage == "global" else 224
  c.data.worker_count = 0           # 2 cores leave no room for worker processes
  c.data.decode_cache_mb = 1024     # each image is used about 13 times a stage

  c.model.global_backbone = "resnet18"
  c.model.local_backbone = "resnet18"
  c.model.width = 0.25
  c.model.attr_dim = 64
  c.model.global_common_dim = 256   # a narrow ASA cannot make a sharp map
  c.model.local_common_dim = 32
  c.model.embed_dim = 128
  c.model.global_output_stride = 8  # 12 x 12 cells: a 6 x 6 cell is wider than the small boxes
  c.model.roi_threshold = 0.5       # at 0.1 the 12 x 12 maps kept most of the frame

  c.train.batch_size = 32
  # 1,200 + 600 steps: what the CPU speed-ups pay for within the demo's 15 minutes.
  c.train.triplets_per_epoch = 12800 if not joint else 19200
  c.train.log_every = 10
  c.train.checkpoint_every = 200
  c.train.lr = 7e-4 if not joint else 1e-3   # joint: the local branch
  c.train.lr_global = 7e-4 if not joint else 2e-4
  c.train.epochs = 3 if not joint else 1
  c.train.decay_every_epochs = 1
  c.train.loss_weights.local_triplet = 1.0   # at 0.1 the local branch learned nothing new

  if stage == "extend":            # 360 steps: a fifth of the demo's 1,200 + 600
    c.train.triplets_per_epoch = 5760
    c.train.epochs = 2
    c.train.lr = 3e-2               # on valid, 3e-3 learnt held-out length less

  c.pretrain.steps = 250
  c.pretrain.batch_size = 96
  c.pretrain.lr = 7e-4
  c.pretrain.pooling = "mask"       # mean pooling taught the background to describe the garment
  c.eval.batch_size = 64
  return common.apply_overrides(c, overrides)


def demo_configs(data_root, backbone_file, overrides=None):
  """(global, joint) configs of the demo: data in <data_root>/Synthetic, the tfds dataset in
  <data_root>/tfds, both backbones from `backbone_file`, then `overrides` ({field: value})."""
  configs = []
  for stage in ("global", "joint"):
    c = get_config(stage)
    c.data.root, c.data.tfds_dir = data_root, os.path.join(data_root, "tfds")
    # Stage 2's global branch comes from stage 1 (--init_from), its local one from the file.
    if stage == "global":
      c.model.init_backbones.global_file = backbone_file
    else:
      c.model.init_backbones.local_file = backbone_file
    configs.append(common.apply_overrides(c, overrides or {}))
  return tuple(configs)
