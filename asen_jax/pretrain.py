"""Backbone pretraining by attribute classification: a stand-in for ImageNet weights.

Where no ImageNet weights can be had (the synthetic demo), `pretrain_backbone` trains the
backbone to classify the training split's attributes -- one linear head per attribute on the
pooled last-stage features, cross entropy -- and writes it as a torchvision-keyed .npz, the file
that `config.model.init_backbones.*_file` reads. Only the backbone is kept: the attention, the
heads and the attribute table still come from the two ASEN++ stages.

Pooling (`config.pretrain.pooling`): 'mean' (global average, as ImageNet classifiers) or 'mask'
(a learned foreground mask weighs each cell, so background cells get almost no gradient).
docs/synthetic.md measures what each does to where ASEN++ later looks.
"""
import hashlib
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from asen_jax import convert
from asen_jax import model as model_lib
from asen_jax import parallel
from asen_jax import resnet
from asen_jax.data import builder
from asen_jax.data import views

NUM_STAGES = 3   # ASEN++ uses ResNets up to layer3


POOLINGS = ("mean", "mask")


class AttributeClassifier(nn.Module):
  """Backbone -> pooling (POOLINGS) -> one linear head per attribute (logits concatenated)."""
  backbone_name: str
  width: float
  num_values: tuple
  output_stride: int = 0
  pooling: str = "mean"

  def setup(self):
    self.backbone = resnet.make_backbone(self.backbone_name, NUM_STAGES, self.width,
                                         output_stride=self.output_stride)
    if self.pooling == "mask":
      self.saliency = nn.Conv(1, (1, 1))
    self.heads = nn.Dense(sum(self.num_values))

  def pool(self, feats_bhwc):
    """(B, H, W, C) features -> (B, C)."""
    if self.pooling == "mean":
      return feats_bhwc.mean(axis=(1, 2))
    mask = nn.sigmoid(self.saliency(feats_bhwc))                       # (B, H, W, 1)
    return (feats_bhwc * mask).sum(axis=(1, 2)) / (mask.sum(axis=(1, 2)) + 1e-3)

  def __call__(self, images_bhwc, train=False):
    return self.heads(self.pool(self.backbone(images_bhwc, train)))


def _value_table(num_values):
  """[A, Kmax] int32 positions of each attribute's logits in the concatenated heads, -1 = pad."""
  kmax, offsets = max(num_values), np.cumsum((0,) + tuple(num_values))
  table = np.full((len(num_values), kmax), -1, np.int32)
  for a, k in enumerate(num_values):
    table[a, :k] = offsets[a] + np.arange(k)
  return jnp.asarray(table)


def classification_loss(logits_bn, labels_ba, table):
  """Cross entropy of every known (image, attribute) label among that attribute's values.

  labels_ba: int [b, A], -1 where an image has no label for an attribute (FashionAI images carry
  one attribute each, the synthetic ones all). Returns (mean loss over known labels,
  correct [b, A] in {0, 1}, known [b, A] in {0, 1}).
  """
  b = logits_bn.shape[0]
  idx = jnp.broadcast_to(table[None], (b,) + table.shape)              # [b, A, Kmax]
  logits = jnp.take_along_axis(logits_bn[:, None, :].astype(jnp.float32),
                               jnp.maximum(idx, 0), axis=-1)
  logits = jnp.where(idx >= 0, logits, -jnp.inf)
  known = (labels_ba >= 0).astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels_ba, 0))
  loss = jnp.sum(ce * known) / jnp.maximum(jnp.sum(known), 1.0)
  correct = (jnp.argmax(logits, -1) == labels_ba).astype(jnp.float32) * known
  return loss, correct, known


def label_matrix(rows, num_records, num_attributes):
  """int32 [num_records, A] value of each (image, attribute), -1 where unlabelled."""
  labels = np.full((num_records, num_attributes), -1, np.int32)
  labels[rows[:, 0], rows[:, 1]] = rows[:, 2]
  return labels


