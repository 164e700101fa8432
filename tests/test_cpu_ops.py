"""cpu_ops' hand-written backward passes give autodiff's gradients (issue 19, must-hold 1)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asen_jax import cpu_ops
from asen_jax import parallel
from asen_jax import resnet
from asen_jax import trainer
from tests.test_train import _first_batch
from tests.tiny_synthetic import make_data, tiny_config

TOL = 1e-5


def _rel(a, b):
  """Largest difference relative to the reference's largest entry, over a pytree."""
  return max(float(jnp.abs(x - y).max() / jnp.maximum(jnp.abs(y).max(), 1e-30))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _grads(fn, args, cotangent_seed=1):
  """Gradients of sum(fn(*args) * r) for a fixed random r, jitted (fusion included)."""
  out = jax.eval_shape(fn, *args)
  r = jnp.asarray(np.random.RandomState(cotangent_seed).randn(*out.shape), out.dtype)
  return jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * r), argnums=tuple(range(len(args)))))(*args)


def trunk_conv_shapes():
  """Every (kernel shape, strides, input size) of the ResNet-18/34/50 trunks to layer3 at 224 px
  at output strides 16 and 8, recorded from the models themselves."""
  shapes = set()
  real_conv = cpu_ops.conv

  def record(x, w, strides, padding, fast=True):
    shapes.add((tuple(w.shape), tuple(strides), x.shape[1]))
    return real_conv(x, w, strides, padding, fast)

  cpu_ops.conv = record
  try:
    for name in ("resnet18", "resnet34", "resnet50"):
      for stride in (16, 8):
        m = resnet.make_backbone(name, 3, output_stride=stride)
        jax.eval_shape(lambda m=m: m.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
  finally:
    cpu_ops.conv = real_conv
  return sorted(shapes)


SHAPES = trunk_conv_shapes()


def test_the_trunks_have_the_expected_conv_shapes():
  kernels = {s[0][:2] for s in SHAPES}
  assert kernels == {(1, 1), (3, 3), (7, 7)}
  # stride-2 1x1 (downsample), stride-2 3x3, and the 1024-channel layer3 of ResNet-50.
  assert ((1, 1, 512, 1024), (2, 2), 28) in SHAPES
  assert any(s[0][:2] == (3, 3) and s[1] == (2, 2) for s in SHAPES)
  assert ((1, 1, 1024, 256), (1, 1), 14) in SHAPES and len(SHAPES) > 20


@pytest.mark.parametrize("shape,strides,size", SHAPES, ids=str)
def test_conv_gradients_equal_autodiff(shape, strides, size):
  kh = shape[0]
  padding = ((kh // 2, kh // 2),) * 2
  # The real channels; a small map of the input's parity (odd/even decides stride-2 padding).
  hw = 7 + size % 2 if kh < 7 else 16 + size % 2
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(2, hw, hw, shape[2]), jnp.float32)
  w = jnp.asarray(rng.randn(*shape) / np.sqrt(np.prod(shape[:3])), jnp.float32)
  fast = _grads(lambda x, w: cpu_ops.conv(x, w, strides, padding, fast=True), (x, w))
  xla = _grads(lambda x, w: cpu_ops.conv(x, w, strides, padding, fast=False), (x, w))
  assert _rel(fast, xla) <= TOL


@pytest.mark.parametrize("roles,fast_variance", [(1, True), (3, False)])
def test_batch_norm_gradients_and_statistics_equal_autodiff(roles, fast_variance):
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(6, 9, 9, 16) * 2 + 1, jnp.float32)
  scale = jnp.asarray(rng.rand(16) + 0.5, jnp.float32)
  bias = jnp.asarray(rng.randn(16), jnp.float32)

  def run(fast):
    return lambda *a: cpu_ops.batch_norm_train(*a, roles, 1e-5, fast_variance, fast=fast)[0]

  assert _rel(_grads(run(True), (x, scale, bias)), _grads(run(False), (x, scale, bias))) <= TOL
  stats = [jax.jit(lambda x, f=f: cpu_ops.batch_norm_train(x, scale, bias, roles, 1e-5,
                                                           fast_variance, fast=f))(x)
           for f in (True, False)]
  assert _rel(stats[0], stats[1]) == 0.0
  # Each role has its own statistics.
  np.testing.assert_allclose(stats[0][1], x.reshape(roles, -1, 16).mean(1), rtol=1e-5)


@pytest.mark.parametrize("size", [8, 9, 112])
def test_max_pool_forward_and_gradients_equal_xla(size):
  rng = np.random.RandomState(size)
  # After a ReLU: many exact ties at 0, as in the stem.
  x = jnp.asarray(np.maximum(rng.randn(2, size, size, 4), 0), jnp.float32)
  fwd = [jax.jit(functools.partial(cpu_ops.max_pool_3x3_s2, fast=f))(x) for f in (True, False)]
  assert fwd[0].shape == (2, (size + 1) // 2, (size + 1) // 2, 4)
  np.testing.assert_array_equal(fwd[0], fwd[1])
  grads = [_grads(functools.partial(cpu_ops.max_pool_3x3_s2, fast=f), (x,)) for f in (True, False)]
  assert _rel(grads[0], grads[1]) <= TOL


@pytest.mark.parametrize("name,roles,stride", [("resnet50", 3, 16), ("resnet34", 1, 8)])
def test_whole_trunk_gradients_equal_autodiff(name, roles, stride, monkeypatch):
  monkeypatch.setattr(resnet, "SPLIT_ROLES_MIN_BYTES", 0)   # one trunk pass per role, as at scale
  # In float64: a small random trunk is so ill-conditioned that in float32 its own autodiff
  # gradients move by percents when the input moves by 1e-7, which would hide nothing and
  # prove nothing. The ops are the same code in both precisions.
  with jax.enable_x64(True):
    x = jnp.asarray(np.random.RandomState(0).randn(6, 64, 64, 3), jnp.float64)
    models = {f: resnet.make_backbone(name, 3, width=0.25, dtype=jnp.float64,
                                      output_stride=stride, bn_roles=roles, fast=f)
              for f in (True, False)}
    variables = jax.tree.map(lambda v: v.astype(jnp.float64),
                             models[True].init(jax.random.key(0), x[:roles]))

    def trunk(fast):
      def fn(params, x):
        return models[fast].apply({"params": params, "batch_stats": variables["batch_stats"]},
                                  x, True, mutable=["batch_stats"])[0]
      return fn

    fast = _grads(trunk(True), (variables["params"], x))
    xla = _grads(trunk(False), (variables["params"], x))
    assert _rel(fast, xla) <= 1e-9


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  return make_data(tmp_path_factory)


def test_three_training_steps_equal_the_xla_gradient_path(data_root, monkeypatch):
  monkeypatch.setattr(resnet, "SPLIT_ROLES_MIN_BYTES", 0)   # one trunk pass per role, as at scale
  config = tiny_config(data_root, "joint", {"model.width": 0.25})
  info, model, tx, joint = trainer.build(config)
  state0 = jax.device_get(trainer.init_state(config, model, tx, joint, info=info))
  mesh = parallel.make_mesh(jax.devices()[:1])
  batch = parallel.shard_batch(mesh, _first_batch(config))
  finals = []
  for fast in (True, False):
    m = model.clone(fast_cpu_backward=fast)
    step = trainer.make_train_step(config, m, tx, joint, mesh)
    state = parallel.replicate(mesh, state0)
    for _ in range(3):
      state, _ = step(state, batch)
    finals.append(jax.device_get(state))
  assert int(finals[0].step) == 3
  # Per leaf, by norm: Adam moves an entry whose gradient is at float32 noise by up to lr
  # either way (as in tests/test_train_parity.py), so a max-entry ratio measures only that.
  for new, old in zip(jax.tree.leaves(finals[0].params), jax.tree.leaves(finals[1].params)):
    assert np.linalg.norm(new - old) <= TOL * np.linalg.norm(old)
    assert np.abs(new - old).max() <= config.train.lr
  for new, old in zip(jax.tree.leaves(finals[0].batch_stats),
                      jax.tree.leaves(finals[1].batch_stats)):
    assert np.linalg.norm(new - old) <= TOL * np.linalg.norm(old)
  assert _rel(finals[1].params, state0.params) > 1e-4   # the steps moved the parameters
