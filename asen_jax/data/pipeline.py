"""Grain input pipelines: training triplets and evaluation streams (host side, uint8 out).

Host work: decode, resize the shorter side (bilinear), centre-crop; a second, higher-resolution
view of the same field of view feeds the on-device RoI crop. Normalisation happens on device.
"""
import functools
import os
import warnings

import grain
import numpy as np

from asen_jax.data import builder
from asen_jax.data.views import box_to_view
from asen_jax.data.views import configure_decode_cache
from asen_jax.data.views import load_view

_MAX_INDEX = 2**62   # "infinite" index range of the training stream


class TripletSampler:
  """Triplet i = pure function of (seed, i), by the official rule.

  Attribute uniform; positive value uniform among values with >= 2 images; negative value
  uniform among the other values with >= 1 image; anchor != positive share the positive value.
  Attributes or values that cannot take part are reported once, at construction.
  """

  def __init__(self, rows, num_values, seed, attributes=None, only=None):
    rows = np.asarray(rows).reshape(-1, 3)
    self.seed = int(seed)
    self.num_values = tuple(num_values)
    attributes = attributes or tuple(str(a) for a in range(len(num_values)))
    self.pools = []       # pools[a][v] = int32 record indices
    self.positive = []    # per attribute, values usable as anchor/positive value
    self.nonempty = []    # per attribute, values with >= 1 image
    rare, dropped = [], []
    for a, k in enumerate(self.num_values):
      sel = rows[rows[:, 1] == a]
      pools = [np.sort(sel[sel[:, 2] == v, 0]).astype(np.int64) for v in range(k)]
      positive = [v for v in range(k) if len(pools[v]) >= 2]
      nonempty = [v for v in range(k) if len(pools[v]) >= 1]
      rare += [f"{attributes[a]}={v} ({len(pools[v])} images)" for v in range(k)
               if len(pools[v]) < 2]
      if not positive or len(nonempty) < 2:
        dropped.append(attributes[a])
      self.pools.append(pools)
      self.positive.append(np.asarray(positive, np.int64))
      self.nonempty.append(np.asarray(nonempty, np.int64))
    # `only`: attribute indices that triplets are drawn for (stage extend: the new ones).
    self.attributes = np.asarray([a for a in range(len(self.num_values))
                                  if attributes[a] not in dropped
                                  and (only is None or a in only)], np.int64)
    if not len(self.attributes):
      raise ValueError("No attribute has a value with two training images and another value "
                       "with one; the training split cannot form a single triplet.")
    self.warning = None
    if rare or dropped:
      self.warning = (f"{len(rare)} attribute values have fewer than two training images and are "
                      f"never drawn as the anchor/positive value: {', '.join(rare[:10])}"
                      f"{' ...' if len(rare) > 10 else ''}"
                      + (f"; attributes never sampled: {', '.join(dropped)}" if dropped else ""))
      warnings.warn(self.warning, stacklevel=2)

  def __call__(self, index):
    """(attribute, value_pos, value_neg, anchor, positive, negative) record indices."""
    rng = np.random.default_rng([self.seed, int(index)])
    a = int(self.attributes[rng.integers(len(self.attributes))])
    vp = int(self.positive[a][rng.integers(len(self.positive[a]))])
    others = self.nonempty[a][self.nonempty[a] != vp]
    vn = int(others[rng.integers(len(others))])
    anchor, positive = rng.choice(self.pools[a][vp], size=2, replace=False)
    negative = self.pools[a][vn][rng.integers(len(self.pools[a][vn]))]
    return a, vp, vn, int(anchor), int(positive), int(negative)


class _LoadTriplet(grain.transforms.Map):
  """Global triplet index -> dict of uint8 views and int32 labels."""

  def __init__(self, source, sampler, image_size, hires_size):
    self.source, self.sampler = source, sampler
    self.image_size, self.hires_size = image_size, hires_size

  def map(self, index):
    a, vp, vn, *records = self.sampler(index)
    views = [load_view(self.source[r]["image"], self.image_size, self.hires_size)
             for r in records]
    return {"images": np.stack([v for v, _ in views]),
            "hires": np.stack([h for _, h in views]),
            "attribute": np.int32(a), "value_pos": np.int32(vp), "value_neg": np.int32(vn),
            "index": np.int64(index)}


