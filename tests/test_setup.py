import jax


def test_eight_cpu_devices():
    assert jax.device_count() == 8


def _preloaded(env):
  """LD_PRELOAD as a child process sees it after allocator.preload()."""
  import os
  import subprocess
  import sys
  code = ("from asen_jax import allocator; allocator.preload(); import os; "
          "print(os.environ.get('LD_PRELOAD', ''))")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", code], cwd=root, env={**os.environ, **env},
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  return out.stdout.strip()


def test_entry_points_run_under_mimalloc_unless_told_not_to():
  from asen_jax import allocator
  lib = allocator.library()
  if lib is None:   # the wheel exists for Linux x86_64 only
    assert _preloaded({}) == ""
    return
  assert lib in _preloaded({"ASEN_JAX_MALLOC": ""}).split(":")
  assert _preloaded({"ASEN_JAX_MALLOC": "system", "LD_PRELOAD": ""}) == ""
