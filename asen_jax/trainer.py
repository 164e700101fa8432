"""ASEN++ training: optimiser, jitted steps and the resumable loop of every stage.

Stage 'global' trains the global branch alone (triplet loss). Stage 'joint' starts from a stage-1
checkpoint and trains both branches: 1.0 * global triplet + 0.1 * local triplet + 0.1 * alignment,
with one learning rate for the local branch and a smaller one for everything global. Stage
'extend' adds attributes to a trained model (asen_jax/extend.py).

Start order (as big_vision): resume this workdir's own run; else --init_from; else converted
ImageNet backbones; else scratch.
"""
import functools
import os
import time
from typing import Any

from absl import logging
import flax
import jax
import jax.numpy as jnp
import optax
from tqdm import tqdm

from asen_jax import checkpoint as ckpt_lib
from asen_jax import config_checks
from asen_jax import data as data_lib
from asen_jax import evaluation
from asen_jax import extend
from asen_jax import losses
from asen_jax import model as model_lib
from asen_jax import parallel
from asen_jax import roi
from asen_jax import runs
from asen_jax import warm_start


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


def steps_per_epoch(config):
  return max(1, config.train.triplets_per_epoch // config.train.batch_size)


def total_steps(config):
  steps = config.train.epochs * steps_per_epoch(config)
  return min(steps, config.train.max_steps) if config.train.max_steps else steps


def learning_rate(config, lr):
  """Step decay: x decay_rate every decay_every_epochs epochs."""
  return optax.exponential_decay(
      lr, transition_steps=config.train.decay_every_epochs * steps_per_epoch(config),
      decay_rate=config.train.decay_rate, staircase=True)


def param_labels(params):
  """'local' for the local branch, 'global' for the rest (incl. the shared attribute table)."""
  return {k: jax.tree.map(lambda _, k=k: "local" if k == "local" else "global", v)
          for k, v in params.items()}


def make_optimizer(config, joint):
  if not joint:
    return optax.adam(learning_rate(config, config.train.lr))
  return optax.multi_transform(
      {"global": optax.adam(learning_rate(config, config.train.lr_global)),
       "local": optax.adam(learning_rate(config, config.train.lr))}, param_labels)


def _roles(x):
  """[B, 3, ...] (anchor, positive, negative) -> [3B, ...], role-major."""
  return jnp.swapaxes(x, 0, 1).reshape((-1,) + x.shape[2:])


def global_pass(params, batch_stats, batch, model):
  """Train-mode global branch on a batch of triplets, role-major:
  (embeddings [3B, E] float32, attention maps [3B, h, w], attributes [3B], new batch_stats)."""
  attrs = jnp.tile(batch["attribute"], 3)
  images = model_lib.normalize_images(_roles(batch["images"]))
  (g, attmap), upd = model.apply({"params": params, "batch_stats": batch_stats}, images, attrs,
                                 train=True, method="embed_global", mutable=["batch_stats"])
  return g.astype(jnp.float32), attmap, attrs, upd["batch_stats"]


def local_crops(attmap, batch, config):
  """The RoI crops [3B, s, s, 3] (0-255 float32) that the global attention picks, role-major."""
  crops, _ = roi.roi_crops(jax.lax.stop_gradient(attmap), _roles(batch["hires"]),
                           config.data.image_size, config.model.local_size,
                           config.model.roi_threshold)
  return crops


def compute_loss(params, batch_stats, batch, *, model, config, joint):
  """Returns (loss, (metrics, new batch_stats)) for a batch of triplets."""
  g, attmap, attrs, batch_stats = global_pass(params, batch_stats, batch, model)
  g_apn = jnp.split(g, 3)
  loss_g = losses.triplet_margin_loss(*g_apn, margin=config.train.margin)
  if not joint:
    return loss_g, ({"loss": loss_g, "loss_global": loss_g}, batch_stats)
  (l, _), upd = model.apply({"params": params, "batch_stats": batch_stats},
                            model_lib.normalize_images(local_crops(attmap, batch, config)), attrs,
                            train=True, method="embed_local", mutable=["batch_stats"])
  l_apn = jnp.split(l.astype(jnp.float32), 3)
  loss_l = losses.triplet_margin_loss(*l_apn, margin=config.train.margin)
  loss_a = losses.alignment_loss(g_apn, l_apn)
  w = config.train.loss_weights
  loss = w.global_triplet * loss_g + w.local_triplet * loss_l + w.alignment * loss_a
  metrics = {"loss": loss, "loss_global": loss_g, "loss_local": loss_l, "loss_align": loss_a}
  return loss, (metrics, upd["batch_stats"])


def train_step(state, batch, *, model, tx, config, joint):
  """One optimiser step. A non-finite loss or update leaves the state untouched (the host
  notices that the step counter did not advance, and stops)."""
  grad_fn = jax.value_and_grad(
      functools.partial(compute_loss, model=model, config=config, joint=joint), has_aux=True)
  (loss, (metrics, batch_stats)), grads = grad_fn(state.params, state.batch_stats, batch)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new = TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                   batch_stats=batch_stats, opt_state=opt_state)
  finite = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(updates))
  new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
  return new, metrics


