"""Weight files in, model variables out: PyTorch <-> Flax conversion, checked strictly.

Every conversion names each missing, unexpected or misshaped key in one sentence (trees.py), so a
wrong file never silently half-loads. PyTorch conv weights are (O, I, kh, kw) and Flax kernels
(kh, kw, I, O); linear weights are (out, in) and Flax kernels (in, out).
"""
from collections.abc import Mapping
import os
import pickle
import re

import jax
import jax.numpy as jnp
import numpy as np

from asen_jax import model as model_lib
from asen_jax import resnet
from asen_jax import torch_pickle
from asen_jax import trees

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias",
                  "mean": "running_mean", "var": "running_var"}


# ----------------------------------------------------------------------------- reading files


def _to_numpy(value):
  if hasattr(value, "detach"):  # torch.Tensor
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":
      value = value.float()
    return value.numpy().copy()   # never alias the tensor: torch may update it in place
  return np.asarray(value)


def _pick_state_dict(obj, path):
  if isinstance(obj, Mapping):
    for key in ("model", "state_dict"):
      if isinstance(obj.get(key), Mapping):
        obj = obj[key]
        break
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict of arrays; "
                     "save `model.state_dict()` (or a dict with a 'model' entry).")
  return _plain_state_dict({str(k): v for k, v in obj.items() if hasattr(v, "shape")})


def _plain_state_dict(state_dict):
  """Tensors -> numpy, without nn.DataParallel's 'module.' prefix."""
  sd = {k: _to_numpy(v) for k, v in state_dict.items()}
  if sd and all(k.startswith("module.") for k in sd):
    sd = {k[len("module."):]: v for k, v in sd.items()}
  return sd


