"""The whole ASEN++ job on the built-in synthetic garments, step by step (behind demo.py).

generate data -> build the tfds dataset -> the backbone (the stand-in for ImageNet weights,
which cannot be downloaded here: the one shipped in assets/, or pretrained by attribute
classification) -> train stage 1 (global) -> train stage 2 (joint, initialised from stage 1) ->
evaluate both on test -> pictures -> one results table.
Every step reuses what a previous run left: existing data, a built dataset, finished stages.
"""
import json
import os
import shutil
import time

import numpy as np

from asen_jax import data as data_lib
from asen_jax import evaluation
from asen_jax import pretrain
from asen_jax import retrieval
from asen_jax import trainer
from asen_jax.data import builder
from asen_jax.data import synthetic


def ensure_data(data_root, workers=2):
  """Generates <data_root>/Synthetic with the generator's defaults unless it is already there."""
  folder = os.path.join(data_root, "Synthetic")
  if os.path.isfile(os.path.join(folder, "meta.json")):
    print(f"Using the synthetic data in {folder}.")
    return folder
  if os.path.exists(folder) and os.listdir(folder):
    raise FileExistsError(f"{folder} exists but holds no meta.json (an interrupted generation?); "
                          "delete it and run the demo again.")
  print(f"Generating the synthetic garments into {folder} ...", flush=True)
  return synthetic.generate(data_root, workers=workers, verbose=True)


# The demo's stand-in for ImageNet weights, made by `python demo.py --pretrain` (2-3 minutes on 2
# CPU cores) and shipped as ImageNet weights would be downloaded; its .json record says from what.
SHIPPED_BACKBONE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "assets", "synthetic_backbone.npz")


def ensure_backbone(config, backbone_file, shipped=SHIPPED_BACKBONE, force_pretrain=False):
  """Puts the stand-in for ImageNet weights at `backbone_file`; returns where it came from:
  'workdir' (a previous run's), 'shipped' (a copy of `shipped`, when its record matches the
  config and the data) or 'pretrained' (trained now)."""
  if os.path.isfile(backbone_file):
    if os.path.isfile(pretrain.record_path(backbone_file)):
      why = pretrain.why_not_reusable(backbone_file, config)
      if why:
        raise ValueError(f"The backbone {backbone_file} does not fit this run: {why}; delete it "
                         "(or use another --workdir) and run the demo again.")
    print(f"Using the pretrained backbone {backbone_file}" + (
        " (--pretrain does not replace the backbone that this workdir's stages started from; use "
        "a new --workdir)." if force_pretrain else "."))
    return "workdir"
  if not force_pretrain:
    why = pretrain.why_not_reusable(shipped, config)
    if why is None:
      os.makedirs(os.path.dirname(os.path.abspath(backbone_file)), exist_ok=True)
      shutil.copyfile(pretrain.record_path(shipped), pretrain.record_path(backbone_file))
      shutil.copyfile(shipped, backbone_file)
      print(f"Using the shipped pretrained backbone {shipped} (the stand-in for ImageNet "
            "weights; `python demo.py --pretrain` makes it again).")
      return "shipped"
    print(f"Not using the shipped backbone: {why}.")
  print(f"Stage 0 (backbone pretraining by attribute classification, the stand-in for ImageNet "
        f"weights) -> {backbone_file}", flush=True)
  pretrain.pretrain_backbone(config, backbone_file)
  return "pretrained"


def random_map_per_attribute(config, split):
  """{attribute: MAP %} of a random ranking (exact expectation) on a split."""
  info = data_lib.dataset_info(config)
  q = builder.eval_lines(config, split, "query")
  c = builder.eval_lines(config, split, "candidate")
  res = retrieval.random_ranking_map(q[:, 1], q[:, 2], c[:, 1], c[:, 2], len(info.attributes),
                                     attribute_names=info.attributes, per_attribute=True)
  return res


