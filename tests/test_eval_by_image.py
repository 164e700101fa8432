"""Evaluation by image: the packing of lines, and embeddings equal to the per-line way's."""
import os
import shutil

import jax
import numpy as np
import pytest

from asen_jax import data as data_lib
from asen_jax import evaluation
from asen_jax import model as model_lib
from asen_jax import parallel
from asen_jax import retrieval
from asen_jax.data import builder
from asen_jax.data import image_batches
from tests import per_line_reference
from tests import tiny_synthetic


def test_pack_lines_keeps_each_images_lines_together_in_first_use_order():
  # Image 7: lines 0, 3; image 2: lines 1, 4, 5; image 9: line 2; image 4: line 6. A chunk
  # closes when the next image's lines do not fit (2 after 7) or it holds 2 images (4 after 9).
  p = image_batches.pack_lines([7, 2, 9, 7, 2, 2, 4], images=2, chunk_multiple=2, slots=4)
  np.testing.assert_array_equal(p.image_id, [[7, -1], [2, 9], [4, -1], [-1, -1]])
  np.testing.assert_array_equal(p.line, [[0, 3, -1, -1], [1, 4, 5, 2], [6, -1, -1, -1],
                                         [-1] * 4])
  np.testing.assert_array_equal(p.slot_image, [[0] * 4, [0, 0, 0, 1], [0] * 4, [0] * 4])
  # Default slots: the mean lines of 2 images (2 * 7 lines / 4 images -> 4), at least 3.
  assert image_batches.pack_lines([7, 2, 9, 7, 2, 2, 4], images=2).line.shape == (3, 4)
  with pytest.raises(ValueError, match="fewer than the 3 lines"):
    image_batches.pack_lines([7, 2, 9, 7, 2, 2, 4], images=2, slots=2)


def test_processes_hold_their_devices_chunks_of_every_step():
  p = image_batches.pack_lines(np.arange(24), images=1, chunk_multiple=8)
  assert p.num_chunks == 24
  parts = [p.chunks_of_process(8, i, 2).reshape(3, 4) for i in range(2)]
  np.testing.assert_array_equal(np.concatenate(parts, axis=1).reshape(-1), np.arange(24))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tiny_synthetic.make_data(tmp_path_factory)
  # A copy in which image i keeps i % 5 + 1 of its five lines (over query and candidate).
  src, dst = os.path.join(root, "Synthetic"), os.path.join(root, "Uneven")
  shutil.copytree(src, dst)
  for which in ("query", "candidate"):
    for split in ("valid", "test"):
      path = os.path.join(dst, f"{which}_{split}.txt")
      with open(path) as f:
        rows = [line.split() for line in f if line.strip()]
      with open(path, "w") as f:
        f.writelines(" ".join(r) + "\n" for r in rows if int(r[1]) <= int(r[0]) % 5)
  return root


@pytest.mark.parametrize("stage", ["global", "joint"])
@pytest.mark.parametrize("folder,devices,batch", [("Uneven", 8, 16), ("Synthetic", 1, 8)])
def test_by_image_equals_per_line(data, stage, folder, devices, batch):
  config = tiny_synthetic.tiny_config(data, stage, {
      "data.folder": folder, "data.tfds_dir": f"{data}/tfds_{folder}", "eval.batch_size": batch})
  lines = np.concatenate([builder.eval_lines(config, "test", w) for w in ("query", "candidate")])
  counts = np.unique(np.bincount(lines[:, 0])[np.unique(lines[:, 0])])
  assert counts.tolist() == ([1, 2, 3, 4, 5] if folder == "Uneven" else [5])
  joint = stage == "joint"
  model = model_lib.build_model(config.model, 5, with_local=joint)
  mesh = parallel.make_mesh(jax.devices()[:devices])
  variables = parallel.replicate(mesh, model_lib.init_variables(
      model, jax.random.key(2), config.data.image_size, config.model.local_size))
  results, *got = evaluation.evaluate_split(
      config, variables, evaluation.make_embed_fn(config, model, joint, mesh), mesh, "test",
      [str(a) for a in range(5)])
  line_fn = per_line_reference.make_line_embed_fn(config, model, joint, mesh)
  want = [per_line_reference.embed_file(config, variables, line_fn, mesh, "test", w)
          for w in ("query", "candidate")]
  for g, w in zip(got, want):
    for k in ("attribute", "value", "image_id", "gt_box", "box"):
      assert getattr(g, k).dtype == w[k].dtype
      np.testing.assert_array_equal(getattr(g, k), w[k], err_msg=k)
    np.testing.assert_allclose(g.emb, w["emb"], atol=1e-5)
    np.testing.assert_allclose(g.attmap, w["attmap"], atol=1e-6)
  expected = retrieval.mean_average_precision(
      want[0]["emb"], want[0]["attribute"], want[0]["value"], want[1]["emb"],
      want[1]["attribute"], want[1]["value"], num_attributes=5)["map_overall"]
  assert results["map_overall"] == pytest.approx(expected, abs=1e-6)


def test_image_stream_gives_each_images_views_and_boxes(data):
  config = tiny_synthetic.tiny_config(data, "joint")
  batches = list(image_batches.make_image_stream(config, "test", [3, -1, 0, 5], batch_size=2))
  got = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  s, r = config.data.image_size, config.data.hires_size
  assert got["image"].shape == (4, s, s, 3) and got["hires"].shape == (4, r, r, 3)
  assert got["boxes"].shape == (4, 5, 4) and got["boxes"].dtype == np.float32
  assert not got["image"][1].any() and not got["hires"][1].any() and (got["boxes"][1] == -1).all()
  # Every candidate line of these images: the per-line stream's views and box.
  lines = {(int(b["image_id"][0]), int(b["attribute"][0])): b
           for b in data_lib.make_eval_stream(config, "test", "candidate", batch_size=1)}
  checked = 0
  for (fid, a), line in lines.items():
    if fid in (3, 0, 5):
      j = (3, -1, 0, 5).index(fid)
      np.testing.assert_array_equal(got["image"][j], line["image"][0])
      np.testing.assert_array_equal(got["hires"][j], line["hires"][0])
      np.testing.assert_array_equal(got["boxes"][j, a], line["box"][0])
      checked += 1
  assert checked >= 3
