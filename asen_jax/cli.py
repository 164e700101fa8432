"""What the entry points share: flag parsing that answers a bad --config in one sentence, the
user errors and stops that end a run with one line, and writable-path checks."""
import importlib.util
import os
import re
import signal
import sys
import tempfile

from absl import app
from absl import flags
import ml_collections

from asen_jax.runs import Stopped

# What a user can cause (bad files, values, paths, a full disk): one line, no traceback.
RESUMES = ("train.py", "demo.py")   # entry points whose rerun continues where they stopped
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, FloatingPointError, OSError)


def _config_arg(argv):
  """The value of --config (or None) and the --config.<field>=<value> overrides in argv."""
  value, fields = None, []
  for i, arg in enumerate(argv[1:], 1):
    if arg.startswith("--config="):
      value = arg.split("=", 1)[1]
    elif arg == "--config" and i + 1 < len(argv):
      value = argv[i + 1]
    elif arg.startswith("--config."):
      fields.append(arg[len("--config."):].split("=", 1)[0])
  return value, fields


def _load_config(spec):
  """Runs <file>.py's get_config(<arg>) as config_flags will, to name a problem in a sentence."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    folder = os.path.dirname(path) or "."
    known = sorted(f for f in os.listdir(folder) if f.endswith(".py") and not f.startswith("_")) \
        if os.path.isdir(folder) else []
    raise ValueError(f"config file {path} does not exist; use configs/<dataset>.py:<stage>"
                     + (f" ({folder}/ holds {', '.join(known)})." if known else "."))
  module_spec = importlib.util.spec_from_file_location("_asen_config_check", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def _check_field(config, dotted):
  target = config
  for depth, name in enumerate(dotted.split(".")):
    where = ".".join(dotted.split(".")[:depth]) or "the config"
    if not isinstance(target, ml_collections.ConfigDict):
      raise ValueError(f"--config.{dotted}: {where} is a value, not a group of fields.")
    if name not in target:
      raise ValueError(f"--config.{dotted}: {where} has no field {name!r}; its fields are "
                       f"{', '.join(sorted(target.keys()))}.")
    target = target[name]


def parse_flags(argv, prog):
  """absl's flag parsing, but a bad --config (file, stage, field, value) is one sentence."""
  try:
    spec, fields = _config_arg(argv)
    if spec:
      sys.path.insert(0, os.getcwd())   # config files import `configs.common`
      config = _load_config(spec)
      for dotted in fields:
        _check_field(config, dotted)
    return flags.FLAGS(argv)
  except flags.Error as e:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    # config_flags wraps the config's own error in a traceback: its last line is the reason.
    reason = lines[-1] if lines else str(e)
    sys.exit(f"{prog}: {re.sub(r'^[A-Za-z]*Error: ', '', reason)}")
  except (ValueError, TypeError, OSError, ImportError, SyntaxError) as e:
    sys.exit(f"{prog}: {e}")


def run(main, prog):
  """app.run with one-sentence flag errors; user errors and stops end with one line."""
  def wrapped(argv):
    try:
      return main(argv)
    except Stopped as e:
      sys.exit(f"{prog}: {e}")
    except KeyboardInterrupt:
      sys.exit(f"{prog}: interrupted" + ("; run the same command again to resume from the last "
                                         "checkpoint." if prog in RESUMES else "."))
    except USER_ERRORS as e:
      sys.exit(f"{prog}: {e}")
  def terminate(signum, frame):
    del signum, frame
    # Outside training's loop (which saves first) there is nothing to save: one line, and out
    # at once (an exception raised here could land in a callback that swallows it).
    print(f"{prog}: stopped by SIGTERM; run the same command again to start over"
          + (" (training resumes from its last checkpoint)." if prog in RESUMES else "."),
          file=sys.stderr, flush=True)
    os._exit(128 + signal.SIGTERM)

  signal.signal(signal.SIGTERM, terminate)
  app.run(wrapped, flags_parser=lambda argv: parse_flags(argv, prog))


def check_writable(path, what, is_dir=True):
  """Creates `path` (or its parent folder) and proves a file can be written there."""
  folder = path if is_dir else (os.path.dirname(os.path.abspath(path)) or ".")
  try:
    os.makedirs(folder, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".write_check_"):
      pass
  except OSError as e:
    raise OSError(f"{what} {path} cannot be written ({e.strerror or e}); choose another path or "
                  "fix its permissions.") from None
