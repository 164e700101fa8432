"""RoI boxes and crops against a plain NumPy/PIL version of the same procedure."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from asen_jax import roi

FRAME, OUT, THR = 224, 112, 0.1
BILINEAR = Image.Resampling.BILINEAR


def reference_box(attmap_hw, frame, threshold):
  """The ASEN++ local-view box, written with PIL and NumPy."""
  img = Image.fromarray(np.asarray(attmap_hw, np.float32))
  assert img.mode == "F"
  up = np.asarray(img.resize((frame, frame), BILINEAR), np.float64)
  lo, hi = up.min(), up.max()
  norm = (up - lo) / (hi - lo) if hi - lo > 1e-6 * max(abs(hi), abs(lo)) else 0 * up
  ys, xs = np.nonzero(norm > threshold)
  if len(xs) == 0:
    return np.array([0, 0, frame, frame], np.float32)
  x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
  d = max(x1 - x0, y1 - y0)
  left = int(np.floor((x0 + x1) / 2 - d / 2))
  top = int(np.floor((y0 + y1) / 2 - d / 2))
  left = min(max(left, 0), frame - d)
  top = min(max(top, 0), frame - d)
  return np.array([left, top, left + d, top + d], np.float32)


def reference_crop(image_hwc_uint8, box, frame, out):
  s = image_hwc_uint8.shape[0] / frame
  hires_box = tuple(int(round(v * s)) for v in box)
  crop = Image.fromarray(image_hwc_uint8).crop(hires_box).resize((out, out), BILINEAR)
  return np.asarray(crop, np.float32)


def peaked_map(rng, row, col, size=14):
  """A softmax map with a blob near (row, col) plus noise, like a trained ASA map."""
  yy, xx = np.mgrid[:size, :size]
  sigma = rng.uniform(0.7, 2.5)
  logits = -((yy - row) ** 2 + (xx - col) ** 2) / (2 * sigma ** 2) * rng.uniform(1, 4)
  logits = logits + 0.3 * rng.standard_normal((size, size))
  p = np.exp(logits - logits.max())
  return (p / p.sum()).astype(np.float32)


def random_maps(seed, n):
  rng = np.random.default_rng(seed)
  corners = [(0, 0), (0, 13), (13, 0), (13, 13), (0, 6), (13, 7), (6, 0)]
  peaks = corners + [tuple(rng.integers(0, 14, 2)) for _ in range(n)]
  return np.stack([peaked_map(rng, r, c) for r, c in peaks[:n]])


def jitted_boxes():
  return jax.jit(functools.partial(roi.attention_boxes, frame_size=FRAME, threshold=THR))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_boxes_match_reference_on_random_maps(seed):
  maps = random_maps(seed, 7)
  boxes = np.asarray(jitted_boxes()(maps))
  assert boxes.shape == (7, 4) and boxes.dtype == np.float32
  ref = np.stack([reference_box(m, FRAME, THR) for m in maps])
  np.testing.assert_allclose(boxes, ref, atol=1.0)
  # Boxes are squares inside the frame.
  np.testing.assert_array_equal(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
  assert boxes.min() >= 0 and boxes.max() <= FRAME
  # The maps must give varied boxes, or this test would prove little.
  assert len({tuple(b) for b in boxes}) == 7


def test_boxes_batch_of_one_equals_batched():
  maps = random_maps(5, 7)
  batched = np.asarray(jitted_boxes()(maps))
  for i in (0, 3, 6):
    single = np.asarray(jitted_boxes()(maps[i:i + 1]))
    assert single.shape == (1, 4)
    np.testing.assert_array_equal(single[0], batched[i])


def one_hot_map(cells):
  m = np.zeros((14, 14), np.float32)
  for cell in cells:
    r, c, v = cell if len(cell) == 3 else (*cell, 1.0)
    m[r, c] = v
  return m


# Hand-computed boxes. A hot cell c is upsampled x16 with half-pixel centres: pixel x samples
# u = (x + 0.5) / 16 - 0.5, value 1 - |u - c|. An interior cell peaks at 1 - 1/32 (no pixel
# centre hits u = c), so after normalisation pixel x is kept when 1 - |u - c| > 0.1 * 31/32,
# i.e. |x + 0.5 - 16c - 8| < 14.45: x in [16c - 6, 16c + 21] -> box [16c - 6, 16c + 22).
# At a border cell, the edge pixels are clamped to value 1 (the max), so kept when
# |u - c| < 0.9: e.g. cell 0 gives [0, 22) and cell 13 gives [202, 224).
@pytest.mark.parametrize("cells,box", [
    ([(3, 9)], (138, 42, 166, 70)),           # interior: rows [42, 70), cols [138, 166)
    ([(0, 0)], (0, 0, 22, 22)),                # top-left corner
    ([(13, 13)], (202, 202, 224, 224)),        # bottom-right corner
    # Strip in row 0, cols 4..8: box x [58, 150), y [0, 22); square side 92 centred at
    # y = 11 starts at 0 + (22 - 92) // 2 = -35, shifted to 0.
    ([(0, c) for c in range(4, 9)], (58, 0, 150, 92)),
    # Strip in row 13, cols 9..13: x [138, 224), y [202, 224); side 86 starts at
    # 202 + (22 - 86) // 2 = 170, shifted to 224 - 86 = 138.
    ([(13, c) for c in range(9, 14)], (138, 138, 224, 224)),
    # Tall strip in col 2, rows 5..7: y [74, 134), x [26, 54); side 60 starts at
    # 26 + (28 - 60) // 2 = 10 (no shift needed).
    ([(r, 2) for r in range(5, 8)], (10, 74, 70, 134)),
    # Odd rounding: cell (3, 9) = 1 and (3, 10) = 0.3. The max is at u = 9 + 1/32:
    # (31/32 + 0.3/32) * 31/32 = 0.947559. Along x (y factor 31/32) keep 0.3 * (11 - u) >
    # 0.0978125, so u < 10.674, x <= 178: x [138, 179), w = 41; y stays [42, 70), h = 28.
    # Side 41: top = 42 + floor((28 - 41) / 2) = 42 - 7 = 35.
    ([(3, 9), (3, 10, 0.3)], (138, 35, 179, 76)),
])
def test_boxes_of_hand_made_maps(cells, box):
  m = one_hot_map(cells)
  # The box only depends on the min-max normalised map: a softmax-like offset/scale of the
  # same map must give the same box.
  maps = np.stack([m, 0.003 + 0.5 * m])
  got = np.asarray(jitted_boxes()(maps))
  np.testing.assert_array_equal(got, np.array([box, box], np.float32))
  np.testing.assert_array_equal(reference_box(m, FRAME, THR), np.array(box, np.float32))


@pytest.mark.parametrize("value", [0.0, 1 / 196, 7.5])
def test_constant_map_gives_whole_frame(value):
  maps = np.full((2, 14, 14), value, np.float32)
  got = np.asarray(jitted_boxes()(maps))
  np.testing.assert_array_equal(got, [[0, 0, FRAME, FRAME]] * 2)


def test_boxes_ignore_gradients_and_frame_size_is_a_config_value():
  m = one_hot_map([(3, 9)])[None]
  # Frame 112 halves the 224 box for the same map: cell scale x8, box [8c - 3, 8c + 11).
  got = np.asarray(roi.attention_boxes(m, 112, THR))
  np.testing.assert_array_equal(got, [[69, 21, 83, 35]])
  grad = jax.grad(lambda a: roi.attention_boxes(a, FRAME, THR).sum())(jnp.asarray(m))
  np.testing.assert_array_equal(np.asarray(grad), 0.0)


def smooth_image(rng, size):
  small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
  return np.asarray(Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC))


def edges_image(size):
  """Horizontal/vertical gradients with hard edges and fine stripes."""
  yy, xx = np.mgrid[:size, :size] / size
  r = 255 * xx
  g = np.where((yy > 0.3) & (xx < 0.6), 230.0, 20.0)
  b = np.where((np.arange(size)[None, :] // max(size // 56, 1)) % 2 == 0, 200.0, 40.0) * (yy < 0.5)
  b = b + 100 * yy * (yy >= 0.5)
  return np.stack([r, g, b], -1).clip(0, 255).astype(np.uint8)


@pytest.mark.parametrize("scale", [2, 1])
def test_crops_match_pil_crop_and_resize(scale):
  size = FRAME * scale
  rng = np.random.default_rng(scale)
  images = np.stack([smooth_image(rng, size), edges_image(size), smooth_image(rng, size),
                     edges_image(size), smooth_image(rng, size), edges_image(size)])
  boxes = np.array([
      [0, 0, 224, 224],      # whole frame: shrink x4 (scale 2) or x2, antialiased
      [74, 74, 102, 102],    # small box: enlarge
      [10, 30, 120, 140],    # shrink a little
      [138, 138, 224, 224],  # touches the bottom-right border
      [0, 0, 22, 22],        # tiny, top-left corner
      [50, 17, 163, 130],    # odd coordinates and side
  ], np.float32)
  crop_fn = jax.jit(functools.partial(roi.crop_and_resize, frame_size=FRAME, out_size=OUT))
  crops = np.asarray(crop_fn(images, boxes))
  assert crops.shape == (6, OUT, OUT, 3) and crops.dtype == np.float32
  assert crops.min() >= 0 and crops.max() <= 255  # the input's range, not normalised
  for img, box, crop in zip(images, boxes, crops):
    ref = reference_crop(img, box, FRAME, OUT)
    assert ref.std() > 5  # the crop has content
    mae = np.abs(crop - ref).mean()
    assert mae < 2.0, (box, mae)  # 2/255 on a 0..1 scale; PIL rounds to uint8


def test_crops_use_hires_detail():
  # One-pixel stripes in a 2x view survive a 2x zoom-in crop exactly; taken from the 1x view
  # (where they average to grey) they would not.
  hires = np.zeros((1, 448, 448, 1), np.uint8)
  hires[0, :, ::2] = 255
  box = np.array([[100, 100, 156, 156]], np.float32)  # 56 frame px = 112 hires px -> 112
  crop = np.asarray(roi.crop_and_resize(hires, box, FRAME, OUT))[0, :, :, 0]
  np.testing.assert_allclose(crop, np.broadcast_to(hires[0, :112, 200:312, 0], crop.shape),
                             atol=1e-3)


def test_roi_crops_no_nan_on_edge_cases():
  images = np.random.default_rng(0).integers(0, 256, (3, 448, 448, 3)).astype(np.uint8)
  maps = np.stack([np.full((14, 14), 1 / 196, np.float32),
                   one_hot_map([(13, 0)]),
                   np.zeros((14, 14), np.float32)])
  fn = jax.jit(functools.partial(roi.roi_crops, frame_size=FRAME, out_size=OUT, threshold=THR))
  for sl in (slice(0, 3), slice(0, 1), slice(1, 2)):  # includes batches of one
    crops, boxes = fn(maps[sl], images[sl])
    assert np.isfinite(np.asarray(crops)).all() and np.isfinite(np.asarray(boxes)).all()
  crops, boxes = fn(maps, images)
  np.testing.assert_array_equal(np.asarray(boxes), [[0, 0, 224, 224], [0, 202, 22, 224],
                                                    [0, 0, 224, 224]])
  np.testing.assert_allclose(
      np.asarray(crops)[1], reference_crop(images[1], boxes[1], FRAME, OUT), atol=1.01)


def test_roi_crops_under_vmap():
  maps = random_maps(3, 4)
  images = np.random.default_rng(1).integers(0, 256, (4, 448, 448, 3)).astype(np.uint8)
  fn = functools.partial(roi.roi_crops, frame_size=FRAME, out_size=OUT, threshold=THR)
  crops, boxes = fn(maps, images)
  vcrops, vboxes = jax.vmap(fn)(maps.reshape(2, 2, 14, 14), images.reshape(2, 2, 448, 448, 3))
  np.testing.assert_array_equal(np.asarray(vboxes).reshape(4, 4), np.asarray(boxes))
  np.testing.assert_allclose(np.asarray(vcrops).reshape(crops.shape), np.asarray(crops),
                             atol=1e-3)


def test_bad_input_raises_one_clear_sentence():
  with pytest.raises(ValueError, match=r"attmap_bhw must have shape \[batch, h, w\]"):
    roi.attention_boxes(np.zeros((14, 14), np.float32), FRAME, THR)
  with pytest.raises(ValueError, match="frame_size must be a positive Python int"):
    roi.attention_boxes(np.zeros((1, 14, 14), np.float32), 224.0, THR)
  with pytest.raises(ValueError, match="boxes_b4 must have shape"):
    roi.crop_and_resize(np.zeros((2, 448, 448, 3), np.uint8), np.zeros((3, 4)), FRAME, OUT)
  with pytest.raises(ValueError, match="3 attention maps for 2 images"):
    roi.roi_crops(np.zeros((3, 14, 14)), np.zeros((2, 448, 448, 3)), FRAME, OUT, THR)
