"""Learning (issue 4): 400 steps of the synthetic config's global stage learn from scratch.

The training loss must fall by at least 30% (mean of the first 20 logged losses against the
last 20) and the validation MAP must end at least 10 points above the exact MAP of a random
ranking. The model family and every learning knob come from configs/synthetic.py; only the data
paths, the step count and the logging cadence are overridden. Training runs `train.py` in a
subprocess on one CPU device, as a user runs it (conftest's 8 fake devices would make each step
several times slower on 2 cores).
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from asen_jax.data import synthetic
from configs import synthetic as synthetic_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 400
WINDOW = 20   # logged losses compared at each end


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
  root = tmp_path_factory.mktemp("learning")
  synthetic.generate(str(root), seed=11, num_train=1000, num_valid=200, num_test=6)
  batch = synthetic_config.get_config("global").train.batch_size
  # One epoch of STEPS steps: the trainer evaluates (validation MAP) at its end.
  arg = (f"global,data.root='{root}',data.tfds_dir='{root}/tfds',train.max_steps={STEPS},"
         f"train.triplets_per_epoch={STEPS * batch},train.epochs=1,train.log_every=1")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if "force_host_platform_device_count" not in f)
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "train.py"),
       f"--config={ROOT}/configs/synthetic.py:{arg}", f"--workdir={root}/run"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(root, "run", "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_training_loss_falls_by_30_percent(rows):
  losses = [r["loss"] for r in rows if "loss" in r]
  assert len(losses) == STEPS
  first, last = np.mean(losses[:WINDOW]), np.mean(losses[-WINDOW:])
  print(f"loss: first {WINDOW} steps {first:.4f}, last {WINDOW} steps {last:.4f} "
        f"({100 * (1 - last / first):.1f}% lower)")
  assert last <= 0.7 * first, (first, last)


def test_validation_map_beats_random_by_10_points(rows):
  evals = [r for r in rows if "val_map" in r]
  assert [r["step"] for r in evals] == [STEPS]
  val, rnd = evals[-1]["val_map"], evals[-1]["val_map_random"]
  print(f"validation MAP {val:.2f}, random ranking {rnd:.2f}")
  # The random-ranking MAP is exact for this split (about 100 / number of values).
  assert 20.0 < rnd < 30.0
  assert val >= rnd + 10.0, (val, rnd)