def make_train_step(config, model, tx, joint, mesh):
  rep, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  fn = functools.partial(train_step, model=model, tx=tx, config=config, joint=joint)
  return jax.jit(fn, in_shardings=(rep, data), out_shardings=(rep, rep), donate_argnums=(0,))


BN_STATS = {"per_role": 3, "batch": 1}   # train.bn_stats -> BatchNorm groups of a batch


def build(config, plan=None):
  """Dataset info, model and optimiser for a config (shared by train and tests); `plan`: stage
  extend's extend.Plan."""
  if config.train.bn_stats not in BN_STATS:
    raise ValueError(f"config.train.bn_stats = {config.train.bn_stats!r}; use 'per_role' (the "
                     "official trainer's statistics) or 'batch' (one set over the whole batch).")
  info = data_lib.dataset_info(config)
  joint = plan.joint if plan else config.stage == "joint"
  tx = extend.make_optimizer(config) if plan else make_optimizer(config, joint)
  model = model_lib.build_model(config.model, len(info.attributes), with_local=joint,
                                dtype=jnp.dtype(config.model.compute_dtype),
                                bn_roles=BN_STATS[config.train.bn_stats])
  return info, model, tx, joint


def _fresh_state(config, model, tx, plan=None):
  variables = model_lib.init_variables(model, jax.random.key(config.seed),
                                       config.data.image_size, config.model.local_size)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables["batch_stats"],
                    opt_state=tx.init(extend.trainable(params, plan.new_ids) if plan else params))


def init_state(config, model, tx, joint, init_from=None, info=None, plan=None, source=None):
  """Host-side TrainState of a fresh start: initial weights are read here and only here
  (stage extend: all from `source`, the variables of its --init_from checkpoint)."""
  state = _fresh_state(config, model, tx, plan)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  if plan:
    variables = extend.load_source(plan, variables, source)
    return state.replace(params=variables["params"], batch_stats=variables["batch_stats"])
  # ImageNet backbones first (stage 2's local branch needs them too), then the previous stage.
  variables = warm_start.load_backbones(config, variables, joint, global_too=not init_from)
  if init_from:
    variables = warm_start.load_init_from(init_from, variables, info.attributes, joint,
                                          config.train.bn_stats)
  # The optimiser state starts at zero whatever the weights, so it stays as initialised.
  return state.replace(params=variables["params"], batch_stats=variables["batch_stats"])


def abstract_state(config, model, tx, mesh, plan=None):
  """Shapes, dtypes and (replicated) shardings of the TrainState, for a resume: no weights
  are read and nothing is computed."""
  rep = parallel.replicated(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                      jax.eval_shape(lambda: _fresh_state(config, model, tx, plan)))


def _meta(config, info, step, **extra):
  return {"attributes": list(info.attributes), "num_values": list(info.num_values),
          "stage": config.stage, "model": config.model.to_dict(), "step": int(step),
          "dataset": config.data.name, "bn_stats": config.train.bn_stats,
          "views": config_checks.views(config), **extra}


