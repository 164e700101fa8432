"""Runs the entry points under mimalloc, which keeps the step's large buffers between steps.

With glibc's malloc every step maps and unmaps its activations and the kernel zeroes their pages
again: on 2 CPU cores that was about half of a training step (docs/speed.md). The library has
to be loaded before the process starts, so `preload()` re-executes the process once with
LD_PRELOAD set. No effect where the wheel (cmeel-mimalloc, Linux x86_64) is not installed, or
with ASEN_JAX_MALLOC=system.
"""
import os
import sys
import sysconfig

ENV = "ASEN_JAX_MALLOC"
# Freed memory stays with the process instead of going back to the kernel after 10 ms.
OPTIONS = {"MIMALLOC_PURGE_DELAY": "-1"}


def library():
  """Path of the installed libmimalloc.so, or None."""
  for key in ("purelib", "platlib"):
    path = os.path.join(sysconfig.get_paths()[key], "cmeel.prefix", "lib", "libmimalloc.so")
    if os.path.exists(path):
      return path
  return None


def preload():
  """Re-executes this process with mimalloc preloaded, once; returns if it cannot or need not."""
  lib = library()
  if (sys.platform != "linux" or os.environ.get(ENV) in ("system", "mimalloc") or lib is None
      or lib in os.environ.get("LD_PRELOAD", "")):
    return
  env = dict(os.environ, LD_PRELOAD=":".join(p for p in (lib, os.environ.get("LD_PRELOAD"))
                                                if p))
  for k, v in OPTIONS.items():
    env.setdefault(k, v)
  env[ENV] = "mimalloc"
  sys.stdout.flush()
  sys.stderr.flush()
  # orig_argv keeps `-m module` and interpreter flags as they were given.
  os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], env)
