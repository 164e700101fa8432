"""Grain pipelines: host transform, triplet rule, determinism, sharding, resume, eval streams."""
import io
import json
import os
import warnings

import grain
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image
import pytest

from asen_jax import data as data_lib
from asen_jax.data import builder
from asen_jax.data import pipeline
from asen_jax.data import synthetic
from asen_jax.data import views
from configs import common

S, R, B = 32, 64, 4


def _png(arr):
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format="PNG")
  return buf.getvalue()


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  synthetic.generate(str(root), seed=11, num_train=24, num_valid=12, num_test=12)
  c = common.base_config("global")
  c.data.name, c.data.root, c.data.folder = "synthetic", str(root), "Synthetic"
  c.data.tfds_dir = str(root / "tfds")
  c.data.image_size, c.data.hires_size = S, R
  c.data.worker_count = 0
  c.train.batch_size = B
  data_lib.prepare_dataset(c)
  return c


def _take(it, n):
  return [{k: np.array(v) for k, v in next(it).items()} for _ in range(n)]


def _assert_batches_equal(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ---------------------------------------------------------------------------------------------
# Host transform.

def test_load_view_matches_resize_then_centre_crop():
  """Parity with torchvision-style Resize(shorter side) + CenterCrop on an integral offset."""
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, size=(200, 300, 3), dtype=np.uint8)   # H=200, W=300
  view, hires = views.load_view(_png(img), 100, 200)
  pil = Image.fromarray(img)
  ref_view = np.asarray(pil.resize((150, 100), Image.Resampling.BILINEAR))[:, 25:125]
  ref_hires = np.asarray(pil.resize((300, 200), Image.Resampling.BILINEAR))[:, 50:250]
  assert view.shape == (100, 100, 3) and hires.shape == (200, 200, 3) and view.dtype == np.uint8
  np.testing.assert_array_equal(view, ref_view)
  np.testing.assert_array_equal(hires, ref_hires)


def test_load_view_and_box_share_the_field_of_view():
  img = np.full((300, 200, 3), 255, np.uint8)        # portrait: W=200, H=300
  img[120:200, 60:140] = 0                           # box (60, 120, 140, 200) in pixels
  box = views.box_to_view([60, 120, 140, 200], 200, 300)
  np.testing.assert_allclose(box, [0.3, 0.35, 0.7, 0.75], atol=1e-6)   # crop rows 50..250
  view, hires = views.load_view(_png(img), 40, 80)
  for arr, n in ((view, 40), (hires, 80)):
    x0, y0, x1, y1 = (box * n).round().astype(int)          # (12, 14, 28, 30) at 40 px
    assert arr[y0 + 1:y1 - 1, x0 + 1:x1 - 1].max() == 0      # inside: black
    assert arr[:y0 - 1].min() == 255 and arr[y1 + 1:].min() == 255
    assert arr[:, :x0 - 1].min() == 255 and arr[:, x1 + 1:].min() == 255
  # Grayscale and palette images come out RGB.
  gray = Image.fromarray(img[..., 0]).convert("L")
  buf = io.BytesIO()
  gray.save(buf, format="JPEG")
  assert views.load_view(buf.getvalue(), 16, 32)[0].shape == (16, 16, 3)
  np.testing.assert_array_equal(views.box_to_view([-1, -1, -1, -1], 10, 10), [-1] * 4)
  # A box poking out of the crop is clipped to it.
  np.testing.assert_allclose(views.box_to_view([0, 0, 100, 60], 200, 300), [0, 0, 0.5, 0.05])


# ---------------------------------------------------------------------------------------------
# Triplet rule.

def _labelled_rows():
  """40 images x 3 attributes; attribute 1 has a value with one image and one with none."""
  rng = np.random.default_rng(1)
  labels = np.stack([rng.integers(0, 4, 40), rng.choice([0, 3], 40), rng.integers(0, 3, 40)], 1)
  labels[7, 1] = 1                                       # the only image of value 1
  rows = [(i, a, int(labels[i, a])) for i in range(40) for a in range(3)]
  return labels, np.asarray(rows)


def _chi2(counts):
  counts = np.asarray(counts, np.float64)
  expected = counts.sum() / len(counts)
  return float(((counts - expected) ** 2 / expected).sum())


# Chi-square critical values at p = 0.001 by degrees of freedom.
_CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 11: 31.26}


