"""Convolution, BatchNorm and max-pool with hand-written backward passes for XLA:CPU.

XLA:CPU's own backward ops run far below its matmul speed (1x1 weight gradients up to 16x their
forward, BatchNorm and max-pool backward 5-17x; docs/speed.md). These versions compute the same
gradients from matrix products, one-pass reductions and the forward's argmax. `fast=False`, or
any platform other than the CPU, gives XLA's own ops and gradients.
"""
import functools

import jax
import jax.numpy as jnp

_CONV_DIMS = ("NHWC", "HWIO", "NHWC")


def use_custom(fast):
  """True where the hand-written backward passes apply: asked for, and tracing for the CPU."""
  return bool(fast) and jax.default_backend() == "cpu"


def _keep(x):
  """`x` through a while loop whose trip count XLA cannot know (1, or 0 for a NaN: the identity
  either way): XLA:CPU drops optimization barriers, but never fuses a loop into its consumers."""
  flat = x.reshape(-1)
  trips = (flat[0] == flat[0]).astype(jnp.int32)
  corner = (0,) * x.ndim

  def body(c):   # rewrites one element with itself, so that XLA cannot drop the loop
    i, v = c
    return i + 1, v.at[corner].set(v[corner] + (0 * i).astype(v.dtype))

  return jax.lax.while_loop(lambda c: c[0] < trips, body, (0, x))[1]


@jax.custom_vjp
def _stored(x):
  return _keep(x)


_stored.defvjp(lambda x: (_keep(x), None), lambda _, g: (g,))


def materialize(x, fast=True):
  """`x` computed once and stored. XLA:CPU otherwise fuses a residual stream into each of its
  consumers, recomputing every block before it (quadratic in depth); identity elsewhere."""
  return _stored(x) if use_custom(fast) else x


def _xla_conv(x, w, strides, padding):
  return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_CONV_DIMS)


def _matmul(a, b, dtype):
  return jnp.dot(a, b, preferred_element_type=jnp.promote_types(dtype, jnp.float32)).astype(dtype)


def _conv_1x1(x, w, strides):
  # A 1x1 conv is one matrix product over the strided pixels (4x XLA:CPU's conv on ResNet-50).
  xs = x[:, ::strides[0], ::strides[1], :]
  cin, cout = w.shape[2:]
  return _matmul(xs.reshape(-1, cin), w.reshape(cin, cout), x.dtype).reshape(xs.shape[:3] + (cout,))