def read_weight_file(path):
  """.pth/.pth.tar/.pt (torch zip or legacy), .npz or .safetensors -> {key: np.ndarray}.

  A checkpoint dict with a 'model' (or 'state_dict') entry yields that state dict. PyTorch
  files are read with torch.load(weights_only=True) when torch is importable, else with the
  built-in restricted reader.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Weight file {path} does not exist; check the path.")
  lower = path.lower()
  try:
    if lower.endswith(".npz"):
      with np.load(path, allow_pickle=False) as f:
        return _pick_state_dict({k: f[k] for k in f.files}, path)
    if lower.endswith(".safetensors"):
      from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
      return _pick_state_dict(load_file(path), path)
    if lower.endswith((".pth", ".pt", ".tar", ".ckpt", ".bin")):
      return _pick_state_dict(_load_torch_file(path), path)
  except (ValueError, FileNotFoundError):
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"Could not read weight file {path} ({type(e).__name__}: "
                     f"{str(e).splitlines()[0] if str(e) else ''}); is it complete and of "
                     "the format its extension says?") from None
  raise ValueError(f"Weight file {path} has an unknown extension; use .pth, .pth.tar, .npz "
                   "or .safetensors.")


def _load_torch_file(path):
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return torch_pickle.load(path)
  # Official checkpoints may store mAP as a numpy scalar; allow just that beside tensors.
  safe = [np.dtype, type(np.dtype(np.float64)), type(np.dtype(np.float32))]
  scalar = getattr(getattr(np, "_core", np).multiarray, "scalar", None)
  if scalar is not None:
    safe.append(scalar)
  try:
    with torch.serialization.safe_globals(safe):
      return torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError:
    # e.g. a numpy-1 scalar torch does not allowlist: the restricted reader knows it.
    return torch_pickle.load(path)


# ----------------------------------------------------------------------------- key mapping


def flax_to_torch_key(path):
  """('layer2_0', 'downsample_bn', 'mean') -> 'layer2.0.downsample.1.running_mean'."""
  *modules, leaf = path
  parts = []
  for m in modules:
    match = re.fullmatch(r"layer(\d+)_(\d+)", m)
    if match:
      parts += [f"layer{match[1]}", match[2]]
    elif m == "downsample_conv":
      parts += ["downsample", "0"]
    elif m == "downsample_bn":
      parts += ["downsample", "1"]
    else:
      parts.append(m)
  return ".".join(parts + [_LEAF_TO_TORCH[leaf]])


def _torch_shape(leaf, flax_shape):
  if leaf == "kernel" and len(flax_shape) == 4:
    kh, kw, cin, cout = flax_shape
    return (cout, cin, kh, kw)
  if leaf == "kernel" and len(flax_shape) == 2:
    return tuple(reversed(flax_shape))
  return tuple(flax_shape)


def _torch_to_flax(leaf, value):
  value = np.asarray(value, np.float32)
  if leaf == "kernel" and value.ndim == 4:
    return value.transpose(2, 3, 1, 0)
  if leaf == "kernel" and value.ndim == 2:
    return value.T
  return value


def convert_state_dict(reference, state_dict, key_fn, source, target, ignore=lambda k: False):
  """Fills `reference` ({'params', 'batch_stats'} shapes) from a PyTorch state dict.

  key_fn maps a Flax path (tuple, collection excluded) to a PyTorch key; keys for which
  `ignore` is true may be present or not. Anything else missing, extra or misshaped raises.
  """
  flat_ref = {}
  for collection in ("params", "batch_stats"):
    for key, ref in trees.flatten_tree(reference.get(collection, {})).items():
      path = tuple(key.split("/"))
      flat_ref[key_fn(path)] = (collection, path, ref)
  missing, misshaped, out = [], [], {}
  for tkey, (collection, path, ref) in sorted(flat_ref.items()):
    want = _torch_shape(path[-1], trees.shape_of(ref))
    if tkey not in state_dict:
      missing.append((tkey, want))
    elif trees.shape_of(state_dict[tkey]) != want:
      misshaped.append((tkey, trees.shape_of(state_dict[tkey]), want))
    else:
      out[collection + "/" + "/".join(path)] = _torch_to_flax(path[-1], state_dict[tkey])
  unexpected = [(k, trees.shape_of(v)) for k, v in sorted(state_dict.items())
                if k not in flat_ref and not ignore(k)]
  if missing or unexpected or misshaped:
    raise trees.mismatch_error(source, target, missing, unexpected, misshaped)
  tree = trees.unflatten_tree(out)
  return {"params": tree.get("params", {}), "batch_stats": tree.get("batch_stats", {})}


# ----------------------------------------------------------------------------- torchvision


def backbone_shapes(arch, num_stages=3, width=1.0):
  """ShapeDtypeStructs of {'params', 'batch_stats'} of a backbone (no compute)."""
  net = resnet.make_backbone(arch, num_stages, width)
  return jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))


def torchvision_to_backbone(state_dict, arch, num_stages=3, width=1.0, source="state dict"):
  """torchvision ResNet state dict -> backbone {'params', 'batch_stats'} (numpy float32).

  fc.*, num_batches_tracked and stages beyond `num_stages` (layer4 for ASEN) are ignored.
  """
  state_dict = _plain_state_dict(state_dict)

  def ignore(key):
    match = re.match(r"layer(\d+)\.", key)
    return (key.startswith("fc.") or key.endswith("num_batches_tracked")
            or (match is not None and int(match[1]) > num_stages))

  return convert_state_dict(backbone_shapes(arch, num_stages, width), state_dict,
                            flax_to_torch_key, source,
                            f"{arch} ({num_stages} stages, width {width})", ignore)


def backbone_to_torchvision(variables):
  """Backbone {'params', 'batch_stats'} -> {torchvision key: numpy array in torch layout}."""
  out = {}
  for collection in ("params", "batch_stats"):
    for key, value in trees.flatten_tree(variables[collection]).items():
      path = tuple(key.split("/"))
      value = np.asarray(value, np.float32)
      if path[-1] == "kernel" and value.ndim == 4:
        value = value.transpose(3, 2, 0, 1)       # (kh, kw, in, out) -> (out, in, kh, kw)
      out[flax_to_torch_key(path)] = value
  return out


def load_backbone_file(path, arch, num_stages=3, width=1.0):
  """Reads a torchvision .pth (or a converted .npz/.safetensors) -> backbone variables."""
  return torchvision_to_backbone(read_weight_file(path), arch, num_stages, width,
                                 source=os.fspath(path))


# ----------------------------------------------------------------------------- official ASEN++

_EMBED_KEY = "choices.{}.attrnet.attr_embedding.weight"


def _infer_backbone(sd, prefix, source):
  """(arch, width) of the ResNet under `prefix` from its keys and the stem's channels."""
  blocks = []
  for stage in (1, 2, 3):
    ids = {int(m[1]) for k in sd for m in [re.match(rf"{re.escape(prefix)}layer{stage}\.(\d+)\.",
                                                     k)] if m}
    blocks.append(len(ids))
  kind = "bottleneck" if any(k.startswith(prefix) and ".conv3." in k for k in sd) else "basic"
  for arch, (sizes, arch_kind) in resnet.ARCHS.items():
    if tuple(sizes[:3]) == tuple(blocks) and arch_kind == kind:
      stem = sd.get(prefix + "conv1.weight")
      if stem is None:
        break
      return arch, float(trees.shape_of(stem)[0]) / 64.0
  raise ValueError(f"{source}: the keys under {prefix} are not a ResNet-18/34/50 to layer3 "
                   f"({kind} blocks per stage {blocks}).")


