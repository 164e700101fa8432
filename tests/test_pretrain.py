"""Backbone pretraining (the demo's stand-in for ImageNet weights) and how its file enters training."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asen_jax import checkpoint as ckpt_lib
from asen_jax import convert
from asen_jax import pretrain
from asen_jax import resnet
from asen_jax import trainer
from asen_jax.data import synthetic
from tests.tiny_synthetic import make_data, tiny_config

PRETRAIN = {"pretrain.batch_size": 16, "pretrain.steps": 3}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  return make_data(tmp_path_factory, seed=5)


def test_classification_loss_by_hand():
  # Two attributes with 2 and 3 values: heads [a0v0, a0v1, a1v0, a1v1, a1v2].
  table = pretrain._value_table((2, 3))
  np.testing.assert_array_equal(np.asarray(table), [[0, 1, -1], [2, 3, 4]])
  logits = jnp.array([[1.0, 3.0, 0.0, 1.0, 2.0],
                      [5.0, 0.0, 9.0, 9.0, 9.0]])
  labels = jnp.array([[1, 0],      # image 0: attribute 0 = 1, attribute 1 = 0
                      [0, -1]])    # image 1: attribute 0 = 0, attribute 1 unlabelled
  loss, correct, known = pretrain.classification_loss(logits, labels, table)
  ce00 = -np.log(np.exp(3.0) / (np.exp(1.0) + np.exp(3.0)))
  ce01 = -np.log(np.exp(0.0) / (np.exp(0.0) + np.exp(1.0) + np.exp(2.0)))
  ce10 = -np.log(np.exp(5.0) / (np.exp(5.0) + np.exp(0.0)))
  np.testing.assert_allclose(float(loss), (ce00 + ce01 + ce10) / 3, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(correct), [[1, 0], [1, 0]])
  np.testing.assert_array_equal(np.asarray(known), [[1, 1], [1, 0]])
  rows = np.array([[0, 0, 1], [0, 1, 0], [2, 0, 0]])
  np.testing.assert_array_equal(pretrain.label_matrix(rows, 3, 2), [[1, 0], [-1, -1], [0, -1]])


def test_pooling_by_hand():
  # 'mask': sigmoid(1x1 conv) weighs each cell; the heads see the weighted mean.
  net = pretrain.AttributeClassifier("resnet18", 0.0625, (2,), pooling="mask")
  variables = net.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  params = dict(variables["params"])
  params["saliency"] = {"kernel": jnp.array([1.0, -1.0]).reshape(1, 1, 2, 1),
                        "bias": jnp.array([0.5])}
  feats = jnp.array([[[[2.0, 0.0], [0.0, 2.0]],
                      [[1.0, 1.0], [3.0, 0.0]]]])                   # (1, 2, 2, C=2)
  pooled = net.apply({**variables, "params": params}, feats,
                     method=pretrain.AttributeClassifier.pool)
  logit = np.array([[2.5, -1.5], [0.5, 3.5]])                        # f . (1, -1) + 0.5
  m = 1.0 / (1.0 + np.exp(-logit))
  f = np.asarray(feats[0])
  want = (f * m[..., None]).sum(axis=(0, 1)) / (m.sum() + 1e-3)
  np.testing.assert_allclose(np.asarray(pooled[0]), want, rtol=1e-6)
  # A cell with weight ~0 does not move the pooled feature.
  params["saliency"] = {"kernel": jnp.array([0.0, 100.0]).reshape(1, 1, 2, 1),
                        "bias": jnp.array([-120.0])}                 # only cell (0, 1): C1 = 2
  pooled = net.apply({**variables, "params": params}, feats,
                     method=pretrain.AttributeClassifier.pool)
  np.testing.assert_allclose(np.asarray(pooled[0]), [0.0, 2.0 / 1.001], rtol=1e-6, atol=1e-7)
  # 'mean': global average pooling, every cell weighted 1.
  mean_net = pretrain.AttributeClassifier("resnet18", 0.0625, (2,), pooling="mean")
  mv = mean_net.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  assert "saliency" not in mv["params"]
  pooled = mean_net.apply(mv, feats, method=pretrain.AttributeClassifier.pool)
  np.testing.assert_allclose(np.asarray(pooled[0]), [1.5, 0.75], rtol=1e-6)


def test_pretrain_rejects_unknown_pooling(data_root, tmp_path):
  config = tiny_config(data_root, "global", {**PRETRAIN, "pretrain.pooling": "max"})
  with pytest.raises(ValueError, match="pretrain.pooling is 'max'; use one of"):
    pretrain.pretrain_backbone(config, str(tmp_path / "backbone.npz"))


def test_torchvision_export_round_trips():
  net = resnet.make_backbone("resnet18", 3, 0.25)
  variables = net.init(jax.random.key(1), jnp.zeros((1, 32, 32, 3)))
  variables = jax.tree.map(lambda x: x + jax.random.uniform(jax.random.key(2), x.shape), variables)
  sd = convert.backbone_to_torchvision(variables)
  assert sd["conv1.weight"].shape == (16, 3, 7, 7)            # torch layout (out, in, kh, kw)
  assert "layer2.0.downsample.1.running_var" in sd
  back = convert.torchvision_to_backbone(sd, "resnet18", 3, 0.25)
  for col in ("params", "batch_stats"):
    jax.tree.map(np.testing.assert_array_equal, back[col], jax.device_get(variables[col]))


def test_pretrained_file_initialises_both_branches(data_root, tmp_path):
  config = tiny_config(data_root, "global", PRETRAIN)
  out = str(tmp_path / "backbone.npz")
  accuracy = pretrain.pretrain_backbone(config, out, log=lambda s: None)
  assert set(accuracy) == set(synthetic.ATTRIBUTES)
  assert all(0.0 <= v <= 100.0 for v in accuracy.values())
  file_vars = convert.load_backbone_file(out, "resnet18", 3, 0.0625)

  # Stage 1 starts its global backbone from the file.
  config_g = tiny_config(data_root, "global", {"model.init_backbones.global_file": out})
  info, model, tx, joint = trainer.build(config_g)
  state = trainer.init_state(config_g, model, tx, joint, info=info)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params["global"]["backbone"]),
               file_vars["params"])
  # Stage 2 from a stage-1 checkpoint: global from the checkpoint, local from the file.
  stage1 = jax.tree.map(lambda x: x * 0.5, {"params": state.params,
                                            "batch_stats": state.batch_stats})
  ckpt_dir = str(tmp_path / "stage1")
  ckpt_lib.save_model_variables(ckpt_dir, stage1, {"attributes": list(info.attributes),
                                                   "stage": "global"})
  config_j = tiny_config(data_root, "joint", {"model.init_backbones.local_file": out})
  info, model, tx, joint = trainer.build(config_j)
  state_j = trainer.init_state(config_j, model, tx, joint, init_from=ckpt_dir, info=info)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state_j.params["local"]["backbone"]),
               file_vars["params"])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state_j.params["global"]),
               jax.device_get(stage1["params"]["global"]))
  jax.tree.map(np.testing.assert_array_equal,
               jax.device_get(state_j.batch_stats["local"]["backbone"]),
               file_vars["batch_stats"])


def test_mask_pooled_pretraining_writes_a_plain_backbone(data_root, tmp_path):
  # The mask's 1x1 conv is pretraining's own, like the heads: the file holds the backbone only
  # (load_backbone_file refuses extra keys).
  config = tiny_config(data_root, "global", {**PRETRAIN, "pretrain.pooling": "mask"})
  out = str(tmp_path / "backbone.npz")
  accuracy = pretrain.pretrain_backbone(config, out, log=lambda s: None)
  assert set(accuracy) == set(synthetic.ATTRIBUTES)
  with np.load(out) as f:
    assert not [k for k in f.files if "saliency" in k or "heads" in k]
  file_vars = convert.load_backbone_file(out, "resnet18", 3, 0.0625)
  assert file_vars["params"]["conv1"]["kernel"].shape == (7, 7, 3, 4)


def test_pretrain_rejects_other_suffix(data_root, tmp_path):
  config = tiny_config(data_root, "global", PRETRAIN)
  with pytest.raises(ValueError, match=r"must end in \.npz"):
    pretrain.pretrain_backbone(config, str(tmp_path / "backbone.pth"))
