"""ASEN++ model: parity with the official-layout PyTorch reference, counts, helpers."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from asen_jax import convert
from asen_jax import model as model_lib
from asen_jax import trees
from configs import common
from tests import torch_reference as tr

torch.set_num_threads(2)

PAPER_COUNTS = {"attr_embedding": 4_096, "global/backbone": 8_543_296, "global/head": 3_411_968,
                "local/backbone": 8_170_304, "local/head": 854_400, "total": 20_984_064}


def rel_err(a, b):
  return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def assert_close(out, ref, rtol=1e-4):
  out = np.asarray(out)
  assert out.shape == ref.shape
  assert rel_err(out, ref) <= rtol
  assert np.abs(out - ref).max() <= rtol * np.abs(ref).max()


def torch_embed(net, branch, x_bhwc, attrs):
  with torch.no_grad():
    emb, attmap = net(torch.from_numpy(x_bhwc.transpose(0, 3, 1, 2)),
                      torch.from_numpy(attrs).long(), branch)
  return emb.numpy(), attmap.numpy()


def save_official(path, state_dict, global_only=False):
  sd = {k: v for k, v in state_dict.items()
        if not (global_only and k.startswith("choices.local."))}
  torch.save({"epoch": 7, "model": sd, "mAP": np.float64(0.61)}, path)
  return str(path)


def model_config(**overrides):
  c = common.base_config("joint").model
  for k, v in overrides.items():
    c[k] = v
  return c


@pytest.fixture(scope="module")
def paper(tmp_path_factory):
  """Paper-config reference (8 attributes) saved as an official stage-2 checkpoint, converted."""
  net = tr.random_asenpp(8, seed=11)
  path = save_official(tmp_path_factory.mktemp("official") / "checkpoint.pth.tar",
                       net.state_dict())
  variables, info = convert.official_to_variables(convert.read_weight_file(path), path)
  model = model_lib.build_model(model_config(), info["num_attributes"], with_local=True)
  return net, variables, info, model


def test_paper_param_counts():
  model = model_lib.build_model(model_config(), 8, with_local=True)
  shapes = jax.eval_shape(lambda: model_lib.init_variables(model, jax.random.key(0)))
  assert model_lib.count_params_by_part(shapes["params"]) == PAPER_COUNTS
  assert model_lib.count_params(shapes["params"]) == 20_984_064
  assert set(shapes["batch_stats"]) == {"global", "local"}
  assert set(shapes["batch_stats"]["local"]) == {"backbone"}


def test_heads_start_as_the_official_pytorch_modules_do():
  """The official code leaves every head at PyTorch's defaults: nn.Embedding N(0, 1); nn.Linear
  and 1x1 nn.Conv2d weights and biases uniform(+-1/sqrt(fan_in)). Flax's defaults differ (a
  0.044-std table at 512 dims, zero biases), and a 23x smaller table starts the attribute query
  tanh(W a) near 0, i.e. every attention map near uniform. Every head parameter of 256 or more
  entries must have the spread of a freshly built PyTorch reference's."""
  kw = dict(global_backbone="resnet18", local_backbone="resnet18", width=0.25)
  torch.manual_seed(0)
  ref, _ = convert.official_to_variables(tr.ASENPP(8, **kw).state_dict(), "reference")
  model = model_lib.build_model(model_config(**kw), 8, with_local=True)
  init = model_lib.init_variables(model, jax.random.key(0), 64, 32)
  ref_flat = trees.flatten_tree(ref["params"])
  checked = []
  for key, value in trees.flatten_tree(init["params"]).items():
    if "/backbone/" in key or np.size(value) < 256:
      continue
    ratio = float(np.std(np.asarray(value)) / np.std(ref_flat[key]))
    assert 0.9 < ratio < 1.1, f"{key}: std {ratio:.3f} x PyTorch's"
    checked.append(key)
  assert "attr_embedding/embedding" in checked
  for branch in ("global", "local"):
    for layer in ("conv", "attr_transform1", "attr_transform2", "feature_fc"):
      assert f"{branch}/head/{layer}/bias" in checked, (branch, layer)


def test_stage1_model_has_no_local_branch():
  model = model_lib.build_model(model_config(), 8, with_local=False)
  shapes = jax.eval_shape(lambda: model_lib.init_variables(model, jax.random.key(0)))
  assert set(shapes["params"]) == {"attr_embedding", "global"}
  assert set(shapes["batch_stats"]) == {"global"}
  assert model_lib.count_params(shapes["params"]) == 4_096 + 8_543_296 + 3_411_968


def test_paper_checkpoint_converts_with_counts(paper):
  _, variables, info, _ = paper
  assert info["stage"] == 2 and info["num_attributes"] == 8
  assert info["model"] == {f: model_config()[f] for f in model_lib.MODEL_FIELDS}
  assert model_lib.count_params_by_part(variables["params"]) == PAPER_COUNTS


