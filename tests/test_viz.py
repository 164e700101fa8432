"""Tests for asen_jax.viz: colours, upsampling parity, panel geometry and frame colours."""
import numpy as np
import pytest
from PIL import Image

from asen_jax import viz


def test_jet_endpoints():
  np.testing.assert_allclose(viz.jet_colormap([0.0, 0.5, 1.0]),
                             [[0, 0, 0.5], [0.5, 1, 0.5], [0.5, 0, 0]], atol=1e-6)


def test_upsample_matches_torch_bilinear():
  torch = pytest.importorskip("torch")
  m = np.random.default_rng(0).random((5, 7)).astype(np.float32)
  ref = torch.nn.functional.interpolate(torch.from_numpy(m)[None, None], size=(33, 20),
                                        mode="bilinear", align_corners=False)[0, 0].numpy()
  np.testing.assert_allclose(viz.upsample_bilinear(m, 33, 20), ref, atol=1e-5)


def test_upsample_with_stride_puts_each_cell_on_its_receptive_field_centre():
  m = np.zeros((14, 14), np.float32)
  m[3, 10] = 1.0
  up = viz.upsample_bilinear(m, 224, 224, stride=16)
  assert np.unravel_index(np.argmax(up), up.shape) == (48, 160) and up[48, 160] == 1.0
  # Drawn at twice the view's size, the peak is on the same point of the image (pixel 96.5).
  up2 = viz.upsample_bilinear(m, 448, 448, stride=16)
  assert up2[96, 320] == up2[97, 321] == pytest.approx(up2.max())
  # The half-pixel convention (stride None) draws the same cell 7.5 view pixels lower-right.
  drawn = viz.upsample_bilinear(m, 224, 224)
  assert drawn[55:57, 167:169].min() == pytest.approx(drawn.max())


def test_heatmap_overlay_hottest_colour_at_peak():
  img = np.zeros((224, 224, 3), np.uint8)
  att = np.zeros((14, 14), np.float32)
  att[3, 10] = 1.0
  out = viz.heatmap_overlay(img, att, alpha=0.6)
  assert out.shape == (224, 224, 3) and out.dtype == np.uint8
  # Cell (3, 10) covers rows 48..63, cols 160..175; its centre pixels hold the peak.
  hottest = np.round(0.6 * 255 * viz.jet_colormap(1.0)).astype(np.uint8)   # (77, 0, 0)
  coldest = np.round(0.6 * 255 * viz.jet_colormap(0.0)).astype(np.uint8)   # (0, 0, 77)
  np.testing.assert_array_equal(out[55, 167], hottest)
  np.testing.assert_array_equal(out[56, 168], hottest)
  np.testing.assert_array_equal(out[200, 20], coldest)
  y, x = np.unravel_index(np.argmax(out[..., 0].astype(int) - out[..., 2]), out.shape[:2])
  assert 48 <= y < 64 and 160 <= x < 176
  # alpha 0 returns the image untouched; a constant map is all "cold".
  grey = np.full((10, 12, 3), 90, np.uint8)
  np.testing.assert_array_equal(viz.heatmap_overlay(grey, att, alpha=0.0), grey)
  const = viz.heatmap_overlay(grey, np.ones((3, 3)), alpha=1.0)
  assert np.all(const == np.round(255 * viz.jet_colormap(0.0)).astype(np.uint8))


