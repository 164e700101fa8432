"""Weight files in, model variables out: strict merging and PyTorch -> Flax conversion.

Every load goes through a strict check that names each missing, unexpected or misshaped key in
one sentence, so a wrong file never silently half-loads. PyTorch conv weights are (O, I, kh, kw)
and Flax kernels (kh, kw, I, O); linear weights are (out, in) and Flax kernels (in, out).
"""
import codecs
import collections
from collections.abc import Mapping
import io
import os
import pickle
import re
import struct
import zipfile

import jax
import jax.numpy as jnp
import numpy as np

from asen_jax import model as model_lib
from asen_jax import resnet

_MAX_LISTED = 8
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias",
                  "mean": "running_mean", "var": "running_var"}


# ----------------------------------------------------------------------------- strict merge


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


def _shape(x):
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


def strict_merge(reference, loaded, source, target="the model"):
  """Checks `loaded` has exactly the keys and shapes of `reference`; returns it in its dtypes.

  Args:
    reference: pytree of arrays or ShapeDtypeStructs (e.g. `jax.eval_shape` of `init`).
    loaded: pytree of arrays read from `source`.
    source: what `loaded` came from (a path), named in the error.
  Returns:
    `loaded` as nested dicts of numpy arrays cast to the reference dtypes.
  """
  ref, got = flatten_tree(reference), flatten_tree(loaded)
  missing = [(k, _shape(ref[k])) for k in sorted(set(ref) - set(got))]
  unexpected = [(k, _shape(got[k])) for k in sorted(set(got) - set(ref))]
  misshaped = [(k, _shape(got[k]), _shape(ref[k])) for k in sorted(set(ref) & set(got))
               if _shape(got[k]) != _shape(ref[k])]
  if missing or unexpected or misshaped:
    raise mismatch_error(source, target, missing, unexpected, misshaped)
  return unflatten_tree({k: np.asarray(got[k]).astype(ref[k].dtype) for k in ref})


# ----------------------------------------------------------------------------- reading files


def _to_numpy(value):
  if hasattr(value, "detach"):  # torch.Tensor
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":
      value = value.float()
    return value.numpy()
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
  sd = {str(k): _to_numpy(v) for k, v in obj.items() if hasattr(v, "shape")}
  if sd and all(k.startswith("module.") for k in sd):  # saved from nn.DataParallel
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
    return load_torch_file_without_torch(path)
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
    return load_torch_file_without_torch(path)


# A restricted reader of torch.save files (zip and legacy formats) for machines without torch:
# only tensors, OrderedDicts, plain containers and numpy scalars are rebuilt.

_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": jnp.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType:

  def __init__(self, dtype):
    self.dtype = np.dtype(dtype)


def _rebuild_tensor(storage, offset, size, stride, *unused_args):
  if isinstance(storage, _LazyStorage):
    return _LazyTensor(storage, offset, size, stride)
  size, stride = tuple(size), tuple(stride)
  if not size:
    return storage[offset].copy()
  view = np.lib.stride_tricks.as_strided(
      storage[offset:], shape=size, strides=[s * storage.itemsize for s in stride])
  return np.array(view)


def _rebuild_parameter(data, *unused_args):
  return data


class _RestrictedUnpickler(pickle.Unpickler):
  """Rebuilds tensors as numpy arrays; refuses every other global."""

  def __init__(self, file, load_storage):
    super().__init__(file)
    self._load_storage = load_storage

  def find_class(self, module, name):
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(_STORAGE_DTYPES[name])
    allowed = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # how protocol-2 pickles store scalar bytes
        ("numpy.core.multiarray", "scalar"): getattr(np, "_core", np).multiarray.scalar,
        ("numpy._core.multiarray", "scalar"): getattr(np, "_core", np).multiarray.scalar,
    }
    if (module, name) not in allowed:
      raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
    return allowed[(module, name)]

  def persistent_load(self, pid):
    return self._load_storage(pid)


def load_torch_file_without_torch(path):
  """Reads a torch.save file (zip or legacy format) into numpy arrays without torch."""
  if zipfile.is_zipfile(path):
    with zipfile.ZipFile(path) as zf:
      pkl = next(n for n in zf.namelist() if n.endswith("data.pkl"))
      prefix = pkl[:-len("data.pkl")]

      def load_storage(pid):
        _, storage_type, key, _, numel = pid[:5]
        data = zf.read(f"{prefix}data/{key}")
        return np.frombuffer(data, storage_type.dtype, count=int(numel)).copy()

      return _RestrictedUnpickler(io.BytesIO(zf.read(pkl)), load_storage).load()
  with open(path, "rb") as f:
    return _load_legacy(f)


