"""Data parallelism: one 'data' mesh axis over every device of every process.

The batch is sharded on 'data', the training state is replicated; `jax.jit` inserts the
collectives (BatchNorm statistics and gradients are reduced over the global batch), so the same
code runs on one CPU, eight GPUs or many TPU hosts.
"""
import itertools
import logging

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np


def make_mesh(devices=None):
  """A 1-D 'data' mesh over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else devices
  # Auto axes: jit propagates the batch sharding; model code stays sharding-agnostic.
  return jax.sharding.Mesh(np.asarray(devices), ("data",),
                           axis_types=(jax.sharding.AxisType.Auto,))


def batch_sharding(mesh):
  return NamedSharding(mesh, P("data"))


def replicated(mesh):
  return NamedSharding(mesh, P())


def check_batch_size(batch_size, name="train.batch_size", mesh=None):
  """The global batch must split evenly over devices (and so over processes)."""
  n = mesh.size if mesh is not None else jax.device_count()
  if batch_size % n:
    raise ValueError(f"Config {name}={batch_size} is not divisible by the {n} devices; "
                     f"use a multiple of {n}, e.g. {name}={max(n, batch_size // n * n)}.")


def shard_batch(mesh, local_arrays):
  """Process-local numpy arrays (leading batch axis) -> global arrays sharded on 'data'."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_arrays)


def replicate(mesh, tree):
  """Puts a host tree on every device (the same values on every process)."""
  return jax.device_put(tree, replicated(mesh))


class _DropLibraryInfo(logging.Filter):
  """Hides orbax/grain INFO chatter (every save logs a dozen lines); warnings still show."""

  def filter(self, record):
    noisy = any(s in record.pathname for s in ("/orbax/", "/grain/", "/etils/"))
    return not (noisy and record.levelno < logging.WARNING)


def quiet_library_logs():
  for handler in logging.getLogger().handlers + logging.getLogger("absl").handlers:
    handler.addFilter(_DropLibraryInfo())
  logging.getLogger("absl").addFilter(_DropLibraryInfo())


# A dataset build can take hours: the others wait on the coordination service's key-value store
# that long (a collective such as multihost_utils.sync_global_devices would time out first).
WAIT_MS = 24 * 3600 * 1000
_CALLS = itertools.count()


def process0_first(fn, name):
  """Runs fn on process 0, then on the others: e.g. building a dataset on a shared filesystem
  once instead of racing (without a shared one, each host builds its own). An error on process 0
  stops every process with its message."""
  if jax.process_count() == 1:
    return fn()
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  client = distributed.global_state.client
  key = f"asen_jax/process0_first/{name}/{next(_CALLS)}"
  if jax.process_index() == 0:
    try:
      out = fn()
    except Exception as e:
      client.key_value_set(key, f"{type(e).__name__}: {e}")
      raise
    client.key_value_set(key, "")
    return out
  failed = client.blocking_key_value_get(key, WAIT_MS)
  if failed:
    raise ValueError(f"process 0 failed in {name}: {failed}")
  return fn()


def put_global(mesh, tree):
  """Host arrays that every process holds whole (leading batch axis) -> arrays sharded on
  'data', each process placing only its own devices' rows."""
  sharding = batch_sharding(mesh)

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return jax.tree.map(put, tree)


def to_host(tree):
  """Device arrays -> numpy on every process; with several processes the rows other processes
  hold are gathered."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return multihost_utils.process_allgather(tree, tiled=True)
