"""Synthetic garments in the official ASEN layout, with ground-truth attribute boxes.

    python -m asen_jax.data.synthetic --out data      # writes data/Synthetic/

Each image shows one garment (body, sleeves, a white bib with a neckline cut-out and three
buttons) on a cluttered background (a random colour and 6-14 random shapes), JPEG-encoded. Five
attributes, every image carries all of them:
  colour, length, pattern   large, visible at any resolution (box: the garment);
  neckline, button          small details on the bib (box: the neckline region / the button
                            column), each with a coarse cue that a ~96 px global view sees
                            (crew vs scoop size; small vs large buttons) and a fine cue that
                            a zoomed crop resolves much better: a ribbed neckline (stripes of a
                            4 px period, averaged to the plain one's grey when the image is
                            shrunk to 96 px) and ring buttons (a hole, with the ink area of the
                            disc; a faint lighter centre at 96 px).
The bib is white whatever the garment's colour, as plackets and collars often are, so the
details look the same on every garment. The garment's scale varies by 1.3x and the background a
lot, as in real photographs, so that the garment's height and a clean background tell less. (On
clean, fixed-scale images, length attention sat on the background around the garment; it still
does on these: see the README's Results.) Everything is a pure function of (seed, split, index):
same seed, same bytes.
"""
import argparse
import io
import json
import multiprocessing
import os
import time

import numpy as np
from PIL import Image, ImageDraw

ATTRIBUTES = ("colour", "length", "pattern", "neckline", "button")
VALUE_NAMES = (
    ("red", "orange", "yellow", "green", "blue", "purple"),
    ("cropped", "hip", "knee", "ankle"),
    ("plain", "h_stripes", "v_stripes", "checks"),
    ("crew", "crew_ribbed", "scoop", "scoop_ribbed"),
    ("small", "small_ring", "large", "large_ring"),
)
GLOBAL_ATTRIBUTES = ("colour", "length", "pattern")
DETAIL_ATTRIBUTES = ("neckline", "button")
SPLITS = ("train", "valid", "test")
_SPLIT_CODE = {"train": 0, "valid": 1, "test": 2}

_HUES = (0.0, 0.08, 0.155, 0.33, 0.61, 0.78)   # HSV hue of each colour value
_LENGTHS = (0.8, 1.15, 1.5, 1.85)              # body height / shoulder width
_SHOULDER = (0.34, 0.44)     # shoulder width / image side: a 1.3x scale range, so the garment's
                             # height alone overlaps between neighbouring lengths
_STRIPE_PERIOD, _STRIPE_DUTY, _STRIPE_DARKEN = 0.3, 0.35, 0.8  # bold dark stripes: period /
                                                              # shoulder, dark share, darkening
_CLUTTER = (6, 14)                             # background shapes: count range
_BG_SATURATION, _BG_VALUE = (0.0, 0.4), (0.4, 0.95)          # background colour
_CLUTTER_SATURATION, _CLUTTER_VALUE = (0.0, 0.6), (0.25, 1.0)  # colour of each shape
# Details: one coarse cue (size) that the global view sees, one fine cue (ribbing, ring hole)
# that needs the zoomed crop. Sizes are fractions of the shoulder width, times detail_scale.
_NECK_SIZES = ((0.25, 0.09), (0.375, 0.275))   # (width, depth): crew, scoop
_RIB_PERIOD = 4                                # ribbing: stripe period in output pixels
_RIB_CONTRAST = 45                             # ribbing: +- grey levels around the plain fill
_BUTTON_R, _BUTTON_LARGE, _RING_HOLE = 0.0375, 2.0, 0.5   # disc radius, large x, hole / ring
# (width, height): shorter side 256 (so every image shrinks by the same factor to the global
# view), varied aspect ratios so resize + centre crop matter.
_CANVASES = ((256, 256), (256, 320), (320, 256), (256, 288), (288, 256), (256, 352), (352, 256))
_SS = 2  # supersampling factor: draw at 2x, box-filter down (anti-aliased small shapes)