def official_to_variables(state_dict, source="official state dict"):
  """Official ASEN++ state dict (choices.global.* [+ choices.local.*]) -> (variables, info).

  The architecture (backbones, width, head dims) is read off the keys and shapes; info is
  {'num_attributes', 'stage' (1 = global only, 2 = global + local), 'model': {field: value}}.
  """
  sd = _plain_state_dict(state_dict)
  gkey, lkey = _EMBED_KEY.format("global"), _EMBED_KEY.format("local")
  if gkey not in sd:
    raise ValueError(f"{source} is not an official ASEN++ state dict: it has no key {gkey}.")
  stage = 2 if any(k.startswith("choices.local.") for k in sd) else 1
  num_attributes, attr_dim = trees.shape_of(sd[gkey])
  fields = {"attr_dim": attr_dim}
  for branch in ("global", "local") if stage == 2 else ("global",):
    arch, width = _infer_backbone(sd, f"choices.{branch}.basenet.", source)
    fields[f"{branch}_backbone"] = arch
    fields["width"] = width
    head = f"choices.{branch}.attnnet."
    try:
      common_dim, channels = trees.shape_of(sd[head + "conv.weight"])[:2]
      hidden = trees.shape_of(sd[head + "fc1.weight"])[0]
      fields[f"{branch}_common_dim"] = common_dim
      fields["reduction"] = max(1, channels // hidden)
      fields["embed_dim"] = trees.shape_of(sd[head + "feature_fc.weight"])[0]
    except KeyError as e:
      raise ValueError(f"{source} lacks the head key {e.args[0]}; it is not an official "
                       "ASEN++ state dict.") from None
  if stage == 2 and lkey in sd:
    if trees.shape_of(sd[lkey]) != trees.shape_of(sd[gkey]) or not np.array_equal(sd[lkey], sd[gkey]):
      raise ValueError(f"{source}: {gkey} and {lkey} differ, but ASEN++ shares one attribute "
                       "embedding table; the checkpoint is inconsistent.")
  net = model_lib.ASENPP(num_attributes=num_attributes, with_local=stage == 2, **fields)
  reference = jax.eval_shape(
      lambda: net.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), jnp.zeros((1,), jnp.int32),
                       jnp.zeros((1, 32, 32, 3)) if stage == 2 else None))

  def key_fn(path):
    if path[0] == "attr_embedding":
      return gkey
    branch, part, *rest = path
    return f"choices.{branch}.{'basenet' if part == 'backbone' else 'attnnet'}." + \
        flax_to_torch_key(tuple(rest))

  variables = convert_state_dict(
      reference, sd, key_fn, source, f"an ASEN++ model ({num_attributes} attributes, "
      f"stage {stage})", ignore=lambda k: k.endswith("num_batches_tracked") or k == lkey)
  model_fields = {f: getattr(net, f) for f in model_lib.MODEL_FIELDS}
  return variables, {"num_attributes": num_attributes, "stage": stage, "model": model_fields}
