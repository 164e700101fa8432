"""Two JAX processes on one machine (coordinator on 127.0.0.1, gloo, 2 CPU devices each) against
one process with 4 devices: the same batches, parameters and MAP; one dataset build; checkpoints
that resume under the other process count; a killed process stops its partner."""
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

from asen_jax import checkpoint as ckpt_lib
from asen_jax import evaluation
from tests.tiny_synthetic import make_data, tiny_config, TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train.py")
RECORDING_TRAIN = os.path.join(ROOT, "tests", "recording_train.py")
EVALUATE = os.path.join(ROOT, "evaluate.py")
HEARTBEAT_S = 10


def _env(devices):
  env = dict(os.environ)
  xla = [f for f in env.get("XLA_FLAGS", "").split()
         if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(xla + [f"--xla_force_host_platform_device_count={devices}"])
  return env


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Job:
  """One command run as `processes` processes of `devices` CPU devices each, logs in files."""

  def __init__(self, script, args, log, processes=2, devices=2):
    self.logs = [f"{log}.{i}.log" for i in range(processes)]
    port = _free_port()
    self.procs = []
    for i, path in enumerate(self.logs):
      cluster = ([f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}",
                  f"--process_id={i}", f"--heartbeat_timeout={HEARTBEAT_S}"]
                 if processes > 1 else [])
      with open(path, "w") as out:
        self.procs.append(subprocess.Popen([sys.executable, script] + args + cluster, cwd=ROOT,
                                           env=_env(devices), stdout=out,
                                           stderr=subprocess.STDOUT))

  def text(self, i):
    with open(self.logs[i]) as f:
      return f.read()

  def wait(self, timeout=600):
    codes = [p.wait(timeout) for p in self.procs]
    if any(codes):
      tails = "\n".join(f"--- process {i} (exit {c}):\n{self.text(i)[-3000:]}"
                        for i, c in enumerate(codes))
      pytest.fail(f"{self.procs[0].args[1]} failed:\n{tails}")
    return self


def _train_args(data_root, workdir, stage="global", max_steps=4, init_from=None,
                checkpoint_every=2):
  fields = {**TINY, "data.root": data_root, "data.tfds_dir": f"{data_root}/tfds",
            "train.max_steps": max_steps, "train.log_every": 1,
            "train.checkpoint_every": checkpoint_every}
  return ([f"--config={os.path.join(ROOT, 'configs', 'synthetic.py')}:{stage}",
           f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in fields.items()]
          + ([f"--init_from={init_from}"] if init_from else []))


def _copy_without_step(src, dst, step):
  """A workdir as it was before `step` was saved (its later metrics lines stay; last wins)."""
  shutil.copytree(src, dst)
  shutil.rmtree(os.path.join(dst, "checkpoints", "latest", str(step)))


