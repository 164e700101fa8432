"""Every config value checked before any work starts, each problem in one sentence.

And what a resumed run may change: the fields that shape a run (model, data, schedule, seed) must
match the saved run's; RESUMABLE fields may differ on a resume, and the change is recorded.
"""
import numbers

# Fields that a resume may change: how long, how often to log/save/validate, how data is read.
RESUMABLE = frozenset({
    "train.max_steps", "train.epochs", "train.log_every", "train.checkpoint_every",
    "train.eval_every_epochs", "data.root", "data.tfds_dir", "data.worker_count",
    "data.decode_cache_mb", "data.skip_corrupt", "eval.batch_size", "eval.split",
    "model.fast_cpu_backward",
    # Initial weights are read on a fresh start only.
    "model.init_backbones.global_file", "model.init_backbones.local_file"})

_POSITIVE_INT = ("data.image_size", "data.hires_size", "model.local_size", "model.attr_dim",
                 "model.global_common_dim", "model.local_common_dim", "model.embed_dim",
                 "model.reduction", "train.batch_size", "train.triplets_per_epoch",
                 "train.log_every", "train.checkpoint_every", "train.eval_every_epochs",
                 "train.epochs", "train.decay_every_epochs", "eval.batch_size",
                 "pretrain.steps", "pretrain.batch_size")
_NON_NEGATIVE_INT = ("train.max_steps", "data.worker_count", "data.decode_cache_mb", "seed")
_POSITIVE_FLOAT = ("model.width", "train.lr", "pretrain.lr")
_UNIT_INTERVAL = ("model.roi_threshold", "eval.beta", "train.decay_rate")
_CHOICES = {"model.global_output_stride": (0, 8, 16),
            "model.compute_dtype": ("float32", "bfloat16", "float16"),
            "train.bn_stats": ("per_role", "batch"),
            "eval.split": ("valid", "test"),
            "pretrain.pooling": ("mean", "mask")}


def _get(config, dotted):
  value = config
  for name in dotted.split("."):
    if name not in value:
      return None
    value = value[name]
  return value


def _is_int(v):
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def problems(config, num_devices=None):
  """Sentences, one per bad field of `config` (empty when it is sound)."""
  out = []
  for f in _POSITIVE_INT:
    v = _get(config, f)
    if v is not None and not (_is_int(v) and v > 0):
      out.append(f"config.{f} = {v!r} must be a whole number > 0")
  for f in _NON_NEGATIVE_INT:
    v = _get(config, f)
    if v is not None and not (_is_int(v) and v >= 0):
      out.append(f"config.{f} = {v!r} must be a whole number >= 0")
  for f in _POSITIVE_FLOAT:
    v = _get(config, f)
    if v is not None and not (isinstance(v, numbers.Real) and v > 0):
      out.append(f"config.{f} = {v!r} must be a number > 0")
  for f in _UNIT_INTERVAL:
    v = _get(config, f)
    if v is not None and not (isinstance(v, numbers.Real) and 0 <= v <= 1):
      out.append(f"config.{f} = {v!r} must be a number in [0, 1]")
  for f in ("train.margin", "train.lr_global"):   # lr_global 0: a frozen global branch
    v = _get(config, f)
    if v is not None and not (isinstance(v, numbers.Real) and v >= 0):
      out.append(f"config.{f} = {v!r} must be a number >= 0")
  for f, choices in _CHOICES.items():
    v = _get(config, f)
    if v is not None and v not in choices:
      out.append(f"config.{f} = {v!r} must be one of {', '.join(map(repr, choices))}")
  image, hires = _get(config, "data.image_size"), _get(config, "data.hires_size")
  if _is_int(image) and _is_int(hires) and hires < image:
    out.append(f"config.data.hires_size = {hires} must be >= data.image_size = {image} (the RoI "
               "crop's view has the same field of view at a higher resolution)")
  if num_devices:
    for f in ("train.batch_size", "eval.batch_size"):
      v = _get(config, f)
      if _is_int(v) and v > 0 and v % num_devices:
        good = max(num_devices, v // num_devices * num_devices)
        out.append(f"config.{f}={v} is not divisible by the {num_devices} devices; use a "
                   f"multiple of {num_devices}, e.g. {f}={good}")
  return out


def check(config, num_devices=None):
  """Raises one ValueError naming every bad field (before any data is read or built)."""
  found = problems(config, num_devices)
  if found:
    raise ValueError("; ".join(found) + ". Fix the config file or its --config.<field> "
                     "override.")


def views(config):
  """The image views a model is trained on; a checkpoint records them for evaluation."""
  return {"data.image_size": config.data.image_size, "data.hires_size": config.data.hires_size,
          "model.local_size": config.model.local_size}


def check_views(saved, config, joint, source):
  """One sentence when `config` would show a checkpoint other views than it was trained on
  (a stage-1 model never crops, so only its global view counts)."""
  if not saved:
    return   # official files and checkpoints from before the record: the config decides
  now = views(config)
  keys = list(saved) if joint else ["data.image_size"]
  diff = [(k, saved[k], now[k]) for k in keys if k in now and saved[k] != now[k]]
  if diff:
    was = ", ".join(f"{k}={v}" for k, v, _ in diff)
    raise ValueError(f"{source} was trained with {was}, but the config has "
                     f"{', '.join(str(n) for _, _, n in diff)}; evaluate with the config it was "
                     f"trained with, or add {' '.join(f'--config.{k}={v}' for k, v, _ in diff)}.")


def differences(saved, now):
  """(shaping, resumable): lists of (field, saved value, new value) between two flat configs."""
  shaping, resumable = [], []
  for key in sorted(set(saved) | set(now)):
    if key not in saved or key not in now:
      continue   # a field this version added or dropped: nothing to compare
    if saved[key] != now[key]:
      (resumable if key in RESUMABLE else shaping).append((key, saved[key], now[key]))
  return shaping, resumable
