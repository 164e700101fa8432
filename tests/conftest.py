"""Test setup: 8 fake CPU devices, a persistent compile cache, parsed absl flags."""
import os
import tempfile

# Must happen before jax is imported anywhere; subprocesses (train.py runs) inherit these.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Identical computations (the same tiny model in several tests and processes) compile once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "asen_jax_test_jit_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402
from absl import flags  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# grain worker processes and absl-based modules expect parsed flags.
if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()

# The longest files first, so that pytest-xdist's two workers (`-n 2 --dist loadfile`) end together.
LONGEST_FIRST = ("test_gpu_check.py", "test_multiprocess.py", "test_learning.py", "test_train.py",
                 "test_faults.py", "test_train_parity.py", "test_cpu_ops.py", "test_extend.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: same order else