def _images_for_step(records, seed, step, batch_size):
  """The images of global step `step`: a pure function of (seed, step), so reruns are identical."""
  rng = np.random.default_rng([int(seed), 7, int(step)])
  return records[rng.integers(0, len(records), batch_size)]


def pretrain_settings(config, arch=None):
  """Everything besides the data that the weights `pretrain_backbone` writes depend on."""
  p = config.pretrain
  return {"arch": arch or config.model.global_backbone, "width": float(config.model.width),
          "output_stride": int(config.model.global_output_stride),
          "image_size": int(config.data.image_size), "steps": int(p.steps),
          "batch_size": int(p.batch_size), "lr": float(p.lr),
          "pooling": p.pooling, "seed": int(config.seed)}


def _file_bytes(path):
  with open(path, "rb") as f:
    return f.read()


def data_fingerprint(config):
  """sha256 of the training split in <data.root>/<data.folder>: its file list, its labels and
  every image's bytes (what pretraining learns from; 0.1 s for the synthetic set)."""
  folder = os.path.join(config.data.root, config.data.folder)
  names = _file_bytes(os.path.join(folder, "filenames_train.txt"))
  digest = hashlib.sha256(names)
  digest.update(_file_bytes(os.path.join(folder, "label_train.txt")))
  for name in names.decode().splitlines():
    if name.strip():
      digest.update(_file_bytes(os.path.join(folder, name.strip())))
  return digest.hexdigest()


def file_sha256(path):
  return hashlib.sha256(_file_bytes(path)).hexdigest()


def record_path(weights_path):
  """The JSON record written next to a pretrained backbone: <file>.json for <file>.npz."""
  return weights_path[:-4] + ".json"


def why_not_reusable(weights_path, config, arch=None):
  """None if `weights_path` is what `pretrain_backbone(config)` would write (same settings, same
  training data, the file its record describes); else the reason, as a phrase."""
  record_file = record_path(weights_path)
  if not (os.path.isfile(weights_path) and os.path.isfile(record_file)):
    return f"{weights_path} or its record {record_file} is missing"
  with open(record_file) as f:
    record = json.load(f)
  want = pretrain_settings(config, arch)
  have = record.get("settings", {})
  changed = [f"{k}={have.get(k)!r} (the config has {v!r})" for k, v in want.items()
             if have.get(k) != v]
  if changed:
    return "it was pretrained with " + ", ".join(changed)
  if record.get("data_sha256") != data_fingerprint(config):
    return (f"it was pretrained on other training data than "
            f"{os.path.join(config.data.root, config.data.folder)}")
  if record.get("file_sha256") != file_sha256(weights_path):
    return f"{weights_path} is not the file its record describes (sha256 differs)"
  return None