def _load_legacy(f):
  # Legacy (pre-1.6) layout: magic, protocol, sys_info, the object pickle (storages as
  # persistent ids), the list of storage keys, then each storage as int64 numel + raw bytes.
  # Tensors are rebuilt after the bytes are read, so the pickle yields placeholders first.
  plain = lambda: _RestrictedUnpickler(f, None).load()
  if plain() != 0x1950a86a20f9469cfc6c:
    raise ValueError("not a PyTorch file (bad magic number)")
  plain()  # protocol version
  plain()  # sys info
  dtypes = {}

  def load_storage(pid):
    _, storage_type, key, _, _, view = pid
    if view is not None:
      raise ValueError("storage views are not supported")
    dtypes[key] = storage_type.dtype
    return _LazyStorage(key)

  obj = _RestrictedUnpickler(f, load_storage).load()
  data = {}
  for key in plain():
    (numel,) = struct.unpack("<q", f.read(8))
    data[key] = np.frombuffer(f.read(numel * dtypes[key].itemsize), dtypes[key]).copy()
  return _resolve_lazy(obj, data)


class _LazyStorage:
  """A legacy storage whose bytes come after the object pickle."""

  def __init__(self, key):
    self.key = key


class _LazyTensor:

  def __init__(self, storage, offset, size, stride):
    self.args = (storage, offset, size, stride)


def _resolve_lazy(obj, data):
  if isinstance(obj, _LazyTensor):
    storage, offset, size, stride = obj.args
    return _rebuild_tensor(data[storage.key], offset, size, stride)
  if isinstance(obj, dict):
    return type(obj)((k, _resolve_lazy(v, data)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(_resolve_lazy(v, data) for v in obj)
  return obj


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
    for key, ref in flatten_tree(reference.get(collection, {})).items():
      path = tuple(key.split("/"))
      flat_ref[key_fn(path)] = (collection, path, ref)
  missing, misshaped, out = [], [], {}
  for tkey, (collection, path, ref) in sorted(flat_ref.items()):
    want = _torch_shape(path[-1], _shape(ref))
    if tkey not in state_dict:
      missing.append((tkey, want))
    elif _shape(state_dict[tkey]) != want:
      misshaped.append((tkey, _shape(state_dict[tkey]), want))
    else:
      out[collection + "/" + "/".join(path)] = _torch_to_flax(path[-1], state_dict[tkey])
  unexpected = [(k, _shape(v)) for k, v in sorted(state_dict.items())
                if k not in flat_ref and not ignore(k)]
  if missing or unexpected or misshaped:
    raise mismatch_error(source, target, missing, unexpected, misshaped)
  tree = unflatten_tree(out)
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
  state_dict = {k: _to_numpy(v) for k, v in state_dict.items()}

  def ignore(key):
    match = re.match(r"layer(\d+)\.", key)
    return (key.startswith("fc.") or key.endswith("num_batches_tracked")
            or (match is not None and int(match[1]) > num_stages))

  return convert_state_dict(backbone_shapes(arch, num_stages, width), state_dict,
                            flax_to_torch_key, source,
                            f"{arch} ({num_stages} stages, width {width})", ignore)


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
      return arch, float(_shape(stem)[0]) / 64.0
  raise ValueError(f"{source}: the keys under {prefix} are not a ResNet-18/34/50 to layer3 "
                   f"({kind} blocks per stage {blocks}).")


def official_to_variables(state_dict, source="official state dict"):
  """Official ASEN++ state dict (choices.global.* [+ choices.local.*]) -> (variables, info).

  The architecture (backbones, width, head dims) is read off the keys and shapes; info is
  {'num_attributes', 'stage' (1 = global only, 2 = global + local), 'model': {field: value}}.
  """
  sd = {k: _to_numpy(v) for k, v in state_dict.items()}
  if sd and all(k.startswith("module.") for k in sd):
    sd = {k[len("module."):]: v for k, v in sd.items()}
  gkey, lkey = _EMBED_KEY.format("global"), _EMBED_KEY.format("local")
  if gkey not in sd:
    raise ValueError(f"{source} is not an official ASEN++ state dict: it has no key {gkey}.")
  stage = 2 if any(k.startswith("choices.local.") for k in sd) else 1
  num_attributes, attr_dim = _shape(sd[gkey])
  fields = {"attr_dim": attr_dim}
  for branch in ("global", "local") if stage == 2 else ("global",):
    arch, width = _infer_backbone(sd, f"choices.{branch}.basenet.", source)
    fields[f"{branch}_backbone"] = arch
    fields["width"] = width
    head = f"choices.{branch}.attnnet."
    try:
      common_dim, channels = _shape(sd[head + "conv.weight"])[:2]
      hidden = _shape(sd[head + "fc1.weight"])[0]
      fields[f"{branch}_common_dim"] = common_dim
      fields["reduction"] = max(1, channels // hidden)
      fields["embed_dim"] = _shape(sd[head + "feature_fc.weight"])[0]
    except KeyError as e:
      raise ValueError(f"{source} lacks the head key {e.args[0]}; it is not an official "
                       "ASEN++ state dict.") from None
  if stage == 2 and lkey in sd:
    if _shape(sd[lkey]) != _shape(sd[gkey]) or not np.array_equal(sd[lkey], sd[gkey]):
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
