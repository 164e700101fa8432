"""The whole GPU check in one command: correctness, training step, evaluation, input pipeline.

  python bench/gpu_check.py --out DIR [--platform gpu|cpu] [--quick] [--budget_s 520]
      [--wheels .whl --target /tmp/asen_site]

--wheels installs the wheels that tools/gpu_wheels.sh downloaded (no network) into --target, which
every part then finds first on its path. Parts, in order, each in its own processes and each
given a share of the time left (one slow part cannot eat the others; a part that fails or runs
out of time is reported and the next one runs):
  env          versions, devices, CPU count
  data         the synthetic set (generated with every core) and its tfds build
  correctness  a short training run of both stages on --platform, then the test MAP of both
               checkpoints on the CPU in float32 and on --platform in float32 and bfloat16
  train_step   bench/train_step.py at paper size, both stages: the JAX step in bfloat16 and
               float32 at batch 16 and at the largest of --large_batches that fits, the PyTorch
               step in float32 and under autocast(bfloat16) at the same batches; MFU against
               the card's dense bf16 peak (FLOPs: the JAX step's HLO)
  embedding    bench/model_forward.py in bfloat16: the two branches, and a split embedded by image
  map_speed    bench/map_speed.py
  input        bench/input_pipeline.py at paper size over worker counts, against the triplets
               per second the bfloat16 step consumes
  tests        the model and training tests under the host's JAX (on its CPU, as conftest.py
               sets; beside data and correctness, ended before the timed parts); --quick:
               tests/test_losses.py, for the plumbing
Writes DIR/gpu_check.json (every figure) and DIR/gpu_check.log (every part's output).
--platform cpu --quick runs every part at tiny sizes on the CPU (tests/test_gpu_check.py).
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
# Datasheet dense bf16 tensor-core peaks (FLOP/s), matched against jax's device_kind.
BF16_PEAK = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
             ("GH200", 989e12), ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12))
MAP_TOLERANCE = {"float32": 0.1, "bfloat16": 0.5}   # MAP points against the CPU in float32
# Shares of the time left that each part may take.
SHARES = {"env": 0.3, "data": 0.5, "correctness": 3.5, "train_step": 5.0, "embedding": 0.8,
          "map_speed": 0.4, "input": 0.8}
PARTS = tuple(SHARES) + ("tests",)
TIMED = ("train_step", "embedding", "map_speed", "input")   # alone on the machine
BACKGROUND = "tests"


def bf16_peak(device_kind):
  for name, peak in BF16_PEAK:
    if name in device_kind:
      return peak
  return None


class Check:
  """Runs commands under time boxes, logs their output, and keeps the results."""

  def __init__(self, args):
    self.args = args
    self.deadline = time.monotonic() + args.budget_s
    os.makedirs(args.out, exist_ok=True)
    self.log = open(os.path.join(args.out, "gpu_check.log"), "w")
    self.lock = threading.Lock()
    self.work = tempfile.mkdtemp(prefix="asen_gpu_check_")
    self.env = dict(os.environ)
    # One device per process: the tests' 8 fake CPU devices would shard tiny batches.
    flags_ = [f for f in self.env.get("XLA_FLAGS", "").split()
              if not f.startswith("--xla_force_host_platform_device_count")]
    self.env["XLA_FLAGS"] = " ".join(flags_)
    self.env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(self.work, "jit_cache"))
    # Model init runs op by op: dozens of small compiles that the next process can reuse.
    self.env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    self.env["PYTHONUNBUFFERED"] = "1"
    if args.platform == "cpu":
      self.env["JAX_PLATFORMS"] = "cpu"
    self.results = {"platform": args.platform, "quick": args.quick, "budget_s": args.budget_s,
                    "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                    "parts": {}}

  def say(self, text):
    with self.lock:
      print(text, flush=True)
      self.log.write(text + "\n")
      self.log.flush()

  def left(self):
    return self.deadline - time.monotonic()

  def run(self, name, cmd, timeout, env=None):
    """Runs `cmd` for at most `timeout` s; returns {'rc', 'seconds', 'timed_out', 'tail'}."""
    timeout = max(1.0, timeout)
    self.say(f"$ [{name}, time box {timeout:.0f}s] {' '.join(cmd)}")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env or self.env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    tail = []

    def pump():
      for line in proc.stdout:
        self.say(f"  [{name}] {line.rstrip()}")
        tail.append(line.rstrip())
        del tail[:-40]

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
      proc.wait(timeout=timeout)
      timed_out = False
    except subprocess.TimeoutExpired:
      timed_out = True
      os.killpg(proc.pid, signal.SIGKILL)   # grain workers and all
      proc.wait()
    reader.join(timeout=5)
    seconds = time.monotonic() - t0
    self.say(f"  [{name}] -> {'TIMED OUT' if timed_out else f'exit {proc.returncode}'} "
             f"after {seconds:.1f}s")
    return {"rc": proc.returncode, "seconds": round(seconds, 1), "timed_out": timed_out,
            "tail": "\n".join(tail[-12:]) if timed_out or proc.returncode else "",
            "last_line": tail[-1] if tail else ""}

  def json_run(self, name, cmd, timeout, env=None):
    """Runs a command that writes --json FILE; returns (its JSON or None, the run record)."""
    path = os.path.join(self.work, f"{name}.json")
    if os.path.exists(path):
      os.remove(path)
    record = self.run(name, cmd + ["--json", path], timeout, env)
    data = None
    if record["rc"] == 0 and os.path.exists(path):
      with open(path) as f:
        data = json.load(f)
    return data, record

  def step(self, step, timeout, *extra, env=None, name=None):
    """This script's own child mode (--step): imports jax there, not here."""
    return self.json_run(name or step, [sys.executable, os.path.abspath(__file__), "--step", step,
                                "--work", self.work, "--platform", self.args.platform]
                         + (["--quick"] if self.args.quick else []) + list(extra),
                         timeout, env)

  def write(self):
    with self.lock, open(os.path.join(self.args.out, "gpu_check.json"), "w") as f:
      json.dump(self.results, f, indent=1)


