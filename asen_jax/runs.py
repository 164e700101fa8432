"""A training workdir's run, beside its checkpoints: one run at a time (a lock), the run's config
and record (where it started, what a resume changed), its metrics (each step once), and stopping
on SIGTERM/SIGINT after a save.

  <workdir>/.lock          held (flock) by the running process; freed by the kernel if it dies
  <workdir>/config.json    the accepted run's config (written once the run is accepted)
  <workdir>/run.json       {"init_from": path or null, "changes": [{step, field, was, now}]}
  <workdir>/metrics.jsonl  one JSON line per logged step
"""
import fcntl
import json
import os
import signal
import socket
import sys
import time

from absl import logging
import jax
from tensorboardX import SummaryWriter

from asen_jax import config_checks
from asen_jax import trees


class Stopped(Exception):
  """SIGTERM or Ctrl-C ended a run after it saved what it had."""


def write_atomic(path, text):
  """Writes `text` to `path` through a temporary file: a crash leaves the old file or the new."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


class WorkdirLock:
  """An exclusive flock on <workdir>/.lock: a second run on the workdir stops with one sentence;
  the kernel frees the lock of a process that dies, so a crashed run's lock is taken over."""

  def __init__(self, workdir):
    self.workdir, self.path, self._fd = workdir, os.path.join(workdir, ".lock"), None

  def acquire(self):
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
      os.close(fd)
      raise ValueError(f"Workdir {self.workdir} is in use by another run ({holder}); wait for "
                       "it to end or stop it, or use another --workdir.") from None
    previous = os.pread(fd, 512, 0).decode(errors="replace").strip()
    if previous:
      logging.warning("Workdir %s: taking over the lock of a run that ended without releasing "
                      "it (%s).", self.workdir, previous)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
              f"{time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
    self._fd = fd
    return self

  def release(self):
    if self._fd is not None:
      os.ftruncate(self._fd, 0)
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None


def _config_json(config):
  return json.loads(config.to_json_best_effort())


def accept(workdir, config, init_from, resume_step):
  """Checks a rerun against the saved run (one sentence if it differs in a field that shapes
  it, or names another start), then writes config.json and run.json; on process 0 only."""
  config_path, record_path = (os.path.join(workdir, n) for n in ("config.json", "run.json"))
  start = os.path.abspath(init_from) if init_from else None
  now = _config_json(config)
  record = {"init_from": start, "changes": []}
  if resume_step is not None:
    if os.path.isfile(record_path):
      with open(record_path) as f:
        record = json.load(f)
      if start and start != record.get("init_from"):
        began = record.get("init_from") or "its own initialisation"
        raise ValueError(f"Workdir {workdir} already holds a run (step {resume_step}) that "
                         f"started from {began}; --init_from {init_from} applies to a fresh start "
                         "only: drop it to resume this run, or use a new --workdir to start "
                         f"from {init_from}.")
    if os.path.isfile(config_path):
      with open(config_path) as f:
        saved = json.load(f)
      shaping, resumable = config_checks.differences(trees.flatten_tree(saved, sep="."),
                                                     trees.flatten_tree(now, sep="."))
      if shaping:
        was = ", ".join(f"{k}={old!r}" for k, old, _ in shaping)
        new = ", ".join(f"{k}={v!r}" for k, _, v in shaping)
        raise ValueError(f"Workdir {workdir} holds a run with {was}, but the config has {new}; "
                         "use a new --workdir (or delete this one), or set "
                         f"{was.replace(' ', '')} to continue it.")
      for key, old, value in resumable:
        logging.warning("Resuming %s at step %d with %s=%r (was %r); recorded in run.json.",
                        workdir, resume_step, key, value, old)
        record.setdefault("changes", []).append(
            {"step": resume_step, "field": key, "was": old, "now": value})
  if jax.process_index() == 0:
    write_atomic(config_path, json.dumps(now, indent=2))
    write_atomic(record_path, json.dumps(record, indent=2))


class MetricWriter:
  """JSON lines + TensorBoard, written by process 0 only. On a resume from step s, rows after s
  (written by the interrupted run after its last checkpoint) are dropped first, so that every
  step is there once (clu's metric_writers need TensorFlow, so they are not used)."""

  def __init__(self, workdir, resume_step=None):
    self.active = jax.process_index() == 0
    if not self.active:
      return
    path = os.path.join(workdir, "metrics.jsonl")
    if resume_step is not None and os.path.isfile(path):
      kept = []
      with open(path) as f:
        for line in f:
          try:
            if json.loads(line)["step"] <= resume_step:
              kept.append(line if line.endswith("\n") else line + "\n")
          except (ValueError, KeyError, TypeError):
            pass   # a line cut short by a kill
      write_atomic(path, "".join(kept))
    self._jsonl = open(path, "a")
    # purge_step: TensorBoard drops the events after it that the interrupted run wrote.
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                             purge_step=None if resume_step is None else resume_step + 1)

  def write(self, step, scalars):
    if not self.active:
      return
    self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
    self._jsonl.flush()
    for k, v in scalars.items():
      if isinstance(v, (int, float)):
        self._tb.add_scalar(k, v, int(step))
    self._tb.flush()

  def close(self):
    if self.active:
      self._jsonl.close()
      self._tb.close()


class StopSignals:
  """The first SIGTERM (how schedulers preempt) or SIGINT asks the loop to stop at the next step
  boundary, where it saves; a second SIGINT stops at once."""

  def __init__(self):
    self.received = None
    self._old = {}

  def _handle(self, signum, frame):
    del frame
    if self.received is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.received = signal.Signals(signum).name
    print(f"\n{self.received}: saving at the end of this step (Ctrl-C again stops at once).",
          file=sys.stderr, flush=True)

  def requested(self):
    """Whether any process got a signal (all processes must stop at the same step)."""
    flag = self.received is not None
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      flag = bool(multihost_utils.process_allgather(flag).any())
    return flag

  def __enter__(self):
    import threading  # pylint: disable=g-import-not-at-top
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)
    return False
