"""ASEN++: global and local branches with attribute-aware spatial and channel attention.

Variable tree (the training code splits learning rates on these top-level names):
  params      = {'attr_embedding': {'embedding'},
                 'global': {'backbone': ..., 'head': ...}, 'local': {'backbone': ..., 'head': ...}}
  batch_stats = {'global': {'backbone': ...}, 'local': {'backbone': ...}}
'local' is absent when `with_local=False`. Head submodule names mirror the official PyTorch
`attnnet` (attr_transform1, conv, attr_transform2, fc1, fc2, feature_fc).
"""
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from asen_jax import resnet

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The official heads keep PyTorch's default initialisation, and so do ours (Flax's defaults differ:
# zero biases, and an attribute table of std 1/sqrt(attr_dim), which started the attribute query
# tanh(W a) near 0 and every attention map near uniform; tests/test_model.py compares the spreads).
# nn.Linear / nn.Conv2d weights: uniform(+-1/sqrt(fan_in)).
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# nn.Embedding: N(0, 1).
torch_embedding_init = nn.initializers.normal(stddev=1.0)


def torch_bias_init(fan_in):
  """nn.Linear / nn.Conv2d biases: uniform(+-1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class AttnEmbedding(nn.Module):
  """ASA (spatial) + ACA (channel) attention over backbone features, then feature_fc."""
  common_dim: int          # ASA dim D (512 global, 256 local)
  reduction: int = 2       # ACA hidden = C // reduction
  embed_dim: int = 1024
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, feats_bhwc, attr_ld, gather=None):
    """(B, H, W, C) image features, (L, attr_dim) line attributes -> (emb_le, attmap_lhw).

    `gather` maps per-image rows to per-line rows (None: line l is image l).
    """
    c = feats_bhwc.shape[-1]
    x = jnp.asarray(feats_bhwc, self.dtype)
    a = jnp.asarray(attr_ld, self.dtype)
    k = a.shape[-1]

    def dense(n, fan_in, name):
      return nn.Dense(n, kernel_init=torch_default_init, bias_init=torch_bias_init(fan_in),
                      dtype=self.dtype, name=name)

    # ASA: scaled dot product between the projected map and the projected attribute.
    img = jnp.tanh(nn.Conv(self.common_dim, (1, 1), kernel_init=torch_default_init,
                           bias_init=torch_bias_init(c), dtype=self.dtype, name="conv")(x))
    if gather is not None:   # the ASA projection ignores the attribute: once per image
      x, img = gather(x), gather(img)
    b, h, w, _ = x.shape
    q = jnp.tanh(dense(self.common_dim, k, "attr_transform1")(a))
    logits = jnp.einsum("bhwd,bd->bhw", img, q) / math.sqrt(self.common_dim)
    # Softmax in float32 so the map sums to 1 whatever the compute dtype.
    attmap = jax.nn.softmax(logits.astype(jnp.float32).reshape(b, h * w), axis=-1)
    attmap_bhw = attmap.reshape(b, h, w)
    pooled = jnp.einsum("bhwc,bhw->bc", x, attmap_bhw.astype(self.dtype))  # weighted sum
    # ACA: channel gate from the pooled feature and the attribute.
    a2 = nn.relu(dense(k, k, "attr_transform2")(a))
    gate = nn.relu(dense(c // self.reduction, c + k, "fc1")(jnp.concatenate([pooled, a2], -1)))
    gate = nn.sigmoid(dense(c, c // self.reduction, "fc2")(gate))
    emb = dense(self.embed_dim, c, "feature_fc")(pooled * gate)
    return emb.astype(jnp.float32), attmap_bhw


class Branch(nn.Module):
  """Backbone to `num_stages` + AttnEmbedding head."""
  backbone_name: str
  width: float
  common_dim: int
  reduction: int
  embed_dim: int
  dtype: Any = jnp.float32
  output_stride: int = 0   # 0: torchvision's (16)
  bn_roles: int = 1        # resnet.RoleBatchNorm
  fast_cpu_backward: bool = True   # resnet: cpu_ops' backward passes on the CPU

  def setup(self):
    self.backbone = resnet.make_backbone(self.backbone_name, 3, self.width, self.dtype,
                                         self.output_stride, bn_roles=self.bn_roles,
                                         fast=self.fast_cpu_backward)
    self.head = AttnEmbedding(self.common_dim, self.reduction, self.embed_dim, self.dtype)

  def __call__(self, images_bhwc, attr_ld, train=False, gather=None):
    return self.head(self.backbone(images_bhwc, train), attr_ld, gather)


class ASENPP(nn.Module):
  """ASEN++ with ONE attribute embedding table shared by the global and local branches."""
  num_attributes: int
  global_backbone: str = "resnet50"
  local_backbone: str = "resnet34"
  width: float = 1.0
  attr_dim: int = 512
  global_common_dim: int = 512
  local_common_dim: int = 256
  reduction: int = 2
  embed_dim: int = 1024
  # 0: the paper's stride 16 (a 14 x 14 map at 224 px); 8 doubles the global map's resolution.
  global_output_stride: int = 0
  with_local: bool = True
  dtype: Any = jnp.float32
  # Training-mode BatchNorm statistics per role (3: anchor, positive, negative) or per batch (1).
  bn_roles: int = 1
  # cpu_ops' hand-written backward passes where XLA:CPU's are slow (same gradients to 1e-5).
  fast_cpu_backward: bool = True

  def setup(self):
    self.attr_embedding = nn.Embed(self.num_attributes, self.attr_dim,
                                   embedding_init=torch_embedding_init, name="attr_embedding")
    # Explicit names: 'global' is a Python keyword, so it cannot be an attribute name.
    self.global_branch = Branch(self.global_backbone, self.width, self.global_common_dim,
                                self.reduction, self.embed_dim, self.dtype,
                                self.global_output_stride, self.bn_roles,
                                self.fast_cpu_backward, name="global")
    if self.with_local:
      self.local_branch = Branch(self.local_backbone, self.width, self.local_common_dim,
                                 self.reduction, self.embed_dim, self.dtype,
                                 bn_roles=self.bn_roles, fast_cpu_backward=self.fast_cpu_backward,
                                 name="local")

  def embed_global(self, images_bhwc, attributes_l, train=False, gather=None):
    """Normalised (B, H, W, 3) images, int (L,) attributes -> (emb_ld, attmap_lhw) float32.

    Without `gather`, L = B and line l is image l; with it, the backbone runs once per image and
    `gather` maps per-image rows to the lines' rows (evaluation.gather_lines).
    """
    return self.global_branch(images_bhwc, self.attr_embedding(attributes_l), train, gather)

  def embed_local(self, crops_bhwc, attributes_b, train=False):
    """Normalised (B, h, w, 3) RoI crops, int (B,) attributes -> (emb_bd, attmap_bhw) float32."""
    if not self.with_local:
      raise ValueError("This ASENPP was built with with_local=False (stage 'global'); "
                       "build it with with_local=True to embed local crops.")
    return self.local_branch(crops_bhwc, self.attr_embedding(attributes_b), train)

  def __call__(self, images, attributes, crops=None, train=False):
    """Runs global and (with_local, crops given) local, so `init` creates every variable.

    Returns {'global': (emb_bd, attmap_bhw)[, 'local': (emb_bd, attmap_bhw)]}.
    """
    out = {"global": self.embed_global(images, attributes, train)}
    if self.with_local and crops is not None:
      out["local"] = self.embed_local(crops, attributes, train)
    return out


MODEL_FIELDS = ("global_backbone", "local_backbone", "width", "attr_dim", "global_common_dim",
                "local_common_dim", "reduction", "embed_dim", "global_output_stride")
# What a field missing from an older config or checkpoint means.
MODEL_FIELD_DEFAULTS = {"global_output_stride": 0}   # the paper's stride


def build_model(model_config, num_attributes, with_local, dtype=None, bn_roles=1):
  """ASENPP from a `config.model` ConfigDict (configs/common.py); dtype defaults to compute_dtype;
  bn_roles 3 for the training BatchNorm of train.bn_stats='per_role'."""
  resnet.check_backbone(model_config.global_backbone, model_config.width,
                        model_config.global_output_stride, field="config.model.global_backbone")
  resnet.check_backbone(model_config.local_backbone, field="config.model.local_backbone")
  if int(num_attributes) < 1:
    raise ValueError(f"The model needs at least one attribute, got num_attributes={num_attributes}.")
  dtype = model_config.compute_dtype if dtype is None else dtype
  try:
    dtype = jnp.dtype(dtype)
  except TypeError:
    raise ValueError(f"config.model.compute_dtype = {dtype!r} is not a dtype; "
                     "use 'float32' or 'bfloat16'.") from None
  return ASENPP(num_attributes=int(num_attributes), with_local=bool(with_local), dtype=dtype,
                bn_roles=bn_roles, fast_cpu_backward=model_config.fast_cpu_backward,
                **{f: model_config[f] for f in MODEL_FIELDS})


def init_variables(model, rng, image_size=224, local_size=112):
  """{'params', 'batch_stats'} (float32) for `model`, from a 1-image dummy batch."""
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  crops = jnp.zeros((1, local_size, local_size, 3), jnp.float32) if model.with_local else None
  attrs = jnp.zeros((1,), jnp.int32)
  variables = jax.jit(lambda r: model.init(r, images, attrs, crops))(rng)
  return {"params": variables["params"], "batch_stats": variables["batch_stats"]}


def normalize_images(x_bhwc):
  """[0, 255] (uint8 or float) NHWC RGB -> float32 ImageNet-normalised."""
  x = jnp.asarray(x_bhwc).astype(jnp.float32) / 255.0
  return (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)


def l2_normalize(x, eps=1e-12, axis=-1):
  """x / max(||x||, eps) along `axis` (as torch.nn.functional.normalize)."""
  x = jnp.asarray(x, jnp.float32)
  norm = jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True))
  return x / jnp.maximum(norm, eps)


def fused_embedding(global_emb, local_emb, beta=0.6):
  """concat(sqrt(beta) l2n(g), sqrt(1-beta) l2n(l)): a dot product is beta cos_g + (1-beta) cos_l."""
  return jnp.concatenate([math.sqrt(beta) * l2_normalize(global_emb),
                          math.sqrt(1.0 - beta) * l2_normalize(local_emb)], axis=-1)


def count_params(tree):
  """Number of scalars in a pytree of arrays (or ShapeDtypeStructs)."""
  return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree.leaves(tree)))


def count_params_by_part(params):
  """{'attr_embedding', 'global/backbone', 'global/head', 'local/...', 'total'} parameter counts."""
  counts = {"attr_embedding": count_params(params["attr_embedding"])}
  for branch in ("global", "local"):
    if branch in params:
      for part in ("backbone", "head"):
        counts[f"{branch}/{part}"] = count_params(params[branch][part])
  counts["total"] = count_params(params)
  return counts
