"""TFDS builder: round trip of the synthetic set, idempotence, dataset_info, bad input."""
import json
import os
import re
import shutil
import time

import numpy as np
import pytest

from asen_jax import data as data_lib
from asen_jax.data import builder
from asen_jax.data import synthetic
from configs import common
from configs import fashionai


def _config(root, tfds_dir, name="synthetic", folder="Synthetic"):
  c = fashionai.get_config("global") if name == "fashionai" else common.base_config("global")
  c.data.name, c.data.root, c.data.folder, c.data.tfds_dir = name, str(root), folder, str(tfds_dir)
  return c


def _triples(path):
  with open(path) as f:
    return [tuple(int(t) for t in line.split()) for line in f]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  synthetic.generate(str(root), seed=5, num_train=24, num_valid=12, num_test=12)
  c = _config(root, root / "tfds")
  data_lib.prepare_dataset(c)
  return c


@pytest.fixture
def raw_copy(built, tmp_path):
  """A writable copy of the raw synthetic folder, for corrupting."""
  src = os.path.join(built.data.root, "Synthetic")
  shutil.copytree(src, tmp_path / "Synthetic")
  return _config(tmp_path, tmp_path / "tfds")


def test_round_trip(built):
  folder = os.path.join(built.data.root, "Synthetic")
  meta = json.load(open(os.path.join(folder, "meta.json")))
  assert os.path.isfile(os.path.join(builder.builder_dir(built),
                                     "asen_fashion-train.array_record-00000-of-00001"))
  for split, n in (("train", 24), ("valid", 12), ("test", 12)):
    names = open(os.path.join(folder, f"filenames_{split}.txt")).read().split()
    src = builder.split_source(built, split)
    assert len(src) == n
    np.testing.assert_array_equal(builder.record_index(built, split), np.arange(n))
    for i in range(n):
      r = src[i]
      assert r["image_id"] == i and r["filename"].decode() == names[i]
      with open(os.path.join(folder, names[i]), "rb") as f:
        assert r["image"] == f.read()                      # bytes exactly as on disk
      assert [r["width"], r["height"]] == meta["splits"][split]["image_size_wh"][i]
      np.testing.assert_allclose(r["boxes"], meta["splits"][split]["boxes"][i], atol=1e-4)
      np.testing.assert_array_equal(r["labels"], meta["splits"][split]["labels"][i])
  train = _triples(os.path.join(folder, "label_train.txt"))
  rows = builder.train_labels(built)
  assert rows.shape == (24 * 5, 3)
  assert sorted(map(tuple, rows.tolist())) == sorted(
      (line[0], a, line[2 + 2 * a]) for line in train for a in range(5))
  for split in ("valid", "test"):
    for which in ("query", "candidate"):
      expect = _triples(os.path.join(folder, f"{which}_{split}.txt"))
      assert builder.eval_lines(built, split, which).tolist() == [list(t) for t in expect]


def test_prepare_is_idempotent_and_fast(built):
  info_file = os.path.join(builder.builder_dir(built), "dataset_info.json")
  before = os.path.getmtime(info_file)
  t0 = time.time()
  assert data_lib.prepare_dataset(built) == builder.builder_dir(built)
  assert time.time() - t0 < 0.5
  assert os.path.getmtime(info_file) == before


def test_dataset_info(built, tmp_path):
  info = data_lib.dataset_info(built)
  assert info.name == "synthetic"
  assert info.attributes == ("colour", "length", "pattern", "neckline", "button")
  assert info.num_values == (6, 4, 4, 4, 4)
  assert info.value_names[3] == ("crew", "crew_ribbed", "scoop", "scoop_ribbed")
  # Public datasets: the lists of their configs (the paper's counts).
  from configs import darn, deepfashion   # pylint: disable=g-import-not-at-top
  for mod, n_attr, total in ((fashionai, 8, 54), (darn, 9, 185), (deepfashion, 5, 1000)):
    c = mod.get_config("global")
    c.data.tfds_dir = str(tmp_path)   # nothing built there
    info = data_lib.dataset_info(c)
    assert len(info.attributes) == n_attr and sum(info.num_values) == total
    assert info.attributes == tuple(c.data.attributes)
  c.data.attributes = ()
  with pytest.raises(ValueError, match=r"set data.attributes and data.num_values"):
    data_lib.dataset_info(c)
  built.data.num_values = (6, 4, 4, 4, 5)
  try:
    with pytest.raises(ValueError, match=re.escape(
        "data.num_values (6, 4, 4, 4, 5) do not match the dataset built at")) as e:
      data_lib.dataset_info(built)
    assert "(6, 4, 4, 4, 4)" in str(e.value)
  finally:
    built.data.num_values = ()
  built.data.attributes = ("colour", "length")
  try:
    with pytest.raises(ValueError, match=r"data.attributes \('colour', 'length'\) do not match"):
      data_lib.dataset_info(built)
  finally:
    built.data.attributes = ()


