"""On-device RoI boxes from attention maps and antialiased crops (the ASEN++ local view).

The public implementation does this per image in NumPy/OpenCV/PIL inside the training loop.
Here every step is a fixed-shape array op, so it runs inside the jitted train/eval step:

1. the attention map is resized bilinearly to the frame (224 x 224) and min-max normalised;
2. pixels above `threshold` are kept; their bounding box is made square around its centre
   and shifted inside the frame (integer pixels, half-open boxes);
3. the square is scaled to a view of the same field of view (e.g. the 2x 'hires' view), cropped
   there and resized to `out_size` with PIL's antialiased bilinear filter.

Boxes are (x0, y0, x1, y1) in frame pixels, half-open: x0 = first kept column, x1 = last + 1.
No gradient flows through boxes or crop positions (the reference detaches the map too).
"""
import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST
# A map whose range is below this fraction of its magnitude is treated as constant: the
# resize alone leaves float32 rounding noise on a constant map, which must not pick a box.
_FLAT_RTOL = 1e-6


def _check_size(name, value):
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ValueError(f"roi: {name} must be a positive Python int (a static shape), "
                     f"got {value!r}.")


def _span(any_bn, n):
  """First index and one-past-last index of True along the last axis ([b] int32 each)."""
  first = jnp.argmax(any_bn, axis=-1)
  last_plus_one = n - jnp.argmax(any_bn[..., ::-1], axis=-1)
  return first.astype(jnp.int32), last_plus_one.astype(jnp.int32)


def attention_boxes(attmap_bhw, frame_size, threshold):
  """Square RoI boxes [b, 4] float32 (x0, y0, x1, y1) in frame pixels from attention maps.

  Args:
    attmap_bhw: [b, h, w] attention maps (any float dtype; e.g. 14 x 14 softmax values).
    frame_size: side of the frame the box lives in (224 in the paper); static int.
    threshold: keep normalised map values strictly above this (0.1 in stage 2).

  A constant map (or one with nothing above the threshold) gives the whole frame.
  """
  _check_size("frame_size", frame_size)
  if getattr(attmap_bhw, "ndim", None) != 3:
    raise ValueError("attention_boxes: attmap_bhw must have shape [batch, h, w], got shape "
                     f"{getattr(attmap_bhw, 'shape', None)}.")
  att = jax.lax.stop_gradient(jnp.asarray(attmap_bhw)).astype(jnp.float32)
  b = att.shape[0]
  f = frame_size
  # Half-pixel centres, edge-clamped weights: the same samples as PIL/cv2 bilinear upsampling.
  up_bff = jax.image.resize(att, (b, f, f), method="bilinear", precision=_HIGHEST)
  lo = jnp.min(up_bff, axis=(1, 2), keepdims=True)
  hi = jnp.max(up_bff, axis=(1, 2), keepdims=True)
  span = hi - lo
  flat = span <= _FLAT_RTOL * jnp.maximum(jnp.abs(hi), jnp.abs(lo))
  norm_bff = jnp.where(flat, 0.0, (up_bff - lo) / jnp.where(flat, 1.0, span))
  keep_bff = norm_bff > threshold

  cols_bf = jnp.any(keep_bff, axis=1)   # any kept pixel in column x
  rows_bf = jnp.any(keep_bff, axis=2)   # any kept pixel in row y
  found_b = jnp.any(cols_bf, axis=-1)
  x0, x1 = _span(cols_bf, f)
  y0, y1 = _span(rows_bf, f)
  zero, full = jnp.zeros_like(x0), jnp.full_like(x0, f)
  x0, x1 = jnp.where(found_b, x0, zero), jnp.where(found_b, x1, full)
  y0, y1 = jnp.where(found_b, y0, zero), jnp.where(found_b, y1, full)

  # Square of side d around the centre: the left edge is floor(centre - d / 2) in exact
  # integer arithmetic (floor division), then shifted to lie inside [0, f]; d <= f always.
  w, h = x1 - x0, y1 - y0
  d = jnp.maximum(w, h)
  sx0 = jnp.clip(x0 + jnp.floor_divide(w - d, 2), 0, f - d)
  sy0 = jnp.clip(y0 + jnp.floor_divide(h - d, 2), 0, f - d)
  return jnp.stack([sx0, sy0, sx0 + d, sy0 + d], axis=-1).astype(jnp.float32)


