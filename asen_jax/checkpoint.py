"""Orbax checkpoints: model variables + JSON metadata, and the training run's state.

Layout of a training workdir:
  <workdir>/checkpoints/latest/<step>/{model,opt,data,meta}   resume point (optimiser + data iterator)
  <workdir>/checkpoints/best/<step>/{model,meta}              best validation MAP
A converted official checkpoint is a manager folder with one step holding {model, meta}.
`meta` is JSON: attributes, num_values, stage ('global'|'joint'), model (config.model), step, ...
`load_model` reads any of these, and the official `.pth.tar` files, for every user of weights.
"""
import dataclasses
import json
import os
import shutil
import time
from typing import Any

from absl import logging
import grain.checkpoint as grain_ckpt
import jax
import numpy as np
import orbax.checkpoint as ocp

from asen_jax import convert
from asen_jax import model as model_lib

MODEL_ITEMS = ("model", "meta")


def _manager(directory, item_names, max_to_keep=None, read_only=False, item_handlers=None):
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
      enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_names=item_names, item_handlers=item_handlers)


def save_model_variables(directory, variables, meta, step=0):
  """Writes {'params', 'batch_stats'} and a JSON-able `meta` as one orbax step."""
  with _manager(directory, MODEL_ITEMS) as mngr:
    mngr.save(step, args=ocp.args.Composite(
        model=ocp.args.StandardSave(dict(variables)), meta=ocp.args.JsonSave(meta)), force=True)
    mngr.wait_until_finished()


def resolve_model_dir(path, prefer="best"):
  """Maps a workdir, a checkpoints/ folder or a manager folder to a manager folder."""
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"Checkpoint {path} does not exist; pass a training workdir, a "
                            "checkpoint folder written by this project, or an official .pth.tar.")
  order = [prefer, "latest" if prefer == "best" else "best"]
  for base in (os.path.join(path, "checkpoints"), path):
    for kind in order:
      if os.path.isdir(os.path.join(base, kind)):
        return os.path.join(base, kind)
  return path


def _latest_step(mngr, directory):
  step = mngr.latest_step()
  if step is None:
    raise FileNotFoundError(f"No finished checkpoint in {directory}; a checkpoint folder holds "
                            "numbered step folders written by train.py or tools/convert_official.py.")
  return step


def _reason(e):
  """An exception as a short clause: its type and first line."""
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