# ---------------------------------------------------------------------------------------------
# The parts (parent side). Each returns its result dict; `box` is its time box in seconds.


def part_env(check, box):
  data, record = check.step("env", box)
  return {**(data or {}), "run": record}


def part_data(check, box):
  data, record = check.step("data", box)
  return {**(data or {}), "run": record}


def part_correctness(check, box):
  end = time.monotonic() + box
  out = {"tolerance": MAP_TOLERANCE, "runs": {}}
  train, out["runs"]["train"] = check.step("train", 0.6 * box)
  out["train"] = train
  if train is None:
    out["status"] = ("timed out" if out["runs"]["train"]["timed_out"] else "failed") + (
        ": training")
    return out
  maps = {}
  cpu_env = dict(check.env, JAX_PLATFORMS="cpu")
  # device_*: on --platform (with --platform cpu, a second CPU process: the plumbing only).
  evals = (("cpu_float32", "float32", cpu_env), ("device_float32", "float32", None),
           ("device_bfloat16", "bfloat16", None))
  if not check.args.quick:   # what TF32 (the GPU's default for float32 products) moves
    evals += (("device_float32_highest", "float32",
               dict(check.env, JAX_DEFAULT_MATMUL_PRECISION="highest")),)
  for i, (key, dtype, env) in enumerate(evals):
    timeout = (end - time.monotonic()) / (len(evals) - i)
    res, out["runs"][key] = check.step("eval", timeout, "--dtype", dtype, env=env,
                                       name=f"eval_{key}")
    maps[key] = res
  out["map"] = maps
  ref = maps.get("cpu_float32")
  diffs, ok = {}, bool(ref)
  for dtype in ("float32", "bfloat16"):
    other = maps.get(f"device_{dtype}")
    if not (ref and other):
      ok = False
      continue
    diffs[dtype] = {k: abs(other[k] - ref[k]) for k in ref if k in other}
    ok = ok and all(d <= MAP_TOLERANCE[dtype] for d in diffs[dtype].values())
  out["map_difference"] = diffs
  out["pass"] = ok
  return out


