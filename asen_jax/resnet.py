"""ResNet-18/34/50 backbones in the torchvision layout, truncated after `num_stages` stages.

NHWC in and out. Padding is explicit and symmetric like PyTorch: Flax 'SAME' pads a stride-2
layer on an even input as (0, 1), which keeps the shape but changes every number, so pretrained
torchvision weights would not reproduce. Module names mirror torchvision keys (`layer2_0/conv1`
is `layer2.0.conv1`; `downsample_conv`/`downsample_bn` are `downsample.0`/`downsample.1`) so that
`asen_jax.convert` maps them one to one.
"""
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from asen_jax import cpu_ops

# Blocks per stage and block type; only the first `num_stages` stages are built.
ARCHS = {
    "resnet18": ((2, 2, 2, 2), "basic"),
    "resnet34": ((3, 4, 6, 3), "basic"),
    "resnet50": ((3, 4, 6, 3), "bottleneck"),
}
BASE_PLANES = (64, 128, 256, 512)
# On the CPU a training batch whose roles' stem maps are this large runs one trunk pass per role;
# below it the passes cost more to compile than they save.
SPLIT_ROLES_MIN_BYTES = 1 << 20

# torchvision initialises convs with kaiming_normal(fan_out, relu).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def scaled_channels(channels, width):
  """`channels * width` rounded to an int, at least 1 (width < 1 gives small test models)."""
  return max(1, int(round(channels * width)))


def output_channels(name, num_stages=3, width=1.0):
  """Channels of the last stage's output (1024 for resnet50 to layer3, 256 for resnet18/34)."""
  check_backbone(name, width, num_stages=num_stages)
  _, block = ARCHS[name]
  planes = scaled_channels(BASE_PLANES[num_stages - 1], width)
  return planes * (4 if block == "bottleneck" else 1)


class RoleBatchNorm(nn.BatchNorm):
  """BatchNorm that, in training, normalises each of `roles` equal parts of the batch with its
  own statistics and updates the running averages once per part, in order, with the unbiased
  variance: what `roles` separate PyTorch forwards do (the official trainer's anchor, positive,
  negative). roles=1 is flax's BatchNorm, or PyTorch's with `torch_stats` (a batch that is one
  role); `fast` takes cpu_ops' backward pass on the CPU."""
  roles: int = 1
  fast: bool = True
  torch_stats: bool = False

  @nn.compact
  def __call__(self, x):
    torch_stats = self.torch_stats or self.roles > 1
    if self.use_running_average or (not torch_stats and not cpu_ops.use_custom(self.fast)):
      return super().__call__(x)
    c = x.shape[-1]
    scale = self.param("scale", self.scale_init, (c,), self.param_dtype)
    bias = self.param("bias", self.bias_init, (c,), self.param_dtype)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    # flax's statistics are E[x^2] - E[x]^2 with a biased running variance; PyTorch's are two
    # passes with an unbiased running variance.
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))   # at least float32, as flax
    y, mean_r, var_r = cpu_ops.batch_norm_train(x32, scale, bias, self.roles, self.epsilon,
                                                not torch_stats, self.fast)
    if not self.is_initializing():
      n = x.size // c // self.roles
      if torch_stats:
        var_r = var_r * n / max(n - 1, 1)
      m, v = ra_mean.value, ra_var.value
      for r in range(self.roles):
        m = self.momentum * m + (1 - self.momentum) * mean_r[r]
        v = self.momentum * v + (1 - self.momentum) * var_r[r]
      ra_mean.value, ra_var.value = m, v
    return y.astype(self.dtype or x.dtype)


def batch_norm(train, dtype, roles=1, fast=True, torch_stats=False, **kwargs):
  """torchvision's BatchNorm2d (momentum 0.1, eps 1e-5); the rest as in RoleBatchNorm."""
  return RoleBatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                       roles=roles, fast=fast, torch_stats=torch_stats, **kwargs)