def _metrics(workdir, key="loss"):
  """{step: value} of metrics.jsonl; a resumed step's later line wins."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r[key] for r in map(json.loads, f) if key in r}


def _ids(workdir, process):
  with open(os.path.join(workdir, f"ids_{process}.jsonl")) as f:
    return dict(json.loads(line) for line in f)


def _max_rel_diff(a, b):
  diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))
                                          / (np.max(np.abs(np.asarray(y))) + 1e-12)), a, b)
  return max(jax.tree.leaves(diffs))


def _kill_second_process_after(job, checkpoint_dir, timeout=600):
  """SIGKILLs process 1 once `checkpoint_dir` is written; returns the survivor's (exit code,
  seconds from the kill to its exit)."""
  deadline = time.time() + timeout
  while not os.path.isdir(checkpoint_dir):
    if time.time() > deadline or any(p.poll() is not None for p in job.procs):
      pytest.fail(f"{checkpoint_dir} never appeared while both processes ran:\n"
                  f"{job.text(0)[-3000:]}")
    time.sleep(0.05)
  job.procs[1].send_signal(signal.SIGKILL)
  killed = time.time()
  try:
    code = job.procs[0].wait(timeout=180)
  except subprocess.TimeoutExpired:
    job.procs[0].kill()
    pytest.fail("process 0 still ran 3 minutes after process 1 was killed")
  job.procs[1].wait()
  return code, time.time() - killed


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Every run of this module, overlapped where independent."""
  root = make_data(tmp_path_factory)   # not built yet: the two processes of `two` build it
  work = tmp_path_factory.mktemp("multiprocess")
  w = {k: str(work / k) for k in ("two", "one", "joint", "two_to_one", "one_to_two", "viz")}
  # Stage 1 on two processes x 2 devices, started at once on an unbuilt dataset.
  two = Job(RECORDING_TRAIN, _train_args(root, w["two"]), f"{work}/two").wait()
  # The same on one process x 4 devices; stage 2 from the two-process run.
  one = Job(RECORDING_TRAIN, _train_args(root, w["one"]), f"{work}/one", 1, 4)
  joint = Job(TRAIN, _train_args(root, w["joint"], "joint", max_steps=2, init_from=w["two"],
                                 checkpoint_every=100), f"{work}/joint")
  one.wait(), joint.wait()
  # Each run's step-2 checkpoint resumed under the other process count; the two-process
  # resume is killed after its step-4 checkpoint and started again.
  _copy_without_step(w["two"], w["two_to_one"], 4)
  _copy_without_step(w["one"], w["one_to_two"], 4)
  two_to_one = Job(TRAIN, _train_args(root, w["two_to_one"]), f"{work}/two_to_one", 1, 4)
  killed_args = _train_args(root, w["one_to_two"], max_steps=6)
  killed = Job(TRAIN, killed_args, f"{work}/killed")
  test_json = str(work / "test.json")
  evaluate = Job(EVALUATE, [f"--config={os.path.join(ROOT, 'configs', 'synthetic.py')}:joint",
                            f"--checkpoint={w['joint']}", "--split=test", f"--output={test_json}",
                            f"--viz_dir={w['viz']}"]
                 + [f"--config.{k}={v}" for k, v in TINY.items()]
                 + [f"--config.data.root={root}", f"--config.data.tfds_dir={root}/tfds"],
                 f"{work}/evaluate")
  kill = _kill_second_process_after(
      killed, os.path.join(w["one_to_two"], "checkpoints", "latest", "4"))
  saved_before_rerun = sorted(int(s) for s in os.listdir(
      os.path.join(w["one_to_two"], "checkpoints", "latest")) if s.isdigit())
  rerun = Job(TRAIN, killed_args, f"{work}/rerun")
  two_to_one.wait(), evaluate.wait(), rerun.wait()
  return dict(root=root, w=w, two=two, one=one, two_to_one=two_to_one, killed=killed,
              kill=kill, saved_before_rerun=saved_before_rerun, rerun=rerun,
              test_json=test_json)


def test_two_processes_read_halves_of_one_batch_and_train_as_one_process(runs):
  w = runs["w"]
  halves, whole = [_ids(w["two"], p) for p in (0, 1)], _ids(w["one"], 0)
  assert sorted(whole) == sorted(halves[0]) == sorted(halves[1]) == [1, 2, 3, 4]
  for step in whole:
    a, b = halves[0][step], halves[1][step]
    assert len(a) == len(b) == TINY["train.batch_size"] // 2 and not set(a) & set(b)
    assert a + b == whole[step]   # process 0 feeds the first two devices, process 1 the others
  two, _, _ = ckpt_lib.load_model_variables(w["two"], prefer="latest")
  one, _, step = ckpt_lib.load_model_variables(w["one"], prefer="latest")
  first = ckpt_lib.load_model_variables(w["one"], prefer="latest", step=2)[0]
  assert step == 4 and _max_rel_diff(two, one) <= 1e-5
  assert _max_rel_diff(one["params"], first["params"]) > 1e-4   # the steps moved the weights
  np.testing.assert_allclose(list(_metrics(w["two"]).values()),
                             list(_metrics(w["one"]).values()), rtol=1e-5)
  val_two, val_one = _metrics(w["two"], "val_map"), _metrics(w["one"], "val_map")
  assert list(val_two) == list(val_one) == [4]
  assert abs(val_two[4] - val_one[4]) <= 1e-4 and 0 < val_one[4] < 100


