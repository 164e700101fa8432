"""Times the jitted training step side by side with the PyTorch reference step, in one process.

  python bench/train_step.py [--sizes paper,synthetic] [--stages global,joint,extend] [--steps 5]
      [--paths fast,xla,torch] [--bn_stats per_role] [--torch_device cuda] [--json FILE]

paper: batch 16 triplets, 224 global view (448 hires view), 112 RoI crop, ResNet-50/34
(FashionAI config). synthetic: configs/synthetic.py. Batches are random uint8 images (no input
pipeline; bench/input_pipeline.py measures that), so this is the model + RoI + optimiser cost.
Paths, timed in turn so that all see the same machine:
  fast   the JAX step (cpu_ops' backward passes on the CPU: config.model.fast_cpu_backward)
  xla    the JAX step with XLA's own gradients (fast_cpu_backward=False)
  torch  the official trainer's structure (tests/torch_train_reference.py): anchors, positives
         and negatives as three forwards per branch, Adam; stage 2 crops each RoI from the
         hires view with F.interpolate around the attention map's largest cell.
  torch_bf16  the same under torch.autocast(bfloat16).
--json writes every timing with the JAX step's FLOPs (its HLO before optimisation) and memory
(bench/gpu_check.py reads it). size tiny: tests/tiny_synthetic.py's model, for quick checks.
Stage extend (asen_jax/extend.py: one new attribute's table row trains on a joint model, all
else frozen) has no PyTorch counterpart; its step is set against the joint step's.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from asen_jax import allocator  # noqa: E402

allocator.preload()   # before jax starts: see asen_jax/allocator.py
import json  # noqa: E402
import time  # noqa: E402

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from asen_jax import extend  # noqa: E402
from asen_jax import model as model_lib  # noqa: E402
from asen_jax import parallel  # noqa: E402
from asen_jax import trainer  # noqa: E402
from asen_jax.data import synthetic as synthetic_data  # noqa: E402
from configs import fashionai  # noqa: E402
from configs import synthetic  # noqa: E402

_SIZES = flags.DEFINE_list("sizes", ["paper", "synthetic"], "paper, synthetic and/or tiny")
_STAGES = flags.DEFINE_list("stages", ["global", "joint", "extend"],
                            "global, joint and/or extend")
_STEPS = flags.DEFINE_integer("steps", 5, "timed steps after the first (compiling) one")
_BATCH = flags.DEFINE_integer("batch_size", 16, "triplets per step")
_DTYPE = flags.DEFINE_string("dtype", "float32", "compute dtype (bfloat16 on GPU/TPU)")
_BN_STATS = flags.DEFINE_string("bn_stats", "per_role", "train.bn_stats of the JAX step")
_PATHS = flags.DEFINE_list("paths", ["fast", "xla", "torch"],
                           "fast, xla, torch and/or torch_bf16")
_TORCH_DEVICE = flags.DEFINE_string("torch_device", "cpu", "device of the PyTorch step (cuda)")
_JSON = flags.DEFINE_string("json", "", "also write the results to this JSON file")
TORCH_PATHS = ("torch", "torch_bf16")
# tests/tiny_synthetic.py's sizes: the whole benchmark in seconds on a CPU.
TINY = {"global_backbone": "resnet18", "local_backbone": "resnet18", "width": 0.0625,
        "attr_dim": 16, "global_common_dim": 16, "local_common_dim": 8, "embed_dim": 32,
        "local_size": 32}


def get_config(size, stage):
  if size == "paper":
    config = fashionai.get_config(stage)
  else:
    config = synthetic.get_config(stage)
    if size == "tiny":
      config.model.update(TINY)
      config.data.image_size, config.data.hires_size = 32, 64
    # The generator's attribute lists, so that no dataset has to exist for the benchmark.
    config.data.attributes = synthetic_data.ATTRIBUTES
    config.data.num_values = tuple(len(v) for v in synthetic_data.VALUE_NAMES)
  config.train.batch_size = _BATCH.value
  config.model.compute_dtype = _DTYPE.value
  config.train.bn_stats = _BN_STATS.value
  return config


def random_batch(config, seed=0):
  rng = np.random.default_rng(seed)
  b, s, r = config.train.batch_size, config.data.image_size, config.data.hires_size
  return {"images": rng.integers(0, 256, (b, 3, s, s, 3), dtype=np.uint8),
          "hires": rng.integers(0, 256, (b, 3, r, r, 3), dtype=np.uint8),
          "attribute": rng.integers(0, len(config.data.attributes), (b,), dtype=np.int32)}


def jax_runner(config, fast):
  """(run one step, compile seconds) for the jitted JAX step."""
  config.model.fast_cpu_backward = fast
  num_attributes = len(config.data.attributes)
  # extend: the last attribute is the new one, on a joint model.
  plan = (extend.Plan(True, config.data.attributes[:-1], tuple(range(num_attributes - 1)) + (-1,),
                      (num_attributes - 1,), "bench") if config.stage == "extend" else None)
  joint = config.stage != "global"
  model = model_lib.build_model(config.model, num_attributes, with_local=joint,
                                bn_roles=trainer.BN_STATS[config.train.bn_stats])
  tx = extend.make_optimizer(config) if plan else trainer.make_optimizer(config, joint)
  mesh = parallel.make_mesh()
  variables = model_lib.init_variables(model, jax.random.key(0), config.data.image_size,
                                       config.model.local_size)
  params = variables["params"]
  state = parallel.replicate(mesh, trainer.TrainState(
      step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables["batch_stats"],
      opt_state=tx.init(extend.trainable(params, plan.new_ids) if plan else params)))
  batch = random_batch(config)
  if plan:
    batch["attribute"][:] = plan.new_ids[0]
  batch = parallel.shard_batch(mesh, batch)
  step_fn = (extend.make_extend_step(config, model, tx, plan, mesh) if plan
             else trainer.make_train_step(config, model, tx, joint, mesh))
  t0 = time.perf_counter()
  lowered = step_fn.lower(state, batch)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  box = [state]

  def run():
    box[0], metrics = compiled(box[0], batch)
    jax.block_until_ready(metrics)

  run()   # warm-up
  run.info = step_info(lowered, compiled)
  return run, compile_s


def step_info(lowered, compiled):
  """FLOPs of the step (counted on the HLO before optimisation, where convolutions are not yet
  opaque library calls) and its device memory in bytes."""
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  info = {"flops": float(cost["flops"]) if cost and "flops" in cost else None}
  try:
    mem = compiled.memory_analysis()
    info.update({f"{k}_bytes": int(getattr(mem, f"{k}_size_in_bytes"))
                 for k in ("argument", "output", "alias", "temp")})
  except Exception:  # pylint: disable=broad-except
    pass   # not every backend reports it
  stats = jax.devices()[0].memory_stats() or {}
  info["device_bytes_limit"] = stats.get("bytes_limit")
  return info


def torch_runner(config, device="cpu", autocast=False):
  """(run one step, 0) for the PyTorch reference step with the official trainer's structure;
  `autocast`: under torch.autocast(bfloat16), as mixed-precision PyTorch training runs."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  from tests import torch_reference as tr  # pylint: disable=g-import-not-at-top
  from tests import torch_train_reference as ttr  # pylint: disable=g-import-not-at-top

  m, joint = config.model, config.stage == "joint"
  net = tr.ASENPP(len(config.data.attributes), m.global_backbone, m.local_backbone, m.width,
                  m.attr_dim, m.global_common_dim, m.local_common_dim, m.reduction, m.embed_dim,
                  with_local=joint).to(device)
  opt, _ = ttr.make_optimizer(net, config.stage, config.train.lr, config.train.lr_global,
                              config.train.decay_rate, 1)
  batch = random_batch(config)
  mean = torch.tensor(model_lib.IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
  std = torch.tensor(model_lib.IMAGENET_STD, device=device).view(1, 3, 1, 1)
  to_nchw = lambda x: (torch.from_numpy(x).to(device).permute(0, 3, 1, 2).float() / 255
                       - mean) / std
  roles = [to_nchw(batch["images"][:, r]) for r in range(3)]
  hires = [to_nchw(batch["hires"][:, r]) for r in range(3)]
  attrs = torch.from_numpy(batch["attribute"]).long().to(device)
  cast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast)
  frame, hires_size, local = config.data.image_size, config.data.hires_size, m.local_size

  def crops(attmaps, views):
    # A box of half the frame around each map's largest cell: the crop's cost, not its rule.
    out = []
    for att, view in zip(attmaps, views):
      b, h, w = att.shape
      cell = att.view(b, -1).argmax(1)
      scale = hires_size / frame
      side = int(hires_size // 2)
      rows = []
      for i in range(b):
        cy = int((cell[i] // w + 0.5) * frame / h * scale)
        cx = int((cell[i] % w + 0.5) * frame / w * scale)
        y0 = min(max(cy - side // 2, 0), hires_size - side)
        x0 = min(max(cx - side // 2, 0), hires_size - side)
        rows.append(F.interpolate(view[i:i + 1, :, y0:y0 + side, x0:x0 + side], size=local,
                                  mode="bilinear", align_corners=False))
      out.append(torch.cat(rows))
    return out

  def run():
    net.train()
    opt.zero_grad()
    with cast:
      glob = [net(x, attrs, "global") for x in roles]
      loss = ttr.triplet_loss(*[g[0] for g in glob], config.train.margin)
      if joint:
        loc = [net(c, attrs, "local")[0]
               for c in crops([g[1].detach() for g in glob], hires)]
        w = config.train.loss_weights
        loss = (w.global_triplet * loss + w.local_triplet * ttr.triplet_loss(
            *loc, config.train.margin) + w.alignment * ttr.alignment_loss(
                [g[0] for g in glob], loc))
    loss.backward()
    opt.step()
    if torch.device(device).type == "cuda":
      torch.cuda.synchronize()   # the step's time, not its launch's

  run()   # warm-up
  return run, 0.0


def bench(size, stages):
  """Times the chosen paths of one step of each stage, interleaved so that all see the same
  machine."""
  runs = {}
  for stage in stages:
    for path in _PATHS.value:
      if path in TORCH_PATHS and stage == "extend":
        continue   # no PyTorch counterpart
      config = get_config(size, stage)
      runs[stage, path] = (torch_runner(config, _TORCH_DEVICE.value, path == "torch_bf16")
                           if path in TORCH_PATHS else jax_runner(config, path == "fast"))
  times = {k: [] for k in runs}
  for _ in range(_STEPS.value):
    for key, (run, _) in runs.items():
      t0 = time.perf_counter()
      run()
      times[key].append(time.perf_counter() - t0)
  med = {k: float(np.median(t)) for k, t in times.items()}
  for stage in stages:
    config = get_config(size, stage)
    for path in _PATHS.value:
      if (stage, path) not in runs:
        continue
      t, compile_s = med[stage, path], runs[stage, path][1]
      print(f"{size:<10}{stage:<8}{config.data.image_size:>4}/{config.model.local_size:<4}"
            f"{config.model.global_backbone}/{config.model.local_backbone} "
            f"w={config.model.width:<6}{path:<6} compile {compile_s:6.1f}s  step "
            f"{t * 1e3:8.1f} ms  {config.train.batch_size / t:7.2f} triplets/s", flush=True)
    for path in _PATHS.value:
      if path not in TORCH_PATHS and (stage, "torch") in runs and (stage, path) in runs:
        print(f"{'':18}{path}: {med[stage, 'torch'] / med[stage, path]:.2f}x the PyTorch "
              "step's speed", flush=True)
      if stage == "extend" and (stage, path) in runs and ("joint", path) in runs:
        print(f"{'':18}{path}: extend {med['joint', path] / med['extend', path]:.2f}x the "
              "joint step's speed", flush=True)
    if (stage, "fast") in runs and (stage, "xla") in runs:
      print(f"{'':18}fast: {med[stage, 'xla'] / med[stage, 'fast']:.2f}x the xla path's speed",
            flush=True)
  return [{"size": size, "stage": stage, "path": path, "batch_size": _BATCH.value,
           "dtype": _DTYPE.value, "step_s": med[stage, path],
           "steps_per_s": 1 / med[stage, path], "triplets_per_s": _BATCH.value / med[stage, path],
           "compile_s": run[1], **getattr(run[0], "info", {})}
          for (stage, path), run in runs.items()]


def main(argv):
  del argv
  print(f"JAX {jax.__version__} on {jax.device_count()} x {jax.devices()[0].device_kind}, "
        f"batch {_BATCH.value} triplets, {_DTYPE.value}, bn_stats {_BN_STATS.value}, median of "
        f"{_STEPS.value} steps; allocator {os.environ.get(allocator.ENV, 'system')}", flush=True)
  results = [r for size in _SIZES.value for r in bench(size, _STAGES.value)]
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump({"jax": jax.__version__, "device": jax.devices()[0].device_kind,
                 "backend": jax.default_backend(), "steps": _STEPS.value,
                 "results": results}, f, indent=1)


if __name__ == "__main__":
  app.run(main)
