"""Image views: decode, centre square, resize (PIL, on the host), and an optional decode cache.

The global view and the higher-resolution view that feeds the on-device RoI crop cover exactly
the same field of view; box_to_view maps original-pixel boxes into it.
"""
import collections
import hashlib
import io
import threading

import numpy as np
from PIL import Image


class _ViewCache:
  """Decoded views by (image digest, sizes), least recently used first out, thread-safe.

  Decoding is a pure function of the bytes, so a cached view is bit-identical to a fresh one.
  Off (0 bytes) unless a loader sets `config.data.decode_cache_mb`; each process has its own.
  """

  def __init__(self):
    self.max_bytes, self.bytes, self.hits, self.misses = 0, 0, 0, 0
    self._views = collections.OrderedDict()
    self._lock = threading.Lock()

  def configure(self, megabytes):
    with self._lock:
      self.max_bytes = max(0, int(megabytes)) << 20
      self._evict()

  def _evict(self):
    while self._views and self.bytes > self.max_bytes:
      _, (view, hires) = self._views.popitem(last=False)
      self.bytes -= view.nbytes + hires.nbytes

  def get(self, image_bytes, image_size, hires_size):
    if not self.max_bytes:
      return _decode_views(image_bytes, image_size, hires_size)
    key = (hashlib.blake2b(image_bytes, digest_size=16).digest(), image_size, hires_size)
    with self._lock:
      views = self._views.get(key)
      if views is not None:
        self._views.move_to_end(key)
        self.hits += 1
        return views
    views = _decode_views(image_bytes, image_size, hires_size)
    for v in views:
      v.setflags(write=False)   # shared between batches: nobody may write into them
    with self._lock:
      self.misses += 1
      if key not in self._views:
        self._views[key] = views
        self.bytes += views[0].nbytes + views[1].nbytes
        self._evict()
    return views


_VIEW_CACHE = _ViewCache()


def configure_decode_cache(megabytes):
  """Keeps up to `megabytes` of decoded views in this process (0: none, the default)."""
  _VIEW_CACHE.configure(megabytes)
  return _VIEW_CACHE


def load_view(image_bytes, image_size, hires_size):
  """(view uint8[S, S, 3], hires uint8[R, R, 3]) of an encoded image.

  Both are the central square of side min(width, height) (what "resize the shorter side, then
  centre-crop" keeps), resized bilinearly in one PIL call, so the two views cover exactly the
  same field of view and view pixel (u, v) maps to original (off_x + u * s0 / S, ...).
  Served from the decode cache when one is configured (read-only arrays then).
  """
  return _VIEW_CACHE.get(image_bytes, image_size, hires_size)


def _decode_views(image_bytes, image_size, hires_size):
  with Image.open(io.BytesIO(image_bytes)) as im:
    im = im.convert("RGB")
    w, h = im.size
    s0 = min(w, h)
    box = ((w - s0) / 2, (h - s0) / 2, (w + s0) / 2, (h + s0) / 2)
    view = im.resize((image_size, image_size), Image.Resampling.BILINEAR, box=box)
    hires = im.resize((hires_size, hires_size), Image.Resampling.BILINEAR, box=box)
  return np.asarray(view, np.uint8), np.asarray(hires, np.uint8)


def box_to_view(box_xyxy, width, height):
  """Original-pixel box -> [0, 1] coordinates of the centre-cropped view (clipped).

  The all -1 box (unknown) stays all -1.
  """
  box = np.asarray(box_xyxy, np.float32)
  if np.all(box == -1):
    return np.full(4, -1.0, np.float32)
  s0 = float(min(width, height))
  off = np.array([(width - s0) / 2, (height - s0) / 2] * 2, np.float32)
  return np.clip((box - off) / s0, 0.0, 1.0).astype(np.float32)