def _hsv_to_rgb(h, s, v):
  i = int(h * 6.0) % 6
  f = h * 6.0 - int(h * 6.0)
  p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
  rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
  return tuple(int(round(255 * c)) for c in rgb)


def _clutter_colour(rng):
  # Less saturated than any garment, so the garment stays the most colourful object.
  return _hsv_to_rgb(rng.uniform(), rng.uniform(*_BG_SATURATION), rng.uniform(*_BG_VALUE))


def _draw_background(draw, rng, w, h):
  """Random rectangles, ellipses and lines of random colours: background nuisance, as in photos."""
  for _ in range(int(rng.integers(_CLUTTER[0], _CLUTTER[1] + 1))):
    kind = rng.integers(3)
    x0, y0 = rng.uniform(-0.2 * w, w), rng.uniform(-0.2 * h, h)
    bw, bh = rng.uniform(0.05, 0.4) * w, rng.uniform(0.05, 0.4) * h
    box = [x0, y0, x0 + bw, y0 + bh]
    colour = _hsv_to_rgb(rng.uniform(), rng.uniform(*_CLUTTER_SATURATION),
                         rng.uniform(*_CLUTTER_VALUE))
    if kind == 0:
      draw.rectangle(box, fill=colour)
    elif kind == 1:
      draw.ellipse(box, fill=colour)
    else:
      draw.line(box, fill=colour, width=int(rng.integers(2, 8)))


def _draw_button(draw, kind, cx, cy, r, fill, hole):
  """One button: kind = 2 * size + ring. A ring has the same ink area as the disc of its size,
  so only its hole (visible when zoomed in) tells them apart."""
  r = r * (_BUTTON_LARGE if kind >= 2 else 1.0)
  if kind % 2 == 0:
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
  else:  # outer ro, hole ri = _RING_HOLE ro: ink area pi (ro^2 - ri^2) = pi r^2
    ro = r / np.sqrt(1.0 - _RING_HOLE ** 2)
    ri = _RING_HOLE * ro
    draw.ellipse([cx - ro, cy - ro, cx + ro, cy + ro], fill=fill)
    draw.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=hole)