def test_missing_folder_and_split_file(tmp_path, raw_copy):
  c = _config(tmp_path / "nowhere", tmp_path / "tfds", name="fashionai", folder="FashionAI")
  with pytest.raises(FileNotFoundError) as e:
    data_lib.prepare_dataset(c)
  msg = str(e.value)
  assert "FashionAI does not exist" in msg and "filenames_{train,valid,test}.txt" in msg
  assert "FashionAI Global Challenge 2018" in msg and "asen_jax.data.synthetic" in msg
  os.remove(os.path.join(raw_copy.data.root, "Synthetic", "query_test.txt"))
  with pytest.raises(FileNotFoundError, match=r"Synthetic has no query_test.txt: it must hold"):
    data_lib.prepare_dataset(raw_copy)
  with pytest.raises(ValueError, match="data.name='imagenet' is not a dataset"):
    data_lib.prepare_dataset(_config(tmp_path, tmp_path / "tfds", name="imagenet"))


def test_corrupt_image_stops_or_is_skipped(raw_copy):
  folder = os.path.join(raw_copy.data.root, "Synthetic")
  bad = os.path.join(folder, "images", "valid", "000004.jpg")
  with open(bad, "rb") as f:
    head = f.read(300)
  with open(bad, "wb") as f:       # a truncated JPEG
    f.write(head)
  os.remove(os.path.join(folder, "images", "test", "000002.jpg"))   # a missing one
  with pytest.raises(ValueError) as e:
    data_lib.prepare_dataset(raw_copy)
  msg = str(e.value)
  assert msg.startswith(f"Cannot read image {bad} (line 5 of filenames_valid.txt): ")
  assert "data.skip_corrupt=True" in msg
  assert not builder.is_built(raw_copy)

  raw_copy.data.skip_corrupt = True
  data_lib.prepare_dataset(raw_copy)
  meta = builder.load_metadata(raw_copy)
  assert [t[:2] for t in meta["skipped"]["valid"]] == [[4, "images/valid/000004.jpg"]]
  assert [t[:2] for t in meta["skipped"]["test"]] == [[2, "images/test/000002.jpg"]]
  assert "No such file" in meta["skipped"]["test"][0][2]
  assert len(builder.split_source(raw_copy, "valid")) == 11
  index = builder.record_index(raw_copy, "valid")
  assert index[4] == -1 and index[5] == 4 and index[11] == 10
  assert builder.split_source(raw_copy, "valid")[4]["image_id"] == 5
  for which in ("query", "candidate"):
    lines = builder.eval_lines(raw_copy, "valid", which)
    assert 4 not in lines[:, 0]
  # Every attribute of image 4 was either a query or a candidate line: 5 lines dropped.
  assert sum(meta["dropped_lines"][w]["valid"] for w in ("query", "candidate")) == 5


def test_label_out_of_range_names_the_line(raw_copy):
  folder = os.path.join(raw_copy.data.root, "Synthetic")
  path = os.path.join(folder, "label_train.txt")
  original = open(path).read()
  lines = original.splitlines()
  fields = lines[2].split()
  fields[4] = "4"          # attribute 1 (length) has values 0..3
  lines[2] = " ".join(fields)
  open(path, "w").write("\n".join(lines) + "\n")
  with pytest.raises(ValueError, match=re.escape(
      f"{path}:3: value 4 of attribute 1 is out of range 0..3")):
    data_lib.prepare_dataset(raw_copy)
  fields[4], fields[3] = "0", "7"   # attribute index 7 does not exist
  lines[2] = " ".join(fields)
  open(path, "w").write("\n".join(lines) + "\n")
  with pytest.raises(ValueError, match=re.escape(f"{path}:3: attribute 7 is out of range 0..4")):
    data_lib.prepare_dataset(raw_copy)
  open(path, "w").write(original)
  qpath = os.path.join(folder, "query_valid.txt")
  q = open(qpath).read().splitlines()
  q[1] = "99 0 1"           # image id past the 12 valid images
  open(qpath, "w").write("\n".join(q) + "\n")
  with pytest.raises(ValueError, match=re.escape(f"{qpath}:2: image id 99 is out of range 0..11")):
    data_lib.prepare_dataset(raw_copy)



def test_public_config_without_boxes(raw_copy, tmp_path):
  """The same files built as 'fashionai': its attribute list, no boxes, eval boxes all -1."""
  os.rename(os.path.join(raw_copy.data.root, "Synthetic"), tmp_path / "FashionAI")
  os.remove(tmp_path / "FashionAI" / "meta.json")
  c = _config(tmp_path, tmp_path / "tfds_fa", name="fashionai", folder="FashionAI")
  data_lib.prepare_dataset(c)
  info = data_lib.dataset_info(c)
  assert info.attributes[0] == "skirt_length" and info.num_values == (6, 9, 8, 6, 5, 5, 10, 5)
  rec = builder.split_source(c, "train")[0]
  assert rec["labels"].shape == (8,) and np.all(rec["labels"][5:] == -1)
  assert np.all(rec["boxes"] == -1)
  c.data.image_size, c.data.hires_size = 16, 32
  batch = next(iter(data_lib.make_eval_stream(c, "test", "query", batch_size=4)))
  assert np.all(batch["box"] == -1) and batch["mask"].all()