def check_resumable(workdir, meta, config, info):
  """Raises one clear ValueError if the run saved in `workdir` (its latest checkpoint's `meta`)
  is not the one `config` describes: another stage, dataset, model shape or BatchNorm grouping."""
  if tuple(meta["attributes"]) != tuple(info.attributes) or meta["stage"] != config.stage:
    raise ValueError(f"Workdir {workdir} holds a {meta['stage']} run on {meta['attributes']}; "
                     "use a new --workdir for a different stage or dataset.")
  saved = {**model_lib.MODEL_FIELD_DEFAULTS, **meta.get("model", {})}
  changed = [(f"model.{f}", saved[f], config.model[f]) for f in model_lib.MODEL_FIELDS
             if f in saved and saved[f] != config.model[f]]
  # Runs from before the field existed normalised over the whole batch.
  if meta.get("bn_stats", "batch") != config.train.bn_stats:
    changed.append(("train.bn_stats", meta.get("bn_stats", "batch"), config.train.bn_stats))
  if changed:
    was = ", ".join(f"{f}={old!r}" for f, old, _ in changed)
    now = ", ".join(f"{new!r}" for _, _, new in changed)
    raise ValueError(f"Workdir {workdir} holds a run with {was}, but the config has {now}; use a "
                     f"new --workdir (or delete this one), or add {was.replace(' ', '')} to the "
                     "config to continue it.")


def train_and_evaluate(config, workdir, init_from=None):
  """Runs (or resumes) one training stage; returns the final TrainState on the host.

  One run per workdir at a time (runs.WorkdirLock); SIGTERM and Ctrl-C save and raise
  runs.Stopped."""
  mesh = parallel.make_mesh()
  config_checks.check(config, num_devices=mesh.size)
  os.makedirs(workdir, exist_ok=True)
  lock = runs.WorkdirLock(workdir).acquire() if jax.process_index() == 0 else None
  try:
    return _train(config, workdir, init_from, mesh)
  finally:
    if lock:
      lock.release()


def _train(config, workdir, init_from, mesh):
  parallel.quiet_library_logs()
  parallel.process0_first(lambda: data_lib.prepare_dataset(config), "prepare_dataset")
  if config.stage == "joint" and not init_from:
    logging.warning("Stage 'joint' without --init_from: the global branch starts untrained; the "
                    "paper initialises it from the last stage-1 checkpoint.")
  ckpts = ckpt_lib.RunCheckpoints(workdir)
  try:
    info, plan, source = data_lib.dataset_info(config), None, None
    resume_step = ckpts.latest_step()
    if resume_step is not None:
      check_resumable(workdir, ckpts.latest_meta(), config, info)
      if config.stage == "extend":
        plan = extend.resumed_plan(ckpts.latest_meta(), info, config)
    elif config.stage == "extend":
      if not init_from:
        raise ValueError("Stage 'extend' needs --init_from: the checkpoint (or workdir) of the "
                         "model trained on the old attributes.")
      plan, source = extend.source_plan(init_from, info, config)
    runs.accept(workdir, config, init_from, resume_step)
    return _loop(config, workdir, init_from, mesh, build(config, plan), plan, source, ckpts)
  finally:
    ckpts.close()