def format_demo_table(results):
  """One plain-text table: MAP of a random ranking, the global-only (stage 1) model, ASEN++ and
  its global branch alone (so the local branch's share of the gain shows), and pointing (at the
  cells' receptive-field centres, and where the paper's way of drawing the map puts them)."""
  rnd, g, j, jg = (results[k] for k in ("random", "global", "joint", "joint_global_branch"))
  pointing = j.get("pointing_accuracy") or {}
  drawn = j.get("pointing_accuracy_drawn") or {}
  per_pa = pointing.get("pointing_per_attribute", {})
  per_drawn = drawn.get("pointing_per_attribute", {})
  nan = float("nan")
  head = (f"{'attribute':<12}{'random':>9}{'global':>9}{'ASEN++':>9}{'gain':>8}"
          f"{'ASEN++ global branch':>22}{'pointing %':>12}{'drawn %':>9}")
  lines = [head, "-" * len(head)]
  rows = [(name, rnd["map_per_attribute"][name], g["map_per_attribute"][name],
           j["map_per_attribute"][name], jg["map_per_attribute"][name],
           per_pa.get(name, nan), per_drawn.get(name, nan)) for name in j["map_per_attribute"]]
  rows.append(None)
  rows.append(("overall", rnd["map_overall"], g["map_overall"], j["map_overall"],
               jg["map_overall"], pointing.get("pointing_overall", nan),
               drawn.get("pointing_overall", nan)))
  for row in rows:
    if row is None:
      lines.append("-" * len(head))
      continue
    name, r, gm, jm, jgm, pa, pd = row
    lines.append(f"{name:<12}{r:>9.2f}{gm:>9.2f}{jm:>9.2f}{jm - gm:>+8.2f}{jgm:>22.2f}"
                 f"{pa:>12.1f}{pd:>9.1f}")
  lines += ["pointing: the ASEN++ attention maximum, at its cell's receptive-field centre, lies in",
            "the attribute's box; drawn: the same with the cell where a half-pixel bilinear",
            "upsampling draws it (the paper's pictures): half a cell less half a pixel",
            "lower-right."]
  return "\n".join(lines)


def _jsonable(x):
  if isinstance(x, dict):
    return {k: _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  return x


def ensure_index(config, checkpoint, index_dir, split):
  """A flat search index of a split's candidate images (search.py), unless one of this model is
  already there."""
  from asen_jax.search import service  # pylint: disable=g-import-not-at-top
  from asen_jax.search import store  # pylint: disable=g-import-not-at-top
  if store.exists(index_dir):
    try:
      service.Searcher(index_dir, config, checkpoint)
      print(f"Using the search index {index_dir}.")
      return
    except ValueError:   # another model's: build it again
      pass
  print(f"Indexing the {split} split for search -> {index_dir}", flush=True)
  service.build(config, checkpoint, index_dir, {"kind": "flat"}, split=split)


def run_demo(config_g, config_j, workdir, split="test", viz_queries=2, force_pretrain=False,
             shipped_backbone=SHIPPED_BACKBONE):
  """Runs every step of the demo with its stage-1 and stage-2 configs (configs/synthetic.py's
  demo_configs, both backbones from <workdir>/backbone.npz), ending with a search index of the
  split in <workdir>/index; returns the results dict (also written to results.json)."""
  t_start = time.time()
  ensure_data(config_g.data.root)
  backbone_file = config_g.model.init_backbones.global_file
  print("Building the tfds dataset (once) ...", flush=True)
  data_lib.prepare_dataset(config_g)
  timings = {}
  t0 = time.time()
  backbone_source = ensure_backbone(config_g, backbone_file, shipped_backbone, force_pretrain)
  timings["backbone_s"] = time.time() - t0
  global_dir, joint_dir = os.path.join(workdir, "global"), os.path.join(workdir, "joint")
  pictures = os.path.join(workdir, "pictures")

  t0 = time.time()
  print(f"Stage 1 (global branch) -> {global_dir}", flush=True)
  trainer.train_and_evaluate(config_g, global_dir)
  timings["train_global_s"] = time.time() - t0
  t0 = time.time()
  print(f"Stage 2 (joint, initialised from stage 1) -> {joint_dir}", flush=True)
  trainer.train_and_evaluate(config_j, joint_dir, init_from=global_dir)
  timings["train_joint_s"] = time.time() - t0

  t0 = time.time()
  print(f"Evaluating both stages on {split} ...", flush=True)
  res_g = evaluation.run_evaluation(config_g, global_dir, split)
  res_j = evaluation.run_evaluation(config_j, joint_dir, split, viz_dir=pictures,
                                    viz_queries=viz_queries)
  timings["evaluate_s"] = time.time() - t0
  t0 = time.time()
  index_dir = os.path.join(workdir, "index")
  ensure_index(config_j, joint_dir, index_dir, split)
  timings["index_s"] = time.time() - t0
  timings["total_s"] = time.time() - t_start
  results = {"split": split, "backbone": backbone_source,
             "random": random_map_per_attribute(config_g, split), "global": res_g, "joint": res_j,
             "joint_global_branch": res_j["global_branch"], "timings": timings}
  results = _jsonable(results)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  return results