def test_triplet_rule_over_10000_triplets():
  labels, rows = _labelled_rows()
  with pytest.warns(UserWarning, match=r"2 attribute values have fewer than two training images"
                    r".*b=1 \(1 images\), b=2 \(0 images\)"):
    sampler = pipeline.TripletSampler(rows, (4, 4, 3), seed=3, attributes=("a", "b", "c"))
  with warnings.catch_warnings():
    warnings.simplefilter("error")                         # warned once, at start only
    draws = np.array([sampler(i) for i in range(10_000)])
  a, vp, vn, anc, pos, neg = draws.T
  assert np.all(labels[anc, a] == vp) and np.all(labels[pos, a] == vp)
  assert np.all(labels[neg, a] == vn) and np.all(vp != vn) and np.all(anc != pos)
  assert not np.any((a == 1) & np.isin(vp, [1, 2]))       # too rare to be the positive value
  assert not np.any((a == 1) & (vn == 2))                  # no image to draw
  assert np.any((a == 1) & (vn == 1))                      # but one image is a fine negative
  assert _chi2(np.bincount(a, minlength=3)) < _CHI2_999[2]
  # Attribute 0: (vp, vn) uniform over the 12 ordered pairs of distinct values (official rule).
  pairs = vp[a == 0] * 4 + vn[a == 0]
  distinct = [p * 4 + n for p in range(4) for n in range(4) if p != n]
  counts = np.bincount(pairs, minlength=16)[distinct]
  assert _chi2(counts) < _CHI2_999[11]
  # Attribute 1: positives split between its two usable values; negatives uniform over others.
  assert _chi2(np.bincount(vp[a == 1], minlength=4)[[0, 3]]) < _CHI2_999[1]
  assert _chi2(np.bincount(vn[(a == 1) & (vp == 0)], minlength=4)[[1, 3]]) < _CHI2_999[1]
  # Anchors spread over the value's images, not stuck on a few.
  sel = (a == 2) & (vp == 0)
  pool = np.flatnonzero(labels[:, 2] == 0)
  assert _chi2(np.bincount(anc[sel], minlength=40)[pool]) < 3 * len(pool)
  # Pure function of (seed, index).
  with pytest.warns(UserWarning):
    again = pipeline.TripletSampler(rows, (4, 4, 3), seed=3, attributes=("a", "b", "c"))
    other = pipeline.TripletSampler(rows, (4, 4, 3), seed=4, attributes=("a", "b", "c"))
  assert [again(i) for i in (5, 0, 9999)] == [tuple(draws[i]) for i in (5, 0, 9999)]
  assert sum(other(i) != tuple(draws[i]) for i in range(100)) > 80


def test_unusable_split_is_one_clear_error():
  rows = np.array([(0, 0, 0), (1, 0, 1)])                 # one image per value: no pair
  with pytest.raises(ValueError, match="cannot form a single triplet"):
    pipeline.TripletSampler(rows, (2,), seed=0)


# ---------------------------------------------------------------------------------------------
# Training loader.

def test_train_batches_are_the_sampled_triplets(cfg):
  batches = _take(iter(data_lib.make_train_loader(cfg, seed=7)), 2)
  b = batches[0]
  assert b["images"].shape == (B, 3, S, S, 3) and b["images"].dtype == np.uint8
  assert b["hires"].shape == (B, 3, R, R, 3) and b["hires"].dtype == np.uint8
  for k in ("attribute", "value_pos", "value_neg"):
    assert b[k].shape == (B,) and b[k].dtype == np.int32
  sampler = pipeline.make_train_sampler(cfg, 7)
  src = builder.split_source(cfg, "train")
  for t, batch in enumerate(batches):
    for j in range(B):
      a, vp, vn, *records = sampler(t * B + j)
      assert (batch["attribute"][j], batch["value_pos"][j], batch["value_neg"][j]) == (a, vp, vn)
      for slot, r in enumerate(records):
        rec = src[r]
        assert rec["labels"][a] == (vp if slot < 2 else vn)
        view, hires = views.load_view(rec["image"], S, R)
        np.testing.assert_array_equal(batch["images"][j, slot], view)
        np.testing.assert_array_equal(batch["hires"][j, slot], hires)


def test_shards_make_up_the_global_batch_and_start_step(cfg):
  full = _take(iter(data_lib.make_train_loader(cfg, seed=2)), 3)
  shards = [_take(iter(data_lib.make_train_loader(cfg, seed=2, shard_index=p, shard_count=2)), 3)
            for p in range(2)]
  assert shards[0][0]["images"].shape[0] == B // 2
  joined = [{k: np.concatenate([shards[0][t][k], shards[1][t][k]]) for k in full[t]}
            for t in range(3)]
  _assert_batches_equal(joined, full)
  _assert_batches_equal(_take(iter(data_lib.make_train_loader(cfg, seed=2, start_step=2)), 1),
                        full[2:])
  with pytest.raises(ValueError, match="train.batch_size=4 must be a positive multiple"):
    data_lib.make_train_loader(cfg, seed=2, shard_index=0, shard_count=3)


def test_iterator_state_restores_the_same_batches(cfg, tmp_path):
  it = iter(data_lib.make_train_loader(cfg, seed=1))
  _take(it, 3)
  state = it.get_state()
  expect = _take(it, 2)
  fresh = iter(data_lib.make_train_loader(cfg, seed=1))
  fresh.set_state(state)
  _assert_batches_equal(_take(fresh, 2), expect)

  # Two worker processes give the same stream, and it survives an orbax Composite round trip.
  mp = iter(data_lib.make_train_loader(cfg, seed=1, worker_count=2))
  try:
    _take(mp, 3)
    mngr = ocp.CheckpointManager(str(tmp_path / "ckpt"))
    mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(mp)))
    mngr.wait_until_finished()
    _assert_batches_equal(_take(mp, 2), expect)
  finally:
    mp.close()
  restored = iter(data_lib.make_train_loader(cfg, seed=1))
  restored = mngr.restore(3, args=ocp.args.Composite(
      data=grain.checkpoint.CheckpointRestore(restored)))["data"]
  _assert_batches_equal(_take(restored, 2), expect)
  mngr.close()