def pretrain_backbone(config, out_path, *, arch=None, log=print):
  """Trains `arch` (default: config.model.global_backbone) by attribute classification and
  writes it to `out_path` (.npz, torchvision keys). Returns {attribute: final accuracy %}.

  Knobs: config.pretrain.{steps, batch_size, lr}; data, image size and width from the config.
  Also writes record_path(out_path): the settings, the training data's fingerprint, the file's
  sha256 and the accuracy, so that a later run can tell whether the file fits its config
  (`why_not_reusable`).
  """
  if not out_path.endswith(".npz"):
    raise ValueError(f"pretrain: the output {out_path} must end in .npz (the torchvision-keyed "
                     "format that model.init_backbones.*_file reads).")
  arch = arch or config.model.global_backbone
  p = config.pretrain
  mesh = parallel.make_mesh()
  parallel.check_batch_size(p.batch_size, "pretrain.batch_size", mesh)
  builder.prepare_dataset(config)
  info = builder.dataset_info(config)
  rows = builder.train_labels(config)
  rows = rows[rows[:, 0] >= 0]                  # images skipped as corrupt have record -1
  source = builder.split_source(config, "train")
  labels = label_matrix(rows, len(source), len(info.attributes))
  records = np.unique(rows[:, 0])
  table = _value_table(tuple(info.num_values))
  # It sees the global view, so it runs at the global branch's stride (weights do not depend on it).
  if p.pooling not in POOLINGS:
    raise ValueError(f"config.pretrain.pooling is {p.pooling!r}; use one of {POOLINGS} "
                     "(e.g. --config.pretrain.pooling=mask).")
  net = AttributeClassifier(arch, config.model.width, tuple(int(k) for k in info.num_values),
                            config.model.global_output_stride, p.pooling)
  size = config.data.image_size
  variables = jax.jit(net.init)(jax.random.key(config.seed),
                                jnp.zeros((1, size, size, 3), jnp.float32))
  tx = optax.adam(p.lr)
  state = parallel.replicate(mesh, (variables["params"], variables["batch_stats"],
                                    tx.init(variables["params"])))

  def step_fn(state, images, labels):
    params, batch_stats, opt = state

    def loss_fn(params):
      logits, upd = net.apply({"params": params, "batch_stats": batch_stats},
                              model_lib.normalize_images(images), train=True,
                              mutable=["batch_stats"])
      loss, correct, known = classification_loss(logits, labels, table)
      return loss, (correct, known, upd["batch_stats"])

    (loss, (correct, known, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt = tx.update(grads, opt, params)
    return (optax.apply_updates(params, updates), batch_stats, opt), loss, (correct, known)

  rep = parallel.replicated(mesh)
  data = parallel.batch_sharding(mesh)
  step_fn = jax.jit(step_fn, in_shardings=(rep, data, data),
                    out_shardings=(rep, rep, rep), donate_argnums=(0,))
  num_attr = len(info.attributes)
  hits, counts = np.zeros(num_attr), np.zeros(num_attr)
  window = max(1, p.steps // 5)   # accuracy over the last fifth of the steps
  local = p.batch_size // jax.process_count()
  first = jax.process_index() * local

  def load(step):
    """This process's share of the images of `step` and their [b, A] labels."""
    batch = _images_for_step(records, config.seed, step, p.batch_size)[first:first + local]
    images = np.stack([views.load_view(source[int(r)]["image"], size, size)[0]
                       for r in batch])
    return images, labels[batch]

  views.configure_decode_cache(config.data.decode_cache_mb)
  bar = tqdm(range(p.steps), desc=f"pretrain {arch}", disable=jax.process_index() != 0)
  upcoming = load(0)
  for step in bar:
    current = upcoming
    state, loss, (correct, known) = step_fn(state, *parallel.shard_batch(mesh, current))
    if step + 1 < p.steps:
      upcoming = load(step + 1)   # decodes while the device runs this step
    if not np.isfinite(float(loss)):
      raise FloatingPointError(f"pretrain: the loss became {float(loss)} at step {step}; "
                               f"lower pretrain.lr (now {p.lr}).")
    if step >= p.steps - window:
      hits += np.asarray(jax.device_get(correct)).sum(0)
      counts += np.asarray(jax.device_get(known)).sum(0)
    bar.set_postfix(loss=f"{float(loss):.3f}")
  params, batch_stats, _ = jax.device_get(state)
  weights = convert.backbone_to_torchvision({"params": params["backbone"],
                                     "batch_stats": batch_stats["backbone"]})
  accuracy = {name: float(100 * hits[a] / max(counts[a], 1))
              for a, name in enumerate(info.attributes)}
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = out_path[:-4] + ".tmp.npz"
    np.savez(tmp, **weights)
    record = {"settings": pretrain_settings(config, arch),
              "data_sha256": data_fingerprint(config), "file_sha256": file_sha256(tmp),
              "train_accuracy_last_fifth": accuracy,
              "data": os.path.join(config.data.root, config.data.folder)}
    with open(record_path(tmp), "w") as f:
      json.dump(record, f, indent=1)
    os.replace(tmp, out_path)   # never a half-written weight file
    os.replace(record_path(tmp), record_path(out_path))
    log(f"Pretrained {arch} ({p.steps} steps): training accuracy over the last {window} steps "
        + ", ".join(f"{k} {v:.0f}%" for k, v in accuracy.items()) + f"; wrote {out_path}.")
  return accuracy