def _fit_batch(info, candidates, small_batch):
  """The largest candidate batch whose memory, scaled from the small batch's, fits 90 % of the
  device; the largest candidate where the device reports no limit (the CPU)."""
  limit = info.get("device_bytes_limit")
  if not limit or info.get("temp_bytes") is None:
    return max(candidates)
  fixed = info["argument_bytes"] + info["output_bytes"] - info["alias_bytes"]
  for b in sorted(candidates, reverse=True):
    # The batch is a small part of the arguments; the activations (temp) scale with it.
    if fixed + info["temp_bytes"] * b / small_batch <= 0.9 * limit:
      return b
  return min(candidates)


def part_train_step(check, box):
  args = check.args
  end = time.monotonic() + box
  size, stages = ("tiny", "global") if args.quick else ("paper", "global,joint")
  small = 4 if args.quick else 16
  large = [int(b) for b in args.large_batches.split(",")]
  steps = "1" if args.quick else str(args.steps)
  # JAX allocates as it goes, so that a PyTorch step in the same process finds memory too.
  env = dict(check.env, XLA_PYTHON_CLIENT_PREALLOCATE="false",
             XLA_PYTHON_CLIENT_MEM_FRACTION="0.9")
  torch_device = "cpu" if args.platform == "cpu" else "cuda"
  base = [sys.executable, os.path.join(BENCH, "train_step.py"), "--sizes", size, "--stages",
          stages, "--steps", steps]
  runs, records, chosen = [], {}, {}

  def launch(key, flags, share):
    timeout = (end - time.monotonic()) * share
    if timeout < 10:
      records[key] = {"skipped": "time box spent"}
      return None
    data, records[key] = check.json_run(f"train_step_{key}", base + flags, timeout, env)
    if data:
      runs.extend(data["results"])
      runs_meta.update({k: data[k] for k in ("jax", "device", "backend")})
    return data

  runs_meta = {}
  # In order of what the verdicts need: bf16 and PyTorch at both batches first, float32 last.
  # At the large batch each PyTorch path has its own process: float32 may not fit.
  # Weights: a JAX run compiles two steps, a PyTorch run compiles nothing. The first three runs
  # (the verdicts') share the time box; the float32 ones get what they leave. At batch 16 the
  # PyTorch steps run in the JAX step's process, interleaved with it; at the large batch each
  # has its own (float32 may not fit).
  plan = [("bfloat16", small, 4), ("bfloat16", "large", 3), ("torch_bf16", "large", 1),
          ("float32", small, 3), ("float32", "large", 3),
          ("torch_fp32", "large", 1)][:3 if args.quick else 6]
  torch_paths = {"torch_bf16": "torch_bf16", "torch_fp32": "torch"}
  for i, (what, batch, weight) in enumerate(plan):
    group = plan[i:3] if i < 3 else plan[i:]
    share = weight / sum(w for _, _, w in group)
    dtype = "bfloat16" if what in torch_paths else what
    if batch == "large":
      small_run = [r for r in runs if r["dtype"] == dtype and r["batch_size"] == small
                   and r["path"] == "xla" and r["stage"] == stages.split(",")[-1]]
      if not small_run:
        records[f"{what}_large"] = {"skipped": f"no {dtype} run at batch {small} to size it"}
        continue
      batch = chosen.setdefault(dtype, _fit_batch(small_run[0], large, small))
    key = f"{what}_{batch}"
    paths = torch_paths.get(what, "xla,torch,torch_bf16" if (what, batch) == ("bfloat16", small)
                            else "xla")
    flags = ["--paths", paths, "--dtype", dtype, "--batch_size", str(batch),
             "--torch_device", torch_device]
    data = launch(key, flags, share)
    # Out of memory despite the estimate: one smaller batch, if any.
    if data is None and what not in torch_paths and batch in large and batch != min(large):
      smaller = max(b for b in large if b < batch)
      chosen[dtype] = smaller
      launch(f"{what}_{smaller}", flags[:-4] + ["--batch_size", str(smaller)] + flags[-2:],
             share)
  out = {"size": size, "runs": runs, "records": records, "large_batch": chosen, **runs_meta}
  out.update(summarise_steps(runs, small, chosen, runs_meta.get("device", "")))
  return out


