"""Several processes (hosts) as one JAX program: the entry points' cluster flags.

A bare `--distributed` lets JAX read the cluster from the environment (SLURM, Open MPI, TPU pods);
`--coordinator_address`, `--num_processes` and `--process_id` name it where nothing sets the
environment. Between CPU processes the collectives run over gloo. If a process dies, the others
stop after `--heartbeat_timeout` seconds (JAX's coordination service) instead of waiting forever
inside a collective.
"""
from absl import flags
from absl import logging
import jax

_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Run as one of several processes (hosts): jax.distributed.initialize(). "
    "Alone it reads the cluster from the environment (SLURM, Open MPI, TPU pods).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0's coordinator, the same on every "
    "process (implies --distributed).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (with "
                                      "--coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0 .. "
                                   "num_processes - 1 (with --coordinator_address).")
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout", 60, "Seconds without a heartbeat after which a process counts as dead "
    "and the others stop (the run resumes from its last checkpoint when started again).")

EXPLICIT = ("coordinator_address", "num_processes", "process_id")


def cluster_args(coordinator_address, num_processes, process_id):
  """Checks the explicit cluster flags: all three or none; returns initialize()'s kwargs."""
  given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
           "process_id": process_id}
  missing = [f"--{k}" for k, v in given.items() if v is None]
  if len(missing) == len(given):
    return {}
  if missing:
    raise ValueError(f"{', '.join(missing)} missing: pass --coordinator_address, --num_processes "
                     "and --process_id together (or none of them, with --distributed, where the "
                     "cluster sets the environment).")
  if ":" not in coordinator_address:
    raise ValueError(f"--coordinator_address={coordinator_address} needs a port, e.g. "
                     "10.0.0.1:1234 (process 0's address, the same on every process).")
  if num_processes < 1 or not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id={process_id} must be in 0..{num_processes - 1} for "
                     f"--num_processes={num_processes}.")
  return given


def initialize_from_flags():
  """jax.distributed.initialize() as the flags say; nothing without them. Before any JAX work."""
  explicit = cluster_args(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if not (explicit or _DISTRIBUTED.value):
    return
  # CPU processes need a cross-process collectives library; GPU/TPU ignore this setting.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  # An unreachable coordinator aborts the process from C++ after a while; say what it waited for.
  logging.info("Joining the cluster at %s as process %s of %s.",
               explicit.get("coordinator_address", "the environment's coordinator"),
               explicit.get("process_id", "?"), explicit.get("num_processes", "?"))
  jax.distributed.initialize(**explicit, heartbeat_timeout_seconds=_HEARTBEAT.value)
  logging.info("Process %d of %d; %d local of %d devices.", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def failure_sentence(error, again):
  """One sentence for a runtime error of a run of several processes (a collective fails when a
  partner dies: 'Connection reset by peer'); None with one process, where it stays an error."""
  if jax.process_count() == 1:
    return None
  lines = str(error).strip().splitlines()
  return (f"{lines[0] if lines else type(error).__name__}. With {jax.process_count()} processes "
          f"this usually means that another one stopped; {again}")
