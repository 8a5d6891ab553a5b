"""Encoders and projection heads for SimCLR pretraining.

ResNets come from torchvision with random init; for small images (CIFAR, digits) the stem is the one
of the SimCLR paper's CIFAR experiments (3x3 stride-1 conv1, no max-pool). The projection head is
SimCLR's Linear-BN-ReLU-Linear (Chen et al. 2020) or SimCLRv2's 3-layer head (Chen et al. 2020b).
"""
from typing import Optional

import torch
from torch import nn

__all__ = ["SmallCNN", "ProjectionHead", "SimCLRModel", "resnet_encoder", "build_encoder", "build_model", "ARCHS"]

ARCHS = ("small_cnn", "resnet18", "resnet34", "resnet50")


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU stages of width w, 2w, 4w (`convs_per_stage` convs each, 3x3), 2x2 max-pool
    after the first two, then average pooling to a `pool` x `pool` grid, flattened: enough for 8x8 to
    32x32 grey digits and cheap on a CPU. Keeping a coarse grid instead of global pooling keeps where
    the strokes are, which is most of what tells digits apart. `feature_dim` = 4 * width * pool**2.
    `final_relu=False` drops the ReLU after the last conv-BN: the features are then pooled BN outputs,
    centred rather than all non-negative, which is what cosine similarity (the kNN probe) separates best."""

    def __init__(self, in_channels: int = 1, width: int = 32, convs_per_stage: int = 1, pool: int = 2,
                 final_relu: bool = True):
        super().__init__()
        if min(in_channels, width, convs_per_stage, pool) < 1:
            raise ValueError(f"in_channels, width, convs_per_stage and pool must be >= 1, got {in_channels}, "
                             f"{width}, {convs_per_stage}, {pool}")
        chans = [width, 2 * width, 4 * width]
        layers, prev = [], in_channels
        for i, c in enumerate(chans):
            for _ in range(convs_per_stage):
                layers += [nn.Conv2d(prev, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
                prev = c
            if i < len(chans) - 1:
                layers.append(nn.MaxPool2d(2))
        if not final_relu:
            layers.pop()
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(pool)
        self.feature_dim = chans[-1] * pool * pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(x)), 1)


def resnet_encoder(arch: str = "resnet18", in_channels: int = 3, cifar_stem: bool = True) -> nn.Module:
    """A torchvision ResNet (random init) without its classifier; `.feature_dim` is the pooled width
    (512 for ResNet-18/34, 2048 for ResNet-50). `cifar_stem` swaps conv1 for 3x3 stride 1 and drops the
    max-pool, as SimCLR does for 32x32 inputs."""
    import torchvision

    builders = {"resnet18": torchvision.models.resnet18, "resnet34": torchvision.models.resnet34,
                "resnet50": torchvision.models.resnet50}
    if arch not in builders:
        raise ValueError(f"arch must be one of {sorted(builders)}, got {arch!r}")
    net = builders[arch](weights=None)
    if cifar_stem:
        net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    net.feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net


class ProjectionHead(nn.Module):
    """g(h) of SimCLR. num_layers=2: Linear-BN-ReLU-Linear (SimCLR v1); num_layers=3: SimCLRv2's
    deeper head (two Linear-BN-ReLU blocks, then Linear). Output dimension `out_dim` (paper: 128)."""

    def __init__(self, in_dim: int, hidden_dim: Optional[int] = None, out_dim: int = 128, num_layers: int = 2):
        super().__init__()
        if num_layers not in (2, 3):
            raise ValueError(f"num_layers must be 2 (SimCLR) or 3 (SimCLRv2), got {num_layers}")
        if in_dim < 1 or out_dim < 1:
            raise ValueError(f"in_dim and out_dim must be >= 1, got in_dim={in_dim}, out_dim={out_dim}")
        hidden_dim = hidden_dim or in_dim
        layers, prev = [], in_dim
        for _ in range(num_layers - 1):
            layers += [nn.Linear(prev, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
            prev = hidden_dim
        layers.append(nn.Linear(prev, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


class SimCLRModel(nn.Module):
    """Encoder f and projection head g: forward(x) -> (h, z) with h = f(x) (kept for downstream tasks)
    and z = g(h) (fed to the contrastive loss)."""

    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, x: torch.Tensor):
        h = self.encoder(x)
        return h, self.head(h)


def build_encoder(arch: str, in_channels: int, width: int = 32, cifar_stem: bool = True, pool: int = 2,
                  final_relu: bool = True) -> nn.Module:
    """`pool` (output grid, 1: global average pooling) and `final_relu` shape the small CNN; the ResNets
    ignore them."""
    if arch == "small_cnn":
        return SmallCNN(in_channels, width, pool=pool, final_relu=final_relu)
    if arch in ARCHS:
        return resnet_encoder(arch, in_channels, cifar_stem)
    raise ValueError(f"arch must be one of {list(ARCHS)}, got {arch!r}")


def build_model(arch: str = "resnet18", in_channels: int = 3, width: int = 32, cifar_stem: bool = True,
                head: str = "simclr", proj_dim: int = 128, hidden_dim: Optional[int] = None,
                pool: int = 2, final_relu: bool = True) -> SimCLRModel:
    """Encoder + projection head. head: "simclr" (2 layers) or "simclrv2" (3 layers); `pool`: the small
    CNN's output grid, `final_relu`: whether its features pass a last ReLU."""
    heads = {"simclr": 2, "simclrv2": 3}
    if head not in heads:
        raise ValueError(f"head must be one of {sorted(heads)}, got {head!r}")
    encoder = build_encoder(arch, in_channels, width, cifar_stem, pool, final_relu)
    return SimCLRModel(encoder, ProjectionHead(encoder.feature_dim, hidden_dim, proj_dim, heads[head]))
