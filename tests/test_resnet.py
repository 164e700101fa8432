"""ResNet backbones: parity with the PyTorch reference through the torchvision converter."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from asen_jax import convert
from asen_jax import resnet
from tests import torch_reference as tr

torch.set_num_threads(2)


def rel_err(a, b):
  return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def assert_close(out, ref, rtol=1e-4):
  assert out.shape == ref.shape
  assert rel_err(out, ref) <= rtol
  # Max abs error, relative to the output's scale: no single position may be off.
  assert np.abs(out - ref).max() <= rtol * np.abs(ref).max()


def torch_forward(net, x_bhwc):
  with torch.no_grad():
    return net(torch.from_numpy(x_bhwc.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module", params=["resnet50", "resnet34"])
def backbone(request):
  """(arch, torch reference, converted variables, jitted Flax apply) shared by the sizes."""
  arch = request.param
  net = tr.random_resnet(arch, seed=3)
  variables = convert.torchvision_to_backbone(net.state_dict(), arch)
  flax_net = resnet.make_backbone(arch)
  return arch, net, variables, jax.jit(lambda v, x: flax_net.apply(v, x, train=False))


@pytest.mark.parametrize("size", [224, 112, 97])
def test_matches_torchvision_layout_reference(backbone, size):
  _, net, variables, apply = backbone
  x = np.random.RandomState(size).randn(2, size, size, 3).astype(np.float32)
  ref = torch_forward(net, x)
  out = np.asarray(apply(variables, x))
  assert out.shape == (2, -(-size // 16), -(-size // 16), resnet.output_channels(backbone[0]))
  assert_close(out, ref)


@pytest.mark.parametrize("ext", [".pth", ".npz"])
def test_loads_from_saved_file(backbone, tmp_path, ext):
  arch, net, variables, apply = backbone
  path = str(tmp_path / f"{arch}{ext}")
  sd = {k: v.clone() for k, v in net.state_dict().items()}
  if ext == ".pth":
    # A full torchvision file also holds layer4 and fc, which ASEN ignores.
    sd["layer4.0.conv1.weight"] = torch.zeros(512, 1024, 1, 1)
    sd["fc.weight"] = torch.zeros(1000, 2048)
    torch.save(sd, path)
  else:
    np.savez(path, **{k: v.numpy() for k, v in sd.items()})
  loaded = convert.load_backbone_file(path, arch)
  jax.tree.map(np.testing.assert_array_equal, loaded, variables)
  x = np.random.RandomState(0).randn(2, 97, 97, 3).astype(np.float32)
  assert_close(np.asarray(apply(loaded, x)), torch_forward(net, x))


def test_resnet18_all_four_stages_small_width():
  net = tr.random_resnet("resnet18", num_stages=4, width=0.25, seed=5)
  variables = convert.torchvision_to_backbone(net.state_dict(), "resnet18", 4, 0.25)
  flax_net = resnet.make_backbone("resnet18", num_stages=4, width=0.25)
  x = np.random.RandomState(1).randn(3, 65, 65, 3).astype(np.float32)
  out = np.asarray(flax_net.apply(variables, x))
  assert out.shape == (3, 3, 3, 128)
  assert_close(out, torch_forward(net, x))


def test_train_mode_uses_batch_statistics_like_torch():
  net = tr.random_resnet("resnet34", width=0.25, seed=7)
  variables = convert.torchvision_to_backbone(net.state_dict(), "resnet34", 3, 0.25)
  flax_net = resnet.make_backbone("resnet34", width=0.25)
  x = np.random.RandomState(2).randn(4, 48, 48, 3).astype(np.float32)
  out, updates = flax_net.apply(variables, x, train=True, mutable=["batch_stats"])
  net.train()
  try:
    ref = torch_forward(net, x)
  finally:
    net.eval()
  assert_close(np.asarray(out), ref)
  # Flax momentum 0.9 == PyTorch momentum 0.1 for the running mean. (The running variance
  # differs by design: PyTorch stores the unbiased batch variance, Flax the biased one.)
  np.testing.assert_allclose(updates["batch_stats"]["layer3_0"]["bn2"]["mean"],
                             net.layer3[0].bn2.running_mean.numpy(), rtol=1e-4, atol=1e-4)


def test_explicit_padding_differs_from_same():
  """Guards the padding choice: 'SAME' on stride 2 would give other numbers."""
  x = jnp.asarray(np.random.RandomState(0).randn(1, 8, 8, 1), jnp.float32)
  k = jnp.ones((3, 3, 1, 1))
  same = jax.lax.conv_general_dilated(x, k, (2, 2), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  torch_like = jax.lax.conv_general_dilated(x, k, (2, 2), ((1, 1), (1, 1)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
  assert same.shape == torch_like.shape
  assert not np.allclose(same, torch_like)
  t = torch.nn.functional.conv2d(torch.from_numpy(np.array(x).transpose(0, 3, 1, 2)),
                                 torch.ones(1, 1, 3, 3), stride=2, padding=1)
  np.testing.assert_allclose(np.asarray(torch_like)[..., 0], t.numpy()[:, 0], rtol=1e-5)


def test_param_counts_match_facts():
  for arch, count in [("resnet50", 8_543_296), ("resnet34", 8_170_304)]:
    shapes = convert.backbone_shapes(arch)
    assert sum(np.prod(x.shape) for x in jax.tree.leaves(shapes["params"])) == count


def test_bad_backbone_name():
  with pytest.raises(ValueError, match=r"'resnet101' is not a known backbone"):
    resnet.make_backbone("resnet101")


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_output_stride_8_is_layer3_at_stride_1(arch):
  """output_stride=8: the same weights, layer3's first block (and its downsample) at stride 1,
  i.e. the torch reference with those two strides set to 1; twice the map's resolution."""
  net = tr.random_resnet(arch, width=0.25, seed=11)
  variables = convert.torchvision_to_backbone(net.state_dict(), arch, 3, 0.25)
  first = net.layer3[0]
  (first.conv2 if arch == "resnet50" else first.conv1).stride = (1, 1)
  first.downsample[0].stride = (1, 1)
  x = np.random.RandomState(4).randn(2, 96, 96, 3).astype(np.float32)
  out = np.asarray(resnet.make_backbone(arch, width=0.25, output_stride=8).apply(variables, x))
  assert out.shape == (2, 12, 12, resnet.output_channels(arch, width=0.25))
  assert_close(out, torch_forward(net, x))
  # 16 (the default) is torchvision's: the 6 x 6 map of an unmodified network.
  out16 = resnet.make_backbone(arch, width=0.25, output_stride=16).apply(variables, x)
  assert out16.shape == (2, 6, 6, out.shape[-1])


