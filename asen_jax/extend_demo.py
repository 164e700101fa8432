"""The synthetic measurement of stage `extend` (behind extend_demo.py).

For a held-out attribute X: a copy of the synthetic split files without X (same images) stands
for the dataset before X was tagged; the backbone stand-in is pretrained on it, stages 1 and 2
train on the other attributes, then `extend` adds X from the joint checkpoint on the full set.
docs/extend.md has the numbers.
"""
import json
import os

import numpy as np

from asen_jax import runs

SPLIT_FILES = ("filenames_train.txt", "filenames_valid.txt", "filenames_test.txt")


def folder_without(held_out):
  return "Synthetic_without_" + "_".join(held_out)


def _write_if_changed(path, text):
  # An unchanged file keeps its mtime, so a rerun finds its built dataset still current.
  if os.path.isfile(path):
    with open(path) as f:
      if f.read() == text:
        return
  runs.write_atomic(path, text)


def write_without(src, dst, held_out):
  """Writes the official layout of `src` (a synthetic folder) into `dst` without the attributes
  `held_out` (names); image paths point into `src`; files already as they would be are left
  alone. Returns dst."""
  with open(os.path.join(src, "meta.json")) as f:
    meta = json.load(f)
  names = meta["attributes"]
  unknown = [a for a in held_out if a not in names]
  if unknown or len(held_out) >= len(names):
    raise ValueError(f"Cannot hold out {list(held_out)}: the synthetic set's attributes are "
                     f"{names}; name one or more of them, not all.")
  keep = [a for a, name in enumerate(names) if name not in held_out]
  new_index = {a: i for i, a in enumerate(keep)}
  os.makedirs(dst, exist_ok=True)
  rel = os.path.relpath(src, dst)
  for fname in SPLIT_FILES:
    with open(os.path.join(src, fname)) as f:
      lines = [line.strip() for line in f if line.strip()]
    _write_if_changed(os.path.join(dst, fname), "".join(f"{rel}/{line}\n" for line in lines))
  out = []
  with open(os.path.join(src, "label_train.txt")) as f:
    for line in f:
      fid, *pairs = line.split()
      kept = [f"{new_index[int(a)]} {v}" for a, v in zip(pairs[::2], pairs[1::2])
              if int(a) in new_index]
      if kept:
        out.append(f"{fid} {' '.join(kept)}\n")
  _write_if_changed(os.path.join(dst, "label_train.txt"), "".join(out))
  for kind in ("query", "candidate"):
    for split in ("valid", "test"):
      out = []
      with open(os.path.join(src, f"{kind}_{split}.txt")) as f:
        for line in f:
          fid, a, v = line.split()
          if int(a) in new_index:
            out.append(f"{fid} {new_index[int(a)]} {v}\n")
      _write_if_changed(os.path.join(dst, f"{kind}_{split}.txt"), "".join(out))
  sub = dict(meta, name=os.path.basename(dst), held_out=list(held_out))
  for field in ("attributes", "num_values", "value_names"):
    sub[field] = [meta[field][a] for a in keep]
  for field in ("global_attributes", "detail_attributes"):
    sub[field] = [a for a in meta[field] if a not in held_out]
  sub["splits"] = {s: dict(v, labels=np.asarray(v["labels"])[:, keep].tolist(),
                           boxes=[[b[a] for a in keep] for b in v["boxes"]])
                   for s, v in meta["splits"].items()}
  _write_if_changed(os.path.join(dst, "meta.json"), json.dumps(sub, separators=(",", ":")))
  return dst


def old_configs(data_root, held_out, backbone_file, overrides=None):
  """The demo's (global, joint) configs on the folder without `held_out`."""
  from configs import synthetic as synthetic_config  # pylint: disable=g-import-not-at-top
  configs = synthetic_config.demo_configs(data_root, backbone_file, overrides)
  for c in configs:
    c.data.folder = folder_without(held_out)
    c.data.tfds_dir = os.path.join(data_root, "tfds_without_" + "_".join(held_out))
  return configs


