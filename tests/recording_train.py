"""train.py that also records, per process, the triplets of every batch it reads: one line
[global step, [triplet ids]] a batch in <workdir>/ids_<process index>.jsonl."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train  # noqa: E402  (re-executes this script once under mimalloc, as train.py does)
from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
from asen_jax.data import pipeline  # noqa: E402

_next = pipeline._TrainIterator.__next__  # pylint: disable=protected-access


def _recording_next(self):
  batch = _next(self)
  path = os.path.join(flags.FLAGS.workdir, f"ids_{jax.process_index()}.jsonl")
  with open(path, "a") as f:
    f.write(json.dumps([self._step, batch["index"].tolist()]) + "\n")  # pylint: disable=protected-access
  return batch


pipeline._TrainIterator.__next__ = _recording_next  # pylint: disable=protected-access

if __name__ == "__main__":
  app.run(train.main)