def summarise_steps(runs, small, chosen, device_kind):
  """Per stage and batch: each path's triplets/s, its ratio to PyTorch, and MFU."""
  peak = bf16_peak(device_kind)
  table = []
  by = {(r["stage"], r["batch_size"], r["path"], r["dtype"] if r["path"] == "xla" else ""): r
        for r in runs}
  flops = {(r["stage"], r["batch_size"]): r.get("flops") for r in runs if r["path"] == "xla"}
  for (stage, batch, path, dtype), r in sorted(by.items(), key=lambda kv: str(kv[0])):
    torch32 = by.get((stage, batch, "torch", ""))
    autocast = by.get((stage, batch, "torch_bf16", ""))
    f = flops.get((stage, batch))
    row = {"stage": stage, "batch": batch, "path": path if path != "xla" else f"jax_{dtype}",
           "steps_per_s": r["steps_per_s"], "triplets_per_s": r["triplets_per_s"],
           "compile_s": r["compile_s"],
           "vs_torch_fp32": r["triplets_per_s"] / torch32["triplets_per_s"] if torch32 else None,
           "vs_torch_autocast": (r["triplets_per_s"] / autocast["triplets_per_s"]
                                 if autocast else None),
           "mfu_bf16_peak": f / r["step_s"] / peak if f and peak else None}
    table.append(row)
  verdicts = {}
  for stage in sorted({r["stage"] for r in runs}):
    at16 = by.get((stage, small, "xla", "bfloat16"))
    t16 = by.get((stage, small, "torch", ""))
    if at16 and t16:
      ratio = at16["triplets_per_s"] / t16["triplets_per_s"]
      verdicts[f"{stage}_bf16_b{small}_vs_torch_fp32"] = {"ratio": ratio, "holds": ratio >= 2}
    big = chosen.get("bfloat16")
    atl, tl = by.get((stage, big, "xla", "bfloat16")), by.get((stage, big, "torch_bf16", ""))
    if atl and tl:
      ratio = atl["triplets_per_s"] / tl["triplets_per_s"]
      verdicts[f"{stage}_bf16_b{big}_vs_torch_autocast"] = {"ratio": ratio, "holds": ratio >= 1}
  return {"table": table, "verdicts": verdicts, "bf16_peak_flops": peak}


def part_embedding(check, box):
  args = check.args
  size = "demo" if args.quick else "paper"
  forward = ["--batch", "4", "--iters", "2"] if args.quick else ["--batch", "128", "--iters", "10"]
  split = (["--split_images", "8", "--eval_batch", "8", "--reps", "1", "--stage", "global"]
           if args.quick else ["--split_images", "128", "--eval_batch", "64", "--reps", "2"])
  cmd = [sys.executable, os.path.join(BENCH, "model_forward.py"), "--dtype", "bfloat16",
         "--size", size]
  fwd, r1 = check.json_run("embedding_forward", cmd + forward, 0.4 * box)
  spl, r2 = check.json_run("embedding_split", cmd + split, box - r1["seconds"])
  return {"forward": fwd, "split": spl, "runs": {"forward": r1, "split": r2}}


