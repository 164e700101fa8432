"""Stage `extend`: new attributes as new rows of the shared attribute table, all else frozen.

The source checkpoint's backbones, heads, BatchNorm statistics and old table rows stay bit for
bit; BatchNorm runs in inference mode; triplets come from the new attributes only. The optimiser
sees the parameters with the table cut to its new rows, and set_to_zero (no state) masks every
other leaf; gradients reach the new rows only (everything else is behind stop_gradient), so no
backbone gradient is computed. Attributes are matched to the source's by name.
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from asen_jax import checkpoint as ckpt_lib
from asen_jax import losses
from asen_jax import model as model_lib
from asen_jax import parallel
from asen_jax import trainer
from asen_jax import trees

TABLE = ("attr_embedding", "embedding")


class Plan(NamedTuple):
  joint: bool              # the source has a local branch (frozen too)
  old_attributes: tuple    # the source's attribute names, in its table's row order
  old_rows: tuple          # per dataset attribute: its row in the source's table, -1 if new
  new_ids: tuple           # dataset indices of the new attributes: the rows that train
  source: str


def make_plan(meta, info, config, source, joint=None):
  """The Plan of extending a checkpoint (its load_model `meta`) to the dataset `info`; one
  sentence for a checkpoint of another dataset, an old attribute missing, or nothing new."""
  if meta["attributes"] is None:
    raise ValueError(f"{source} holds no attribute names (an official .pth.tar); convert it "
                     "with tools/convert_official.py and the config of its dataset, then extend "
                     "the converted checkpoint.")
  if meta.get("dataset", config.data.name) != config.data.name:
    raise ValueError(f"{source} was trained on the {meta['dataset']} dataset but the config is "
                     f"{config.data.name}'s; extend a checkpoint of the same dataset.")
  old, names = tuple(meta["attributes"]), tuple(info.attributes)
  missing = [a for a in old if a not in names]
  if missing:
    raise ValueError(f"{source} was trained on {missing}, which the dataset "
                     f"{config.data.root}/{config.data.folder} does not list ({list(names)}); "
                     "extend keeps every old attribute, so the dataset must name them all.")
  new_ids = tuple(i for i, a in enumerate(names) if a not in old)
  if not new_ids:
    raise ValueError(f"The dataset {config.data.root}/{config.data.folder} has no attribute "
                     f"that {source} was not trained on ({list(names)}); extend needs at "
                     "least one new attribute in the dataset.")
  if joint is None:
    joint = meta["stage"] == "joint" or bool(meta.get("extend", {}).get("joint"))
  return Plan(joint, old, tuple(old.index(a) if a in old else -1 for a in names), new_ids,
              source)


def plan_meta(plan, info):
  """What a resume needs to rebuild the plan (kept in the run's checkpoint meta)."""
  return {"joint": plan.joint, "old_attributes": list(plan.old_attributes),
          "new_attributes": [info.attributes[i] for i in plan.new_ids], "source": plan.source}


def resumed_plan(meta, info, config):
  ext = meta["extend"]
  return make_plan({"attributes": ext["old_attributes"], "stage": "extend", "extend": ext},
                   info, config, ext["source"])


def source_plan(path, info, config):
  """(Plan, variables) of the --init_from checkpoint: a workdir's best, the model whose
  embeddings (and search index) are in use."""
  loaded, meta = ckpt_lib.load_model(path, prefer="best")
  plan = make_plan(meta, info, config, f"--init_from {path}",
                   joint="local" in loaded["params"])
  return plan, loaded


def load_source(plan, variables, loaded):
  """Fresh `variables` of the extended model with every source weight in place: old rows of
  the table copied by name, new rows as initialised."""
  merged = {k: trees.merge_params(variables[k], loaded[k], plan.source,
                                  dont_load=("/".join(TABLE),)) for k in ("params", "batch_stats")}
  old = np.asarray(loaded["params"][TABLE[0]][TABLE[1]])
  table = np.array(merged["params"][TABLE[0]][TABLE[1]])
  if old.shape[1:] != table.shape[1:]:
    raise ValueError(f"{plan.source}'s attribute table has rows of {old.shape[1]}, the config's "
                     f"model.attr_dim is {table.shape[1]}; use the source's model config.")
  for i, row in enumerate(plan.old_rows):
    if row >= 0:
      table[i] = old[row]
  merged["params"][TABLE[0]] = {TABLE[1]: table}
  return merged


def trainable(params, new_ids):
  """The parameter tree the optimiser sees: the table cut to its new rows."""
  table = params[TABLE[0]][TABLE[1]]
  rows = (table[np.asarray(new_ids)] if not isinstance(table, jax.ShapeDtypeStruct)
          else jax.ShapeDtypeStruct((len(new_ids),) + table.shape[1:], table.dtype))
  return {**params, TABLE[0]: {TABLE[1]: rows}}


def make_optimizer(config):
  """Adam on the new rows; set_to_zero (which keeps no state) on every other leaf."""
  def labels(params):
    return {k: jax.tree.map(lambda _, k=k: "new" if k == TABLE[0] else "frozen", v)
            for k, v in params.items()}
  return optax.multi_transform(
      {"new": optax.adam(trainer.learning_rate(config, config.train.lr)),
       "frozen": optax.set_to_zero()}, labels)


def extend_loss(rows, params, batch_stats, batch, *, model, config, joint, new_ids):
  """(loss, metrics) of a batch of triplets of new attributes, as a function of the new rows
  only: inference-mode BatchNorm, every other weight a constant."""
  params, batch_stats = jax.lax.stop_gradient((params, batch_stats))
  table = params[TABLE[0]][TABLE[1]].at[new_ids].set(rows)
  variables = {"params": {**params, TABLE[0]: {TABLE[1]: table}}, "batch_stats": batch_stats}
  attrs = jnp.tile(batch["attribute"], 3)
  images = model_lib.normalize_images(trainer._roles(batch["images"]))  # pylint: disable=protected-access
  g, attmap = model.apply(variables, images, attrs, method="embed_global")
  g_apn = jnp.split(g.astype(jnp.float32), 3)
  loss_g = losses.triplet_margin_loss(*g_apn, margin=config.train.margin)
  if not joint:
    return loss_g, {"loss": loss_g, "loss_global": loss_g}
  crops = model_lib.normalize_images(trainer.local_crops(attmap, batch, config))
  l, _ = model.apply(variables, crops, attrs, method="embed_local")
  l_apn = jnp.split(l.astype(jnp.float32), 3)
  loss_l = losses.triplet_margin_loss(*l_apn, margin=config.train.margin)
  loss_a = losses.alignment_loss(g_apn, l_apn)
  w = config.train.loss_weights
  loss = w.global_triplet * loss_g + w.local_triplet * loss_l + w.alignment * loss_a
  return loss, {"loss": loss, "loss_global": loss_g, "loss_local": loss_l, "loss_align": loss_a}


def extend_step(state, batch, *, model, tx, config, joint, new_ids):
  """One optimiser step on the new rows; every other variable passes through untouched. A
  non-finite loss or update leaves the state as it was (as trainer.train_step)."""
  ids = jnp.asarray(new_ids)
  table = state.params[TABLE[0]][TABLE[1]]
  rows = table[ids]
  (loss, metrics), row_grads = jax.value_and_grad(
      functools.partial(extend_loss, model=model, config=config, joint=joint, new_ids=ids),
      has_aux=True)(rows, state.params, state.batch_stats, batch)
  view = trainable(state.params, new_ids)
  # Zeros for the masked leaves: set_to_zero never reads them, so XLA drops them.
  grads = {**jax.tree.map(jnp.zeros_like, view), TABLE[0]: {TABLE[1]: row_grads}}
  updates, opt_state = tx.update(grads, state.opt_state, view)
  step_rows = updates[TABLE[0]][TABLE[1]]
  finite = jnp.isfinite(loss) & jnp.all(jnp.isfinite(step_rows))
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_rows = keep(optax.apply_updates(rows, step_rows), rows)
  params = {**state.params, TABLE[0]: {TABLE[1]: table.at[ids].set(new_rows)}}
  return state.replace(step=state.step + finite.astype(state.step.dtype), params=params,
                       opt_state=keep(opt_state, state.opt_state)), metrics


def make_extend_step(config, model, tx, plan, mesh):
  rep, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  fn = functools.partial(extend_step, model=model, tx=tx, config=config, joint=plan.joint,
                         new_ids=plan.new_ids)
  return jax.jit(fn, in_shardings=(rep, data), out_shardings=(rep, rep), donate_argnums=(0,))
