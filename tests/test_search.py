"""Search: flat == brute force over evaluation's embeddings; add/remove; atomic writes; errors."""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from asen_jax import checkpoint as ckpt_lib
from asen_jax import data as data_lib
from asen_jax import evaluation
from asen_jax import model as model_lib
from asen_jax import parallel
from asen_jax import retrieval
from asen_jax.search import faiss_index
from asen_jax.search import quality
from asen_jax.search import service
from asen_jax.search import store
from tests import tiny_synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _save_model(config, path, seed, joint=True):
  info = data_lib.dataset_info(config)
  model = model_lib.build_model(config.model, len(info.attributes), with_local=joint)
  variables = model_lib.init_variables(model, jax.random.key(seed), config.data.image_size,
                                       config.model.local_size)
  ckpt_lib.save_model_variables(path, jax.device_get(variables), {
      "attributes": list(info.attributes), "stage": "joint" if joint else "global",
      "model": config.model.to_dict()})
  return model, variables


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  data = tiny_synthetic.make_data(tmp_path_factory)
  config = tiny_synthetic.tiny_config(data, "joint")
  work = tmp_path_factory.mktemp("search")
  model, variables = _save_model(config, str(work / "ckpt"), seed=4)
  _save_model(config, str(work / "other"), seed=5)
  mesh = parallel.make_mesh()
  queries, cands = evaluation.embed_split(
      config, parallel.replicate(mesh, variables),
      evaluation.make_embed_fn(config, model, True, mesh), mesh, "test")
  index = service.build(config, str(work / "ckpt"), str(work / "split_index"),
                        {"kind": "flat"}, split="test")
  return dict(config=config, work=work, queries=queries, cands=cands, index=index,
              folder=os.path.join(data, "Synthetic"))


def _path_of(folder, split):
  with open(os.path.join(folder, f"filenames_{split}.txt")) as f:
    return [os.path.join(folder, line.strip()) for line in f]


def test_flat_ranks_as_brute_force_over_evaluations_embeddings(setup):
  queries, cands, folder = setup["queries"], setup["cands"], setup["folder"]
  paths = _path_of(folder, "test")
  searcher = service.Searcher(str(setup["work"] / "split_index"))
  names = searcher.attributes
  for q in range(len(queries.emb)):
    a = int(queries.attribute[q])
    rows = np.flatnonzero(cands.attribute == a)
    scores = cands.emb[rows] @ queries.emb[q]
    order = np.argsort(-scores, kind="stable")
    results, _ = searcher.query(paths[queries.image_id[q]], names[a], top_k=len(rows))
    assert [r["path"] for r in results] == [paths[i] for i in cands.image_id[rows][order]]
    np.testing.assert_allclose([r["score"] for r in results], scores[order], atol=1e-5)


def test_a_folder_embeds_as_evaluation_and_add_remove_match_a_full_build(setup):
  cands, work = setup["cands"], setup["work"]
  paths = _path_of(setup["folder"], "test")
  folder = work / "photos"
  for i, p in enumerate(paths):   # nested folders, shuffled names
    dst = folder / f"part{i % 2}" / f"{(7 * i) % 20:02d}_{os.path.basename(p)}"
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(p, dst)
  full = service.build(setup["config"], str(work / "ckpt"), str(work / "full"), {"kind": "flat"},
                       images=[str(folder)])
  assert len(full.items) == len(paths)
  # Every candidate line's embedding, read back from the flat index: evaluation's, to 1e-5.
  item_of = {os.path.basename(p).split("_", 1)[1]: i for i, p in enumerate(full.items)}
  for fid, a, emb in zip(cands.image_id, cands.attribute, cands.emb):
    stored = full.indexes[a].reconstruct(item_of[os.path.basename(paths[fid])])
    np.testing.assert_allclose(stored, emb, atol=1e-5)

  part = sorted(str(p) for p in (folder / "part0").iterdir())
  service.build(setup["config"], str(work / "ckpt"), str(work / "grow"), {"kind": "flat"},
                images=[str(folder / "part1")])
  assert service.add(str(work / "grow"), [str(folder / "part0")]) == len(part)
  assert service.remove(str(work / "grow"), part[:3]) == 3
  grown = service.Searcher(str(work / "grow"))
  ref = service.Searcher(str(work / "full"))
  for query in part[3:6]:
    got, _ = grown.query(query, "pattern", top_k=len(paths))
    want, _ = ref.query(query, "pattern", top_k=len(paths))
    want = [r for r in want if r["path"] not in part[:3]]
    assert [r["path"] for r in got] == [r["path"] for r in want]
    np.testing.assert_allclose([r["score"] for r in got], [r["score"] for r in want], atol=1e-6)


def test_map_through_flat_equals_exact_map(setup):
  queries, cands, index = setup["queries"], setup["cands"], setup["index"]
  image_ids = np.asarray(index.meta["catalog"]["image_ids"])
  maps = []
  for a in range(len(index.attributes)):
    value = np.full(len(image_ids), -1)
    rows = np.flatnonzero(cands.attribute == a)
    value[[list(image_ids).index(f) for f in cands.image_id[rows]]] = cands.value[rows]
    q = queries.attribute == a
    maps.append(quality.map_through_index(index.indexes[a], queries.emb[q], queries.value[q],
                                          value) * q.sum())
  exact = retrieval.mean_average_precision(
      queries.emb, queries.attribute, queries.value, cands.emb, cands.attribute, cands.value,
      num_attributes=len(index.attributes))["map_overall"]
  assert sum(maps) / len(queries.emb) == pytest.approx(exact, abs=1e-6)
  # A ranking that misses a relevant item (an IVF index's) counts it as never found.
  assert quality.average_precision([True, False, True], 3) == pytest.approx((1 + 2 / 3) / 3)


