"""Nothing lost, nothing silent: kills, signals, two runs on one workdir and a damaged
checkpoint end with the losses of an uninterrupted run, each step once in metrics.jsonl."""
import json
import os
import random
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.tiny_synthetic import make_data, TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 20


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  root = make_data(tmp_path_factory)
  return str(root)


def _cmd(data_root, workdir):
  fields = {**TINY, "data.root": data_root, "data.tfds_dir": f"{data_root}/tfds",
            "train.max_steps": STEPS, "train.log_every": 1, "train.checkpoint_every": 2}
  return [sys.executable, os.path.join(ROOT, "tests", "fault_runner.py"),
          f"--config={os.path.join(ROOT, 'configs', 'synthetic.py')}:global",
          f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in fields.items()]


def _env(fault=""):
  return dict(os.environ, ASEN_FAULT=fault, ASEN_JAX_MALLOC="system")


def _run(data_root, workdir, fault=""):
  return subprocess.run(_cmd(data_root, workdir), cwd=ROOT, env=_env(fault), capture_output=True,
                        text=True, timeout=600)


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _losses(workdir):
  return [(r["step"], r["loss"]) for r in _rows(workdir) if "loss" in r]


def _one_line_error(run, *phrases):
  """A non-zero exit whose stderr ends in one sentence with `phrases`, and no traceback."""
  assert run.returncode not in (0, None), run.stderr[-2000:]
  assert "Traceback" not in run.stderr, run.stderr[-4000:]
  last = run.stderr.strip().splitlines()[-1]
  for phrase in phrases:
    assert phrase in last, run.stderr[-2000:]
  return last


@pytest.fixture(scope="module")
def straight(data_root, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("straight") / "w")
  run = _run(data_root, workdir)
  assert run.returncode == 0, run.stderr[-3000:]
  return dict(_losses(workdir))


