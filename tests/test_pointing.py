"""Pointing accuracy: hand cases, per value, cell placement."""
import numpy as np
import pytest

from asen_jax import pointing


def test_pointing_accuracy_hand_case():
  att = np.zeros((6, 4, 4), np.float32)
  att[0, 1, 2] = 1.0  # centre (0.625, 0.375)
  att[1, 1, 2] = 1.0
  att[2, 3, 0] = 1.0  # centre (0.125, 0.875)
  att[3, 0, 0] = 1.0  # centre (0.125, 0.125)
  att[4, 2, 2] = 1.0  # no box -> ignored
  att[5, 2, 2] = 1.0  # masked -> ignored
  boxes = np.array([
      [0.5, 0.25, 0.75, 0.5],    # hit
      [0.0, 0.0, 0.5, 1.0],      # miss: x 0.625 > 0.5
      [0.125, 0.875, 0.2, 0.9],  # hit on the inclusive edge
      [0.0, 0.0, 0.3, 0.3],      # hit
      [-1, -1, -1, -1],
      [0.0, 0.0, 0.1, 0.1],      # would miss, but masked
  ], np.float32)
  attrs = np.array([0, 0, 0, 1, 1, 0])
  mask = np.array([True] * 5 + [False])
  res = pointing.pointing_accuracy(att, boxes, attrs, 3, mask=mask,
                                   attribute_names=["collar", "sleeve", "neck"])
  assert res["pointing_overall"] == pytest.approx(75.0)
  assert res["pointing_per_attribute"]["collar"] == pytest.approx(200 / 3)
  assert res["pointing_per_attribute"]["sleeve"] == pytest.approx(100.0)
  assert np.isnan(res["pointing_per_attribute"]["neck"])
  assert res["num_pairs"] == {"collar": 3, "sleeve": 1, "neck": 0}
  assert "pointing_per_value" not in res
  # Per value: collar rows 0 (value 0, hit), 1 and 2 (value 1, miss and hit); sleeve row 3.
  att[1] = 1 / 16
  att[1, 1, 2] = 0.25   # a flatter map, maximum 4 x the uniform level; the others 16 x
  names = [("pointed", "round"), ("short", "long"), ("crew", "v")]
  res = pointing.pointing_accuracy(att, boxes, attrs, 3, mask=mask,
                                   attribute_names=["collar", "sleeve", "neck"],
                                   values_b=[0, 1, 1, 0, 1, 1], value_names=names)
  assert res["pointing_overall"] == pytest.approx(75.0)
  assert res["pointing_per_value"] == {"collar": {"pointed": 100.0, "round": 50.0},
                                       "sleeve": {"short": 100.0}, "neck": {}}
  assert res["peak_per_value"] == {"collar": {"pointed": 16.0, "round": 10.0},
                                   "sleeve": {"short": 16.0}, "neck": {}}
  unnamed = pointing.pointing_accuracy(att, boxes, attrs, 3, mask=mask,
                                       values_b=[0, 1, 1, 0, 1, 1])
  assert unnamed["pointing_per_value"]["attribute_0"] == {"0": 100.0, "1": 50.0}
  with pytest.raises(ValueError, match="values_b has value 1 for attribute 'sleeve'"):
    pointing.pointing_accuracy(att, boxes, attrs, 3, mask=mask, values_b=[0, 1, 1, 1, 1, 1],
                               attribute_names=["collar", "sleeve", "neck"],
                               value_names=[("a", "b"), ("a",), ("a",)])
  with pytest.raises(ValueError, match="values_b has value -1 for attribute 'collar'"):
    pointing.pointing_accuracy(att, boxes, attrs, 3, mask=mask, values_b=[-1, 1, 1, 0, 1, 1],
                               attribute_names=["collar", "sleeve", "neck"], value_names=names)
  with pytest.raises(ValueError, match="boxes_b4 row 1"):
    pointing.pointing_accuracy(att[:2], np.array([[0, 0, 1, 1], [0.5, 0, 0.2, 1]]), [0, 0], 3)


def test_pointing_at_receptive_field_centres():
  # A 4 x 4 map of a 32 px view, stride 8: cell (1, 2) looks at view pixel (8, 16), centre
  # (16.5, 8.5) / 32 = (0.515625, 0.265625); the drawing convention puts it at (0.625, 0.375).
  np.testing.assert_allclose(pointing.cell_centres(4, 8), [0.015625, 0.265625, 0.515625,
                                                             0.765625])
  np.testing.assert_allclose(pointing.cell_centres(4), [0.125, 0.375, 0.625, 0.875])
  att = np.zeros((2, 4, 4), np.float32)
  att[:, 1, 2] = 1.0
  boxes = np.array([[0.5, 0.25, 0.53, 0.28],     # a narrow box on the receptive field's centre
                    [0.6, 0.35, 0.65, 0.4]], np.float32)   # one on the drawn centre
  at_rf = pointing.pointing_accuracy(att, boxes, [0, 1], 2, stride=8)["pointing_per_attribute"]
  drawn = pointing.pointing_accuracy(att, boxes, [0, 1], 2)["pointing_per_attribute"]
  assert list(at_rf.values()) == [100.0, 0.0]
  assert list(drawn.values()) == [0.0, 100.0]