def test_kinds_store_their_code_size_and_sq8_scores_nearly_exactly():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(600, 64)).astype(np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  ids = np.arange(600) * 3
  exact = x[:5] @ x.T
  sizes = {}
  for kind in faiss_index.KINDS:
    ix = faiss_index.build(faiss_index.IndexSpec(kind, 64, pq_bytes=16), x, ids)
    sizes[kind] = faiss_index.code_bytes(ix)
    scores, got = faiss_index.search(ix, x[:5], 600, nprobe=1000)
    assert set(got[0]) == set(ids)   # nprobe past nlist: every vector comes back
    if kind == "sq8":
      np.testing.assert_allclose(scores, np.take_along_axis(exact, got // 3, 1), atol=0.01)
  assert sizes["flat"] == 256 and sizes["sq8"] == 64 and sizes["pq"] == 16
  with pytest.raises(ValueError, match="needs at least 256 vectors"):
    faiss_index.build(faiss_index.IndexSpec("pq", 64, pq_bytes=16), x[:100], ids[:100])
  with pytest.raises(ValueError, match="must divide the embedding size 64"):
    faiss_index.check_spec(faiss_index.IndexSpec("pq", 64, pq_bytes=48))


def test_an_interrupted_write_leaves_the_previous_index(setup):
  work, config = setup["work"], setup["config"]
  before = store.read(str(work / "split_index"))

  def die(tmp):
    assert os.path.isfile(os.path.join(tmp, "meta.json"))
    raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    service.build(config, str(work / "ckpt"), str(work / "split_index"), {"kind": "sq8"},
                  images=[os.path.join(setup["folder"], "images", "valid")], before_commit=die)
  with pytest.raises(KeyboardInterrupt):
    service.add(str(work / "split_index"), [os.path.join(setup["folder"], "images", "valid")],
                before_commit=die)
  after = store.read(str(work / "split_index"))
  assert after.meta == before.meta and after.indexes[0].ntotal == before.indexes[0].ntotal


def test_bad_input_gets_one_sentence(setup, tmp_path):
  work = setup["work"]
  searcher = service.Searcher(str(work / "split_index"))
  image = _path_of(setup["folder"], "test")[0]
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty.jpg").write_bytes(b"")
  (tmp_path / "text.jpg").write_text("not an image")
  with pytest.raises(ValueError, match=r"Unknown attribute 'collar'; this model knows colour, len"):
    searcher.query(image, "collar")
  with pytest.raises(ValueError, match="empty.jpg is empty"):
    searcher.query(str(tmp_path / "empty.jpg"), "colour")
  with pytest.raises(ValueError, match="text.jpg is not a readable image"):
    searcher.query(str(tmp_path / "text.jpg"), "colour")
  with pytest.raises(ValueError, match="holds no image files"):
    service.add(str(work / "split_index"), [str(tmp_path / "empty")])
  with pytest.raises(FileNotFoundError, match="No search index in"):
    service.Searcher(str(tmp_path / "nowhere"))
  with pytest.raises(ValueError, match="was built with another model or config"):
    service.Searcher(str(work / "split_index"), checkpoint=str(work / "other"))


def test_command_line_query_prints_the_ranking_and_a_picture(setup, tmp_path):
  work = setup["work"]
  image = _path_of(setup["folder"], "test")[4]
  picture = tmp_path / "q.png"
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "search.py"), "query", f"--index={work / 'split_index'}",
       f"--image={image}", "--attribute=length", "--top_k=3", "--json", f"--picture={picture}"],
      capture_output=True, text=True, cwd=ROOT, check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  got = json.loads(out.stdout[:out.stdout.rindex("}") + 1])["results"]
  want, _ = service.Searcher(str(work / "split_index")).query(image, "length", top_k=3)
  assert [r["path"] for r in got] == [r["path"] for r in want]
  np.testing.assert_allclose([r["score"] for r in got], [r["score"] for r in want], atol=1e-5)
  assert picture.stat().st_size > 1000


def test_a_stage1_checkpoint_indexes_the_global_embedding(setup, tmp_path):
  config = tiny_synthetic.tiny_config(os.path.dirname(setup["folder"]), "global")
  model, variables = _save_model(config, str(tmp_path / "g"), seed=6, joint=False)
  images = _path_of(setup["folder"], "test")[:3]
  index = service.build(config, str(tmp_path / "g"), str(tmp_path / "ix"), {"kind": "flat"},
                        images=images)
  assert index.meta["stage"] == "global" and index.indexes[0].d == config.model.embed_dim
  mesh = parallel.make_mesh()
  fn = evaluation.make_embed_fn(config, model, False, mesh)
  view, hires = service.embedder_lib.load_image_views(images[1], config.data.image_size,
                                                      config.data.hires_size)
  emb, _, _ = fn.embed_lines(parallel.replicate(mesh, variables), view[None], hires[None], [0],
                             [3])
  np.testing.assert_allclose(index.indexes[3].reconstruct(1), emb[0], atol=1e-5)
