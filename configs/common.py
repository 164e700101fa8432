"""Shared config pieces: the ASEN++ base config and the `:arg` parser.

Every dataset config is `get_config(arg)` with `arg` = `global`, `joint` or `extend` (new
attributes on a trained model: asen_jax/extend.py). Fields are
overridden with ml_collections' own flags, `--config.train.batch_size=32`; `:joint,key=value`
works too.
"""
import ast

import ml_collections

STAGES = ("global", "joint", "extend")


def parse_arg(arg):
  """Splits 'stage,key=value,...' into (stage, {key: value})."""
  stage, _, rest = (arg or "global").partition(",")
  if stage not in STAGES:
    raise ValueError(f"Config stage must be one of {STAGES}, got {stage!r}; "
                     "use e.g. configs/fashionai.py:global, :joint or :extend.")
  return stage, parse_overrides(rest)


def parse_overrides(text):
  """'key=value,...' -> {key: value}; values are Python literals, else plain strings."""
  overrides = {}
  for part in (p for p in text.split(",") if p):
    if "=" not in part:
      raise ValueError(f"Config override {part!r} is not of the form key=value.")
    key, value = part.split("=", 1)
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass  # Plain strings stay strings.
    overrides[key] = value
  return overrides


def apply_overrides(config, overrides):
  """Sets each dotted key (`seed`, `train.lr`, ...) of `config`; only existing fields."""
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    target, where = config, "the config"
    for depth, name in enumerate(parents + [leaf]):
      if not isinstance(target, ml_collections.ConfigDict):
        raise ValueError(f"Config override {key!r}: {where} is a value, not a group of fields.")
      if name not in target:
        raise ValueError(f"Config override {key!r}: {where} has no field {name!r}; its fields "
                         f"are {', '.join(sorted(target.keys()))}.")
      if depth < len(parents):
        target, where = target[name], ".".join(parents[:depth + 1])
    target[leaf] = value
  return config


def base_config(stage):
  """The paper's settings (FashionAI); dataset configs override what differs."""
  c = ml_collections.ConfigDict()
  c.stage = stage
  c.seed = 0

  # Data: <data.root>/<data.folder>/ holds the official split files.
  c.data = ml_collections.ConfigDict()
  c.data.name = "fashionai"          # tfds builder config
  c.data.root = "data"               # folder that holds <folder>/
  c.data.folder = "FashionAI"
  c.data.tfds_dir = "data/tfds"      # where the array_record dataset is built
  c.data.attributes = ()             # names, in attribute-index order
  c.data.num_values = ()             # values per attribute
  c.data.image_size = 224            # global view: shorter side -> size, centre crop
  c.data.hires_size = 448            # same field of view, for the on-device RoI crop
  c.data.worker_count = 2            # grain worker processes
  c.data.decode_cache_mb = 0         # decoded views kept in memory per process (threads only)
  c.data.skip_corrupt = False

  c.model = ml_collections.ConfigDict()
  c.model.global_backbone = "resnet50"
  c.model.local_backbone = "resnet34"
  c.model.width = 1.0                # backbone width multiplier (1.0 = torchvision)
  c.model.attr_dim = 512
  c.model.global_common_dim = 512
  c.model.local_common_dim = 256
  c.model.reduction = 2
  c.model.embed_dim = 1024
  c.model.global_output_stride = 0   # 0: the paper's 16 (14 x 14 map at 224 px); 8: 2x finer
  c.model.local_size = 112           # RoI crop side fed to the local branch
  c.model.roi_threshold = 0.1
  c.model.compute_dtype = "float32"  # bfloat16 on GPU/TPU; params stay float32
  c.model.fast_cpu_backward = True   # asen_jax/cpu_ops.py's gradients on the CPU (same to 1e-5)
  c.model.init_backbones = ml_collections.ConfigDict()
  c.model.init_backbones.global_file = ""   # converted torchvision .npz/.pth/.safetensors
  c.model.init_backbones.local_file = ""

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 16            # triplets per step, global (all devices)
  c.train.triplets_per_epoch = 100_000
  c.train.margin = 0.2
  # BatchNorm statistics in training: 'per_role' (anchors, positives, negatives apart, as the
  # official trainer's three forwards) or 'batch' (one set over all 3 x batch_size images).
  c.train.bn_stats = "per_role"
  c.train.log_every = 50
  c.train.checkpoint_every = 1000    # steps; plus at every epoch end
  c.train.max_steps = 0              # stop after this many steps (0: epochs * steps per epoch)
  c.train.eval_every_epochs = 1      # validation MAP (and best checkpoint) every N epochs and
                                     # at the last step
  if stage == "global":
    c.train.epochs = 50
    c.train.lr = 1e-4
    c.train.lr_global = 1e-4
    c.train.decay_rate = 0.9
    c.train.decay_every_epochs = 3
  elif stage == "extend":           # the new table rows only (lr); a fifth of stage 1's epochs
    c.train.epochs = 10
    c.train.lr = 1e-3
    c.train.lr_global = 0.0          # unused: nothing global trains
    c.train.decay_rate = 0.9
    c.train.decay_every_epochs = 1
  else:
    c.train.epochs = 20
    c.train.lr = 1e-4                # local backbone and local heads
    c.train.lr_global = 1e-5         # global branch incl. the shared attribute embedding
    c.train.decay_rate = 0.9
    c.train.decay_every_epochs = 1
  c.train.loss_weights = ml_collections.ConfigDict(
      dict(global_triplet=1.0, local_triplet=0.1, alignment=0.1))

  # Backbone pretraining by attribute classification (asen_jax/pretrain.py,
  # tools/pretrain_backbone.py): the stand-in for ImageNet weights where there are none.
  c.pretrain = ml_collections.ConfigDict()
  c.pretrain.steps = 1000
  c.pretrain.batch_size = 64         # images per step (all devices)
  c.pretrain.lr = 1e-3
  c.pretrain.pooling = "mean"        # or 'mask', a learned foreground mask: asen_jax/pretrain.py

  c.eval = ml_collections.ConfigDict()
  c.eval.beta = 0.6
  c.eval.batch_size = 64
  c.eval.split = "valid"
  return c