def test_retrieval_panel_geometry_and_frames():
  rng = np.random.default_rng(0)
  query = rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)
  cands = [rng.integers(0, 255, (300, 200, 3), dtype=np.uint8) for _ in range(3)]
  att = rng.random((14, 14)).astype(np.float32)
  tile = 100
  panel = viz.retrieval_panel(query, att, (0.25, 0.25, 0.75, 0.75), cands, [True, False, True],
                              [0.91, 0.85, 0.5], "collar_design = peter pan", tile=tile,
                              gt_box=(0.0, 0.0, 0.5, 0.5))
  assert isinstance(panel, Image.Image)
  assert panel.size == (viz.PAD + 5 * (tile + viz.PAD), viz.TITLE_H + tile + viz.CAPTION_H)
  px = np.asarray(panel)
  for i, colour in enumerate([viz.RELEVANT_COLOUR, viz.IRRELEVANT_COLOUR, viz.RELEVANT_COLOUR]):
    x, y = viz.tile_origin(i + 2, tile)
    for yy, xx in [(y, x + tile // 2), (y + tile // 2, x + 2), (y + tile - 1, x + tile - 3),
                   (y + tile // 2, x + tile - viz.FRAME)]:
      np.testing.assert_array_equal(px[yy, xx], colour)
    # Inside the frame the candidate picture is shown, not the frame colour.
    assert not np.array_equal(px[y + tile // 2, x + tile // 2], colour)
  # RoI box on the heatmap tile: a 224 x 224 query fills the tile, so x0 = 0.25 * tile.
  hx, hy = viz.tile_origin(1, tile)
  np.testing.assert_array_equal(px[hy + 60, hx + 25], viz.BOX_COLOUR)
  np.testing.assert_array_equal(px[hy + 25, hx + 60], viz.BOX_COLOUR)
  # GT box top edge (y = 0) is not covered by the RoI box.
  np.testing.assert_array_equal(px[hy, hx + 10], viz.GT_BOX_COLOUR)
  # Query tile is the query image itself (resized 224 -> 100).
  qx, qy = viz.tile_origin(0, tile)
  expect = np.asarray(Image.fromarray(query).resize((tile, tile), Image.Resampling.BILINEAR))
  np.testing.assert_array_equal(px[qy:qy + tile, qx:qx + tile], expect)
  with pytest.raises(ValueError, match="3 candidates, 2 relevance flags"):
    viz.retrieval_panel(query, att, None, cands, [True, False], [1, 2, 3], "t")


def test_attention_grid_cells_are_overlays(tmp_path):
  rng = np.random.default_rng(1)
  tile = 64
  images = [rng.integers(0, 255, (tile, tile, 3), dtype=np.uint8) for _ in range(2)]
  maps = rng.random((2, 3, 7, 7)).astype(np.float32)
  grid = viz.attention_grid(images, maps, ["skirt", "sleeve", "collar"], tile=tile, alpha=0.4)
  assert grid.size == (viz.PAD + 4 * (tile + viz.PAD), viz.HEADER_H + 2 * (tile + viz.PAD))
  px = np.asarray(grid)
  x, _ = viz.tile_origin(3, tile)
  y = viz.HEADER_H + 1 * (tile + viz.PAD)
  np.testing.assert_array_equal(px[y:y + tile, x:x + tile],
                                viz.heatmap_overlay(images[1], maps[1, 2], alpha=0.4))
  with pytest.raises(ValueError, match=r"shape \[2, 2, h, w\]"):
    viz.attention_grid(images, maps, ["a", "b"])
  path = viz.save_panel(grid, tmp_path / "sub" / "grid.png")
  assert Image.open(path).size == grid.size
  with pytest.raises(ValueError, match="extensions"):
    viz.save_panel(grid, tmp_path / "grid.gif")
  with pytest.raises(ValueError, match="uint8"):
    viz.heatmap_overlay(np.zeros((4, 4, 3), np.float32), maps[0, 0])


def test_attention_grid_draws_boxes_and_each_maximum():
  tile = 96   # = the view size, so tile pixels are view pixels
  images = [np.full((96, 96, 3), 128, np.uint8)]
  maps = np.zeros((1, 2, 12, 12), np.float32)
  maps[0, 0, 3, 5] = 1.0
  maps[0, 1, 10, 1] = 1.0
  boxes = np.array([[[0.25, 0.5, 0.75, 1.0], [-1, -1, -1, -1]]], np.float32)
  grid = viz.attention_grid(images, maps, ["a", "b"], tile=tile, stride=8, boxes=boxes,
                            mark_peaks=True)
  assert grid.size[1] == viz.HEADER_H + tile + viz.PAD + viz.CAPTION_H   # legend line
  px = np.asarray(grid)
  y = viz.HEADER_H
  tiles = [px[y:y + tile, x:x + tile] for x in (viz.tile_origin(j, tile)[0] for j in (1, 2))]
  # The box's left edge (x0 = 0.25 * 96 = 24) from y0 = 48 down; none on the boxless map.
  np.testing.assert_array_equal(tiles[0][70, 24], viz.GT_BOX_COLOUR)
  assert not (tiles[1] == viz.GT_BOX_COLOUR).all(-1).any()
  # Each '+' is centred on its maximum's cell at the receptive-field centre: view pixel 8 * index
  # plus half a pixel, (40.5, 24.5) for cell (3, 5) and (8.5, 80.5) for cell (10, 1).
  for t, (cx, cy) in zip(tiles, [(40.5, 24.5), (8.5, 80.5)]):
    ys, xs = np.nonzero((t == viz.PEAK_COLOUR).all(-1))
    assert len(xs) >= 12
    centre = (xs.mean() + 0.5, ys.mean() + 0.5)
    assert abs(centre[0] - cx) <= 1.0 and abs(centre[1] - cy) <= 1.0, centre
  with pytest.raises(ValueError, match=r"boxes must have shape \[1, 2, 4\]"):
    viz.attention_grid(images, maps, ["a", "b"], boxes=boxes[:, :1])
