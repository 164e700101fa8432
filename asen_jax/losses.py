"""ASEN++ losses: triplet margin ranking on cosine similarity, and global/local alignment.

All losses take raw (un-normalised) embeddings and compute in float32. Norms are clamped
at `eps` (like torch.nn.functional.cosine_similarity), so a zero embedding gives cosine 0
and finite gradients instead of NaN.
"""
import jax.numpy as jnp


def _check_pair(name, a, b):
  if a.shape != b.shape or a.ndim < 1:
    raise ValueError(f"{name}: embeddings must have the same shape [..., dim], got "
                     f"{a.shape} and {b.shape}.")


def _safe_norm(x, eps):
  # sqrt(max(|x|^2, eps^2)) = max(|x|, eps): its gradient is 0, not NaN, at x = 0.
  return jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1), eps * eps))


def cosine_similarity(a_bd, b_bd, eps=1e-8):
  """Cosine similarity along the last axis: [..., d] x [..., d] -> [...] float32."""
  a = jnp.asarray(a_bd).astype(jnp.float32)
  b = jnp.asarray(b_bd).astype(jnp.float32)
  _check_pair("cosine_similarity", a, b)
  return jnp.sum(a * b, axis=-1) / (_safe_norm(a, eps) * _safe_norm(b, eps))


def triplet_margin_loss(anchor, positive, negative, margin=0.2, eps=1e-8):
  """mean(max(0, margin - cos(anchor, positive) + cos(anchor, negative))), a scalar."""
  cos_ap = cosine_similarity(anchor, positive, eps)
  cos_an = cosine_similarity(anchor, negative, eps)
  return jnp.mean(jnp.maximum(0.0, margin - cos_ap + cos_an))


def alignment_loss(global_embs, local_embs, eps=1e-8):
  """sum over (anchor, positive, negative) of mean(1 - cos(global, local)), a scalar.

  Args:
    global_embs: sequence of [b, d] global-branch embeddings, one per triplet member.
    local_embs: the local-branch embeddings of the same images, in the same order.
  """
  global_embs, local_embs = list(global_embs), list(local_embs)
  if not global_embs or len(global_embs) != len(local_embs):
    raise ValueError(f"alignment_loss: got {len(global_embs)} global and {len(local_embs)} "
                     "local embedding arrays; pass one of each per triplet member "
                     "(anchor, positive, negative).")
  return sum(jnp.mean(1.0 - cosine_similarity(g, l, eps))
             for g, l in zip(global_embs, local_embs))