def train_old_model(data_root, workdir, held_out, overrides=None):
  """Backbone stand-in, stage 1 and stage 2 without `held_out`; returns the joint workdir."""
  from asen_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from asen_jax import end_to_end
  from asen_jax import pretrain
  from asen_jax import trainer
  end_to_end.ensure_data(data_root)
  write_without(os.path.join(data_root, "Synthetic"),
                os.path.join(data_root, folder_without(held_out)), held_out)
  backbone = os.path.join(workdir, "backbone.npz")
  config_g, config_j = old_configs(data_root, held_out, backbone, overrides)
  data_lib.prepare_dataset(config_g)
  if not os.path.isfile(backbone):
    print(f"Pretraining the backbone stand-in without {held_out} -> {backbone}", flush=True)
    pretrain.pretrain_backbone(config_g, backbone)
  global_dir, joint_dir = os.path.join(workdir, "global"), os.path.join(workdir, "joint")
  print(f"Stage 1 without {held_out} -> {global_dir}", flush=True)
  trainer.train_and_evaluate(config_g, global_dir)
  print(f"Stage 2 without {held_out} -> {joint_dir}", flush=True)
  trainer.train_and_evaluate(config_j, joint_dir, init_from=global_dir)
  return joint_dir


def extend_config(data_root, overrides=None):
  """configs/synthetic.py:extend on the full set in <data_root>."""
  from configs import common  # pylint: disable=g-import-not-at-top
  from configs import synthetic as synthetic_config
  c = synthetic_config.get_config("extend")
  c.data.root, c.data.tfds_dir = data_root, os.path.join(data_root, "tfds")
  return common.apply_overrides(c, overrides or {})


def run(data_root, workdir, held_out, five, overrides=None, split="test"):
  """Per held-out attribute: the old model, extend, test MAP; `five` is the five-attribute demo
  model's results.json (demo.py). Returns {attribute: row} (also in <workdir>/results.json)."""
  from asen_jax import end_to_end  # pylint: disable=g-import-not-at-top
  from asen_jax import evaluation
  from asen_jax import trainer
  from asen_jax import data as data_lib
  config = extend_config(data_root, overrides)
  end_to_end.ensure_data(data_root)
  data_lib.prepare_dataset(config)
  random = end_to_end.random_map_per_attribute(config, split)["map_per_attribute"]
  path = os.path.join(workdir, "results.json")
  rows = {}
  if os.path.isfile(path):
    with open(path) as f:
      rows = json.load(f)
  for x in held_out:
    if x in rows:
      continue
    old_dir = train_old_model(data_root, os.path.join(workdir, x), (x,), overrides)
    ext_dir = os.path.join(workdir, x, "extend")
    print(f"Stage extend: {x} onto {old_dir} -> {ext_dir}", flush=True)
    trainer.train_and_evaluate(config, ext_dir, init_from=old_dir)
    res = evaluation.run_evaluation(config, ext_dir, split)
    old_config = old_configs(data_root, (x,), "")[1]
    old = evaluation.run_evaluation(old_config, old_dir, split)
    rows[x] = {"random": random[x], "five": five["joint"]["map_per_attribute"][x],
               "extended": res["map_per_attribute"][x],
               "steps": trainer.total_steps(config),
               "five_steps": five.get("steps"),
               "old_attributes": {a: {"four": old["map_per_attribute"][a],
                                      "extended": res["map_per_attribute"][a],
                                      "five": five["joint"]["map_per_attribute"][a]}
                                  for a in old["map_per_attribute"]}}
    r = rows[x]
    r["gap_closed"] = (r["extended"] - r["random"]) / (r["five"] - r["random"])
    with open(path, "w") as f:
      json.dump(rows, f, indent=2)
  return rows


def format_table(rows):
  head = (f"{'held out':<10}{'random':>8}{'five-attribute':>16}{'extended':>10}"
          f"{'gap closed':>12}{'steps':>7}{'old attributes, four -> extended':>36}")
  lines = [head, "-" * len(head)]
  for x, r in rows.items():
    same = all(v["four"] == v["extended"] for v in r["old_attributes"].values())
    lines.append(f"{x:<10}{r['random']:>8.2f}{r['five']:>16.2f}{r['extended']:>10.2f}"
                 f"{100 * r['gap_closed']:>11.1f}%{r['steps']:>7}"
                 f"{'unchanged' if same else 'CHANGED':>36}")
  return "\n".join(lines)
