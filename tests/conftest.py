"""Test setup: 8 fake CPU devices, parsed absl flags, float32 matmuls."""
import os

# Must happen before jax is imported anywhere.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
from absl import flags  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# grain worker processes and absl-based modules expect parsed flags.
if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
