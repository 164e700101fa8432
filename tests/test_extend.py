"""Stage extend: old attributes bit for bit, only the new rows train, bad sources in one sentence."""
import functools
import os

import faiss
import jax
import numpy as np
import pytest

from asen_jax import checkpoint as ckpt_lib
from asen_jax import data as data_lib
from asen_jax import evaluation
from asen_jax import extend
from asen_jax import extend_demo
from asen_jax import model as model_lib
from asen_jax import parallel
from asen_jax import trainer
from asen_jax.data import builder
from asen_jax.search import embedder as embedder_lib
from asen_jax.search import service
from asen_jax.search import store
from tests.tiny_synthetic import make_data, tiny_config

HELD_OUT = ("button",)


@pytest.fixture(scope="module")
def old_run(tmp_path_factory):
  """A joint checkpoint of the tiny model on the set without `button` (random weights, random
  BatchNorm statistics: bit equality must not hinge on trained values)."""
  root = make_data(tmp_path_factory)
  extend_demo.write_without(os.path.join(root, "Synthetic"),
                            os.path.join(root, extend_demo.folder_without(HELD_OUT)), HELD_OUT)
  old = tiny_config(root, "joint", {"data.folder": extend_demo.folder_without(HELD_OUT),
                                    "data.tfds_dir": f"{root}/tfds_old"})
  info, model, tx, _ = trainer.build(old)
  variables = model_lib.init_variables(model, jax.random.key(7), 32, 32)
  rng = np.random.default_rng(0)
  variables["batch_stats"] = jax.tree.map(
      lambda x: (x * rng.uniform(0.9, 1.1, x.shape) + rng.uniform(-0.05, 0.05, x.shape)
                 ).astype(x.dtype), variables["batch_stats"])
  path = os.path.join(root, "old_ckpt")
  ckpt_lib.save_model_variables(path, jax.device_get(variables), trainer._meta(old, info, 0))
  return root, old, path


def _extend(root, workdir, path, steps):
  config = tiny_config(root, "extend", {"train.max_steps": steps, "train.log_every": 1})
  return config, trainer.train_and_evaluate(config, workdir, init_from=path)


def _embed(config, path):
  info = builder.dataset_info(config)
  model, variables, joint, _ = evaluation.load_for_eval(config, path, info.attributes)
  mesh = parallel.make_mesh()
  q, c = evaluation.embed_split(config, variables, evaluation.make_embed_fn(
      config, model, joint, mesh), mesh, "test")
  return info, {(n, int(i), int(v)): e for emb in (q, c) for n, i, v, e in zip(
      np.asarray(info.attributes)[emb.attribute], emb.image_id, emb.value, emb.emb)}


@pytest.fixture(scope="module")
def extended(old_run, tmp_path_factory):
  """The old checkpoint extended by `button`: two steps, the second after a resume."""
  root, _, path = old_run
  workdir = str(tmp_path_factory.mktemp("extended") / "ext")
  _extend(root, workdir, path, 1)
  config, state = _extend(root, workdir, path, 2)   # resumes at step 1
  return config, state, workdir


def test_extend_trains_new_rows_only_and_keeps_old_embeddings_bitwise(old_run, extended):
  root, old, path = old_run
  config, state, workdir = extended
  assert int(state.step) == 2
  source, _ = ckpt_lib.load_model(path)
  table, old_table = (np.asarray(t["attr_embedding"]["embedding"])
                      for t in (state.params, source["params"]))
  info = builder.dataset_info(config)
  assert info.attributes[-1] == "button" and table.shape[0] == old_table.shape[0] + 1
  # Names, not positions: the old rows sit where the dataset lists their attributes.
  np.testing.assert_array_equal(table[:-1], old_table)
  init = model_lib.init_variables(trainer.build(config, extend.Plan(
      True, (), (), (4,), ""))[1], jax.random.key(config.seed), 32, 32)
  assert np.abs(table[-1] - np.asarray(init["params"]["attr_embedding"]["embedding"][-1])).max() > 1e-4
  for k in ("params", "batch_stats"):
    a, b = (jax.tree.map(np.asarray, {n: t for n, t in d[k].items() if n != "attr_embedding"})
            for d in ({"params": state.params, "batch_stats": state.batch_stats}, source))
    jax.tree.map(np.testing.assert_array_equal, a, b)
  # Adam's two moments of the one new row and two step counts (Adam's, the schedule's); nothing
  # for any other parameter.
  sizes = [np.size(x) for x in jax.tree.leaves(state.opt_state)]
  assert sorted(sizes) == [1, 1, config.model.attr_dim, config.model.attr_dim], sizes
  # Every old attribute's test embeddings: bit for bit the old checkpoint's.
  _, new_emb = _embed(config, workdir)
  old_info, old_emb = _embed(old, path)
  assert len(old_emb) and set(old_emb) <= set(new_emb)
  for key, e in old_emb.items():
    assert np.array_equal(new_emb[key], e), key
  assert any(k[0] == "button" for k in new_emb)


def _meta(attributes, dataset="synthetic"):
  return {"attributes": attributes, "dataset": dataset, "stage": "joint"}


@pytest.mark.parametrize("meta, names, message", [
    (_meta(["colour", "length"]), ("colour", "length"), "has no attribute that"),
    (_meta(["colour", "sleeve"]), ("colour", "length"), r"trained on \['sleeve'\], which the"),
    (_meta(["colour"], "fashionai"), ("colour", "length"), "trained on the fashionai dataset"),
    ({**_meta(None), "num_attributes": 1}, ("colour", "length"), "holds no attribute names"),
])
def test_bad_sources_say_what_is_wrong(old_run, meta, names, message):
  info = builder.DatasetInfo("synthetic", names, (2,) * len(names), ())
  with pytest.raises(ValueError, match=message):
    extend.make_plan(meta, info, old_run[1], "ckpt")


