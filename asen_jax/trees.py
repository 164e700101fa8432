"""Nested variable trees: flattening, and the one strict merge every loader goes through.

A wrong file never half-loads: each missing, unexpected or misshaped key is named in one sentence.
"""
from collections.abc import Mapping
import re

import numpy as np

_MAX_LISTED = 8


def flatten_tree(tree, sep="/"):
  """Nested mappings -> {'a/b/c': leaf}."""
  flat = {}

  def walk(node, prefix):
    if isinstance(node, Mapping):
      for k, v in node.items():
        walk(v, f"{prefix}{sep}{k}" if prefix else str(k))
    else:
      flat[prefix] = node

  walk(tree, "")
  return flat


def unflatten_tree(flat, sep="/"):
  """{'a/b/c': leaf} -> nested dicts."""
  tree = {}
  for key, value in flat.items():
    node = tree
    *parents, leaf = key.split(sep)
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def _listing(items, fmt):
  shown = [fmt(x) for x in items[:_MAX_LISTED]]
  if len(items) > _MAX_LISTED:
    shown.append(f"... {len(items) - _MAX_LISTED} more")
  return ", ".join(shown)


def shape_of(x):
  return tuple(int(d) for d in np.shape(x))


def mismatch_error(source, target, missing, unexpected, misshaped):
  """One ValueError sentence listing missing / unexpected / misshaped keys."""
  parts = []
  if missing:
    parts.append(f"{len(missing)} missing key(s) ("
                 + _listing(missing, lambda kv: f"{kv[0]} {kv[1]}") + ")")
  if unexpected:
    parts.append(f"{len(unexpected)} unexpected key(s) ("
                 + _listing(unexpected, lambda kv: f"{kv[0]} {kv[1]}") + ")")
  if misshaped:
    parts.append(f"{len(misshaped)} misshaped key(s) ("
                 + _listing(misshaped, lambda k: f"{k[0]}: file {k[1]}, model {k[2]}") + ")")
  return ValueError(f"{source} does not match {target}: " + "; ".join(parts)
                    + "; check that the file and the model config (backbone, width, "
                    "attributes) belong together.")


def merge_params(init, loaded, source, *, dont_load=(), target="the model"):
  """`loaded` in the keys, shapes and dtypes of `init`, strictly (as big_vision's merge_params).

  Args:
    init: pytree of arrays, or of ShapeDtypeStructs when `dont_load` is empty.
    loaded: pytree of arrays read from `source` (a path, named in the error).
    dont_load: regexes of '/'-joined keys that keep their `init` value; `loaded` may have them
      or not. Every other key must be in both trees with the same shape.
  Returns nested dicts of numpy arrays.
  """
  skip = lambda k: any(re.fullmatch(p, k) for p in dont_load)
  ref, got = flatten_tree(init), flatten_tree(loaded)
  missing = [(k, shape_of(ref[k])) for k in sorted(set(ref) - set(got)) if not skip(k)]
  unexpected = [(k, shape_of(got[k])) for k in sorted(set(got) - set(ref)) if not skip(k)]
  misshaped = [(k, shape_of(got[k]), shape_of(ref[k])) for k in sorted(set(ref) & set(got))
               if not skip(k) and shape_of(got[k]) != shape_of(ref[k])]
  if missing or unexpected or misshaped:
    raise mismatch_error(source, target, missing, unexpected, misshaped)
  return unflatten_tree({k: np.asarray(ref[k] if skip(k) else got[k]).astype(ref[k].dtype)
                         for k in ref})