class Conv(nn.Module):
  """Bias-free NHWC conv with torchvision's init, `kernel` laid out as flax's nn.Conv's."""
  features: int
  kernel_size: Sequence[int]
  strides: Sequence[int] = (1, 1)
  padding: Any = ((0, 0), (0, 0))
  dtype: Any = jnp.float32
  fast: bool = True

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", conv_init,
                        tuple(self.kernel_size) + (x.shape[-1], self.features), jnp.float32)
    return cpu_ops.conv(jnp.asarray(x, self.dtype), jnp.asarray(kernel, self.dtype),
                        self.strides, self.padding, self.fast)


def _pad(k):
  # PyTorch pads k x k convs (k odd) by k // 2 on every side.
  return ((k // 2, k // 2), (k // 2, k // 2))


class BasicBlock(nn.Module):
  """Two 3x3 convs (ResNet-18/34); stride on the first."""
  planes: int
  strides: int = 1
  dtype: Any = jnp.float32
  bn_roles: int = 1
  fast: bool = True
  torch_stats: bool = False
  expansion = 1

  @nn.compact
  def __call__(self, x, train):
    conv = functools.partial(Conv, dtype=self.dtype, fast=self.fast)
    norm = functools.partial(batch_norm, train, self.dtype, self.bn_roles, self.fast,
                             self.torch_stats)
    s = (self.strides, self.strides)
    y = conv(self.planes, (3, 3), s, padding=_pad(3), name="conv1")(x)
    y = nn.relu(norm(name="bn1")(y))
    y = conv(self.planes, (3, 3), padding=_pad(3), name="conv2")(y)
    y = norm(name="bn2")(y)
    if self.strides != 1 or x.shape[-1] != self.planes:
      x = conv(self.planes, (1, 1), s, name="downsample_conv")(x)
      x = norm(name="downsample_bn")(x)
    return cpu_ops.materialize(nn.relu(y + x), self.fast)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 -> 1x1 (x4) block, stride on the 3x3 conv (torchvision v1.5)."""
  planes: int
  strides: int = 1
  dtype: Any = jnp.float32
  bn_roles: int = 1
  fast: bool = True
  torch_stats: bool = False
  expansion = 4

  @nn.compact
  def __call__(self, x, train):
    conv = functools.partial(Conv, dtype=self.dtype, fast=self.fast)
    norm = functools.partial(batch_norm, train, self.dtype, self.bn_roles, self.fast,
                             self.torch_stats)
    out = self.planes * self.expansion
    s = (self.strides, self.strides)
    y = conv(self.planes, (1, 1), name="conv1")(x)
    y = nn.relu(norm(name="bn1")(y))
    y = conv(self.planes, (3, 3), s, padding=_pad(3), name="conv2")(y)
    y = nn.relu(norm(name="bn2")(y))
    y = conv(out, (1, 1), name="conv3")(y)
    y = norm(name="bn3")(y)
    if self.strides != 1 or x.shape[-1] != out:
      x = conv(out, (1, 1), s, name="downsample_conv")(x)
      x = norm(name="downsample_bn")(x)
    return cpu_ops.materialize(nn.relu(y + x), self.fast)


class ResNet(nn.Module):
  """torchvision ResNet without the head, stopping after `num_stages` stages (ASEN: 3)."""
  stage_sizes: Sequence[int]
  block: str = "bottleneck"   # 'basic' | 'bottleneck'
  num_stages: int = 3
  width: float = 1.0
  dtype: Any = jnp.float32    # compute dtype; params stay float32
  # Input size / output size. torchvision's is 4 * 2**(num_stages - 1) (16 to layer3); a smaller
  # one keeps the later stages at stride 1 (same weights, a finer map, more compute).
  output_stride: int = 0      # 0: torchvision's
  bn_roles: int = 1           # RoleBatchNorm: 3 normalises anchors, positives, negatives apart
  fast: bool = True           # cpu_ops' backward passes where they apply (XLA:CPU)

  @nn.compact
  def __call__(self, x_bhwc, train=False):
    """(B, H, W, 3) normalised images -> (B, H/16, W/16, C) features for num_stages=3
    (H/output_stride with an output_stride)."""
    block_cls = Bottleneck if self.block == "bottleneck" else BasicBlock
    # On the CPU each role runs the trunk on its own, as the official trainer's three forwards:
    # the same numbers, with a third of the activations live at a time.
    b, h, w, _ = x_bhwc.shape
    stem_bytes = (b // max(self.bn_roles, 1) * -(-h // 2) * -(-w // 2)
                  * scaled_channels(64, self.width) * jnp.dtype(self.dtype).itemsize)
    split = (train and self.bn_roles > 1 and cpu_ops.use_custom(self.fast)
             and stem_bytes >= SPLIT_ROLES_MIN_BYTES)
    roles = 1 if split else self.bn_roles
    stem = Conv(scaled_channels(64, self.width), (7, 7), (2, 2), _pad(7), self.dtype, self.fast,
                name="conv1")
    stem_bn = batch_norm(train, self.dtype, roles, self.fast, split, name="bn1")
    blocks = []
    stride, target = 4, self.output_stride or 4 * 2 ** (self.num_stages - 1)
    for stage in range(self.num_stages):
      planes = scaled_channels(BASE_PLANES[stage], self.width)
      for i in range(self.stage_sizes[stage]):
        strides = 2 if (stage > 0 and i == 0 and stride < target) else 1
        stride *= strides
        blocks.append(block_cls(planes, strides, self.dtype, roles, self.fast, split,
                                name=f"layer{stage + 1}_{i}"))

    def trunk(x):
      x = cpu_ops.max_pool_3x3_s2(nn.relu(stem_bn(stem(x))), self.fast)
      for block in blocks:
        x = block(x, train)
      return x

    x = jnp.asarray(x_bhwc, self.dtype)
    if not split:
      return trunk(x)
    parts = x.reshape((self.bn_roles, -1) + x.shape[1:])
    return jnp.concatenate([trunk(parts[r]) for r in range(self.bn_roles)])


def output_strides(num_stages=3):
  """The output strides a ResNet truncated after `num_stages` stages can have: (4, 8, 16) for 3."""
  return tuple(4 * 2 ** k for k in range(num_stages))


def check_backbone(name, width=1.0, output_stride=0, num_stages=3, field="backbone"):
  """One ValueError naming `field` for an unknown arch, a width <= 0 or an impossible stride."""
  if name not in ARCHS:
    raise ValueError(f"{field} = {name!r} is not a known backbone; use one of "
                     f"{', '.join(sorted(ARCHS))}.")
  if not 1 <= num_stages <= 4:
    raise ValueError(f"{field} {name}: num_stages must be in 1..4, got {num_stages}.")
  if not width > 0:
    raise ValueError(f"{field} {name}: the width must be > 0, got {width}.")
  strides = output_strides(num_stages)
  if output_stride and output_stride not in strides:
    raise ValueError(f"{field} {name}: output stride {output_stride!r} is not possible for a "
                     f"backbone to layer{num_stages}; use 0 (torchvision's {strides[-1]}) or one "
                     f"of {strides}.")


def make_backbone(name, num_stages=3, width=1.0, dtype=jnp.float32, output_stride=0, **kwargs):
  """ResNet `name` ('resnet18'|'resnet34'|'resnet50') truncated after `num_stages` stages.

  output_stride: 0 for torchvision's (16 to layer3), or a smaller one of `output_strides()`:
  the stages past it run at stride 1 (same weights, so pretrained files load unchanged).
  """
  check_backbone(name, width, output_stride, num_stages)
  stage_sizes, block = ARCHS[name]
  return ResNet(stage_sizes, block, num_stages, width, dtype, output_stride, **kwargs)