def part_map_speed(check, box):
  extra = (["--dim", "64", "--repeats", "1", "--ref_queries", "50"] if check.args.quick else [])
  data, record = check.json_run("map_speed", [sys.executable, os.path.join(BENCH,
                                                                           "map_speed.py")]
                                + extra, box)
  return {**(data or {}), "run": record}


def part_input(check, box):
  args = check.args
  cpus = os.cpu_count() or 1
  if args.quick:
    sizes = ["--image_size", "32", "--hires_size", "64", "--batch_size", "4", "--steps", "3",
             "--warmup", "1", "--workers", "0", "1"]
  else:
    sizes = ["--image_size", "224", "--hires_size", "448", "--batch_size", "64", "--steps",
             "10", "--warmup", "2", "--workers"] + [str(w) for w in sorted({cpus // 2, cpus})]
  data, record = check.json_run("input", [sys.executable, os.path.join(BENCH,
                                                                       "input_pipeline.py"),
                                          "--root", os.path.join(check.work, "data")] + sizes,
                                box, dict(check.env, JAX_PLATFORMS="cpu"))
  out = {**(data or {}), "run": record}
  steps = check.results["parts"].get("train_step", {}).get("table", [])
  need = max((r["triplets_per_s"] for r in steps if r["path"] == "jax_bfloat16"), default=None)
  if data and need:
    best = max(data["rates"], key=lambda r: r["triplets_per_s"])
    out["fed"] = {"step_triplets_per_s": need, "pipeline_triplets_per_s":
                  best["triplets_per_s"], "workers": best["workers"],
                  "ratio": best["triplets_per_s"] / need,
                  "holds": best["triplets_per_s"] >= need}
  return out


def part_tests(check, box):
  import importlib.util  # pylint: disable=g-import-not-at-top
  files = (["tests/test_losses.py"] if check.args.quick else
           ["tests/test_model.py", "tests/test_resnet.py", "tests/test_roi.py",
            "tests/test_train.py"])
  cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"] + files
  if not check.args.quick and importlib.util.find_spec("xdist"):
    cmd += ["-n", str(min(8, os.cpu_count() or 1))]
  record = check.run("tests", cmd, box)
  return {"files": files, "run": record, "summary": record["last_line"]}


RUNNERS = {"env": part_env, "data": part_data, "correctness": part_correctness,
           "train_step": part_train_step, "embedding": part_embedding,
           "map_speed": part_map_speed, "input": part_input, "tests": part_tests}


def install(check, args):
  """pip-installs the carried wheels into --target, without the network."""
  wheels = sorted(os.path.join(args.wheels, w) for w in os.listdir(args.wheels)
                  if w.endswith(".whl"))
  record = check.run("install", [sys.executable, "-m", "pip", "install", "-q", "--no-index",
                                 "--no-deps", "--no-compile", "--no-cache-dir", "--upgrade",
                                 "--target", args.target] + wheels, 120)
  paths = [args.target] + [p for p in check.env.get("PYTHONPATH", "").split(os.pathsep) if p]
  check.env["PYTHONPATH"] = os.pathsep.join(paths)
  return {"wheels": len(wheels), **record}


def run_part(check, part, box):
  """Runs one part under its time box; stores and returns its result with status and seconds."""
  check.say(f"=== {part} (time box {box:.0f}s of {check.left():.0f}s left)")
  t0 = time.monotonic()
  try:
    result = RUNNERS[part](check, box)
    runs = [r for r in _records(result) if isinstance(r, dict) and "rc" in r]
    failed = [r for r in runs if r["rc"] or r["timed_out"]]
    status = result.pop("status", None) or ("ok" if not failed else
                                            "timed out" if any(r["timed_out"] for r in failed)
                                            else "failed")
  except Exception as e:  # pylint: disable=broad-except
    result, status = {"error": repr(e)}, "failed"
  result["status"] = status
  result["seconds"] = round(time.monotonic() - t0, 1)
  with check.lock:
    check.results["parts"][part] = result
  return result


def main_parent(args):
  check = Check(args)
  t_start = time.monotonic()
  if args.wheels:
    check.results["install"] = install(check, args)
  chosen = args.parts.split(",")
  parts = [p for p in PARTS if p in chosen and p != BACKGROUND]
  background = None
  for i, part in enumerate(parts):
    if part in TIMED and background:
      background.join()   # nothing else on the CPU while the timed parts run
      background = None
    left = check.left()
    box = left * SHARES[part] / sum(SHARES[p] for p in parts[i:])
    run_part(check, part, box)
    check.write()
    if part == "env" and BACKGROUND in chosen:
      # The tests need no GPU: they run beside the untimed parts and end before the timed ones.
      untimed = [p for p in parts[i + 1:] if p not in TIMED]
      tests_box = (check.left() * sum(SHARES[p] for p in untimed)
                   / sum(SHARES[p] for p in parts[i + 1:]))
      background = threading.Thread(target=run_part, args=(check, BACKGROUND, tests_box))
      background.start()
  if background:
    background.join()
  if BACKGROUND in chosen and "env" not in chosen:
    run_part(check, BACKGROUND, check.left())
  check.results["parts"] = {p: check.results["parts"][p] for p in PARTS
                            if p in check.results["parts"]}
  check.results["total_s"] = round(time.monotonic() - t_start, 1)
  check.write()
  check.say(summary(check.results))
  check.log.close()
  shutil.rmtree(check.work, ignore_errors=True)
  return 0


def _records(result):
  for key in ("run", "runs", "records"):
    value = result.get(key)
    if isinstance(value, dict) and "rc" in value:
      yield value
    elif isinstance(value, dict):
      yield from value.values()


def summary(results):
  """A few lines for the log's end: each part's status and the verdicts."""
  lines = [f"=== summary ({results['platform']}{', quick' if results['quick'] else ''}, "
           f"{results.get('total_s')}s)"]
  for name, part in results["parts"].items():
    lines.append(f"{name:12s} {part['status']:10s} {part['seconds']:7.1f}s")
  env = results["parts"].get("env", {})
  if env.get("devices"):
    lines.append(f"device: {env['devices'][0]}; jax {env.get('versions', {}).get('jax')}")
  corr = results["parts"].get("correctness", {})
  for key, maps in (corr.get("map") or {}).items():
    if maps:
      lines.append(f"MAP {key:16s} " + "  ".join(f"{k} {v:.2f}" for k, v in maps.items()))
  if "pass" in corr:
    lines.append(f"MAP agreement within {MAP_TOLERANCE}: {corr['pass']}")
  for row in results["parts"].get("train_step", {}).get("table", []):
    fmt = lambda x, f: "-" if x is None else format(x, f)
    lines.append(f"step {row['stage']:6s} b{row['batch']:<4d} {row['path']:13s} "
                 f"{row['steps_per_s']:8.2f} steps/s {row['triplets_per_s']:9.1f} triplets/s "
                 f"x{fmt(row['vs_torch_fp32'], '.2f')} torch fp32, "
                 f"x{fmt(row['vs_torch_autocast'], '.2f')} autocast, "
                 f"MFU {fmt(row['mfu_bf16_peak'], '.1%')}")
  for name, v in results["parts"].get("train_step", {}).get("verdicts", {}).items():
    lines.append(f"{name}: {v['ratio']:.2f}x ({'holds' if v['holds'] else 'does not hold'})")
  emb = results["parts"].get("embedding", {})
  if emb.get("forward"):
    lines.append("embedding (bf16): " + ", ".join(
        f"{m} {emb['forward'][m]['images_per_s']:.0f} images/s"
        for m in ("embed_global", "embed_local")) + (
            f"; split by image {emb['split']['images_per_s']:.1f} images/s"
            if emb.get("split") else ""))
  ms = results["parts"].get("map_speed", {})
  if "steady_s" in ms:
    lines.append(f"map_speed: {ms['steady_s']:.3f}s steady ({ms['queries']} x "
                 f"{ms['candidates']}), NumPy {ms['numpy_s']:.2f}s")
  inp = results["parts"].get("input", {})
  for r in inp.get("rates", []):
    lines.append(f"input workers={r['workers']}: {r['images_per_s']:.0f} images/s "
                 f"({r['triplets_per_s']:.1f} triplets/s)")
  if results["parts"].get("tests"):
    lines.append(f"tests: {results['parts']['tests'].get('summary')}")
  if "fed" in inp:
    fed = inp["fed"]
    lines.append(f"fed: pipeline {fed['pipeline_triplets_per_s']:.1f} vs bf16 step "
                 f"{fed['step_triplets_per_s']:.1f} triplets/s -> "
                 f"{'fed' if fed['holds'] else 'NOT fed'}")
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Child mode (--step): runs in its own process, with jax.


def _write(args, data):
  with open(args.json, "w") as f:
    json.dump(data, f, indent=1)


def step_env(args):
  import importlib.metadata as md  # pylint: disable=g-import-not-at-top
  import platform  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  versions = {"python": platform.python_version()}
  for name in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax",
               "orbax-checkpoint", "numpy", "pillow", "torch", "torchvision", "grain",
               "tensorflow-datasets", "array-record", "ml-collections", "tensorboardX",
               "protobuf", "etils"):
    try:
      versions[name] = md.version(name)
    except md.PackageNotFoundError:
      versions[name] = None
  data = {"versions": versions, "backend": jax.default_backend(),
          "devices": [f"{d.platform}: {d.device_kind}" for d in jax.devices()],
          "cpus": os.cpu_count()}
  try:
    import torch  # pylint: disable=g-import-not-at-top
    data["torch_cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
  except ImportError:
    data["torch_cuda"] = None
  if shutil.which("nvidia-smi"):
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                          "--format=csv,noheader"], capture_output=True, text=True)
    data["nvidia_smi"] = smi.stdout.strip()
  if args.platform == "gpu" and jax.default_backend() != "gpu":
    raise SystemExit(f"gpu_check: --platform gpu, but JAX's backend is "
                     f"{jax.default_backend()!r}; is jax's CUDA plugin installed?")
  print(json.dumps(data, indent=1))
  _write(args, data)


def _data_root(args):
  return os.path.join(args.work, "data")


def _correctness_configs(args):
  """(global, joint) configs of the correctness run: the demo's model from the shipped stand-in
  for ImageNet weights, a short run; tests/tiny_synthetic.py's model with --quick."""
  from asen_jax import end_to_end  # pylint: disable=g-import-not-at-top
  from configs import common  # pylint: disable=g-import-not-at-top
  from configs import synthetic as synthetic_config  # pylint: disable=g-import-not-at-top
  root = _data_root(args)
  configs = []
  for stage in ("global", "joint"):
    c = synthetic_config.get_config(stage)
    fields = {"data.root": root, "data.tfds_dir": os.path.join(root, "tfds"),
              "train.triplets_per_epoch": 100_000, "train.log_every": 50,
              "train.checkpoint_every": 10_000}
    if args.quick:
      fields.update({"model.global_backbone": "resnet18", "model.local_backbone": "resnet18",
                     "data.image_size": 32, "data.hires_size": 64, "model.local_size": 32,
                     "model.width": 0.0625, "model.attr_dim": 16, "model.global_common_dim": 16,
                     "model.local_common_dim": 8, "model.embed_dim": 32, "train.batch_size": 4,
                     "eval.batch_size": 8, "train.max_steps": 2, "train.log_every": 1})
    else:
      fields["train.max_steps"] = 150 if stage == "global" else 80
      fields[f"model.init_backbones.{stage if stage == 'global' else 'local'}_file"] = (
          end_to_end.SHIPPED_BACKBONE)
    configs.append(common.apply_overrides(c, fields))
  return configs


def step_data(args):
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.FLAGS.mark_as_parsed()
  from asen_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from asen_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  sizes = (dict(num_train=24, num_valid=8, num_test=12) if args.quick
           else dict(num_train=1000, num_valid=100, num_test=400))
  t0 = time.perf_counter()
  synthetic.generate(_data_root(args), seed=0, workers=os.cpu_count() or 1, **sizes)
  gen_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  data_lib.prepare_dataset(_correctness_configs(args)[0], verbose=False)
  _write(args, {**sizes, "generate_s": gen_s, "build_s": time.perf_counter() - t0})


def step_train(args):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  flags.FLAGS.mark_as_parsed()
  logging.set_verbosity(logging.ERROR)
  import jax  # pylint: disable=g-import-not-at-top
  from asen_jax import trainer  # pylint: disable=g-import-not-at-top
  config_g, config_j = _correctness_configs(args)
  out, t0 = {"backend": jax.default_backend()}, time.perf_counter()
  trainer.train_and_evaluate(config_g, os.path.join(args.work, "global"))
  out["global_s"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  trainer.train_and_evaluate(config_j, os.path.join(args.work, "joint"),
                             init_from=os.path.join(args.work, "global"))
  out["joint_s"] = time.perf_counter() - t0
  out["steps"] = {"global": config_g.train.max_steps, "joint": config_j.train.max_steps}
  _write(args, out)


def step_eval(args):
  """Test MAP (%) of both checkpoints in --dtype on this process's backend."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  flags.FLAGS.mark_as_parsed()
  logging.set_verbosity(logging.ERROR)
  import jax  # pylint: disable=g-import-not-at-top
  from asen_jax import evaluation  # pylint: disable=g-import-not-at-top
  out = {}
  for config in _correctness_configs(args):
    config.model.compute_dtype = args.dtype
    res = evaluation.run_evaluation(config, os.path.join(args.work, config.stage), "test")
    out[config.stage] = res["map_overall"]
    if "global_branch" in res:
      out["joint_global_branch"] = res["global_branch"]["map_overall"]
  print(f"{jax.default_backend()} {args.dtype}: " + ", ".join(f"{k} {v:.4f}"
                                                              for k, v in out.items()))
  _write(args, out)


STEPS = {"env": step_env, "data": step_data, "train": step_train, "eval": step_eval}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", help="folder for gpu_check.json and gpu_check.log")
  p.add_argument("--platform", choices=("gpu", "cpu"), default="gpu")
  p.add_argument("--quick", action="store_true", help="tiny sizes: the test's run on a CPU")
  p.add_argument("--budget_s", type=float, default=520,
                 help="seconds for all parts together, install included")
  p.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of " +
                 ", ".join(PARTS))
  p.add_argument("--large_batches", default="256,128,64",
                 help="the large batch: the largest of these that fits")
  p.add_argument("--steps", type=int, default=5, help="timed training steps per run")
  p.add_argument("--wheels", default="", help="folder of wheels to install first (no network)")
  p.add_argument("--target", default=os.path.join(tempfile.gettempdir(), "asen_site"),
                 help="where --wheels go")
  # Child mode.
  p.add_argument("--step", choices=tuple(STEPS), help=argparse.SUPPRESS)
  p.add_argument("--work", help=argparse.SUPPRESS)
  p.add_argument("--json", help=argparse.SUPPRESS)
  p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.step:
    sys.path.insert(0, ROOT)
    return STEPS[args.step](args)
  if not args.out:
    p.error("--out is required")
  if args.quick and args.large_batches == p.get_default("large_batches"):
    args.large_batches = "8"
  return main_parent(args)


if __name__ == "__main__":
  sys.exit(main())