def load_model_variables(path, prefer="best", step=None):
  """Returns (variables as host numpy trees, meta dict, step) from any of our checkpoints."""
  directory = resolve_model_dir(path, prefer)
  handlers = {"model": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
  try:
    with _manager(directory, MODEL_ITEMS, read_only=True, item_handlers=handlers) as mngr:
      step = _latest_step(mngr, directory) if step is None else step
      # numpy targets: whole arrays on every process, whatever devices and processes saved them
      # (without a target orbax restores onto the saved topology, or fails).
      target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype),
                            mngr.item_metadata(step)["model"])
      restored = mngr.restore(step, args=ocp.args.Composite(
          model=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
  except FileNotFoundError as e:
    if "No finished checkpoint" in str(e):
      raise
    raise ValueError(f"Checkpoint {directory}/{step} cannot be read ({_reason(e)}); it is "
                     "incomplete or damaged: use another checkpoint of the run.") from None
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"Checkpoint {directory}/{step} cannot be read ({_reason(e)}); it is "
                     "incomplete or damaged: use another checkpoint of the run.") from None
  variables = jax.device_get(dict(restored["model"]))
  variables.setdefault("batch_stats", {})
  return variables, dict(restored["meta"]), step


OFFICIAL_SUFFIXES = (".pth", ".tar", ".pt")


def load_model(path, prefer="best"):
  """(variables, meta) of any model checkpoint, as host numpy trees.

  `path`: a training workdir (its `prefer` checkpoint: 'best' or 'latest'), a checkpoint folder
  of this project, or an official ASEN++ `.pth.tar` (stage 1 or 2, architecture read off the
  keys). meta always has: stage ('global'|'joint'), model (the shape fields of config.model),
  attributes (None for official files, which hold only their count), num_attributes, step
  (None for official files), bn_stats (train.bn_stats that trained it) and source.
  """
  path = os.fspath(path)
  if path.endswith(OFFICIAL_SUFFIXES):
    variables, info = convert.official_to_variables(convert.read_weight_file(path), source=path)
    meta = {"stage": "joint" if info["stage"] == 2 else "global", "model": info["model"],
            "attributes": None, "num_attributes": info["num_attributes"], "step": None,
            "bn_stats": "per_role"}   # the official trainer's three forwards
  else:
    variables, meta, step = load_model_variables(path, prefer)
    meta = dict(meta, step=step, num_attributes=len(meta["attributes"]))
    meta.setdefault("bn_stats", "batch")   # checkpoints from before the field
    # Fields newer than the checkpoint take the value they had before they existed.
    meta["model"] = {**model_lib.MODEL_FIELD_DEFAULTS, **meta.get("model", {})}
  meta["source"] = path
  return variables, meta


def check_attributes(meta, attributes, source):
  """One sentence when a checkpoint (its `meta`) was trained on other attributes."""
  if meta["attributes"] is None:   # official files: only the count is known
    if meta["num_attributes"] != len(attributes):
      raise ValueError(f"{source} has {meta['num_attributes']} attributes but the config has "
                       f"{len(attributes)} ({', '.join(attributes)}); use the config of the "
                       "dataset it was trained on.")
  elif list(meta["attributes"]) != list(attributes):
    raise ValueError(f"{source} was trained on attributes {list(meta['attributes'])}, but the "
                     f"config has {list(attributes)}; use a checkpoint of the same dataset or "
                     "the config of its dataset.")


class DataHandler(grain_ckpt.CheckpointHandler):
  """grain's iterator handler, restorable under any process count: grain names the state file
  by process index and count, but the training stream's state is global (its step)."""

  def restore(self, directory, item=None, args=None):
    item = item or args.item
    states = {f.read_text() for f in directory.glob("process_*-of-*.json")}
    if len(states) != 1:   # one file per process that saved, all the same
      raise ValueError(f"{directory} holds {len(states)} distinct data iterator states, not one; "
                       "it was not written by train.py.")
    item.set_state(json.loads(states.pop()))
    item.start_prefetch()
    return item


@ocp.args.register_with_handler(DataHandler, for_save=True)
@dataclasses.dataclass
class DataSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(DataHandler, for_restore=True)
@dataclasses.dataclass
class DataRestore(ocp.args.CheckpointArgs):
  item: Any


class RunCheckpoints:
  """The latest (full training state) and best-by-MAP (model only) checkpoints of a run."""

  def __init__(self, workdir, keep_latest=2):
    root = self._root = os.path.join(workdir, "checkpoints")
    self.latest = _manager(os.path.join(root, "latest"), ("model", "opt", "data", "meta"),
                           max_to_keep=keep_latest,
                           item_handlers={"data": DataHandler()})
    self.best = _manager(os.path.join(root, "best"), MODEL_ITEMS, max_to_keep=1)

  def latest_step(self):
    return self.latest.latest_step()

  def _set_aside(self, step, e):
    """Moves a damaged step out of the manager's folder (kept for a post-mortem) and warns."""
    src = os.path.join(self._root, "latest", str(step))
    dst = os.path.join(self._root, "damaged", f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    logging.warning("Checkpoint %s cannot be read (%s); moved to %s, resuming from the one "
                    "before.", src, _reason(e), dst)
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      shutil.move(src, dst)
    self.latest.reload()

  def _newest_readable(self, args):
    """Restores `args` from the newest latest/ step that can be read, setting damaged ones aside."""
    while (step := self.latest.latest_step()) is not None:
      try:
        return step, self.latest.restore(step, args=args)
      except Exception as e:  # pylint: disable=broad-except
        self._set_aside(step, e)
    raise ValueError(f"No checkpoint in {self._root}/latest can be read; delete the workdir to "
                     "start again.")

  def latest_meta(self):
    if self.latest.latest_step() is None:
      return None
    return self._newest_readable(ocp.args.Composite(meta=ocp.args.JsonRestore()))[1]["meta"]

  def _save(self, mngr, step, args, kind):
    try:
      mngr.save(step, args=args, force=True)
      mngr.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      cause = e
      while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
      if cause is None:
        raise   # not the filesystem (e.g. a collective after another process died)
      good = self.latest.latest_step() if kind == "latest" else None
      kept = f"; the last good one (step {good}) is intact" if good not in (None, step) else ""
      raise OSError(f"Could not write the {kind} checkpoint of step {step} in {self._root} "
                    f"({_reason(cause)}){kept}: free space or fix the folder, then run the "
                    "same command again.") from None

  def save_latest(self, step, variables, opt, data_iterator, meta):
    self._save(self.latest, step, ocp.args.Composite(
        model=ocp.args.StandardSave(variables), opt=ocp.args.StandardSave(opt),
        data=DataSave(data_iterator), meta=ocp.args.JsonSave(meta)),
        "latest")

  def save_best(self, step, variables, meta):
    for old in self.best.all_steps():   # incl. this step, from a run stopped before its latest
      self.best.delete(old)
    self._save(self.best, step, ocp.args.Composite(
        model=ocp.args.StandardSave(variables), meta=ocp.args.JsonSave(meta)), "best")

  def restore_latest(self, abstract_variables, abstract_opt, data_iterator):
    """Restores the newest readable training state into the given shapes/shardings and
    iterator (a damaged newest step is set aside with a warning)."""
    step, restored = self._newest_readable(ocp.args.Composite(
        model=ocp.args.StandardRestore(abstract_variables),
        opt=ocp.args.StandardRestore(abstract_opt),
        data=DataRestore(data_iterator),
        meta=ocp.args.JsonRestore()))
    logging.info("Restored training state of step %d.", step)
    return restored["model"], restored["opt"], restored["data"], restored["meta"]

  def close(self):
    self.latest.close()
    self.best.close()