def test_paper_global_branch_matches_reference(paper):
  net, variables, _, model = paper
  x = np.random.RandomState(0).randn(2, 224, 224, 3).astype(np.float32)
  attrs = np.array([3, 6], np.int32)
  emb, attmap = jax.jit(lambda v, x, a: model.apply(v, x, a, method="embed_global"))(
      variables, x, attrs)
  ref_emb, ref_map = torch_embed(net, "global", x, attrs)
  assert emb.shape == (2, 1024) and attmap.shape == (2, 14, 14)
  assert emb.dtype == jnp.float32 and attmap.dtype == jnp.float32
  assert_close(emb, ref_emb)
  assert_close(attmap, ref_map)
  np.testing.assert_allclose(np.asarray(attmap).sum((1, 2)), 1.0, rtol=1e-5)


def test_paper_local_branch_matches_reference(paper):
  net, variables, _, model = paper
  crops = np.random.RandomState(1).randn(2, 112, 112, 3).astype(np.float32)
  attrs = np.array([0, 7], np.int32)
  emb, attmap = jax.jit(lambda v, x, a: model.apply(v, x, a, method="embed_local"))(
      variables, crops, attrs)
  ref_emb, ref_map = torch_embed(net, "local", crops, attrs)
  assert emb.shape == (2, 1024) and attmap.shape == (2, 7, 7)
  assert_close(emb, ref_emb)
  assert_close(attmap, ref_map)


def test_stage1_checkpoint_small_width(tmp_path):
  net = tr.random_asenpp(5, seed=12, width=0.25, with_local=False)
  path = save_official(tmp_path / "model_best.pth.tar", net.state_dict())
  variables, info = convert.official_to_variables(convert.read_weight_file(path), path)
  assert info["stage"] == 1 and info["num_attributes"] == 5 and info["model"]["width"] == 0.25
  assert set(variables["params"]) == {"attr_embedding", "global"}
  model = model_lib.build_model(model_config(width=0.25), 5, with_local=False)
  x = np.random.RandomState(2).randn(3, 97, 97, 3).astype(np.float32)
  attrs = np.array([4, 0, 2], np.int32)
  emb, attmap = jax.jit(lambda v: model.apply(v, x, attrs, method="embed_global"))(variables)
  ref_emb, ref_map = torch_embed(net, "global", x, attrs)
  assert attmap.shape == (3, 7, 7)
  assert_close(emb, ref_emb)
  assert_close(attmap, ref_map)


def test_stage2_other_backbones_small_width(tmp_path):
  """The architecture is read off the keys: resnet34 global + resnet18 local, other dims."""
  kw = dict(global_backbone="resnet34", local_backbone="resnet18", width=0.25, attr_dim=32,
            global_common_dim=24, local_common_dim=16, reduction=4, embed_dim=40)
  net = tr.random_asenpp(3, seed=13, **kw)
  path = save_official(tmp_path / "checkpoint.pth.tar", net.state_dict())
  variables, info = convert.official_to_variables(convert.read_weight_file(path), path)
  # Official checkpoints are the paper's network: the global map at stride 16 (field value 0).
  assert info["model"] == dict(kw, global_output_stride=0) and info["stage"] == 2
  model = model_lib.ASENPP(3, **kw)
  crops = np.random.RandomState(3).randn(2, 48, 48, 3).astype(np.float32)
  images = np.random.RandomState(4).randn(2, 64, 64, 3).astype(np.float32)
  attrs = np.array([2, 1], np.int32)
  out = jax.jit(lambda v: model.apply(v, images, attrs, crops))(variables)
  for branch, x in (("global", images), ("local", crops)):
    ref_emb, ref_map = torch_embed(net, branch, x, attrs)
    assert_close(out[branch][0], ref_emb)
    assert_close(out[branch][1], ref_map)


def test_bfloat16_compute_stays_close_to_float32():
  model32 = model_lib.build_model(model_config(width=0.25), 4, with_local=False)
  model16 = model_lib.build_model(model_config(width=0.25, compute_dtype="bfloat16"), 4,
                                  with_local=False)
  assert model16.dtype == jnp.bfloat16
  variables = model_lib.init_variables(model32, jax.random.key(0), 64, 32)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
  x = np.random.RandomState(5).randn(2, 64, 64, 3).astype(np.float32)
  attrs = np.array([1, 3], np.int32)
  e32, m32 = jax.jit(lambda v: model32.apply(v, x, attrs, method="embed_global"))(variables)
  e16, m16 = jax.jit(lambda v: model16.apply(v, x, attrs, method="embed_global"))(variables)
  assert e16.dtype == jnp.float32 and m16.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(m16).sum((1, 2)), 1.0, rtol=1e-5)
  assert rel_err(e16, np.asarray(e32)) < 0.05
  assert rel_err(e16, np.asarray(e32)) > 0  # really computed in bfloat16