def test_plan_matches_names_not_positions(old_run):
  info = builder.DatasetInfo("synthetic", ("length", "button", "colour"), (2, 2, 2), ())
  plan = extend.make_plan(_meta(["colour", "length"]), info, old_run[1], "ckpt")
  assert (plan.old_rows, plan.new_ids, plan.joint) == ((1, -1, 0), (1,), True)


def test_writing_the_folder_again_keeps_its_built_dataset(old_run):
  """extend_demo.py run again (after a crash) rewrites the folder without `button`: the built
  dataset must still count as current, not stop the rerun as stale data."""
  root, old, _ = old_run
  folder = os.path.join(root, extend_demo.folder_without(HELD_OUT))
  data_lib.prepare_dataset(old, verbose=False)
  before = builder.source_files(folder)
  extend_demo.write_without(os.path.join(root, "Synthetic"), folder, HELD_OUT)
  assert builder.source_files(folder) == before
  data_lib.prepare_dataset(old, verbose=False)


def test_step_computes_no_backbone_gradient(old_run):
  """The extend step holds exactly the convolutions of its forward pass: none for a gradient."""
  root = old_run[0]
  config = tiny_config(root, "extend")
  plan = extend.Plan(True, (), (0, 1, 2, 3, -1), (4,), "")
  _, model, tx, _ = trainer.build(config, plan)
  v = model_lib.init_variables(model, jax.random.key(0), 32, 32)
  state = trainer.TrainState(step=np.zeros((), np.int32), params=v["params"],
                             batch_stats=v["batch_stats"],
                             opt_state=tx.init(extend.trainable(v["params"], plan.new_ids)))
  batch = {"images": np.zeros((8, 3, 32, 32, 3), np.uint8),
           "hires": np.zeros((8, 3, 64, 64, 3), np.uint8), "attribute": np.full(8, 4, np.int32)}
  kw = dict(model=model, config=config, joint=True)
  step = str(jax.make_jaxpr(functools.partial(extend.extend_step, tx=tx, new_ids=(4,), **kw))(
      state, batch))
  forward = str(jax.make_jaxpr(functools.partial(extend.extend_loss, new_ids=np.array([4]), **kw))(
      v["params"]["attr_embedding"]["embedding"][4:], v["params"], v["batch_stats"], batch))
  assert step.count("conv_general_dilated") == forward.count("conv_general_dilated") > 0
  # A joint step of the same model differentiates its convolutions: the count would show it.
  joint = tiny_config(root, "joint")
  _, jmodel, jtx, _ = trainer.build(joint)
  jv = model_lib.init_variables(jmodel, jax.random.key(0), 32, 32)
  jstate = trainer.TrainState(step=np.zeros((), np.int32), params=jv["params"],
                              batch_stats=jv["batch_stats"], opt_state=jtx.init(jv["params"]))
  jstep = str(jax.make_jaxpr(functools.partial(trainer.train_step, model=jmodel, tx=jtx,
                                               config=joint, joint=True))(jstate, batch))
  assert jstep.count("conv_general_dilated") > 2 * forward.count("conv_general_dilated")


def _stored(faiss_ix, items):
  """{path: vector} of a flat index."""
  ids = faiss.vector_to_array(faiss_ix.id_map)
  return {items[i]: v for i, v in zip(ids, faiss_ix.index.reconstruct_n(0, faiss_ix.ntotal))}


def test_search_index_takes_the_new_attribute_without_reembedding_the_old(
    old_run, extended, tmp_path, monkeypatch):
  root, old, path = old_run
  config, _, workdir = extended
  index_dir = str(tmp_path / "index")
  before = service.build(old, path, index_dir, {"kind": "flat"}, split="test")
  asked = []
  embed = embedder_lib.Embedder.embed_split_candidates
  monkeypatch.setattr(embedder_lib.Embedder, "embed_split_candidates",
                      lambda self, *a: asked.append(a) or embed(self, *a))
  assert service.extend(index_dir, config, workdir) == ["button"]
  button = builder.dataset_info(config).attributes.index("button")
  assert asked == [("test", [button])]   # only the new attribute's lines were embedded
  after = store.read(index_dir)
  assert after.attributes == before.attributes + ["button"]
  for old_ix, new_ix in zip(before.indexes, after.indexes):
    assert np.array_equal(faiss.serialize_index(old_ix), faiss.serialize_index(new_ix))
  # The new attribute's index holds what a full build with the extended model holds.
  monkeypatch.undo()
  full = service.build(config, workdir, str(tmp_path / "full"), {"kind": "flat"}, split="test")
  got = _stored(after.indexes[-1], after.items)
  want = _stored(full.indexes[full.attributes.index("button")], full.items)
  assert sorted(got) == sorted(want) and len(got) > 0
  for p, v in want.items():
    np.testing.assert_allclose(got[p], v, atol=1e-5)
  with pytest.raises(ValueError, match="has no attribute that the index"):
    service.extend(index_dir, config, workdir)
  # Another model (one weight moved) would change the old embeddings: refused, before embedding.
  store.write(before, str(tmp_path / "index_old"))
  variables, meta = ckpt_lib.load_model(workdir)
  leaves, treedef = jax.tree.flatten(variables)
  leaves[-1] = leaves[-1] + np.float32(1e-3)   # a head weight (params sort after batch_stats)
  other = str(tmp_path / "other")
  ckpt_lib.save_model_variables(other, jax.tree.unflatten(treedef, leaves), meta)
  with pytest.raises(ValueError, match="is not the index's model"):
    service.extend(str(tmp_path / "index_old"), config, other)
