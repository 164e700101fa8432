"""Pictures: attention heatmaps, query/top-k panels, attribute grids, and those of an evaluation."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from asen_jax import pointing
from asen_jax.data import builder
from asen_jax.data import views

RELEVANT_COLOUR = (0, 200, 0)
IRRELEVANT_COLOUR = (220, 0, 0)
NEUTRAL_COLOUR = (160, 160, 160)  # relevance unknown (a search of an unlabelled catalog)
BOX_COLOUR = (255, 255, 0)      # predicted RoI
GT_BOX_COLOUR = (0, 255, 255)   # ground-truth box
PEAK_COLOUR = (255, 255, 255)   # attention maximum
BACKGROUND = (255, 255, 255)
TEXT_COLOUR = (0, 0, 0)
PAD = 8          # gap between tiles and around the panel
FRAME = 5        # relevance frame width, drawn inside the tile
TITLE_H = 24     # title band above the tiles
CAPTION_H = 20   # caption band below the tiles
HEADER_H = 22    # attribute-name band of attention_grid
_SAVE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def jet_colormap(t) -> np.ndarray:
  """Jet-like colours in [0, 1] for values t in [0, 1] -> float32 [..., 3] (blue -> red)."""
  t = np.clip(np.asarray(t, np.float32), 0.0, 1.0)[..., None]
  centres = np.array([0.75, 0.5, 0.25], np.float32)  # r, g, b peaks
  return np.clip(1.5 - np.abs(4.0 * (t - centres)), 0.0, 1.0).astype(np.float32)


def upsample_bilinear(map_hw, out_h: int, out_w: int, stride: float | None = None) -> np.ndarray:
  """Bilinear resize with edge clamping. stride=None: half-pixel centres (PyTorch
  align_corners=False); stride=s: each cell sits at its receptive field's centre, s network-view
  pixels per cell (pointing.cell_centres), whatever the output size."""
  m = np.asarray(map_hw, np.float32)
  if m.ndim != 2:
    raise ValueError(f"attention map must be 2-D [H, W], got shape {m.shape}.")
  h, w = m.shape

  offset = pointing.cell_offset(stride)

  def axis(n_in, n_out):
    src = (np.arange(n_out, dtype=np.float32) + 0.5) * (n_in / n_out) - offset
    src = np.clip(src, 0.0, n_in - 1)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, (src - lo).astype(np.float32)

  y0, y1, fy = axis(h, out_h)
  x0, x1, fx = axis(w, out_w)
  top = m[y0][:, x0] * (1 - fx) + m[y0][:, x1] * fx
  bot = m[y1][:, x0] * (1 - fx) + m[y1][:, x1] * fx
  return top * (1 - fy[:, None]) + bot * fy[:, None]


def _as_uint8_rgb(image, name: str) -> np.ndarray:
  if isinstance(image, Image.Image):
    return np.asarray(image.convert("RGB"))
  arr = np.asarray(image)
  if arr.dtype != np.uint8:
    raise ValueError(f"{name} must be a uint8 image (0-255), got dtype {arr.dtype}; "
                     "un-normalise and cast with np.uint8 first.")
  if arr.ndim == 2:
    arr = np.repeat(arr[..., None], 3, axis=2)
  if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
    raise ValueError(f"{name} must have shape [H, W, 3], got {arr.shape}.")
  if arr.shape[2] == 1:
    arr = np.repeat(arr, 3, axis=2)
  return arr[..., :3]


def heatmap_overlay(image_uint8_hwc, attmap_hw, alpha: float = 0.5,
                    stride: float | None = None) -> np.ndarray:
  """Blend a jet heatmap of `attmap_hw` (bilinearly upsampled, min-max scaled) over the image;
  `stride` as in `upsample_bilinear`."""
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha must lie in [0, 1], got {alpha}.")
  img = _as_uint8_rgb(image_uint8_hwc, "image_uint8_hwc")
  up = upsample_bilinear(attmap_hw, img.shape[0], img.shape[1], stride)
  lo, hi = float(up.min()), float(up.max())
  # Normalise after upsampling so the hottest colour lands exactly on the map's peak.
  t = (up - lo) / (hi - lo) if hi > lo else np.zeros_like(up)
  colour = jet_colormap(t) * 255.0
  out = alpha * colour + (1.0 - alpha) * img.astype(np.float32)
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _font(size: int = 12):
  try:
    return ImageFont.load_default(size=size)
  except (OSError, TypeError):  # PIL without FreeType: bitmap font, fixed size
    return ImageFont.load_default()


def _fit(img: np.ndarray, tile: int) -> tuple[Image.Image, tuple[int, int, int, int]]:
  """Letterbox an image into a tile x tile square -> (tile image, (ox, oy, new_w, new_h))."""
  h, w = img.shape[:2]
  scale = tile / max(h, w)
  new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
  canvas = Image.new("RGB", (tile, tile), BACKGROUND)
  ox, oy = (tile - new_w) // 2, (tile - new_h) // 2
  canvas.paste(Image.fromarray(img).resize((new_w, new_h), Image.Resampling.BILINEAR), (ox, oy))
  return canvas, (ox, oy, new_w, new_h)


def _draw_box(draw, box, placement, offset, colour, width=2):
  if box is None:
    return
  box = np.asarray(box, np.float64)
  if box.shape != (4,) or np.all(box == -1):
    return
  ox, oy, new_w, new_h = placement
  x0, y0 = offset[0] + ox + box[0] * new_w, offset[1] + oy + box[1] * new_h
  x1, y1 = offset[0] + ox + box[2] * new_w - 1, offset[1] + oy + box[3] * new_h - 1
  draw.rectangle([x0, y0, max(x0, x1), max(y0, y1)], outline=colour, width=width)


def tile_origin(col: int, tile: int, top: int = TITLE_H) -> tuple[int, int]:
  """Top-left pixel of column `col` in a panel (shared by the panels and their tests)."""
  return PAD + col * (tile + PAD), top


def retrieval_panel(query_image, attmap, box, candidates: Sequence, relevant: Sequence[bool],
                    scores: Sequence[float], title: str, gt_box=None, *, tile: int = 160,
                    alpha: float = 0.5, stride: float | None = None) -> Image.Image:
  """Query | heatmap with RoI box (yellow; GT cyan) | top-k with green/red frames (grey where a
  `relevant` entry is None) and scores.

  Boxes are (x0, y0, x1, y1) in [0, 1] coordinates of `query_image`. The panel is
  (PAD + (k + 2) * (tile + PAD)) wide and (TITLE_H + tile + CAPTION_H) high.
  """
  k = len(candidates)
  if len(relevant) != k or len(scores) != k:
    raise ValueError(f"retrieval_panel got {k} candidates, {len(relevant)} relevance flags and "
                     f"{len(scores)} scores; pass one of each per candidate.")
  query = _as_uint8_rgb(query_image, "query_image")
  width = PAD + (k + 2) * (tile + PAD)
  panel = Image.new("RGB", (width, TITLE_H + tile + CAPTION_H), BACKGROUND)
  draw = ImageDraw.Draw(panel)
  font = _font(12)
  draw.text((PAD, 5), title, fill=TEXT_COLOUR, font=font)

  q_tile, placement = _fit(query, tile)
  panel.paste(q_tile, tile_origin(0, tile))
  heat_tile, _ = _fit(heatmap_overlay(query, attmap, alpha, stride), tile)
  heat_xy = tile_origin(1, tile)
  panel.paste(heat_tile, heat_xy)
  _draw_box(draw, gt_box, placement, heat_xy, GT_BOX_COLOUR)
  _draw_box(draw, box, placement, heat_xy, BOX_COLOUR)
  caption_y = TITLE_H + tile + 3
  draw.text((tile_origin(0, tile)[0], caption_y), "query", fill=TEXT_COLOUR, font=font)
  draw.text((heat_xy[0], caption_y), "attention + RoI", fill=TEXT_COLOUR, font=font)

  for i, (cand, rel, score) in enumerate(zip(candidates, relevant, scores)):
    c_tile, _ = _fit(_as_uint8_rgb(cand, f"candidates[{i}]"), tile)
    x, y = tile_origin(i + 2, tile)
    panel.paste(c_tile, (x, y))
    colour = NEUTRAL_COLOUR if rel is None else RELEVANT_COLOUR if rel else IRRELEVANT_COLOUR
    draw.rectangle([x, y, x + tile - 1, y + tile - 1], outline=colour, width=FRAME)
    draw.text((x, caption_y), f"#{i + 1}  {float(score):.3f}", fill=TEXT_COLOUR, font=font)
  return panel


def _draw_peak(draw, attmap, placement, offset, stride, arm=4):
  """A white '+' with a dark outline on the map's maximum, placed as `upsample_bilinear` places
  its cell (the point that `pointing.pointing_hits` tests against the box)."""
  m = np.asarray(attmap, np.float32)
  i, j = np.unravel_index(int(np.argmax(m)), m.shape)   # first maximum, as pointing_hits
  off = pointing.cell_offset(stride)
  ox, oy, new_w, new_h = placement
  x = offset[0] + ox + (j + off) / m.shape[1] * new_w
  y = offset[1] + oy + (i + off) / m.shape[0] * new_h
  for colour, width in ((TEXT_COLOUR, 3), (PEAK_COLOUR, 1)):
    draw.line([(x - arm, y), (x + arm, y)], fill=colour, width=width)
    draw.line([(x, y - arm), (x, y + arm)], fill=colour, width=width)


def attention_grid(images: Sequence, attmaps_per_attribute, attribute_names: Sequence[str], *,
                   tile: int = 128, alpha: float = 0.5, stride: float | None = None,
                   boxes=None, mark_peaks: bool = False) -> Image.Image:
  """Rows = images, columns = the image then one heatmap per attribute.

  Args:
    images: N uint8 images [H, W, 3] (sizes may differ).
    attmaps_per_attribute: [N, A, h, w] attention maps, one per image and attribute.
    attribute_names: A column titles.
    stride: as in `upsample_bilinear`.
    boxes: optional [N, A, 4] ground-truth regions, (x0, y0, x1, y1) in [0, 1] coordinates of
      each image (all -1: none), outlined in GT_BOX_COLOUR on each heatmap.
    mark_peaks: draw a '+' on each map's maximum (where pointing accuracy looks); a legend line
      is added below the grid when boxes or peaks are drawn.
  """
  maps = np.asarray(attmaps_per_attribute, np.float32)
  n, a = len(images), len(attribute_names)
  if maps.ndim != 4 or maps.shape[:2] != (n, a):
    raise ValueError(f"attmaps_per_attribute must have shape [{n}, {a}, h, w] for {n} images and "
                     f"{a} attribute names, got {maps.shape}.")
  if boxes is not None:
    boxes = np.asarray(boxes, np.float32)
    if boxes.shape != (n, a, 4):
      raise ValueError(f"boxes must have shape [{n}, {a}, 4] (one box per image and attribute), "
                       f"got {boxes.shape}.")
  legend = [text for text, on in (("cyan: the attribute's region", boxes is not None),
                                  ("+: the attention maximum", mark_peaks)) if on]
  width = PAD + (a + 1) * (tile + PAD)
  height = HEADER_H + n * (tile + PAD) + (CAPTION_H if legend else 0)
  grid = Image.new("RGB", (width, height), BACKGROUND)
  draw = ImageDraw.Draw(grid)
  font = _font(11)
  draw.text((PAD, 5), "image", fill=TEXT_COLOUR, font=font)
  for j, name in enumerate(attribute_names):
    draw.text((tile_origin(j + 1, tile)[0], 5), str(name), fill=TEXT_COLOUR, font=font)
  for i, image in enumerate(images):
    img = _as_uint8_rgb(image, f"images[{i}]")
    y = HEADER_H + i * (tile + PAD)
    grid.paste(_fit(img, tile)[0], (tile_origin(0, tile)[0], y))
    for j in range(a):
      cell, placement = _fit(heatmap_overlay(img, maps[i, j], alpha, stride), tile)
      xy = (tile_origin(j + 1, tile)[0], y)
      grid.paste(cell, xy)
      if boxes is not None:
        _draw_box(draw, boxes[i, j], placement, xy, GT_BOX_COLOUR, width=1)
      if mark_peaks:
        _draw_peak(draw, maps[i, j], placement, xy, stride)
  if legend:
    draw.text((PAD, height - CAPTION_H + 3), ";  ".join(legend), fill=TEXT_COLOUR, font=font)
  return grid


def save_panel(panel: Image.Image, path) -> str:
  """Write a panel as PNG/JPEG/WebP (by extension), creating folders -> the path written."""
  path = os.fspath(path)
  ext = os.path.splitext(path)[1].lower()
  if ext not in _SAVE_FORMATS:
    raise ValueError(f"save_panel cannot write '{path}': use one of the extensions "
                     f"{sorted(_SAVE_FORMATS)}.")
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  panel.save(path, format=_SAVE_FORMATS[ext])
  return path


# ----------------------------------------------------------------------------- evaluation


def _split_images(config, split):
  """image_id -> (view, hires, boxes) loader for one split: uint8 images, and float32 [A, 4]
  ground-truth boxes in [0, 1] view coordinates (all -1 where unknown)."""
  source = builder.split_source(config, split)
  index = builder.record_index(config, split)

  def load(image_id):
    record = source[int(index[int(image_id)])]
    view, hires = views.load_view(record["image"], config.data.image_size,
                                     config.data.hires_size)
    w, h = int(record["width"]), int(record["height"])
    boxes = np.stack([views.box_to_view(b, w, h) for b in np.asarray(record["boxes"])])
    return view, hires, boxes
  return load


def write_pictures(config, split, queries, cands, info, viz_dir, per_attribute=3, top_k=6,
                   variables=None, embed_fn=None, grid_images=4, write=True):
  """Retrieval panels (a few queries per attribute) and an attention grid; returns the paths.

  With several processes every process calls it (the grid runs the model on the global mesh)
  and only the one with `write` draws and saves.
  """
  load = _split_images(config, split)
  grid = None
  if embed_fn is not None and grid_images:
    ids = list(dict.fromkeys(queries.image_id.tolist()))[:grid_images]
    grid = model_attention_grid(config, variables, embed_fn, load, ids, info)
  if not write:
    return []
  os.makedirs(viz_dir, exist_ok=True)
  frame = float(config.data.image_size)
  paths = []
  for a, name in enumerate(info.attributes):
    q_rows = np.flatnonzero(queries.attribute == a)[:per_attribute]
    c_rows = np.flatnonzero(cands.attribute == a)
    for q in q_rows:
      scores = cands.emb[c_rows] @ queries.emb[q]
      order = np.argsort(-scores, kind="stable")[:top_k]
      top = c_rows[order]
      value_name = info.value_names[a][queries.value[q]] if info.value_names else queries.value[q]
      gt = queries.gt_box[q] if (queries.gt_box[q] >= 0).all() else None
      panel = retrieval_panel(
          load(queries.image_id[q])[0], queries.attmap[q], queries.box[q] / frame,
          [load(cands.image_id[c])[0] for c in top], list(cands.value[top] == queries.value[q]),
          [float(s) for s in scores[order]],
          f"{name} = {value_name}   (query {int(queries.image_id[q])}, {split})", gt_box=gt,
          stride=pointing.attention_stride(config))
      path = os.path.join(viz_dir, f"{name}_query{int(queries.image_id[q])}.png")
      save_panel(panel, path)
      paths.append(path)
  if grid is not None:
    path = os.path.join(viz_dir, "attention_grid.png")
    save_panel(grid, path)
    paths.append(path)
  return paths


def model_attention_grid(config, variables, embed_fn, load, image_ids, info):
  """Where each attribute looks: images x attributes heatmaps of the global branch, with each
  attribute's ground-truth box and each map's maximum."""
  views = [load(i) for i in image_ids]
  n, num_attr = len(views), len(info.attributes)
  _, attmap, _ = embed_fn.embed_lines(
      variables, np.stack([v[0] for v in views]), np.stack([v[1] for v in views]),
      np.repeat(np.arange(n), num_attr), np.tile(np.arange(num_attr, dtype=np.int32), n))
  attmap = attmap.reshape((n, num_attr) + attmap.shape[1:])
  return attention_grid([v[0] for v in views], attmap, list(info.attributes),
                        stride=pointing.attention_stride(config),
                        boxes=np.stack([v[2] for v in views]), mark_peaks=True)
