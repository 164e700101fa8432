"""PyTorch reference: torchvision-layout ResNet and the ASEN++ model, written from the facts file.

Independent of asen_jax (nothing is imported from it) so parity tests compare two implementations.
State dict keys follow torchvision (`conv1`, `layer1.0.downsample.0`, ...) and the official ASEN++
layout (`choices.global.attrnet.attr_embedding.weight`, `choices.{global,local}.basenet.*`,
`choices.{global,local}.attnnet.*`). torchvision itself is not used.
"""
import math

import torch
from torch import nn
import torch.nn.functional as F

ARCHS = {
    "resnet18": ((2, 2, 2, 2), "basic"),
    "resnet34": ((3, 4, 6, 3), "basic"),
    "resnet50": ((3, 4, 6, 3), "bottleneck"),
}


def _ch(c, width):
  return max(1, int(round(c * width)))


def _conv(cin, cout, k, stride=1):
  return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False)


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, cin, planes, stride):
    super().__init__()
    self.conv1 = _conv(cin, planes, 3, stride)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = _conv(planes, planes, 3)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = None
    if stride != 1 or cin != planes:
      self.downsample = nn.Sequential(_conv(cin, planes, 1, stride), nn.BatchNorm2d(planes))

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, cin, planes, stride):
    super().__init__()
    out = planes * 4
    self.conv1 = _conv(cin, planes, 1)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = _conv(planes, planes, 3, stride)  # v1.5: stride on the 3x3
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = _conv(planes, out, 1)
    self.bn3 = nn.BatchNorm2d(out)
    self.downsample = None
    if stride != 1 or cin != out:
      self.downsample = nn.Sequential(_conv(cin, out, 1, stride), nn.BatchNorm2d(out))

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
  """Stem + layer1..layer{num_stages}; no layer4 (unless asked), no fc. NCHW."""

  def __init__(self, arch, num_stages=3, width=1.0):
    super().__init__()
    sizes, kind = ARCHS[arch]
    block = Bottleneck if kind == "bottleneck" else BasicBlock
    cin = _ch(64, width)
    self.conv1 = nn.Conv2d(3, cin, 7, stride=2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(cin)
    self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
    self.num_stages = num_stages
    for s in range(num_stages):
      planes = _ch(64 * 2 ** s, width)
      blocks = []
      for i in range(sizes[s]):
        blocks.append(block(cin, planes, 2 if (s > 0 and i == 0) else 1))
        cin = planes * block.expansion
      setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
    self.out_channels = cin

  def forward(self, x):
    x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
    for s in range(self.num_stages):
      x = getattr(self, f"layer{s + 1}")(x)
    return x


class AttnEmbedding(nn.Module):
  """ASA + ACA + feature_fc, names as the official `attnnet`."""

  def __init__(self, channels, common_dim, attr_dim=512, reduction=2, embed_dim=1024):
    super().__init__()
    self.common_dim = common_dim
    self.attr_transform1 = nn.Linear(attr_dim, common_dim)
    self.conv = nn.Conv2d(channels, common_dim, 1)
    self.attr_transform2 = nn.Linear(attr_dim, attr_dim)
    self.fc1 = nn.Linear(channels + attr_dim, channels // reduction)
    self.fc2 = nn.Linear(channels // reduction, channels)
    self.feature_fc = nn.Linear(channels, embed_dim)

  def forward(self, x, a):
    b, c, h, w = x.shape
    img = torch.tanh(self.conv(x)).view(b, self.common_dim, h * w)
    q = torch.tanh(self.attr_transform1(a)).view(b, 1, self.common_dim)
    logits = torch.bmm(q, img).view(b, h * w) / math.sqrt(self.common_dim)
    attmap = F.softmax(logits, dim=1).view(b, 1, h, w)
    pooled = (x * attmap).view(b, c, h * w).sum(dim=2)
    a2 = F.relu(self.attr_transform2(a))
    gate = torch.sigmoid(self.fc2(F.relu(self.fc1(torch.cat([pooled, a2], dim=1)))))
    return self.feature_fc(pooled * gate), attmap.view(b, h, w)


class AttrNet(nn.Module):

  def __init__(self, num_attributes, attr_dim):
    super().__init__()
    self.attr_embedding = nn.Embedding(num_attributes, attr_dim)


class Branch(nn.Module):

  def __init__(self, attrnet, arch, common_dim, width, attr_dim, reduction, embed_dim):
    super().__init__()
    self.attrnet = attrnet
    self.basenet = ResNet(arch, 3, width)
    self.attnnet = AttnEmbedding(self.basenet.out_channels, common_dim, attr_dim, reduction,
                                 embed_dim)

  def forward(self, images_nchw, attributes):
    a = self.attrnet.attr_embedding(attributes)
    return self.attnnet(self.basenet(images_nchw), a)


class ASENPP(nn.Module):
  """Official layout: `choices.global` and (stage 2) `choices.local`, sharing one AttrNet."""

  def __init__(self, num_attributes, global_backbone="resnet50", local_backbone="resnet34",
               width=1.0, attr_dim=512, global_common_dim=512, local_common_dim=256,
               reduction=2, embed_dim=1024, with_local=True):
    super().__init__()
    attrnet = AttrNet(num_attributes, attr_dim)
    choices = {"global": Branch(attrnet, global_backbone, global_common_dim, width, attr_dim,
                                reduction, embed_dim)}
    if with_local:
      choices["local"] = Branch(attrnet, local_backbone, local_common_dim, width, attr_dim,
                                reduction, embed_dim)
    self.choices = nn.ModuleDict(choices)

  def forward(self, images_nchw, attributes, branch="global"):
    return self.choices[branch](images_nchw, attributes)


@torch.no_grad()
def randomize_(model, calib_inputs, seed=0):
  """Random weights and random BatchNorm weight/bias/running stats, then eval mode.

  Running stats are first calibrated on `calib_inputs` (a list of (module, NCHW input) pairs:
  one train-mode pass with cumulative averaging) so that activations stay O(1) through 30+
  layers, then perturbed at random so that they differ from any batch's statistics.
  """
  g = torch.Generator().manual_seed(seed)
  rand = lambda *s: torch.rand(*s, generator=g)
  randn = lambda *s: torch.randn(*s, generator=g)
  for m in model.modules():
    if isinstance(m, nn.Conv2d):
      fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
      m.weight.copy_(randn(*m.weight.shape) * math.sqrt(2.0 / fan_out))
      if m.bias is not None:
        m.bias.copy_(randn(*m.bias.shape) * 0.1)
    elif isinstance(m, nn.Linear):
      m.weight.copy_(randn(*m.weight.shape) / math.sqrt(m.in_features))
      m.bias.copy_(randn(*m.bias.shape) * 0.1)
    elif isinstance(m, nn.Embedding):
      m.weight.copy_(randn(*m.weight.shape))
    elif isinstance(m, nn.BatchNorm2d):
      m.weight.copy_(0.5 + rand(m.num_features))
      m.bias.copy_(randn(m.num_features) * 0.2)
      m.momentum = None  # cumulative average over the calibration pass
      m.reset_running_stats()
  model.train()
  for module, x in calib_inputs:
    module(x)
  for m in model.modules():
    if isinstance(m, nn.BatchNorm2d):
      m.momentum = 0.1
      m.running_mean.add_(randn(m.num_features) * 0.1 * m.running_var.sqrt())
      m.running_var.mul_(0.5 + rand(m.num_features))
  model.eval()
  return model


def random_resnet(arch, num_stages=3, width=1.0, seed=0, calib_size=64):
  """A randomised eval-mode reference ResNet."""
  net = ResNet(arch, num_stages, width)
  g = torch.Generator().manual_seed(seed + 1)
  x = torch.randn(4, 3, calib_size, calib_size, generator=g)
  return randomize_(net, [(net, x)], seed)


def random_asenpp(num_attributes, seed=0, global_size=64, local_size=32, **kwargs):
  """A randomised eval-mode reference ASEN++."""
  net = ASENPP(num_attributes, **kwargs)
  g = torch.Generator().manual_seed(seed + 1)
  calib = [(b.basenet, torch.randn(4, 3, s, s, generator=g))
           for b, s in zip(net.choices.values(), (global_size, local_size))]
  return randomize_(net, calib, seed)
