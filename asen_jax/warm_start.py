"""Where a training run's weights start: converted ImageNet backbones and a previous stage.

Read on a fresh start only (a resume restores its own checkpoint); every file goes through
checkpoint.load_model or convert.load_backbone_file and the strict trees.merge_params.
"""
from absl import logging

from asen_jax import checkpoint as ckpt_lib
from asen_jax import convert
from asen_jax import trees


def load_init_from(path, variables, attributes, joint, bn_stats="per_role"):
  """The model variables of a previous run (or an official .pth.tar) into a fresh init: the
  shared table and the global branch, and the local branch too when both runs are joint."""
  loaded, meta = ckpt_lib.load_model(path, prefer="latest")
  source = f"--init_from {path}"
  ckpt_lib.check_attributes(meta, attributes, source)
  if "global" not in loaded["params"]:
    raise ValueError(f"{source} holds no global branch; pass a stage-1 or stage-2 checkpoint of "
                     "this project or an official ASEN++ checkpoint.")
  keep_init = () if joint and "local" in loaded["params"] else ("local/.*",)
  if meta["bn_stats"] != bn_stats:
    logging.warning("%s was trained with train.bn_stats=%r and this run uses %r: its BatchNorm "
                    "statistics were taken another way.", source, meta["bn_stats"], bn_stats)
  return {k: trees.merge_params(variables[k], loaded[k], source, dont_load=keep_init)
          for k in ("params", "batch_stats")}


def load_backbones(config, variables, joint, global_too=True):
  """Converted ImageNet backbones named in config.model.init_backbones, if any (the global one
  only when `global_too`: with --init_from the previous stage provides it)."""
  files = config.model.init_backbones
  branches = [("global", files.global_file, config.model.global_backbone)] if global_too else []
  if joint:
    branches.append(("local", files.local_file, config.model.local_backbone))
  variables = {k: dict(v) for k, v in variables.items()}
  loaded_any = False
  for branch, path, arch in branches:
    if not path:
      continue
    backbone = convert.load_backbone_file(path, arch, num_stages=3, width=config.model.width)
    for k in ("params", "batch_stats"):
      variables[k][branch] = dict(variables[k][branch], backbone=trees.merge_params(
          variables[k][branch]["backbone"], backbone[k], path))
    loaded_any = True
  if not loaded_any and branches:
    logging.warning("No ImageNet backbone weights (config.model.init_backbones): training from "
                    "scratch; results will be far below the paper's.")
  return variables