class _ShardIndexMap(grain.transforms.Map):
  """Element k of a shard's stream -> its position in the global stream.

  Step t of the global stream holds positions [t * G, (t + 1) * G), G = per_shard * shard_count;
  shard p takes the slice [t * G + p * per_shard, ...), so the shards' batches of one step
  together are the global batch, whatever the number of processes.
  """

  def __init__(self, per_shard, shard_index, shard_count):
    self.per_shard, self.shard_index, self.shard_count = per_shard, shard_index, shard_count

  def map(self, k):
    t, j = divmod(int(k), self.per_shard)
    return t * self.per_shard * self.shard_count + self.shard_index * self.per_shard + j


def _check_shard(batch_size, shard_index, shard_count, what):
  if shard_count < 1 or not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index={shard_index} must be in 0..{shard_count - 1}.")
  if batch_size < shard_count or batch_size % shard_count:
    raise ValueError(f"{what}={batch_size} must be a positive multiple of the number of "
                     f"processes ({shard_count}).")


def make_train_sampler(config, seed, attributes=None):
  info = builder.dataset_info(config)
  return TripletSampler(builder.train_labels(config), info.num_values, seed, info.attributes,
                        only=attributes)


def _train_pipeline(config, sampler, source, per_shard, shard_index, shard_count, worker_count,
                    start_step):
  ds = grain.MapDataset.range(start_step * per_shard, _MAX_INDEX)
  ds = ds.map(_ShardIndexMap(per_shard, shard_index, shard_count))
  ds = ds.map(_LoadTriplet(source, sampler, config.data.image_size, config.data.hires_size))
  ds = ds.batch(per_shard, drop_remainder=True)
  # Threads decode within a process (PIL releases the GIL); buffers are a few batches, not 500.
  threads = max(1, min(4, os.cpu_count() or 1))
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads))
  if worker_count > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count,
                                                     per_worker_buffer_size=2))
  return ds


class _TrainIterator(grain.DatasetIterator):
  """Steps through the training stream; its state is just the global step.

  Batch t is a pure function of (seed, t), so the state {'step': t} restores the same batches
  under any worker count (grain's own multi-worker state would tie a resume to the same
  worker count). The grain pipeline below is rebuilt from that step on set_state.
  """

  def __init__(self, build, start_step, fingerprint):
    super().__init__()
    self._build, self._step, self._fingerprint = build, int(start_step), fingerprint
    self._inner = None

  def _ensure_inner(self):
    if self._inner is None:
      self._inner = iter(self._build(self._step))
    return self._inner

  def __next__(self):
    self._assert_not_closed()
    batch = next(self._ensure_inner())
    self._step += 1
    return batch

  def get_state(self):
    return {"step": self._step, **self._fingerprint}

  def set_state(self, state):
    for key, value in self._fingerprint.items():
      if state.get(key) != value:
        raise ValueError(f"The data iterator state was saved with {key}={state.get(key)}, but "
                         f"this run has {key}={value}; resume with the same setting or start a "
                         "new workdir.")
    if self._inner is not None:
      self._inner.close()
      self._inner = None
    self._step = int(state["step"])

  def start_prefetch(self):
    inner = self._ensure_inner()
    if hasattr(inner, "start_prefetch"):
      inner.start_prefetch()

  def close(self):
    if self._inner is not None:
      self._inner.close()
      self._inner = None
    super().close()


class _TrainStream(grain.IterDataset):
  """IterDataset whose iterators are `_TrainIterator`s."""

  def __init__(self, build, start_step, fingerprint):
    super().__init__()
    self._build, self._start_step, self._fingerprint = build, start_step, fingerprint

  def __iter__(self):
    return _TrainIterator(self._build, self._start_step, self._fingerprint)