# ---------------------------------------------------------------------------------------------
# Evaluation streams.

def _collect(stream):
  out = {}
  for batch in stream:
    for k, v in batch.items():
      out.setdefault(k, []).append(np.array(v))
  return {k: np.concatenate(v) for k, v in out.items()}, len(out["mask"]) if out else 0


def test_eval_stream_every_line_once_with_padding(cfg):
  folder = os.path.join(cfg.data.root, "Synthetic")
  meta = json.load(open(os.path.join(folder, "meta.json")))
  names = open(os.path.join(folder, "filenames_test.txt")).read().split()
  lines = builder.eval_lines(cfg, "test", "candidate")
  n = len(lines)
  assert n % 5 != 0
  stream = data_lib.make_eval_stream(cfg, "test", "candidate", batch_size=5)
  batches = list(stream)
  assert len(batches) == data_lib.eval_stream_length(cfg, "test", "candidate", batch_size=5)
  assert len(batches) == -(-n // 5)
  assert batches[0]["image"].shape == (5, S, S, 3) and batches[0]["hires"].shape == (5, R, R, 3)
  assert batches[0]["box"].dtype == np.float32 and batches[0]["mask"].dtype == bool
  got = {k: np.concatenate([np.array(b[k]) for b in batches]) for k in batches[0]}
  mask = got["mask"]
  assert mask.sum() == n and not mask[n:].any() and mask[:n].all()
  np.testing.assert_array_equal(
      np.stack([got["image_id"], got["attribute"], got["value"]], 1)[mask], lines)
  for j in (0, n - 1):
    fid, a, _ = lines[j]
    with open(os.path.join(folder, names[fid]), "rb") as f:
      view, hires = views.load_view(f.read(), S, R)
    np.testing.assert_array_equal(got["image"][j], view)
    np.testing.assert_array_equal(got["hires"][j], hires)
    w, h = meta["splits"]["test"]["image_size_wh"][fid]
    np.testing.assert_allclose(got["box"][j], views.box_to_view(
        meta["splits"]["test"]["boxes"][fid][a], w, h), atol=1e-5)
  assert np.all(got["box"][mask] >= 0) and np.all(got["box"][~mask] == -1)
  assert np.all(got["image"][~mask] == 0)


def test_eval_stream_shards_cover_all_lines(cfg):
  lines = builder.eval_lines(cfg, "valid", "query")
  n = len(lines)
  steps = data_lib.eval_stream_length(cfg, "valid", "query", batch_size=3, shard_count=2)
  assert steps == -(-n // 6)
  parts = [list(data_lib.make_eval_stream(cfg, "valid", "query", batch_size=3, shard_index=p,
                                          shard_count=2)) for p in range(2)]
  assert len(parts[0]) == len(parts[1]) == steps
  seen = []
  for t in range(steps):
    for p in range(2):
      b = parts[p][t]
      rows = np.stack([b["image_id"], b["attribute"], b["value"]], 1)[b["mask"]]
      seen += [tuple(r) for r in rows]
  assert seen == [tuple(r) for r in lines.tolist()]
  with pytest.raises(ValueError, match="split in"):
    data_lib.make_eval_stream(cfg, "train", "query", batch_size=3)


def test_decode_cache_gives_the_same_views_and_keeps_to_its_budget():
  rng = np.random.default_rng(3)
  images = [_png(rng.integers(0, 256, size=(40 + i, 50, 3), dtype=np.uint8)) for i in range(6)]
  fresh = [views.load_view(b, 16, 32) for b in images]   # no cache: decoded each time
  views.configure_decode_cache(0)                         # empty, whatever ran before
  cache = views.configure_decode_cache(1)                 # 1 MB: holds all six (4.6 kB each)
  misses, hits = cache.misses, cache.hits                    # counters run for the process
  try:
    for _ in range(2):
      for b, (view, hires) in zip(images, fresh):
        v, h = views.load_view(b, 16, 32)
        np.testing.assert_array_equal(v, view)
        np.testing.assert_array_equal(h, hires)
        assert not v.flags.writeable
    assert (cache.misses - misses, cache.hits - hits) == (6, 6)
    # A budget of 0 MB empties it; a budget of a few views keeps the most recent ones only.
    cache.configure(0)
    assert cache.bytes == 0
    cache.max_bytes = 2 * (16 * 16 + 32 * 32) * 3
    for b in images:
      views.load_view(b, 16, 32)
    assert cache.bytes == cache.max_bytes and len(cache._views) == 2
    views.load_view(images[-1], 16, 32)
    assert cache.hits - hits == 7
  finally:
    views.configure_decode_cache(0)