def test_train_mode_updates_only_that_branch():
  model = model_lib.build_model(model_config(width=0.25), 4, with_local=True)
  # Converted reference weights: cheaper than compiling init, and non-trivial BN statistics.
  variables, _ = convert.official_to_variables(tr.random_asenpp(4, seed=14, width=0.25)
                                               .state_dict())
  x = np.random.RandomState(6).randn(4, 64, 64, 3).astype(np.float32)
  (emb, _), updates = jax.jit(lambda v, x: model.apply(
      v, x, jnp.arange(4), train=True, method="embed_global", mutable=["batch_stats"]))(
          variables, x)
  assert emb.shape == (4, 1024)
  old, new = variables["batch_stats"], updates["batch_stats"]
  assert not np.allclose(old["global"]["backbone"]["bn1"]["mean"],
                         new["global"]["backbone"]["bn1"]["mean"])
  jax.tree.map(np.testing.assert_array_equal, old["local"], new["local"])


def test_embed_local_needs_local_branch():
  model = model_lib.build_model(model_config(width=0.25), 2, with_local=False)
  with pytest.raises(ValueError, match="built with with_local=False"):
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                      jnp.zeros((1,), jnp.int32), method="embed_local"))


@pytest.mark.parametrize("field", ["global_backbone", "local_backbone"])
def test_bad_backbone_name(field):
  with pytest.raises(ValueError, match=rf"config.model.{field} = 'resnet101' is not a known"):
    model_lib.build_model(model_config(**{field: "resnet101"}), 8, with_local=True)


def test_global_output_stride_8_doubles_the_attention_map():
  """The same variables at stride 8 give a 2x finer global map; the local branch stays at 16."""
  x = np.random.RandomState(0).rand(2, 96, 96, 3).astype(np.float32)
  attrs = np.array([0, 1], np.int32)
  crops = np.random.RandomState(1).rand(2, 64, 64, 3).astype(np.float32)
  fine = model_lib.build_model(model_config(width=0.25, global_output_stride=8), 2, True)
  coarse = model_lib.build_model(model_config(width=0.25), 2, True)
  variables = fine.init(jax.random.key(0), x, attrs, crops)
  out_fine, out_coarse = fine.apply(variables, x, attrs, crops), coarse.apply(variables, x, attrs,
                                                                               crops)
  assert out_fine["global"][1].shape == (2, 12, 12)
  assert out_coarse["global"][1].shape == (2, 6, 6)
  np.testing.assert_array_equal(out_fine["local"][0], out_coarse["local"][0])
  assert out_fine["local"][1].shape == (2, 4, 4)


def test_bad_global_output_stride():
  with pytest.raises(ValueError, match=r"config.model.global_backbone .*output stride 32 is not "
                                       r"possible"):
    model_lib.build_model(model_config(global_output_stride=32), 8, with_local=True)


def test_normalize_images_imagenet_stats():
  x = np.zeros((1, 1, 2, 3), np.uint8)
  x[0, 0, 1] = 255
  out = np.asarray(model_lib.normalize_images(x))
  assert out.dtype == np.float32
  np.testing.assert_allclose(out[0, 0, 0], [-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225],
                             rtol=1e-6)
  np.testing.assert_allclose(out[0, 0, 1], [0.515 / 0.229, 0.544 / 0.224, 0.594 / 0.225],
                             rtol=1e-6)
  np.testing.assert_allclose(model_lib.normalize_images(x.astype(np.float32)), out)


def test_l2_normalize_and_fused_embedding():
  rng = np.random.RandomState(7)
  g, l = rng.randn(2, 3, 8), rng.randn(2, 3, 5)
  np.testing.assert_allclose(np.linalg.norm(model_lib.l2_normalize(g[0]), axis=-1), 1, rtol=1e-6)
  assert np.all(np.asarray(model_lib.l2_normalize(np.zeros((2, 4)))) == 0)  # no NaN
  beta = 0.6
  fa, fb = (np.asarray(model_lib.fused_embedding(g[i], l[i], beta)) for i in (0, 1))
  cos = lambda a, b: (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
  expected = beta * cos(g[0], g[1]) + (1 - beta) * cos(l[0], l[1])
  np.testing.assert_allclose((fa * fb).sum(-1), expected, rtol=1e-5)
  assert fa.shape == (3, 13)
  np.testing.assert_allclose(np.linalg.norm(fa[:, :8], axis=-1), math.sqrt(beta), rtol=1e-6)