def render_garment(seed, split, index, labels, detail_scale=1.0):
  """Draws one image; returns (jpeg_bytes, (width, height), boxes[A][4] in pixels).

  `detail_scale` multiplies the size of the neckline and the buttons (not their boxes).
  """
  rng = np.random.default_rng([seed, _SPLIT_CODE[split], index])
  colour, length, pattern, neckline, button = (int(v) for v in labels)
  w, h = _CANVASES[int(rng.integers(len(_CANVASES)))]
  m = min(w, h)
  # The garment stays inside the central square that the shorter-side crop keeps.
  off_x, off_y = (w - m) / 2, (h - m) / 2

  s = rng.uniform(*_SHOULDER) * m                                         # shoulder width
  body_h = s * _LENGTHS[length] * rng.uniform(0.97, 1.03)
  hem_half = s / 2 * rng.uniform(1.0, 1.15)
  sleeve_out, sleeve_drop, sleeve_w = 0.42 * s, 0.5 * s, 0.2 * s
  half_w = max(s / 2 + sleeve_out + 0.02 * s, hem_half)
  neck_up = 0.04 * s   # the neckline box reaches above the shoulder line
  margin = 0.04 * m
  cx = off_x + rng.uniform(margin + half_w, m - margin - half_w)
  ty = off_y + rng.uniform(margin + neck_up, m - margin - body_h)

  background = _clutter_colour(rng)
  img = Image.new("RGB", (w * _SS, h * _SS), background)
  draw = ImageDraw.Draw(img)
  _draw_background(draw, rng, w * _SS, h * _SS)

  # Garment silhouette as a mask; pattern and shading are applied in numpy.
  def p(x, y):
    return (x * _SS, y * _SS)

  mask = Image.new("L", img.size, 0)
  mdraw = ImageDraw.Draw(mask)
  body = [p(cx - s / 2, ty), p(cx + s / 2, ty), p(cx + hem_half, ty + body_h),
          p(cx - hem_half, ty + body_h)]
  mdraw.polygon(body, fill=255)
  for sign in (-1, 1):
    sx = cx + sign * s / 2
    mdraw.polygon([p(sx, ty), p(sx + sign * sleeve_out, ty + sleeve_drop),
                   p(sx + sign * (sleeve_out - 0.05 * s), ty + sleeve_drop + sleeve_w),
                   p(sx, ty + 0.32 * s)], fill=255)
  base = np.array(_hsv_to_rgb((_HUES[colour] + rng.uniform(-0.02, 0.02)) % 1.0,
                              rng.uniform(0.6, 0.9), rng.uniform(0.65, 0.95)), np.float32)
  # Only the garment's bounding region is composited (keeps generation fast).
  gx0, gy0 = int((cx - half_w) * _SS) - 2, int(ty * _SS) - 2
  gx1, gy1 = int(np.ceil((cx + half_w) * _SS)) + 2, int(np.ceil((ty + body_h) * _SS)) + 2
  yy = (np.arange(gy0, gy1, dtype=np.float32) / _SS)[:, None]
  xx = (np.arange(gx0, gx1, dtype=np.float32) / _SS)[None, :]
  period = _STRIPE_PERIOD * s
  phase_x, phase_y = rng.uniform(0, period, size=2)
  hs = ((yy - ty + phase_y) % period) < _STRIPE_DUTY * period
  vs = ((xx - cx + phase_x) % period) < _STRIPE_DUTY * period
  stripes = [np.zeros((1, 1), bool), hs, vs, hs | vs][pattern]
  shade = 1.0 - _STRIPE_DARKEN * stripes.astype(np.float32)
  shade = shade * (1.0 - 0.15 * (yy - ty) / (body_h + 1.0))   # soft vertical lighting gradient
  cloth = base * shade[..., None]
  alpha = np.asarray(mask, np.float32)[gy0:gy1, gx0:gx1, None] / 255.0
  arr = np.array(img)
  region = arr[gy0:gy1, gx0:gx1].astype(np.float32)
  arr[gy0:gy1, gx0:gx1] = np.clip(region * (1 - alpha) + cloth * alpha + 0.5, 0, 255)
  img = Image.fromarray(arr)
  draw = ImageDraw.Draw(img)

  # The bib: white on every garment, from the shoulder line down to the last button.
  bib = tuple([int(rng.integers(228, 248))] * 3)
  bib_x = 0.21 * s
  draw.rectangle([p(cx - bib_x, ty), p(cx + bib_x, ty + min(0.68 * s, body_h - 0.02 * s))],
                 fill=bib)

  # Neckline: a dark cut-out at the top of the bib, shallow (crew) or deep (scoop); ribbed =
  # vertical stripes of _RIB_PERIOD output pixels around the plain fill (same mean grey).
  deep, ribbed = divmod(neckline, 2)
  nw, nd = _NECK_SIZES[deep]
  nw, nd = nw * s * detail_scale, nd * s * detail_scale
  inner = int(rng.integers(55, 80))
  x0, y0 = int((cx - 0.2 * s) * _SS), int((ty - 0.1 * s) * _SS)
  x1, y1 = int((cx + 0.2 * s) * _SS) + 1, int((ty + 0.3 * s) * _SS) + 1
  cut = Image.new("L", (x1 - x0, y1 - y0), 0)
  ImageDraw.Draw(cut).pieslice([cx * _SS - x0 - nw * _SS / 2, ty * _SS - y0 - nd * _SS,
                                cx * _SS - x0 + nw * _SS / 2, ty * _SS - y0 + nd * _SS],
                               0, 180, fill=255)
  fill = np.full((y1 - y0, x1 - x0), inner, np.float32)
  if ribbed:
    phase = int(rng.integers(_RIB_PERIOD * _SS))
    dark = ((np.arange(x0, x1) + phase) // (_RIB_PERIOD * _SS // 2)) % 2 == 0
    fill = fill + np.where(dark, -_RIB_CONTRAST, _RIB_CONTRAST)[None, :]
  fill = Image.fromarray(np.clip(fill, 0, 255).astype(np.uint8)).convert("RGB")
  img.paste(fill, (x0, y0, x1, y1), cut)

  # Three buttons of one kind down the bib.
  pk_y0, pk_y1 = ty + 0.17 * s, ty + min(0.62 * s, body_h - 0.05 * s)
  r = _BUTTON_R * s * detail_scale   # small disc ~8 px wide at 256 px: a blob at 96 px
  button_fill = tuple(int(c) for c in rng.integers(10, 45, size=3))
  ys = np.linspace(pk_y0 + 0.08 * s, pk_y1 - 0.08 * s, 3)
  for by in ys:
    _draw_button(draw, button, cx * _SS, by * _SS, r * _SS, button_fill, bib)

  img = img.resize((w, h), Image.Resampling.BOX)
  arr = np.asarray(img, np.float32)
  arr = arr + rng.uniform(2.0, 7.0) * rng.standard_normal(arr.shape, dtype=np.float32)
  img = Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8))
  buf = io.BytesIO()
  img.save(buf, format="JPEG", quality=int(rng.integers(80, 96)))

  garment = [cx - half_w, ty - neck_up, cx + half_w, ty + body_h]
  neck_box = [cx - 0.19 * s, ty - 0.04 * s, cx + 0.19 * s, ty + 0.28 * s]
  button_box = [cx - 0.11 * s, ys[0] - 0.1 * s, cx + 0.11 * s, ys[-1] + 0.1 * s]
  # The pattern covers body and sleeves, so its region is the whole garment, like the colour's.
  boxes = [garment, garment, garment, neck_box, button_box]
  boxes = [[round(float(v), 2) for v in b] for b in boxes]
  return buf.getvalue(), (w, h), boxes