def make_train_loader(config, *, seed, shard_index=0, shard_count=1, worker_count=None,
                      start_step=0, attributes=None):
  """Infinite grain IterDataset of this process's training batches.

  Yields {'images': uint8[B, 3, S, S, 3] (anchor, positive, negative), 'hires': uint8[B, 3, R,
  R, 3], 'attribute', 'value_pos', 'value_neg': int32[B], 'index': int64[B] (the triplets'
  positions in the global stream)} with B = train.batch_size // shard_count. `iter()` gives a
  grain DatasetIterator whose get_state/set_state ({'step': t},
  orbax-checkpointable with grain.checkpoint.CheckpointSave/CheckpointRestore) resume at global
  step t under any worker count. `start_step` starts there without a saved state;
  `attributes` (indices) limits the triplets to those attributes.
  """
  _check_shard(config.train.batch_size, shard_index, shard_count, "train.batch_size")
  builder.prepare_dataset(config)
  per_shard = config.train.batch_size // shard_count
  configure_decode_cache(config.data.decode_cache_mb)
  sampler = make_train_sampler(config, seed, attributes)
  source = builder.split_source(config, "train")
  worker_count = config.data.worker_count if worker_count is None else worker_count
  build = functools.partial(_train_pipeline, config, sampler, source, per_shard, shard_index,
                            shard_count, max(0, int(worker_count or 0)))
  fingerprint = {"seed": int(seed), "global_batch_size": int(config.train.batch_size)}
  if attributes is not None:
    fingerprint["attributes"] = [int(a) for a in attributes]
  return _TrainStream(build, start_step, fingerprint)


class _LoadEval(grain.transforms.Map):
  """Stream position -> one (possibly padding) query/candidate line with its views."""

  def __init__(self, source, lines, record_index, index_map, image_size, hires_size):
    self.source, self.lines, self.record_index = source, lines, record_index
    self.index_map = index_map
    self.image_size, self.hires_size = image_size, hires_size

  def map(self, k):
    g = self.index_map.map(k)
    if g >= len(self.lines):   # padding: keeps every process's batch count equal
      return {"image": np.zeros((self.image_size, self.image_size, 3), np.uint8),
              "hires": np.zeros((self.hires_size, self.hires_size, 3), np.uint8),
              "attribute": np.int32(0), "value": np.int32(-1), "image_id": np.int32(-1),
              "box": np.full(4, -1.0, np.float32), "mask": np.bool_(False)}
    fid, a, v = (int(x) for x in self.lines[g])
    record = self.source[int(self.record_index[fid])]
    view, hires = load_view(record["image"], self.image_size, self.hires_size)
    return {"image": view, "hires": hires, "attribute": np.int32(a), "value": np.int32(v),
            "image_id": np.int32(fid),
            "box": box_to_view(record["boxes"][a], int(record["width"]), int(record["height"])),
            "mask": np.bool_(True)}


def eval_stream_length(config, split, which, *, batch_size, shard_count=1):
  """Number of batches each process's eval stream yields (the same on every process)."""
  n = len(builder.eval_lines(config, split, which))
  return -(-n // (batch_size * shard_count))


def make_eval_stream(config, split, which, *, batch_size, shard_index=0, shard_count=1):
  """Every line of <which>_<split>.txt once, in file order, as this process's batches.

  `batch_size` is per process. Yields {'image': uint8[B, S, S, 3], 'hires': uint8[B, R, R, 3],
  'attribute', 'value', 'image_id': int32[B], 'box': float32[B, 4] (ground-truth box of the
  attribute in [0, 1] view coordinates, -1 when unknown), 'mask': bool[B]}; padding has mask
  False. Step t of process p holds lines t * batch_size * shard_count + p * batch_size + j.
  """
  _check_shard(batch_size * shard_count, shard_index, shard_count, "batch_size * shard_count")
  builder.prepare_dataset(config)
  lines = builder.eval_lines(config, split, which)
  configure_decode_cache(config.data.decode_cache_mb)
  steps = eval_stream_length(config, split, which, batch_size=batch_size,
                             shard_count=shard_count)
  load = _LoadEval(builder.split_source(config, split), lines,
                   builder.record_index(config, split),
                   _ShardIndexMap(batch_size, shard_index, shard_count),
                   config.data.image_size, config.data.hires_size)
  ds = grain.MapDataset.range(steps * batch_size).map(load).batch(batch_size)
  threads = max(1, min(8, os.cpu_count() or 1))
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                              prefetch_buffer_size=threads))