def test_kills_signals_two_runs_and_a_damaged_checkpoint_lose_nothing(data_root, straight,
                                                                     tmp_path):
  workdir = str(tmp_path / "w")
  # Two runs started together on one workdir: one stops at once with one sentence; the other is
  # SIGKILLed inside its second save (step 4), so step 2 is the last finished checkpoint.
  procs = [subprocess.Popen(_cmd(data_root, workdir), cwd=ROOT, env=_env("kill_in_save:2"),
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
           for _ in range(2)]
  outs = [p.communicate(timeout=600)[1] for p in procs]
  codes = [p.returncode for p in procs]
  assert sorted(codes) == [-9, 1], [o[-2000:] for o in outs]
  loser = outs[codes.index(1)]
  assert "Traceback" not in loser
  assert "is in use by another run (pid" in loser.strip().splitlines()[-1]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints", "latest")))[0] == "2"
  # SIGKILL at a random moment of the resumed run (seeded: the same moment on every run).
  proc = subprocess.Popen(_cmd(data_root, workdir), cwd=ROOT, env=_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  start = time.time()
  while time.time() - start < 300 and proc.poll() is None:
    if any(s > 3 for s, _ in _losses(workdir)):
      time.sleep(random.Random(0).uniform(0.0, 0.3))
      proc.kill()
      break
    time.sleep(0.05)
  proc.wait(timeout=60)
  # SIGTERM, as a scheduler preempts: a save at the step it arrived in, then one line.
  run = _run(data_root, workdir, "SIGTERM:2")
  last = _one_line_error(run, "SIGTERM", "saved step", "run the same command again")
  saved = int(last.split("saved step ")[1].split()[0])
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints", "latest"))
                 if s.isdigit())
  assert steps[-1] == saved and len(steps) == 2   # the two newest are kept
  # Ctrl-C likewise.
  run = _run(data_root, workdir, "SIGINT:1")
  last = _one_line_error(run, "SIGINT", "saved step")
  newest = int(last.split("saved step ")[1].split()[0])
  assert newest == saved + 1
  # Damage the newest checkpoint: the rerun sets it aside, says so, and resumes from the one
  # before it.
  model_dir = os.path.join(workdir, "checkpoints", "latest", str(newest), "model")
  for folder, _, files in os.walk(model_dir):
    for name in files:
      with open(os.path.join(folder, name), "r+b") as f:
        f.write(b"\0garbage\0" * 8)
  run = _run(data_root, workdir)
  assert run.returncode == 0, run.stderr[-3000:]
  assert f"latest/{newest} cannot be read" in run.stderr
  assert os.listdir(os.path.join(workdir, "checkpoints", "damaged"))[0].startswith(str(newest))
  # Each step once, with the uninterrupted run's losses.
  losses = _losses(workdir)
  assert [s for s, _ in losses] == list(range(1, STEPS + 1))
  np.testing.assert_allclose([l for _, l in losses], [straight[s] for s, _ in losses],
                             rtol=1e-6)
  assert [r["step"] for r in _rows(workdir) if "val_map" in r] == [STEPS]
  with open(os.path.join(workdir, "run.json")) as f:
    assert json.load(f)["changes"] == []


# In-process: a rerun that differs, a changed dataset, the wrong views, a damaged checkpoint, a
# full disk, bad values and paths. Each is one sentence.

from asen_jax import checkpoint as ckpt_lib  # noqa: E402
from asen_jax import cli  # noqa: E402
from asen_jax import config_checks  # noqa: E402
from asen_jax import data as data_lib  # noqa: E402
from asen_jax import evaluation  # noqa: E402
from asen_jax import trainer  # noqa: E402
from tests.tiny_synthetic import tiny_config  # noqa: E402


@pytest.fixture(scope="module")
def one_step_run(data_root, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run") / "w")
  trainer.train_and_evaluate(tiny_config(data_root, "global", {"train.max_steps": 1}), workdir)
  return workdir


def test_rerun_with_other_settings_or_another_start_is_refused(data_root, one_step_run, tmp_path):
  workdir = str(tmp_path / "w")
  trainer.train_and_evaluate(tiny_config(data_root, "global", {"train.max_steps": 1}), workdir)
  with open(os.path.join(workdir, "config.json")) as f:
    saved = f.read()
  other_lr = tiny_config(data_root, "global", {"train.max_steps": 2, "train.lr": 1e-3})
  with pytest.raises(ValueError, match=r"holds a run with train.lr=0.0007, but the config has "
                     r"train.lr=0.001; use a new --workdir"):
    trainer.train_and_evaluate(other_lr, workdir)
  with pytest.raises(ValueError, match=r"already holds a run \(step 1\) that started from its own "
                     r"initialisation; --init_from .* applies to a fresh start only"):
    trainer.train_and_evaluate(tiny_config(data_root, "global", {"train.max_steps": 2}), workdir,
                               init_from=one_step_run)
  with open(os.path.join(workdir, "config.json")) as f:
    assert f.read() == saved   # a refused rerun writes nothing
  # A field that may change on a resume is taken, and recorded.
  trainer.train_and_evaluate(tiny_config(data_root, "global", {"train.max_steps": 2}), workdir)
  with open(os.path.join(workdir, "run.json")) as f:
    record = json.load(f)
  assert record == {"init_from": None, "changes": [
      {"step": 1, "field": "train.max_steps", "was": 1, "now": 2}]}
  assert [s for s, _ in _losses(workdir)] == [1, 2]


def test_changed_or_other_dataset_source_is_one_sentence(tmp_path_factory):
  root = str(make_data(tmp_path_factory, seed=5))
  config = tiny_config(root, "global")   # builds it
  folder = os.path.join(root, "Synthetic")
  data_lib.prepare_dataset(config)       # unchanged: fine
  with open(os.path.join(folder, "query_test.txt"), "a") as f:
    f.write("\n")
  with pytest.raises(ValueError, match=r"Synthetic changed after the dataset at .* was built "
                     r"from it \(query_test.txt\); delete .* to rebuild"):
    data_lib.prepare_dataset(config)
  other = str(make_data(tmp_path_factory, seed=6))
  config.data.root = other
  with pytest.raises(ValueError, match=rf"was built from {folder}, but the config reads "
                     rf"{other}/Synthetic; delete"):
    data_lib.prepare_dataset(config)


def test_evaluation_with_other_views_or_a_damaged_checkpoint_is_one_sentence(
    data_root, one_step_run, tmp_path):
  wider = tiny_config(data_root, "global", {"data.image_size": 40})
  with pytest.raises(ValueError, match=r"was trained with data.image_size=32, but the config has "
                     r"40; .* add --config.data.image_size=32"):
    evaluation.run_evaluation(wider, one_step_run, "test")
  # A joint model also crops from the high-resolution view.
  saved = {"data.image_size": 32, "data.hires_size": 224, "model.local_size": 32}
  config = tiny_config(data_root, "global", {"data.hires_size": 96})
  config_checks.check_views(saved, config, joint=False, source="x")
  with pytest.raises(ValueError, match=r"x was trained with data.hires_size=224, but the config "
                     r"has 96"):
    config_checks.check_views(saved, config, joint=True, source="x")
  best = os.path.join(one_step_run, "checkpoints", "best")
  step = os.listdir(best)[0]
  for folder, _, files in os.walk(os.path.join(best, step, "model")):
    for name in files:
      with open(os.path.join(folder, name), "wb") as f:
        f.write(b"garbage")
  with pytest.raises(ValueError, match=rf"Checkpoint {best}/{step} cannot be read \(.*\); it is "
                     "incomplete or damaged"):
    ckpt_lib.load_model(one_step_run)


def test_full_disk_during_a_save_is_one_sentence(data_root, tmp_path, monkeypatch):
  import errno  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  save, calls = ocp.CheckpointManager.save, []

  def full_disk(self, step, *args, **kwargs):
    calls.append(step)
    if step == 4:
      raise OSError(errno.ENOSPC, "No space left on device")
    return save(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
  workdir = str(tmp_path / "w")
  config = tiny_config(data_root, "global", {"train.max_steps": 6, "train.checkpoint_every": 2})
  with pytest.raises(OSError, match=r"Could not write the latest checkpoint of step 4 in .* "
                     r"\(OSError: \[Errno 28\] No space left on device\); the last good one "
                     r"\(step 2\) is intact: free space"):
    trainer.train_and_evaluate(config, workdir)
  assert ckpt_lib.load_model_variables(workdir, prefer="latest")[2] == 2


def test_bad_values_and_paths_are_named_before_any_work(data_root, tmp_path):
  config = tiny_config(data_root, "global", {"train.log_every": 0, "train.lr": -1.0,
                                             "eval.batch_size": 12, "data.hires_size": 16,
                                             "model.global_output_stride": 4})
  found = config_checks.problems(config, num_devices=8)
  assert found == [
      "config.train.log_every = 0 must be a whole number > 0",
      "config.train.lr = -1.0 must be a number > 0",
      "config.model.global_output_stride = 4 must be one of 0, 8, 16",
      "config.data.hires_size = 16 must be >= data.image_size = 32 (the RoI crop's view has the "
      "same field of view at a higher resolution)",
      "config.eval.batch_size=12 is not divisible by the 8 devices; use a multiple of 8, e.g. "
      "eval.batch_size=8"]
  a_file = tmp_path / "file"
  a_file.write_text("")
  with pytest.raises(OSError, match=rf"--viz_dir {a_file}/pictures cannot be written"):
    cli.check_writable(str(a_file / "pictures"), "--viz_dir")


@pytest.mark.parametrize("args, sentence", [
    (["--config=configs/nope.py:global"], "train.py: config file configs/nope.py does not exist"),
    (["--config=configs/synthetic.py:global", "--config.train.nofield=1"],
     "train.py: --config.train.nofield: train has no field 'nofield'; its fields are batch_size"),
])
def test_bad_config_flags_are_one_line(args, sentence, tmp_path):
  run = subprocess.run([sys.executable, "train.py", f"--workdir={tmp_path}/w"] + args, cwd=ROOT,
                       env=_env(), capture_output=True, text=True, timeout=120)
  assert run.returncode == 1 and run.stderr.strip().startswith(sentence), run.stderr[-2000:]
  assert len(run.stderr.strip().splitlines()) == 1
