"""Training: device-count invariance, exact resume across processes, stage-2 init, failure modes."""
import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from asen_jax import checkpoint as ckpt_lib
from asen_jax import config_checks
from asen_jax import convert
from asen_jax import data as data_lib
from asen_jax import model as model_lib
from asen_jax import parallel
from asen_jax import trainer
from tests.tiny_synthetic import make_data, tiny_config, TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  return make_data(tmp_path_factory)


def _first_batch(config):
  batch = next(iter(data_lib.make_train_loader(config, seed=config.seed)))
  return {k: batch[k] for k in ("images", "hires", "attribute")}


def _max_rel_diff(a, b):
  diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))
                                          / (np.max(np.abs(np.asarray(y))) + 1e-12)), a, b)
  return max(jax.tree.leaves(diffs))


@pytest.mark.parametrize("stage", ["global", "joint"])
def test_one_step_same_on_1_and_8_devices(data_root, stage):
  config = tiny_config(data_root, stage)
  info, model, tx, joint = trainer.build(config)
  # Host copies: the jitted step donates (deletes) its input state.
  host_state = jax.device_get(trainer.init_state(config, model, tx, joint, info=info))
  batch = _first_batch(config)
  grad_fn = jax.jit(jax.grad(functools.partial(trainer.compute_loss, model=model, config=config,
                                               joint=joint), has_aux=True))
  results = []
  for devices in (jax.devices()[:1], jax.devices()[:8]):
    mesh = parallel.make_mesh(devices)
    arrays = parallel.shard_batch(mesh, batch)
    grads, _ = grad_fn(*parallel.replicate(mesh, (host_state.params, host_state.batch_stats)),
                       arrays)
    step = trainer.make_train_step(config, model, tx, joint, mesh)
    state, metrics = step(parallel.replicate(mesh, host_state), arrays)
    results.append((jax.device_get(state), jax.device_get(metrics), jax.device_get(grads)))
  (s1, m1, g1), (s8, m8, g8) = results
  assert int(s1.step) == int(s8.step) == 1
  np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
  assert _max_rel_diff(g8, g1) <= 1e-5
  assert _max_rel_diff(s8.batch_stats, s1.batch_stats) <= 1e-5
  # Adam's first step moves each entry by lr * g / (|g| + 1e-8): an entry whose gradient is at
  # float32 noise may move by a different fraction of lr (here by less than lr in all).
  lr = max(config.train.lr, config.train.lr_global)
  assert max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), s8.params,
                                          s1.params))) <= lr
  # The step really moved the parameters (else the comparison above proves nothing).
  assert _max_rel_diff(s1.params, host_state.params) > 1e-4


def _train_cli(data_root, workdir, max_steps):
  """train.py with ml_collections' own --config.<field>=<value> overrides."""
  fields = {**TINY, "data.root": data_root, "data.tfds_dir": f"{data_root}/tfds",
            "train.max_steps": max_steps, "train.log_every": 1, "train.checkpoint_every": 100}
  cmd = [sys.executable, os.path.join(ROOT, "train.py"),
         f"--config={os.path.join(ROOT, 'configs', 'synthetic.py')}:global",
         f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in fields.items()]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def test_resume_in_a_new_process_is_exact(data_root, tmp_path):
  straight, split = tmp_path / "straight", tmp_path / "split"
  for workdir, steps in ((straight, 6), (split, 3), (split, 6)):
    run = _train_cli(data_root, workdir, steps)
    assert run.returncode == 0, run.stderr[-3000:]
  assert [s for s, _ in _losses(split)] == list(range(1, 7))
  np.testing.assert_allclose([l for _, l in _losses(split)], [l for _, l in _losses(straight)],
                             rtol=1e-6)
  a, meta_a, step_a = ckpt_lib.load_model_variables(str(straight), prefer="latest")
  b, _, step_b = ckpt_lib.load_model_variables(str(split), prefer="latest")
  assert step_a == step_b == 6 and meta_a["stage"] == "global"
  assert meta_a["bn_stats"] == "per_role"   # the checkpoint says which BatchNorm made it
  assert _max_rel_diff(b, a) <= 1e-6
  # max_steps stopped both runs mid-epoch (1000 steps per epoch): each run is validated at its
  # last step, so evaluation finds a best checkpoint (it did not, once).
  with open(os.path.join(split, "metrics.jsonl")) as f:
    assert [r["step"] for r in map(json.loads, f) if "val_map" in r] == [3, 6]
  _, meta_best, step_best = ckpt_lib.load_model_variables(str(straight), prefer="best")
  assert step_best == 6 and meta_best["map"] > 0