def _bilinear_weights(start_b, stop_b, in_size, out_size):
  """[b, out_size, in_size] weights that resample pixels [start, stop) to out_size pixels.

  PIL's resampling rule: output pixel i samples at start + (i + 0.5) * scale with a triangle
  filter widened by the scale when shrinking (antialiasing); only pixels inside the crop
  count and the weights of each output pixel are normalised to sum to one.
  """
  start = start_b[:, None]
  stop = stop_b[:, None]
  scale = (stop - start) / out_size                                  # [b, 1]
  support = jnp.maximum(scale, 1.0)[..., None]                       # [b, 1, 1]
  centres = start + (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * scale  # [b, out]
  taps = jnp.arange(in_size, dtype=jnp.float32) + 0.5                # pixel centres [in]
  weights = jnp.maximum(0.0, 1.0 - jnp.abs(taps - centres[..., None]) / support)
  inside = (taps >= start) & (taps < stop)                           # [b, in]
  weights = jnp.where(inside[:, None, :], weights, 0.0)
  total = jnp.sum(weights, axis=-1, keepdims=True)
  return weights / jnp.maximum(total, 1e-12)


def crop_and_resize(images_bhwc, boxes_b4, frame_size, out_size):
  """Crops frame boxes out of a same-field-of-view image and resizes them: [b, out, out, c].

  Args:
    images_bhwc: [b, H, W, c] view covering the frame's field of view at any resolution
      (e.g. the 2x 'hires' view); uint8 or float.
    boxes_b4: [b, 4] (x0, y0, x1, y1) in frame pixels, as from `attention_boxes`.
    frame_size: side of the frame the boxes live in; static int.
    out_size: side of the output crops (112 in the paper); static int.

  Returns float32 crops in the input's value range (uint8 -> 0..255, not normalised).
  The box is scaled by H / frame_size (W / frame_size) and rounded to whole pixels.
  """
  _check_size("frame_size", frame_size)
  _check_size("out_size", out_size)
  if getattr(images_bhwc, "ndim", None) != 4:
    raise ValueError("crop_and_resize: images_bhwc must have shape [batch, H, W, channels], "
                     f"got shape {getattr(images_bhwc, 'shape', None)}.")
  if getattr(boxes_b4, "shape", None) != (images_bhwc.shape[0], 4):
    raise ValueError(f"crop_and_resize: boxes_b4 must have shape ({images_bhwc.shape[0]}, 4) "
                     f"to match the images, got {getattr(boxes_b4, 'shape', None)}.")
  _, height, width, _ = images_bhwc.shape
  boxes = jax.lax.stop_gradient(jnp.asarray(boxes_b4)).astype(jnp.float32)

  def edges(lo, hi, size):
    s = size / frame_size
    lo = jnp.clip(jnp.floor(lo * s + 0.5), 0, size - 1)
    hi = jnp.clip(jnp.floor(hi * s + 0.5), lo + 1, size)  # never an empty crop
    return lo, hi

  x0, x1 = edges(boxes[:, 0], boxes[:, 2], width)
  y0, y1 = edges(boxes[:, 1], boxes[:, 3], height)
  wy = _bilinear_weights(y0, y1, height, out_size)  # [b, out, H]
  wx = _bilinear_weights(x0, x1, width, out_size)   # [b, out, W]
  images = jnp.asarray(images_bhwc).astype(jnp.float32)
  # Two separable matmuls; HIGHEST keeps 0..255 values exact under bf16-default matmuls.
  rows = jnp.einsum("boh,bhwc->bowc", wy, images, precision=_HIGHEST)
  crops = jnp.einsum("bpw,bowc->bopc", wx, rows, precision=_HIGHEST)
  if jnp.issubdtype(images_bhwc.dtype, jnp.integer):
    # The weights are a convex combination; clip only float32 rounding (255.00003).
    info = jnp.iinfo(images_bhwc.dtype)
    crops = jnp.clip(crops, info.min, info.max)
  return crops


def roi_crops(attmap_bhw, images_bhwc, frame_size, out_size, threshold):
  """(crops [b, out, out, c] float32, boxes [b, 4] float32): the local view of each image."""
  if getattr(attmap_bhw, "ndim", None) == 3 and getattr(images_bhwc, "ndim", None) == 4:
    if attmap_bhw.shape[0] != images_bhwc.shape[0]:
      raise ValueError(f"roi_crops: {attmap_bhw.shape[0]} attention maps for "
                       f"{images_bhwc.shape[0]} images; pass one map per image.")
  boxes = attention_boxes(attmap_bhw, frame_size, threshold)
  return crop_and_resize(images_bhwc, boxes, frame_size, out_size), boxes
