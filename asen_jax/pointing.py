"""Pointing accuracy: does an attention map's maximum fall in the attribute's ground-truth box?

Cells are placed at their receptive field's centre (`stride` given) or where the paper's way of
drawing a map puts them (bilinear, half-pixel centres); see `cell_centres`.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from asen_jax import retrieval


def attention_stride(config) -> int:
  """Global-view pixels per cell of the global attention map (torchvision's layer3: 16)."""
  return int(config.model.global_output_stride or 16)


def cell_centres(n: int, stride: float | None = None):
  """Centres of the n cells along one axis of an attention map, in [0, 1] view coordinates.

  stride=None: where a bilinear resize with half-pixel centres (PyTorch's align_corners=False,
  the paper's way of drawing a map) puts cell i, (i + 0.5) / n.
  stride=s: where cell i of a network with s view pixels per cell actually looks, the centre of
  its receptive field. With symmetric padding at every strided layer (torchvision's ResNets, and
  ours) that is view pixel s * i, so (i + 0.5 / s) / n: 3.5 view pixels up and left of the
  drawing convention at s = 8, 7.5 at s = 16 (tests/test_resnet.py checks it on the backbones).
  """
  return (jnp.arange(n, dtype=jnp.float32) + cell_offset(stride)) / n


def cell_offset(stride: float | None = None) -> float:
  """Where a cell's centre sits inside it, in cells: 0.5 drawn, 0.5 / stride at its receptive
  field's centre (see `cell_centres`; viz.upsample_bilinear places maps with the same rule)."""
  return 0.5 if stride is None else 0.5 / stride


def pointing_hits(attmap_bhw, boxes_b4, stride: float | None = None):
  """Jittable: (hit_b, has_box_b) -- does the argmax cell's centre fall inside the box?

  Cell centres are `cell_centres(., stride)` in [0, 1] view coordinates; boxes are (x0, y0, x1,
  y1) in the same coordinates, edges inclusive. Ties in the map go to the first cell in
  row-major order. A box of all -1 means "no box".
  """
  attmap_bhw = jnp.asarray(attmap_bhw)
  boxes_b4 = jnp.asarray(boxes_b4, jnp.float32)
  b, h, w = attmap_bhw.shape
  idx = jnp.argmax(attmap_bhw.reshape(b, h * w), axis=1)
  x = cell_centres(w, stride)[idx % w]
  y = cell_centres(h, stride)[idx // w]
  has_box = ~jnp.all(boxes_b4 == -1, axis=1)
  inside = ((x >= boxes_b4[:, 0]) & (x <= boxes_b4[:, 2]) &
            (y >= boxes_b4[:, 1]) & (y <= boxes_b4[:, 3]))
  return inside & has_box, has_box


def pointing_accuracy(attmap_bhw, boxes_b4, attributes_b, num_attributes: int, mask=None,
                      attribute_names: Sequence[str] | None = None,
                      stride: float | None = None, values_b=None,
                      value_names: Sequence[Sequence[str]] | None = None) -> dict[str, Any]:
  """Share (%) of (image, attribute) pairs whose attention maximum lies in the GT box.

  `stride` (view pixels per map cell) places each cell at its receptive field's centre; None
  at the drawing convention's (see `cell_centres`).

  Returns dict(pointing_overall=%, pointing_per_attribute={name: %}, num_pairs={name: int});
  rows with an all -1 box or mask False are ignored; NaN where there are no pairs.
  With `values_b` (each row's value of its attribute) it also returns, per attribute and value
  (named by `value_names[a][v]`, else the value's index), pointing_per_value={name: {value: %}}
  and peak_per_value={name: {value: median of the map's maximum over the uniform level 1/(H W)}}:
  a value whose maps have no clear peak (about 1-4) gets its maximum wherever noise puts it.
  """
  names = retrieval.attribute_names_list(attribute_names, num_attributes)
  att = np.asarray(attmap_bhw)
  boxes = np.asarray(boxes_b4, np.float64)
  if att.ndim != 3:
    raise ValueError(f"attmap_bhw must have shape [B, H, W], got {att.shape}.")
  b = att.shape[0]
  if boxes.shape != (b, 4):
    raise ValueError(f"boxes_b4 must have shape ({b}, 4) to match attmap_bhw, got {boxes.shape}.")
  attr = retrieval.check_labels(attributes_b, "attributes_b", b)
  ok = retrieval.check_mask(mask, "mask", b)
  has_box = ~np.all(boxes == -1, axis=1)
  used = ok & has_box
  retrieval.check_attribute_range(attr, used, "attributes_b", num_attributes)
  bad = used & ((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1]) |
                np.any(boxes < 0, axis=1) | np.any(boxes > 1, axis=1))
  if bad.any():
    i = int(np.flatnonzero(bad)[0])
    raise ValueError(f"boxes_b4 row {i} is {boxes[i].tolist()}; boxes must be (x0, y0, x1, y1) "
                     "in [0, 1] with x0 <= x1 and y0 <= y1, or all -1 for no box.")
  hit, _ = pointing_hits(att, boxes.astype(np.float32), stride)
  hit = np.asarray(hit)
  by_value = values_b is not None
  if by_value:
    val = retrieval.check_labels(values_b, "values_b", b)
    if value_names is not None and len(value_names) != num_attributes:
      raise ValueError(f"value_names has {len(value_names)} lists but num_attributes is "
                       f"{num_attributes}; give one list of value names per attribute.")
    peak = att.reshape(b, -1).max(axis=1) * (att.shape[1] * att.shape[2])
  per_attr, counts, per_value, peak_value = {}, {}, {}, {}
  for a, name in enumerate(names):
    sel = used & (attr == a)
    counts[name] = int(sel.sum())
    per_attr[name] = float(100.0 * hit[sel].mean()) if counts[name] else float("nan")
    if not by_value:
      continue
    present = np.unique(val[sel])
    if value_names is not None:
      bad_v = present[(present < 0) | (present >= len(value_names[a]))]
      if bad_v.size:
        raise ValueError(f"values_b has value {int(bad_v[0])} for attribute {name!r}, which has "
                         f"{len(value_names[a])} value names; the labels and the names disagree.")
    per_value[name], peak_value[name] = {}, {}
    for v in present:
      key = str(value_names[a][v]) if value_names is not None else str(int(v))
      sel_v = sel & (val == v)
      per_value[name][key] = float(100.0 * hit[sel_v].mean())
      peak_value[name][key] = float(np.median(peak[sel_v]))
  overall = float(100.0 * hit[used].mean()) if used.any() else float("nan")
  out = {"pointing_overall": overall, "pointing_per_attribute": per_attr, "num_pairs": counts}
  if by_value:
    out.update(pointing_per_value=per_value, peak_per_value=peak_value)
  return out
