"""The synthetic measurement of stage `extend` (behind extend_demo.py).

For a held-out attribute X: a copy of the synthetic split files without X (same images) stands
for the dataset before X was tagged; the backbone stand-in is pretrained on it, stages 1 and 2
train on the other attributes, then `extend` adds X from the joint checkpoint on the full set.
docs/extend.md has the numbers.
"""
import json
import os

import numpy as np

SPLIT_FILES = ("filenames_train.txt", "filenames_valid.txt", "filenames_test.txt")


def folder_without(held_out):
  return "Synthetic_without_" + "_".join(held_out)


def write_without(src, dst, held_out):
  """Writes the official layout of `src` (a synthetic folder) into `dst` without the attributes
  `held_out` (names); image paths point into `src`. Returns dst."""
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
    with open(os.path.join(dst, fname), "w") as f:
      f.write("".join(f"{rel}/{line}\n" for line in lines))
  with open(os.path.join(src, "label_train.txt")) as f, \
       open(os.path.join(dst, "label_train.txt"), "w") as out:
    for line in f:
      fid, *pairs = line.split()
      kept = [f"{new_index[int(a)]} {v}" for a, v in zip(pairs[::2], pairs[1::2])
              if int(a) in new_index]
      if kept:
        out.write(f"{fid} {' '.join(kept)}\n")
  for kind in ("query", "candidate"):
    for split in ("valid", "test"):
      with open(os.path.join(src, f"{kind}_{split}.txt")) as f, \
           open(os.path.join(dst, f"{kind}_{split}.txt"), "w") as out:
        for line in f:
          fid, a, v = line.split()
          if int(a) in new_index:
            out.write(f"{fid} {new_index[int(a)]} {v}\n")
  sub = dict(meta, name=os.path.basename(dst), held_out=list(held_out))
  for field in ("attributes", "num_values", "value_names"):
    sub[field] = [meta[field][a] for a in keep]
  for field in ("global_attributes", "detail_attributes"):
    sub[field] = [a for a in meta[field] if a not in held_out]
  sub["splits"] = {s: dict(v, labels=np.asarray(v["labels"])[:, keep].tolist(),
                           boxes=[[b[a] for a in keep] for b in v["boxes"]])
                   for s, v in meta["splits"].items()}
  with open(os.path.join(dst, "meta.json"), "w") as f:
    json.dump(sub, f, separators=(",", ":"))
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
