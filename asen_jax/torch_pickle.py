"""torch.save files (zip and legacy formats) read into numpy without torch.

Only tensors, OrderedDicts, plain containers and numpy scalars are rebuilt; every other pickled
global is refused, so a weight file cannot run code.
"""
import codecs
import collections
import io
import pickle
import struct
import zipfile

import jax.numpy as jnp
import numpy as np

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


def load(path):
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