def _is_1x1(w, padding):
  return w.shape[:2] == (1, 1) and padding == ((0, 0), (0, 0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, w, strides, padding):
  return _conv_1x1(x, w, strides) if _is_1x1(w, padding) else _xla_conv(x, w, strides, padding)


def _conv_fwd(x, w, strides, padding):
  return _conv(x, w, strides, padding), (x, w)


def _conv_bwd(strides, padding, res, dy):
  x, w = res
  if not _is_1x1(w, padding):   # XLA's own input and weight gradients
    _, vjp = jax.vjp(lambda x_, w_: _xla_conv(x_, w_, strides, padding), x, w)
    return vjp(dy)
  cin, cout = w.shape[2:]
  xs = x[:, ::strides[0], ::strides[1], :]
  dw = _matmul(xs.reshape(-1, cin).T, dy.reshape(-1, cout), w.dtype).reshape(w.shape)
  dxs = _matmul(dy.reshape(-1, cout), w.reshape(cin, cout).T, x.dtype).reshape(xs.shape)
  # Back to the full grid: zeros between the strided pixels and after the last one.
  pads = [(0, 0, 0)] + [(0, n - (s * (m - 1) + 1), s - 1)
                        for n, m, s in zip(x.shape[1:3], xs.shape[1:3], strides)] + [(0, 0, 0)]
  return jax.lax.pad(dxs, jnp.zeros((), dxs.dtype), pads), dw


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv(x, w, strides, padding, fast=True):
  """NHWC x HWIO convolution (no dilation, no groups); `padding` as ((top, bottom), (l, r))."""
  strides, padding = tuple(strides), tuple(tuple(p) for p in padding)
  if use_custom(fast):
    return _conv(x, w, strides, padding)
  return _xla_conv(x, w, strides, padding)


def _by_role(x, roles):
  return x.reshape((roles, x.shape[0] // roles) + x.shape[1:])


def _per_row(v, n):
  """[roles, C] per-role values -> [n, 1, 1, C] (or [1, 1, 1, C]) to broadcast over NHWC rows."""
  roles = v.shape[0]
  if roles > 1:
    v = jnp.broadcast_to(v[:, None], (roles, n // roles, v.shape[-1])).reshape(n, -1)
  return v[:, None, None, :]


def _bn_stats(x, roles, fast_variance):
  # Reductions per role; everything elementwise stays NHWC, so XLA:CPU splits its loops over
  # the batch rows instead of over 3 roles on 2 threads.
  xr = _by_role(x, roles)
  axes = (1, 2, 3)
  mean = xr.mean(axes)
  if fast_variance:   # flax's BatchNorm: E[x^2] - E[x]^2, clipped at 0
    var = jnp.maximum(0.0, jnp.square(xr).mean(axes) - jnp.square(mean))
  else:               # two passes, as PyTorch
    var = jnp.square(xr - mean[:, None, None, None]).mean(axes)
  return mean, var


def _bn_apply(x, mean, var, scale, bias, eps):
  n = x.shape[0]
  return (x - _per_row(mean, n)) * _per_row(jax.lax.rsqrt(var + eps) * scale, n) + bias


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _bn(x, scale, bias, roles, eps, fast_variance):
  mean, var = _bn_stats(x, roles, fast_variance)
  return _bn_apply(x, mean, var, scale, bias, eps), mean, var


def _bn_fwd(x, scale, bias, roles, eps, fast_variance):
  mean, var = _bn_stats(x, roles, fast_variance)
  rstd = jax.lax.rsqrt(var + eps)
  return (_bn_apply(x, mean, var, scale, bias, eps), mean, var), (x, mean, rstd, scale)


def _bn_bwd(roles, eps, fast_variance, res, cotangents):
  # The statistics only feed the running averages, so their cotangents are zero and ignored.
  del eps, fast_variance
  dy = cotangents[0]
  x, mean, rstd, scale = res
  n = x.shape[0]
  xhat = (x - _per_row(mean, n)) * _per_row(rstd, n)
  axes = (1, 2, 3)
  dy_mean = _by_role(dy, roles).mean(axes)
  dyx_mean = _by_role(dy * xhat, roles).mean(axes)
  # Means, not sums: (m dy - sum dy - xhat sum(dy xhat)) / m cancels badly at m ~ 2e5.
  dx = _per_row(rstd * scale, n) * (dy - _per_row(dy_mean, n) - xhat * _per_row(dyx_mean, n))
  m = x.size // (roles * x.shape[-1])
  return dx, dyx_mean.sum(0) * m, dy_mean.sum(0) * m


_bn.defvjp(_bn_fwd, _bn_bwd)


def batch_norm_train(x, scale, bias, roles, eps, fast_variance, fast=True):
  """Training-mode BatchNorm of float32 NHWC `x`, each of `roles` equal parts of the batch with
  its own statistics: (y, mean [roles, C], biased var [roles, C])."""
  if use_custom(fast):
    return _bn(x, scale, bias, roles, eps, fast_variance)
  mean, var = _bn_stats(x, roles, fast_variance)
  return _bn_apply(x, mean, var, scale, bias, eps), mean, var


def _pool_taps(xp, ho, wo):
  """The 9 strided (N, ho, wo, C) views of a 3x3/2 window over the padded input."""
  return [xp[:, i:i + 2 * ho - 1:2, j:j + 2 * wo - 1:2, :] for i in range(3) for j in range(3)]


def _pool_pad(x):
  return jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)


@jax.custom_vjp
def _max_pool(x):
  return _max_pool_fwd(x)[0]


def _max_pool_fwd(x):
  h, w = x.shape[1:3]
  ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
  taps = _pool_taps(_pool_pad(x), ho, wo)
  best, arg = taps[0], jnp.zeros(taps[0].shape, jnp.int8)
  for k, t in enumerate(taps[1:], 1):
    # Strictly greater: the first maximum in window order wins, as in XLA and PyTorch.
    better = t > best
    best, arg = jnp.where(better, t, best), jnp.where(better, jnp.int8(k), arg)
  arg = _keep(arg)   # stored, not recomputed from the input in the backward pass
  return best, (arg, x.shape)


def _max_pool_bwd(res, dy):
  arg, (n, h, w, c) = res
  ho, wo = dy.shape[1], dy.shape[2]
  g = [jnp.where(arg == k, dy, 0).astype(dy.dtype) for k in range(9)]
  g = [g[3 * i:3 * i + 3] for i in range(3)]   # g[i][j]: window row i, column j

  def shift(a, down, right):
    # a[m - down, n - right], zero outside: the window one output step up/left.
    return jnp.pad(a, ((0, 0), (down, 1 - down), (right, 1 - right), (0, 0)))

  # Padded input position (2m + p, 2n + q) receives from outputs (m, n) and (m-1, .)/(., n-1).
  even_even = (shift(g[0][0], 0, 0) + shift(g[2][0], 1, 0) + shift(g[0][2], 0, 1)
               + shift(g[2][2], 1, 1))
  odd_even = shift(g[1][0], 0, 0) + shift(g[1][2], 0, 1)
  even_odd = shift(g[0][1], 0, 0) + shift(g[2][1], 1, 0)
  odd_odd = shift(g[1][1], 0, 0)
  rows_even = jnp.stack([even_even, even_odd], axis=3)      # (N, ho+1, wo+1, 2, C)
  rows_odd = jnp.stack([odd_even, odd_odd], axis=3)
  full = jnp.stack([rows_even, rows_odd], axis=2)           # (N, ho+1, 2, wo+1, 2, C)
  full = full.reshape(n, 2 * ho + 2, 2 * wo + 2, c)
  return (full[:, 1:h + 1, 1:w + 1, :],)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool_3x3_s2(x, fast=True):
  """PyTorch's MaxPool2d(3, stride 2, padding 1) on NHWC `x` (padding never wins: -inf)."""
  if use_custom(fast):
    return _max_pool(x)
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                               ((0, 0), (1, 1), (1, 1), (0, 0)))
