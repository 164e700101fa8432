"""PyTorch reference of the official ASEN++ training step, built on torch_reference.ASENPP.

Written from the facts file ("Training (official defaults)"); imports nothing from asen_jax so
parity tests compare two independent implementations.

The scheduler is stepped once per EPOCH, as the official trainer does:

  opt, sched = make_optimizer(model, 'joint', 1e-4, 1e-5, 0.9, 1)
  for epoch in range(2):
    for _ in range(3):  # tiny steps-per-epoch
      train_step(model, opt, a, p, n, attrs, crops=(ca, cp, cn))
    sched.step()
"""
import torch
import torch.nn.functional as F


def _param_groups(model, stage, lr, lr_global):
  glob = list(model.choices["global"].parameters())  # includes the shared attr_embedding
  if stage == "global":
    return [{"params": glob, "lr": lr}]
  if stage != "joint":
    raise ValueError(f"unknown stage {stage!r}")
  local = model.choices["local"]
  own = list(local.basenet.parameters()) + list(local.attnnet.parameters())  # not attrnet
  ids = [id(p) for p in glob + own]
  assert len(ids) == len(set(ids)), "a parameter is in both groups"
  assert set(ids) == {id(p) for p in model.parameters()}, "a parameter is in no group"
  return [{"params": own, "lr": lr}, {"params": glob, "lr": lr_global}]


def make_optimizer(model, stage, lr, lr_global, decay_rate, decay_every_epochs):
  """Adam (torch defaults) + StepLR. 'global': global branch at `lr`.

  'joint': group 0 = local basenet+attnnet at `lr`, group 1 = whole global branch (with the
  shared attribute embedding) at `lr_global`. Step the scheduler once per epoch.
  """
  opt = torch.optim.Adam(_param_groups(model, stage, lr, lr_global))
  sched = torch.optim.lr_scheduler.StepLR(opt, step_size=decay_every_epochs, gamma=decay_rate)
  return opt, sched


def triplet_loss(a, p, n, margin):
  """mean(max(0, margin - cos(a, p) + cos(a, n)))."""
  return F.relu(margin - F.cosine_similarity(a, p) + F.cosine_similarity(a, n)).mean()


def alignment_loss(glob, loc):
  """Sum over the roles (anchor, positive, negative) of mean(1 - cos(global, local))."""
  return sum((1.0 - F.cosine_similarity(g, l)).mean() for g, l in zip(glob, loc))


def losses(model, anchors, positives, negatives, attributes, *, margin=0.2, crops=None,
           weights=(1.0, 0.1, 0.1)):
  """Loss tensors. One forward per role (anchor, positive, negative), as the official trainer,
  so each BatchNorm sees one role's B images and updates its running stats 3x per branch."""
  w_g, w_l, w_a = weights
  glob = [model(x, attributes, "global")[0] for x in (anchors, positives, negatives)]
  out = {"loss_global": triplet_loss(*glob, margin)}
  total = w_g * out["loss_global"]
  if crops is not None:
    loc = [model(c, attributes, "local")[0] for c in crops]
    out["loss_local"] = triplet_loss(*loc, margin)
    out["loss_align"] = alignment_loss(glob, loc)
    total = total + w_l * out["loss_local"] + w_a * out["loss_align"]
  out["loss"] = total
  return out


def train_step(model, optimizer, anchors, positives, negatives, attributes, *, margin=0.2,
               crops=None, weights=(1.0, 0.1, 0.1), return_grads=False):
  """One official step in train mode: zero_grad, forward, backward, Adam step.

  Returns {name: float} losses ('loss', 'loss_global', and with `crops` 'loss_local',
  'loss_align'); with return_grads, also {named_parameters key: numpy grad} taken before the
  step. named_parameters lists the shared embedding once, as
  'choices.global.attrnet.attr_embedding.weight' (its grad sums both branches' use).
  """
  model.train()
  optimizer.zero_grad()
  out = losses(model, anchors, positives, negatives, attributes, margin=margin, crops=crops,
               weights=weights)
  out["loss"].backward()
  grads = {k: p.grad.detach().clone().numpy() for k, p in model.named_parameters()
           if p.grad is not None} if return_grads else None
  optimizer.step()
  out = {k: float(v.detach()) for k, v in out.items()}
  return (out, grads) if return_grads else out
