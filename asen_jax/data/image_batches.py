"""Evaluation by image: lines (image, attribute, value) packed so each image is loaded and run
through the backbones once, whatever the number of its lines.

A chunk is one device's share of a step: up to `images` images and `slots` line slots whose
images are all in that chunk, so the device reads its lines' features without communication.
"""
import dataclasses
import os

import grain
import numpy as np

from asen_jax.data import builder
from asen_jax.data.views import box_to_view
from asen_jax.data.views import configure_decode_cache
from asen_jax.data.views import load_view


@dataclasses.dataclass(frozen=True)
class LinePacking:
  """Chunks of images and line slots; the number of chunks is a multiple of `chunk_multiple`."""
  image_id: np.ndarray     # int32[chunks, images]: image ids, -1 for padding
  line: np.ndarray         # int64[chunks, slots]: row of the packed line table, -1 for padding
  slot_image: np.ndarray   # int32[chunks, slots]: the slot's image within its chunk (0: padding)

  @property
  def num_chunks(self):
    return self.image_id.shape[0]

  def chunks_of_process(self, devices, process_index=0, process_count=1):
    """Indices of one process's chunks, step by step: a step is `devices` chunks, one a device,
    and process p holds those of devices [p * L, (p + 1) * L), L = devices / process_count."""
    per_process = devices // process_count
    steps = self.num_chunks // devices
    return (np.arange(steps)[:, None] * devices + process_index * per_process
            + np.arange(per_process)).reshape(-1)


def pack_lines(line_image_ids, images, chunk_multiple=1, slots=None):
  """Packs lines (their image ids, in line-table order) into chunks, images in first-use order.

  Chunks hold up to `images` images and `slots` lines (default: the mean number of lines of
  `images` images, and at least the most lines of one image); each image's lines stay together.
  """
  ids = np.asarray(line_image_ids, np.int64).reshape(-1)
  if images < 1:
    raise ValueError(f"pack_lines: images={images} must be at least 1.")
  uniq, first, inverse, counts = np.unique(ids, return_index=True, return_inverse=True,
                                           return_counts=True)
  order = np.argsort(first, kind="stable")             # images in order of their first line
  lines_of = np.split(np.argsort(inverse, kind="stable"), np.cumsum(counts)[:-1])
  most = int(counts.max()) if len(ids) else 1
  if slots is None:
    slots = max(most, -(-images * len(ids) // max(len(uniq), 1)))
  if slots < most:
    raise ValueError(f"pack_lines: slots={slots} is fewer than the {most} lines of one image.")
  chunks, current = [], ([], [])
  for u in order:
    if len(current[0]) == images or len(current[1]) + counts[u] > slots:
      chunks.append(current)
      current = ([], [])
    current[0].append(uniq[u])
    current[1].extend((len(current[0]) - 1, j) for j in lines_of[u])
  if current[0]:
    chunks.append(current)
  count = max(1, -(-len(chunks) // chunk_multiple)) * chunk_multiple   # empty chunks pad
  image_id = np.full((count, images), -1, np.int32)
  line = np.full((count, slots), -1, np.int64)
  slot_image = np.zeros((count, slots), np.int32)
  for c, (chunk_ids, chunk_lines) in enumerate(chunks):
    image_id[c, :len(chunk_ids)] = chunk_ids
    if chunk_lines:
      slot_image[c, :len(chunk_lines)], line[c, :len(chunk_lines)] = zip(*chunk_lines)
  return LinePacking(image_id, line, slot_image)


class _LoadImage(grain.transforms.Map):
  """Image id (-1: padding) -> its views and its ground-truth boxes in view coordinates."""

  def __init__(self, source, record_index, image_size, hires_size, num_attributes):
    self.source, self.record_index = source, record_index
    self.image_size, self.hires_size = image_size, hires_size
    self.num_attributes = num_attributes

  def map(self, image_id):
    if image_id < 0:
      return {"image": np.zeros((self.image_size, self.image_size, 3), np.uint8),
              "hires": np.zeros((self.hires_size, self.hires_size, 3), np.uint8),
              "boxes": np.full((self.num_attributes, 4), -1.0, np.float32)}
    record = self.source[int(self.record_index[int(image_id)])]
    view, hires = load_view(record["image"], self.image_size, self.hires_size)
    w, h = int(record["width"]), int(record["height"])
    return {"image": view, "hires": hires,
            "boxes": np.stack([box_to_view(b, w, h) for b in np.asarray(record["boxes"])])}


def make_image_stream(config, split, image_ids, *, batch_size):
  """Batches of `batch_size` images of a split, in the order of `image_ids` (-1: padding).

  Yields {'image': uint8[B, S, S, 3], 'hires': uint8[B, R, R, 3], 'boxes': float32[B, A, 4]
  (ground-truth boxes in [0, 1] view coordinates, -1 when unknown or padding)}.
  """
  ids = np.asarray(image_ids, np.int64).reshape(-1)
  if len(ids) % batch_size:
    raise ValueError(f"make_image_stream: {len(ids)} image ids are not whole batches of "
                     f"{batch_size}.")
  builder.prepare_dataset(config)
  configure_decode_cache(config.data.decode_cache_mb)
  load = _LoadImage(builder.split_source(config, split), builder.record_index(config, split),
                    config.data.image_size, config.data.hires_size,
                    len(builder.dataset_info(config).attributes))
  ds = grain.MapDataset.source(ids).map(load).batch(batch_size)
  threads = max(1, min(8, os.cpu_count() or 1))
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                              prefetch_buffer_size=threads))