def test_stage2_starts_from_stage1_and_uses_two_learning_rates(data_root, tmp_path):
  stage1 = tiny_config(data_root, "global")
  info, model1, tx1, _ = trainer.build(stage1)
  s1 = trainer.init_state(stage1, model1, tx1, False, info=info)
  ckpt_lib.save_model_variables(str(tmp_path / "s1"), {"params": s1.params,
                                                       "batch_stats": s1.batch_stats},
                                {"attributes": list(info.attributes), "stage": "global"})
  config = tiny_config(data_root, "joint", {"train.lr": 1e-3, "train.lr_global": 1e-5})
  _, model, tx, joint = trainer.build(config)
  state = jax.device_get(
      trainer.init_state(config, model, tx, joint, init_from=str(tmp_path / "s1"), info=info))
  for key in ("attr_embedding", "global"):
    assert _max_rel_diff(state.params[key], s1.params[key]) == 0.0
  assert _max_rel_diff(state.batch_stats["global"], s1.batch_stats["global"]) == 0.0
  mesh = parallel.make_mesh()
  step = trainer.make_train_step(config, model, tx, joint, mesh)
  new, _ = step(parallel.replicate(mesh, state), parallel.shard_batch(mesh, _first_batch(config)))
  new = jax.device_get(new)
  # Adam's first step moves every parameter with a gradient by exactly lr * sign(grad).
  for key, lr in (("global", 1e-5), ("attr_embedding", 1e-5), ("local", 1e-3)):
    deltas = np.concatenate([np.abs(np.asarray(x) - np.asarray(y)).ravel() for x, y in zip(
        jax.tree.leaves(new.params[key]), jax.tree.leaves(state.params[key]))])
    moved = deltas[deltas > 0]
    assert moved.size > 0.5 * deltas.size if key != "attr_embedding" else moved.size > 0
    # float32 rounding of p + lr * sign(g) for |p| ~ 1 is up to ~0.6% of lr = 1e-5.
    np.testing.assert_allclose(np.max(moved), lr, rtol=1e-2)
    np.testing.assert_allclose(np.median(moved), lr, rtol=1e-2)


def test_init_from_other_attributes_is_one_sentence(data_root, tmp_path):
  config = tiny_config(data_root, "joint")
  info, model, tx, joint = trainer.build(config)
  ckpt_lib.save_model_variables(str(tmp_path / "other"), {"params": {}, "batch_stats": {}},
                                {"attributes": ["a", "b"], "stage": "global"})
  with pytest.raises(ValueError, match=r"was trained on attributes \['a', 'b'\], but the config "
                     r"has \['colour'"):
    trainer.init_state(config, model, tx, joint, init_from=str(tmp_path / "other"), info=info)


def test_batch_size_not_divisible_by_devices(data_root, tmp_path):
  config = tiny_config(data_root, "global", {"train.batch_size": 12})
  with pytest.raises(ValueError, match=r"train.batch_size=12 is not divisible by the 8 devices"):
    trainer.train_and_evaluate(config, str(tmp_path / "w"))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(data_root, tmp_path, monkeypatch):
  # A resume may not change train.lr (test_faults.py); here it is how the loss blows up mid-run.
  monkeypatch.setattr(config_checks, "RESUMABLE", config_checks.RESUMABLE | {"train.lr"})
  workdir = str(tmp_path / "w")
  good = tiny_config(data_root, "global", {"train.max_steps": 2, "train.log_every": 1})
  trainer.train_and_evaluate(good, workdir)
  bad = tiny_config(data_root, "global",
                    {"train.max_steps": 4, "train.log_every": 1, "train.lr": 1e999})
  with pytest.raises(FloatingPointError, match="Non-finite loss or update at step 3 or earlier"):
    trainer.train_and_evaluate(bad, workdir)
  variables, _, step = ckpt_lib.load_model_variables(workdir, prefer="latest")
  assert step == 2
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(variables))


