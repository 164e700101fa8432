"""Synthetic garments: determinism, value coverage, layout, boxes, labels that match pixels."""
import colorsys
import hashlib
import io
import json
import os

import numpy as np
from PIL import Image
import pytest

from asen_jax.data import synthetic
from asen_jax.data.pipeline import load_view

SIZES = dict(num_train=30, num_valid=12, num_test=12)


def _digest(root):
  out = {}
  for dirpath, _, files in os.walk(root):
    for name in files:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


def _read_triples(path):
  with open(path) as f:
    return [tuple(int(t) for t in line.split()) for line in f]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  out = tmp_path_factory.mktemp("syn")
  return synthetic.generate(str(out), seed=3, **SIZES)


def test_same_seed_same_bytes(tiny, tmp_path):
  again = synthetic.generate(str(tmp_path / "again"), seed=3, **SIZES)
  other = synthetic.generate(str(tmp_path / "other"), seed=4, **SIZES)
  a, b, c = _digest(tiny), _digest(again), _digest(other)
  assert len(a) == 30 + 12 + 12 + 8 + 1   # images, 8 split files, meta.json
  assert a == b
  jpgs = [k for k in a if k.endswith(".jpg")]
  assert sum(a[k] != c[k] for k in jpgs) == len(jpgs)


def test_every_split_covers_every_value(tiny):
  meta = json.load(open(os.path.join(tiny, "meta.json")))
  k = meta["num_values"]
  assert len(k) >= 5 and all(3 <= n <= 8 for n in k)
  train = _read_triples(os.path.join(tiny, "label_train.txt"))
  assert len(train) == 30
  for a, n in enumerate(k):
    assert {line[2 + 2 * a] for line in train} == set(range(n))
    # Balanced: every value appears floor or ceil(30 / n) times.
    counts = np.bincount([line[2 + 2 * a] for line in train], minlength=n)
    assert counts.max() - counts.min() <= 1
  for split in ("valid", "test"):
    for which in ("query", "candidate"):
      lines = _read_triples(os.path.join(tiny, f"{which}_{split}.txt"))
      for a, n in enumerate(k):
        assert {v for _, aa, v in lines if aa == a} == set(range(n)), (split, which, a)


def test_layout_queries_candidates_and_boxes(tiny):
  meta = json.load(open(os.path.join(tiny, "meta.json")))
  for split, n in (("train", 30), ("valid", 12), ("test", 12)):
    names = open(os.path.join(tiny, f"filenames_{split}.txt")).read().split()
    assert len(names) == n and all(os.path.isfile(os.path.join(tiny, p)) for p in names)
    labels = np.asarray(meta["splits"][split]["labels"])
    if split != "train":
      q = _read_triples(os.path.join(tiny, f"query_{split}.txt"))
      c = _read_triples(os.path.join(tiny, f"candidate_{split}.txt"))
      for a in range(5):
        qa = {fid for fid, aa, _ in q if aa == a}
        ca = {fid for fid, aa, _ in c if aa == a}
        assert not qa & ca and qa | ca == set(range(n))   # disjoint, every image once
        assert 0.15 * n <= len(qa) <= 0.55 * n
      assert all(labels[fid, a] == v for fid, a, v in q + c)
    for fid, name in enumerate(names):
      with Image.open(os.path.join(tiny, name)) as im:
        w, h = im.size
      assert [w, h] == meta["splits"][split]["image_size_wh"][fid]
      assert min(w, h) == 256
      s0 = min(w, h)
      garment, length_box, pattern_box, neck, button = np.asarray(
          meta["splits"][split]["boxes"][fid])
      np.testing.assert_array_equal(length_box, garment)
      np.testing.assert_array_equal(pattern_box, garment)
      # The garment lies inside the centre crop, details inside the garment.
      assert garment[0] >= (w - s0) / 2 and garment[2] <= (w + s0) / 2
      assert garment[1] >= (h - s0) / 2 and garment[3] <= (h + s0) / 2
      for box in (neck, button):
        assert box[0] >= garment[0] - 1e-3 and box[2] <= garment[2] + 1e-3
        assert box[1] >= garment[1] - 1e-3 and box[3] <= garment[3] + 1e-3
      # Details are small: a few % of the crop width.
      assert (neck[2] - neck[0]) / s0 < 0.2 and (button[2] - button[0]) / s0 < 0.1
      assert (garment[2] - garment[0]) / s0 > 0.5


