"""NCP-VAE's binary classifiers D_k(z_k, c(z_<k)), one per latent group (ncpvae_appendix.md App. C Eq. 11, D, E).

Each classifier sees a latent group z_k concatenated with the context feature c(z_<k) (App. D: the decoder state
before group k, which encodes z_<k) and returns one logit per sample. With D_k = sigmoid(logit) trained by NCE
(core.objectives.nce, Eq. 10-11) the logit estimates log r_k = log D_k / (1 - D_k) = log q(z_k|z_<k) / p(z_k|z_<k),
the log ratio that reweights the backbone's prior.

Architecture (App. E, Fig. 6; the figure's exact layer list is not in the appendix text, so the decisions below are
ours and documented as fields):
- image-shaped groups (C, H, W): a 3x3 stem conv on concat(z_k, c), then per resolution `blocks_per_resolution`
  Residual-Block-A (BN, Swish, 3x3 conv, BN, Swish, 3x3 conv, squeeze-and-excitation, identity skip) followed by one
  Residual-Block-B (the same with a stride-2 first conv, C -> 2C, and on the skip path a factorized reduction of
  stride-2 1x1 convs on shifted inputs) until the map is `min_resolution` wide; then Swish, global average pooling
  and a linear head to one logit.
- vector groups (D,) (the 2-D protocol's MLP VAE, App. J): `mlp_layers` fully connected layers of `mlp_hidden` units
  with Swish, the last one giving the logit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.models.layers import FactorizedReduce, SqueezeExcitation


@dataclass
class NCPClassifierConfig:
    base_channels: int = 32  # channels after the stem (doubled by every Residual-Block-B)
    blocks_per_resolution: int = 1  # Residual-Block-A per resolution before each down-sampling Residual-Block-B
    min_resolution: int = 4  # spatial side at which down-sampling stops (a group smaller than this is not reduced)
    use_se: bool = True  # squeeze-and-excitation in every residual block (App. E)
    bn_momentum: float = 0.05  # running-statistics momentum of the blocks' batch norms (NVAE's value)
    mlp_hidden: int = 256  # vector groups: hidden units per layer (App. J: 256)
    mlp_layers: int = 4  # vector groups: fully connected layers including the output layer (App. J: 4)

    def validate(self) -> None:
        if self.base_channels < 4 or self.blocks_per_resolution < 0 or self.min_resolution < 1:
            raise ValueError("classifier: need base_channels >= 4, blocks_per_resolution >= 0, min_resolution >= 1")
        if not 0.0 < self.bn_momentum <= 1.0:
            raise ValueError("classifier.bn_momentum must be in (0, 1]")
        if self.mlp_hidden < 1 or self.mlp_layers < 2:
            raise ValueError("classifier: need mlp_hidden >= 1 and mlp_layers >= 2")


class ResidualBlockA(nn.Module):
    """x + SE(conv3x3(Swish(BN(conv3x3(Swish(BN(x))))))) at constant width and resolution (App. E, Fig. 6)."""

    def __init__(self, channels: int, use_se: bool, momentum: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(channels, momentum=momentum)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(channels, momentum=momentum)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.se = SqueezeExcitation(channels) if use_se else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.bn1(x)))
        h = self.conv2(F.silu(self.bn2(h)))
        return x + self.se(h)


class ResidualBlockB(nn.Module):
    """FactorizedReduce(x) + SE(conv3x3(Swish(BN(conv3x3_s2(Swish(BN(x))))))): C -> 2C, half the spatial size; the
    skip path is the factorized reduction of 1x1 stride-2 convs on shifted copies (App. E)."""

    def __init__(self, channels: int, use_se: bool, momentum: float):
        super().__init__()
        out = 2 * channels
        self.bn1 = nn.BatchNorm2d(channels, momentum=momentum)
        self.conv1 = nn.Conv2d(channels, out, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(out, momentum=momentum)
        self.conv2 = nn.Conv2d(out, out, 3, padding=1)
        self.se = SqueezeExcitation(out) if use_se else nn.Identity()
        self.skip = FactorizedReduce(channels, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.bn1(x)))
        h = self.conv2(F.silu(self.bn2(h)))
        return self.skip(x) + self.se(h)


class ConvGroupClassifier(nn.Module):
    """logit(z_k, c) for an image-shaped group (C_z, H, W) with a context map (C_c, H, W)."""

    def __init__(self, z_channels: int, context_channels: int, resolution: int, config: NCPClassifierConfig):
        super().__init__()
        c = config.base_channels
        self.stem = nn.Conv2d(z_channels + context_channels, c, 3, padding=1)
        blocks: list[nn.Module] = []
        size = resolution
        while True:
            blocks += [ResidualBlockA(c, config.use_se, config.bn_momentum)
                       for _ in range(config.blocks_per_resolution)]
            if size <= config.min_resolution or size % 2:
                break
            blocks.append(ResidualBlockB(c, config.use_se, config.bn_momentum))
            c, size = 2 * c, size // 2
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(c, 1)

    def forward(self, z: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.stem(torch.cat([z, context], dim=1)))
        return self.head(F.silu(h).mean(dim=(2, 3))).squeeze(1)


class MLPGroupClassifier(nn.Module):
    """logit(z_k, c) for a vector group (D,) with a flat context (App. J: 4 FC layers of 256 units)."""

    def __init__(self, in_features: int, config: NCPClassifierConfig):
        super().__init__()
        dims = [in_features] + [config.mlp_hidden] * (config.mlp_layers - 1)
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.out = nn.Linear(dims[-1], 1)

    def forward(self, z: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = torch.cat([z.flatten(1), context.flatten(1)], dim=1)
        for layer in self.hidden:
            h = F.silu(layer(h))
        return self.out(h).squeeze(1)


class NCPClassifiers(nn.Module):
    """The K group classifiers; `forward(zs, contexts)` returns the K logits log r_k, each of shape (batch,).

    group_shapes: per group (z shape, context shape), both without batch, as a walk of the backbone yields them.
    """

    def __init__(self, group_shapes: list[tuple[tuple[int, ...], tuple[int, ...]]], config: NCPClassifierConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.group_shapes = [(tuple(z), tuple(c)) for z, c in group_shapes]
        nets = []
        for z_shape, c_shape in self.group_shapes:
            if len(z_shape) == 3:
                if len(c_shape) != 3 or c_shape[1:] != z_shape[1:]:
                    raise ValueError(f"context {c_shape} must be a map of the group's spatial size {z_shape[1:]}")
                nets.append(ConvGroupClassifier(z_shape[0], c_shape[0], z_shape[1], config))
            else:
                nets.append(MLPGroupClassifier(math.prod(z_shape) + math.prod(c_shape), config))
        self.groups = nn.ModuleList(nets)

    def __len__(self) -> int:
        return len(self.groups)

    def group_logit(self, k: int, z: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """log r_k(z_k, c) of one group, (batch,), in the input's dtype cast to the networks' dtype."""
        dtype = next(self.groups[k].parameters()).dtype
        return self.groups[k](z.to(dtype), context.to(dtype))

    def forward(self, zs: list[torch.Tensor], contexts: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(zs) != len(self.groups) or len(contexts) != len(self.groups):
            raise ValueError(f"expected {len(self.groups)} groups, got {len(zs)} latents and {len(contexts)} contexts")
        return [self.group_logit(k, z, c) for k, (z, c) in enumerate(zip(zs, contexts))]

    def log_ratio(self, tower) -> torch.Tensor:
        """sum_k log r_k(z_k, c(z_<k)) over the groups of a backbone walk (a `TowerPass`), (batch,) in fp32."""
        return sum(self.group_logit(k, g.z, g.context).float() for k, g in enumerate(tower.groups))
