"""Training metrics: JSON lines and TensorBoard."""
import json
import os

import jax
from tensorboardX import SummaryWriter


class MetricWriter:
  """JSON lines + TensorBoard, written by process 0 only (clu 0.0.12's metric_writers cannot be
  imported without TensorFlow, so they are not used)."""

  def __init__(self, workdir):
    self.active = jax.process_index() == 0
    if self.active:
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

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