def test_colour_label_matches_pixels(tiny):
  """The dominant hue inside the body (beside the placket) is the labelled colour."""
  meta = json.load(open(os.path.join(tiny, "meta.json")))
  hues = np.array([0.0, 0.08, 0.155, 0.33, 0.61, 0.78])
  names = open(os.path.join(tiny, "filenames_train.txt")).read().split()
  for fid, name in enumerate(names):
    x0, y0, x1, y1 = meta["splits"]["train"]["boxes"][fid][2]
    img = np.asarray(Image.open(os.path.join(tiny, name)).convert("RGB"), np.float32) / 255
    # Left of the bib, inside the body (never under a sleeve, never the background): cloth only.
    # The garment box is the sleeves' span, 1.88 shoulder widths s, and starts 0.04 s above the
    # shoulder line; the body spans the shoulders, the bib 0.21 s either side of the centre.
    s, cx = (x1 - x0) / 1.88, (x0 + x1) / 2
    patch = img[int(y0 + 0.25 * s):int(y1 - 2), int(cx - 0.45 * s):int(cx - 0.28 * s)]
    mean = patch.reshape(-1, 3).mean(0)
    h = colorsys.rgb_to_hsv(*mean)[0]
    dist = np.minimum(np.abs(hues - h), 1 - np.abs(hues - h))
    assert int(np.argmin(dist)) == meta["splits"]["train"]["labels"][fid][0], fid


def test_cli_writes_layout(tmp_path):
  synthetic.main(["--out", str(tmp_path), "--num_train", "8", "--num_valid", "6", "--num_test",
                  "6", "--workers", "0", "--seed", "1"])
  assert sorted(os.listdir(tmp_path / "Synthetic")) == [
      "candidate_test.txt", "candidate_valid.txt", "filenames_test.txt", "filenames_train.txt",
      "filenames_valid.txt", "images", "label_train.txt", "meta.json", "query_test.txt",
      "query_valid.txt"]


def test_too_small_split_is_one_clear_error(tmp_path):
  with pytest.raises(ValueError, match="at least 6 images per split"):
    synthetic.generate(str(tmp_path), num_train=4, num_valid=6, num_test=6)


def test_detail_scale_changes_only_the_details():
  """Same draws, smaller neckline and buttons: pixels differ only around the detail boxes."""
  labels = [2, 1, 3, 1, 3]
  big, size, boxes = synthetic.render_garment(9, "train", 0, labels, detail_scale=1.0)
  small, size2, boxes2 = synthetic.render_garment(9, "train", 0, labels, detail_scale=0.6)
  assert size == size2 and boxes == boxes2
  a = np.asarray(Image.open(io.BytesIO(big)).convert("RGB"), np.int32)
  b = np.asarray(Image.open(io.BytesIO(small)).convert("RGB"), np.int32)
  near = np.zeros(a.shape[:2], bool)
  for x0, y0, x1, y1 in (boxes[3], boxes[4]):   # JPEG blocks reach up to 16 px further
    near[max(0, int(y0) - 16):int(y1) + 17, max(0, int(x0) - 16):int(x1) + 17] = True
  diff = np.abs(a - b).max(-1)
  assert diff[~near].max() == 0
  x0, y0, x1, y1 = (int(v) for v in boxes[4])
  assert diff[y0:y1, x0:x1].mean() > 5
  with pytest.raises(ValueError, match="detail_scale must be in"):
    synthetic.generate("/nonexistent", detail_scale=3.0)


def _view_of_box(labels, attribute, size, seed=4, index=2):
  """The `size` px view of an image (as the pipeline makes it) and its box for `attribute`."""
  jpeg, (w, h), boxes = synthetic.render_garment(seed, "train", index, labels)
  view = load_view(jpeg, size, size)[0].astype(np.float32)
  m = min(w, h)
  f = size / m
  x0, y0, x1, y1 = boxes[attribute]
  box = [int((x0 - (w - m) / 2) * f), int((y0 - (h - m) / 2) * f),
         int(np.ceil((x1 - (w - m) / 2) * f)), int(np.ceil((y1 - (h - m) / 2) * f))]
  return view, box


@pytest.mark.parametrize("attribute, plain, fine", [(3, 0, 1), (3, 2, 3)])
def test_fine_cues_need_the_zoomed_view(attribute, plain, fine):
  """Ribbed vs plain crew and scoop: nearly the same at the 96 px global view, clearly different
  at the 224 px view the RoI crop is taken from (what the local branch is for)."""
  a_labels, b_labels = [1, 2, 0, 2, 0], [1, 2, 0, 2, 0]
  a_labels[attribute], b_labels[attribute] = plain, fine
  diffs = []
  for size in (96, 224):
    a, (x0, y0, x1, y1) = _view_of_box(a_labels, attribute, size)
    b, _ = _view_of_box(b_labels, attribute, size)
    diffs.append(float(np.abs(a[y0:y1, x0:x1] - b[y0:y1, x0:x1]).mean()))
  low, high = diffs
  print(f"attribute {attribute}: mean |plain - fine| in its box: {low:.1f} at 96 px, "
        f"{high:.1f} at 224 px")
  assert high > 2.0 * low, diffs