def _balanced_labels(rng, n):
  """[n, A] labels, each value of each attribute used floor/ceil(n / k) times."""
  cols = []
  for names in VALUE_NAMES:
    k = len(names)
    if n < k:
      raise ValueError(f"A split of {n} images cannot cover all {k} values of an attribute; "
                       f"use at least {max(len(v) for v in VALUE_NAMES)} images per split.")
    cols.append(rng.permutation(np.arange(n) % k))
  return np.stack(cols, axis=1)


def _query_candidate_split(rng, labels, query_fraction):
  """Per attribute and value, a query_fraction share of the images (at least one, and at least
  one left as candidate) are queries; the rest are candidates."""
  queries, candidates = [], []
  n = len(labels)
  for a in range(labels.shape[1]):
    is_query = np.zeros(n, bool)
    for v in np.unique(labels[:, a]):
      ids = rng.permutation(np.flatnonzero(labels[:, a] == v))
      if len(ids) >= 2:
        is_query[ids[:min(len(ids) - 1, max(1, round(query_fraction * len(ids))))]] = True
    for fid in range(n):
      (queries if is_query[fid] else candidates).append((fid, a, int(labels[fid, a])))
  return queries, candidates


def _render_job(args):
  return render_garment(*args)


def generate(out, *, seed=0, num_train=3000, num_valid=400, num_test=800, query_fraction=0.2,
             folder="Synthetic", detail_scale=1.0, workers=0, verbose=False):
  """Writes <out>/<folder>/ in the official layout plus meta.json; returns that path."""
  if not 0.4 <= detail_scale <= 1.0:
    raise ValueError(f"detail_scale must be in [0.4, 1.0] (details must fit their boxes), got "
                     f"{detail_scale}.")
  if not 0.0 < query_fraction < 1.0:
    raise ValueError(f"query_fraction must be in (0, 1), got {query_fraction}.")
  root = os.path.join(out, folder)
  sizes = {"train": num_train, "valid": num_valid, "test": num_test}
  meta = {"name": folder, "seed": seed, "detail_scale": detail_scale,
          "attributes": list(ATTRIBUTES),
          "num_values": [len(v) for v in VALUE_NAMES],
          "value_names": [list(v) for v in VALUE_NAMES],
          "global_attributes": list(GLOBAL_ATTRIBUTES),
          "detail_attributes": list(DETAIL_ATTRIBUTES),
          "box_format": "x0, y0, x1, y1 in original image pixels", "splits": {}}
  pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
  try:
    for split in SPLITS:
      t0 = time.time()
      n = sizes[split]
      labels = _balanced_labels(np.random.default_rng([seed, _SPLIT_CODE[split], 2**31]), n)
      os.makedirs(os.path.join(root, "images", split), exist_ok=True)
      jobs = [(seed, split, i, labels[i].tolist(), detail_scale) for i in range(n)]
      results = (pool.imap(_render_job, jobs, chunksize=16) if pool
                 else map(_render_job, jobs))
      names, image_sizes, boxes = [], [], []
      for i, (jpeg, size, bxs) in enumerate(results):
        name = f"images/{split}/{i:06d}.jpg"
        with open(os.path.join(root, name), "wb") as f:
          f.write(jpeg)
        names.append(name)
        image_sizes.append(list(size))
        boxes.append(bxs)
      with open(os.path.join(root, f"filenames_{split}.txt"), "w") as f:
        f.write("".join(f"{name}\n" for name in names))
      if split == "train":
        with open(os.path.join(root, "label_train.txt"), "w") as f:
          for fid, row in enumerate(labels):
            pairs = " ".join(f"{a} {int(v)}" for a, v in enumerate(row))
            f.write(f"{fid} {pairs}\n")
      else:
        qc_rng = np.random.default_rng([seed, _SPLIT_CODE[split], 2**31 + 1])
        queries, candidates = _query_candidate_split(qc_rng, labels, query_fraction)
        for kind, lines in (("query", queries), ("candidate", candidates)):
          with open(os.path.join(root, f"{kind}_{split}.txt"), "w") as f:
            f.write("".join(f"{fid} {a} {v}\n" for fid, a, v in lines))
      meta["splits"][split] = {"image_size_wh": image_sizes, "labels": labels.tolist(),
                               "boxes": boxes}
      if verbose:
        print(f"{split}: {n} images in {time.time() - t0:.1f}s", flush=True)
  finally:
    if pool:
      pool.close()
      pool.join()
  with open(os.path.join(root, "meta.json"), "w") as f:
    json.dump(meta, f, separators=(",", ":"))
  return root


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="data", help="writes <out>/<folder>/")
  parser.add_argument("--folder", default="Synthetic")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--num_train", type=int, default=3000)
  parser.add_argument("--num_valid", type=int, default=400)
  parser.add_argument("--num_test", type=int, default=800)
  parser.add_argument("--query_fraction", type=float, default=0.2,
                      help="per attribute, this fraction of a valid/test split are queries")
  parser.add_argument("--detail_scale", type=float, default=1.0,
                      help="size of the neckline and buttons (0.4-1.0): smaller = harder at "
                           "the global view")
  parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
  args = parser.parse_args(argv)
  t0 = time.time()
  root = generate(args.out, seed=args.seed, num_train=args.num_train, num_valid=args.num_valid,
                  num_test=args.num_test, query_fraction=args.query_fraction, folder=args.folder,
                  detail_scale=args.detail_scale, workers=args.workers, verbose=True)
  print(f"Wrote {root} in {time.time() - t0:.1f}s.")


if __name__ == "__main__":
  main()