def _loop(config, workdir, init_from, mesh, built, plan, source, ckpts):
  info, model, tx, joint = built
  loader = data_lib.make_train_loader(config, seed=config.seed, shard_index=jax.process_index(),
                                      shard_count=jax.process_count(),
                                      attributes=plan.new_ids if plan else None)
  data_iter = iter(loader)
  best_map = -1.0
  if ckpts.latest_step() is None:
    state = parallel.replicate(mesh, init_state(config, model, tx, joint, init_from, info, plan,
                                                source))
  else:
    abstract = abstract_state(config, model, tx, mesh, plan)
    variables, opt, data_iter, meta = ckpts.restore_latest(
        {"params": abstract.params, "batch_stats": abstract.batch_stats},
        {"step": abstract.step, "opt_state": abstract.opt_state}, data_iter)
    state = TrainState(step=opt["step"], params=variables["params"],
                       batch_stats=variables["batch_stats"], opt_state=opt["opt_state"])
    best_map = float(meta.get("best_map", -1.0))
    logging.info("Resuming %s from step %d.", workdir, int(opt["step"]))

  step_fn = (extend.make_extend_step(config, model, tx, plan, mesh) if plan
             else make_train_step(config, model, tx, joint, mesh))
  extra_meta = {"extend": extend.plan_meta(plan, info)} if plan else {}
  embed_fn = evaluation.make_embed_fn(config, model, joint, mesh)
  step = int(jax.device_get(state.step))
  first = step
  writer = runs.MetricWriter(workdir, resume_step=step if step else None)
  per_epoch, last = steps_per_epoch(config), total_steps(config)

  def save_latest(step):
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    ckpts.save_latest(step, variables, {"step": state.step, "opt_state": state.opt_state},
                      data_iter, _meta(config, info, step, best_map=best_map, **extra_meta))

  def check_finite(step, metrics):
    # The step counter only advances on finite steps (train_step), so one scalar tells.
    if int(jax.device_get(state.step)) != step:
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      raise FloatingPointError(
          f"Non-finite loss or update at step {step} or earlier ({metrics}); stopping. The last "
          f"good checkpoint in {workdir}/checkpoints/latest is kept; lower train.lr or check "
          "the data.")

  bar = tqdm(total=last, initial=step, desc=f"train {config.stage}", unit="step",
             disable=jax.process_index() != 0, dynamic_ncols=True)
  tick, tick_step = time.time(), step
  try:
    with runs.StopSignals() as stop:
      while step < last:
        batch = next(data_iter)
        arrays = parallel.shard_batch(mesh, {k: batch[k] for k in ("images", "hires", "attribute")})
        state, metrics = step_fn(state, arrays)
        step += 1
        bar.update(1)
        epoch_end = step % per_epoch == 0
        log_now = step % config.train.log_every == 0 or step == last or epoch_end
        save_now = step % config.train.checkpoint_every == 0 or epoch_end or step == last
        if stop.requested():
          log_now = save_now = True
        if not (log_now or save_now):
          continue  # Metrics stay on the device between logging steps.
        check_finite(step, metrics)
        if log_now:
          metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
          now = time.time()
          rate = (step - tick_step) * config.train.batch_size / max(now - tick, 1e-9)
          tick, tick_step = now, step
          writer.write(step, {**metrics, "triplets_per_s": rate, "epoch": step / per_epoch})
          bar.set_postfix(loss=f"{metrics['loss']:.4f}", trip_s=f"{rate:.1f}")
        # Also at the last step, so a run cut short by train.max_steps has a best checkpoint.
        if step == last or (epoch_end and (step // per_epoch) % config.train.eval_every_epochs
                            == 0):
          variables = {"params": state.params, "batch_stats": state.batch_stats}
          results, _, _ = evaluation.evaluate_split(config, variables, embed_fn, mesh,
                                                    config.eval.split, info.attributes)
          val_map = results["map_overall"]
          writer.write(step, {"val_map": val_map, "val_map_random": results["map_random"]})
          logging.info("step %d epoch %d: validation MAP %.2f (random ranking %.2f)", step,
                       step // per_epoch, val_map, results["map_random"])
          if val_map > best_map:
            best_map = val_map
            ckpts.save_best(step, variables, _meta(config, info, step, map=val_map,
                                                    **extra_meta))
          tick = time.time()
        if save_now:
          save_latest(step)
        if stop.requested():
          raise runs.Stopped(f"{stop.received or 'a signal to another process'}: saved step "
                             f"{step} in {workdir}/checkpoints/latest; run the same command again "
                             "to resume.")
  finally:
    bar.close()
    writer.close()
  logging.info("Finished %s: %d steps (%d this run).", config.stage, step, step - first)
  return jax.device_get(state)