def test_bad_output_stride():
  with pytest.raises(ValueError, match=r"output stride 32 is not possible .* \(4, 8, 16\)"):
    resnet.make_backbone("resnet18", output_stride=32)


@pytest.mark.parametrize("arch,output_stride", [("resnet18", 8), ("resnet50", 0)])
def test_receptive_field_of_cell_i_is_centred_on_view_pixel_stride_times_i(arch, output_stride):
  # pointing.cell_centres and viz.upsample_bilinear(stride=...) rest on this: with symmetric
  # padding, cell i of the layer3 map sees input pixels centred on pixel stride * i (not on
  # stride * i + (stride - 1) / 2, where a half-pixel upsampling of the map draws it).
  size = 320
  net = resnet.make_backbone(arch, 3, 0.25, output_stride=output_stride)
  x = jax.random.normal(jax.random.key(1), (2, size, size, 3))
  variables = net.init(jax.random.key(0), x[:1], False)
  h = net.apply(variables, x[:1], False).shape[1]
  stride = size // h
  assert stride == (output_stride or 16)
  for r, c in ((h // 2, h // 2), (h // 2 - 1, h // 2 + 1)):
    grads = jax.vmap(jax.grad(lambda xi: net.apply(variables, xi[None], False)[0, r, c].sum()))(x)
    support = np.abs(np.asarray(grads)).sum(axis=(0, 3)) > 0
    rows, cols = np.flatnonzero(support.any(1)), np.flatnonzero(support.any(0))
    assert rows[0] > 0 and rows[-1] < size - 1 and cols[0] > 0 and cols[-1] < size - 1  # whole RF
    assert (rows[0] + rows[-1]) / 2 == stride * r and (cols[0] + cols[-1]) / 2 == stride * c