def test_two_processes_build_the_dataset_once(runs):
  logs = [runs["two"].text(p) for p in (0, 1)]
  assert [log.count("Building the synthetic dataset") for log in logs] == [1, 0]
  tfds = os.path.join(runs["root"], "tfds", "asen_fashion", "synthetic")
  assert os.listdir(tfds) == ["1.0.0"]   # no second or unfinished build beside it


def test_checkpoints_resume_under_the_other_process_count(runs):
  w = runs["w"]
  assert f"Resuming {w['two_to_one']} from step 2." in runs["two_to_one"].text(0)
  assert f"Resuming {w['one_to_two']} from step 2." in runs["killed"].text(0)
  for resumed, straight in (("two_to_one", "two"), ("one_to_two", "one")):
    after, before = _metrics(w[resumed]), _metrics(w[straight])
    np.testing.assert_allclose([after[3], after[4]], [before[3], before[4]], rtol=1e-6)


def test_killed_process_stops_the_other_and_the_rerun_resumes(runs):
  code, seconds = runs["kill"]
  print(f"process 0 exited ({code}) {seconds:.1f} s after process 1 was killed")
  assert code != 0 and seconds < 120, (code, seconds)
  survivor = runs["killed"].text(0)
  assert "another task died" in survivor   # JAX's coordination service, after the heartbeats
  if "Connection reset by peer" in survivor:   # a collective failed first: one sentence, too
    assert "train.py: " in survivor and "another one stopped; start the same command" in survivor
    assert "Traceback" not in survivor
  last = runs["saved_before_rerun"][-1]
  assert last in (4, 6)
  log = runs["rerun"].text(0)
  if last == 6:   # killed after its last save: nothing is left to train
    assert "Finished global: 6 steps (0 this run)" in log
  else:
    assert f"Resuming {runs['w']['one_to_two']} from step 4." in log
    assert "Finished global: 6 steps (2 this run)" in log
  assert ckpt_lib.load_model_variables(runs["w"]["one_to_two"], prefer="latest")[2] == 6


def test_stage2_and_test_evaluation_on_two_processes(runs, tmp_path):
  w = runs["w"]
  assert list(_metrics(w["joint"], "loss_local")) == [1, 2]
  _, meta, step = ckpt_lib.load_model_variables(w["joint"], prefer="best")
  assert step == 2 and meta["stage"] == "joint"
  with open(runs["test_json"]) as f:
    two = json.load(f)
  config = tiny_config(runs["root"], "joint")
  one = evaluation.run_evaluation(config, w["joint"], "test", viz_dir=str(tmp_path))
  assert two["stage"] == "joint" and two["split"] == "test"
  assert abs(two["map_overall"] - one["map_overall"]) <= 1e-4
  for name, value in one["map_per_attribute"].items():
    assert abs(two["map_per_attribute"][name] - value) <= 1e-4
  names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(w["viz"], "*.png")))
  assert names == sorted(os.path.basename(p) for p in one["pictures"])
  assert "attention_grid.png" in names
  grids = [np.asarray(Image.open(os.path.join(d, "attention_grid.png")), np.int16)
           for d in (w["viz"], str(tmp_path))]
  assert np.abs(grids[0] - grids[1]).max() <= 2   # the same maps, up to float rounding


def test_cluster_flags_are_all_or_none():
  from asen_jax import distributed   # pylint: disable=g-import-not-at-top
  assert distributed.cluster_args(None, None, None) == {}
  assert distributed.cluster_args("10.0.0.1:1234", 2, 1) == {
      "coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1}
  with pytest.raises(ValueError, match="--num_processes, --process_id missing"):
    distributed.cluster_args("10.0.0.1:1234", None, None)
  with pytest.raises(ValueError, match="needs a port"):
    distributed.cluster_args("10.0.0.1", 2, 0)
  with pytest.raises(ValueError, match=r"--process_id=2 must be in 0..1"):
    distributed.cluster_args("10.0.0.1:1234", 2, 2)