def test_resume_with_another_model_shape_is_one_sentence(data_root, tmp_path):
  workdir = str(tmp_path / "w")
  trainer.train_and_evaluate(tiny_config(data_root, "global", {"train.max_steps": 1}), workdir)
  with open(os.path.join(workdir, "config.json")) as f:
    saved = f.read()
  wider = tiny_config(data_root, "global",
                      {"train.max_steps": 2, "model.global_common_dim": 24})
  with pytest.raises(ValueError, match=r"holds a run with model.global_common_dim=16, but the "
                     r"config has 24; use a new --workdir .* add model.global_common_dim=16"):
    trainer.train_and_evaluate(wider, workdir)
  with open(os.path.join(workdir, "config.json")) as f:
    assert f.read() == saved   # the run's own config is kept
  # With the saved shape it continues.
  trainer.train_and_evaluate(
      tiny_config(data_root, "global", {"train.max_steps": 2, "model.global_common_dim": 16}),
      workdir)
  assert ckpt_lib.load_model_variables(workdir, prefer="latest")[2] == 2


def test_resume_does_not_read_the_initial_weights_again(data_root, tmp_path):
  """Initial weights are read on a fresh start only: the run resumes with the file gone."""
  config = tiny_config(data_root, "global")
  _, model, _, _ = trainer.build(config)
  variables = model_lib.init_variables(model, jax.random.key(5), 32, 32)
  backbone = str(tmp_path / "backbone.npz")
  np.savez(backbone, **convert.backbone_to_torchvision(
      {k: variables[k]["global"]["backbone"] for k in ("params", "batch_stats")}))
  workdir = str(tmp_path / "w")
  first = tiny_config(data_root, "global", {"train.max_steps": 1,
                                            "model.init_backbones.global_file": backbone})
  trainer.train_and_evaluate(first, workdir)
  os.remove(backbone)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    trainer.init_state(first, model, trainer.make_optimizer(first, False), False)
  first.train.max_steps = 2
  state = trainer.train_and_evaluate(first, workdir)
  assert int(state.step) == 2


def test_whole_batch_statistics_resume_exactly_and_the_other_grouping_says_so(data_root,
                                                                            tmp_path, caplog):
  def run(workdir, steps, bn_stats):
    config = tiny_config(data_root, "global", {"train.max_steps": steps, "train.log_every": 1,
                                               "train.bn_stats": bn_stats})
    return jax.device_get(trainer.train_and_evaluate(config, str(workdir)))

  straight = run(tmp_path / "straight", 3, "batch")
  run(tmp_path / "split", 2, "batch")
  resumed = run(tmp_path / "split", 3, "batch")
  np.testing.assert_allclose([l for _, l in _losses(tmp_path / "split")],
                             [l for _, l in _losses(tmp_path / "straight")], rtol=1e-6)
  assert _max_rel_diff(resumed.params, straight.params) <= 1e-6
  workdir = str(tmp_path / "split")
  with pytest.raises(ValueError, match=r"holds a run with train.bn_stats='batch'.*'per_role'"):
    run(workdir, 4, "per_role")
  # Fine-tuning from it with the other grouping is allowed, and said.
  joint = tiny_config(data_root, "joint")
  _, model, tx, _ = trainer.build(joint)
  trainer.init_state(joint, model, tx, True, init_from=workdir, info=data_lib.dataset_info(joint))
  assert "trained with train.bn_stats='batch' and this run uses 'per_role'" in caplog.text
