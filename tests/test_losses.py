"""Losses against hand-computed numbers, torch, and finite gradients at zero embeddings."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asen_jax import losses

# Anchors, positives, negatives (rows are triplets).
A = np.array([[3., 4.], [1., 0.], [1., 1.]], np.float32)
P = np.array([[4., 3.], [2., 0.], [-1., -1.]], np.float32)
N = np.array([[0., 1.], [0., -3.], [2., 2.]], np.float32)


def test_cosine_similarity_hand_computed():
  # (3*4 + 4*3) / (5 * 5) = 0.96; (1*2) / (1 * 2) = 1; (-1 - 1) / (sqrt2 * sqrt2) = -1.
  np.testing.assert_allclose(losses.cosine_similarity(A, P), [0.96, 1.0, -1.0], rtol=1e-6)
  # A zero vector has cosine 0 with anything, not NaN.
  np.testing.assert_array_equal(losses.cosine_similarity(np.zeros((1, 2)), A[:1]), [0.0])


def test_triplet_margin_loss_hand_computed():
  # cos(a, n): 4/5 = 0.8; 0/3 = 0; 4/(sqrt2 * sqrt8) = 1.
  # Per triplet max(0, 0.2 - cos_ap + cos_an): 0.2 - 0.96 + 0.8 = 0.04; 0.2 - 1 + 0 < 0 -> 0;
  # 0.2 + 1 + 1 = 2.2. Mean: (0.04 + 0 + 2.2) / 3 = 0.746667.
  np.testing.assert_allclose(losses.triplet_margin_loss(A, P, N), 2.24 / 3, rtol=1e-6)
  # margin 1: 1 - 0.96 + 0.8 = 0.84; 1 - 1 + 0 = 0; 1 + 1 + 1 = 3 -> 3.84 / 3 = 1.28.
  np.testing.assert_allclose(losses.triplet_margin_loss(A, P, N, margin=1.0), 1.28, rtol=1e-6)
  # Only the direction matters: scaling the embeddings changes nothing.
  np.testing.assert_allclose(losses.triplet_margin_loss(7 * A, 0.1 * P, 3 * N), 2.24 / 3,
                             rtol=1e-6)


def test_alignment_loss_hand_computed():
  g = [np.array([[3., 4.], [1., 0.]]), np.array([[1., 0.], [0., 2.]]),
       np.array([[1., 2.], [2., 1.]])]
  l = [np.array([[4., 3.], [0., 1.]]), np.array([[1., 0.], [0., 5.]]),
       np.array([[-1., -2.], [2., 1.]])]
  # anchor: cos 0.96 and 0 -> mean(0.04, 1) = 0.52; positive: cos 1, 1 -> 0;
  # negative: cos -1, 1 -> mean(2, 0) = 1. Sum = 1.52.
  np.testing.assert_allclose(losses.alignment_loss(g, l), 1.52, rtol=1e-6)
  with pytest.raises(ValueError, match="got 3 global and 2 local embedding arrays"):
    losses.alignment_loss(g, l[:2])


def test_bfloat16_embeddings_are_computed_in_float32():
  loss = losses.triplet_margin_loss(jnp.asarray(A, jnp.bfloat16), jnp.asarray(P, jnp.bfloat16),
                                    jnp.asarray(N, jnp.bfloat16))
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, 2.24 / 3, rtol=1e-6)  # these values are exact in bf16


def test_gradients_finite_with_zero_embeddings():
  a, p, n = A.copy(), P.copy(), N.copy()
  a[0] = 0.0   # a zero anchor
  n[2] = 0.0   # a zero negative
  grads = jax.grad(losses.triplet_margin_loss, argnums=(0, 1, 2))(a, p, n)
  for grad in grads:
    assert np.isfinite(np.asarray(grad)).all()
  g = [a, p, n]
  l = [np.zeros_like(a), p, n]
  grads = jax.grad(losses.alignment_loss, argnums=(0, 1))(g, l)
  for grad in jax.tree.leaves(grads):
    assert np.isfinite(np.asarray(grad)).all()


def test_values_and_gradients_match_torch():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(0)
  a, p, n, gl = (rng.standard_normal((6, 16)).astype(np.float32) for _ in range(4))
  ta, tp, tn, tg = (torch.tensor(x, requires_grad=True) for x in (a, p, n, gl))
  cos = torch.nn.functional.cosine_similarity
  # The public implementation: MarginRankingLoss(margin)(cos_ap, cos_an, target=1).
  t_trip = torch.nn.functional.margin_ranking_loss(
      cos(ta, tp), cos(ta, tn), torch.ones(6), margin=0.2)
  t_align = sum((1 - cos(x, tg)).mean() for x in (ta, tp, tn))
  (t_trip + 0.1 * t_align).backward()

  def total(a, p, n, gl):
    return (losses.triplet_margin_loss(a, p, n, margin=0.2)
            + 0.1 * losses.alignment_loss([a, p, n], [gl, gl, gl]))

  np.testing.assert_allclose(losses.triplet_margin_loss(a, p, n), t_trip.item(), rtol=1e-5)
  np.testing.assert_allclose(losses.alignment_loss([a, p, n], [gl] * 3), t_align.item(),
                             rtol=1e-5)
  grads = jax.grad(total, argnums=(0, 1, 2, 3))(a, p, n, gl)
  for grad, t in zip(grads, (ta, tp, tn, tg)):
    np.testing.assert_allclose(grad, t.grad.numpy(), rtol=1e-4, atol=1e-6)
