"""train.py with a fault injected at a chosen moment (tests only).

  ASEN_FAULT=kill_in_save:N   SIGKILL inside the N-th latest-checkpoint save of this process,
                              after orbax has opened the step's temporary folder
  ASEN_FAULT=SIGTERM:N        a real SIGTERM (or SIGINT) to itself after its N-th training step
"""
import os
import runpy
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

kind, _, count = os.environ.get("ASEN_FAULT", "").partition(":")
calls = [0]


def _tick():
  calls[0] += 1
  return calls[0] == int(count)


if kind == "kill_in_save":
  import grain.checkpoint as grain_ckpt  # pylint: disable=g-import-not-at-top
  _save = grain_ckpt.CheckpointHandler.save

  def save(self, *args, **kwargs):
    if _tick():
      os.kill(os.getpid(), signal.SIGKILL)
    return _save(self, *args, **kwargs)

  grain_ckpt.CheckpointHandler.save = save
elif kind in ("SIGTERM", "SIGINT"):
  from asen_jax import trainer  # pylint: disable=g-import-not-at-top
  _make = trainer.make_train_step

  def make_train_step(*args, **kwargs):
    fn = _make(*args, **kwargs)

    def step(*a):
      out = fn(*a)
      if _tick():
        os.kill(os.getpid(), getattr(signal, kind))
      return out
    return step

  trainer.make_train_step = make_train_step

sys.argv[0] = os.path.join(ROOT, "train.py")
runpy.run_path(sys.argv[0], run_name="__main__")
