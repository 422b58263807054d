"""The joint latent-space EBM prior's energy terms f_alpha(z) = sum_i f_alpha_i(z_i) (joint_latent_ebm_prior.md
Eq. 6-7, App. C Table 12 "EBM f_alpha_i(z_i) for NVAE backbone").

One small network per latent group, each seeing only its own group (the "simple factorized layer-wise
parameterization" of Sec. 3.1); the groups are coupled through the backbone's hierarchical prior, and the EBM
prior is exp(f_alpha(z)) p_beta(z) / Z.

- Spatial groups (C, H, W), H = W: `N x conv(4, channels, 2) + LeakyReLU(0.2)` down to 4x4 (N = log2(H / 4); none
  for groups of 4x4 or smaller), flatten, `M x Linear(hidden) + LeakyReLU(0.2)`, `Linear(1)` (Table 12).
- Vector groups (D,) (the 2-D protocol's MLP VAE): `M x Linear(hidden) + LeakyReLU(0.2)`, `Linear(1)` (the
  Table 12 MLP energies of the CelebA-64 model).

No batch norm: a chain's f never depends on the rest of its batch (Langevin drifts are per-sample). The output
layer starts at zero, so an untrained prior is exactly the backbone's prior (f = 0, Z = 1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn


@dataclass
class LatentEnergyConfig:
    channels: int = 64  # output channels of every stride-2 4x4 conv (Table 12: conv(4, 64, 2))
    hidden: int = 200  # width of the hidden linear layers (Table 12: Linear(200))
    num_linear: int = 2  # hidden Linear(hidden) + LReLU layers before Linear(1) (Table 12 "N x"; 2 gives Table 10's
    #                      10M parameters on the 30-group CIFAR-10 NVAE)
    negative_slope: float = 0.2  # LeakyReLU slope (Table 12 "LReLU"; 0.2 in the paper's code)
    target_size: int = 4  # spatial groups are down-sampled to target_size x target_size (Table 12: 4x4)

    def validate(self) -> None:
        if min(self.channels, self.hidden, self.target_size) < 1 or self.num_linear < 0:
            raise ValueError("latent energy: channels, hidden and target_size must be >= 1, num_linear >= 0")
        if not 0.0 <= self.negative_slope < 1.0:
            raise ValueError(f"latent energy: negative_slope must be in [0, 1), got {self.negative_slope}")

    def num_convs(self, shape: Sequence[int]) -> int:
        """Stride-2 convs a group of `shape` gets (0 for vectors and groups no larger than the target)."""
        if len(shape) != 3 or shape[-1] <= self.target_size:
            return 0
        ratio = shape[-1] / self.target_size
        n = round(math.log2(ratio))
        if 2 ** n != ratio:
            raise ValueError(f"latent group {tuple(shape)}: its side must be target_size x a power of 2 "
                             f"(target_size={self.target_size})")
        return n


def _check_shape(shape: Sequence[int]) -> None:
    if len(shape) == 1:
        return
    if len(shape) != 3 or shape[1] != shape[2]:
        raise ValueError(f"latent groups must be vectors (D,) or square maps (C, H, H), got {tuple(shape)}")


class GroupEnergy(nn.Module):
    """f_alpha_i(z_i) -> (batch,) for one latent group of a fixed shape (Table 12)."""

    def __init__(self, shape: Sequence[int], config: LatentEnergyConfig):
        super().__init__()
        _check_shape(shape)
        act = lambda: nn.LeakyReLU(config.negative_slope)  # noqa: E731
        layers: list[nn.Module] = []
        c_in = shape[0] if len(shape) == 3 else None
        side = shape[-1] if len(shape) == 3 else None
        for _ in range(config.num_convs(shape)):
            layers += [nn.Conv2d(c_in, config.channels, 4, stride=2, padding=1), act()]
            c_in, side = config.channels, side // 2
        layers.append(nn.Flatten())
        width = c_in * side * side if len(shape) == 3 else shape[0]
        for _ in range(config.num_linear):
            layers += [nn.Linear(width, config.hidden), act()]
            width = config.hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, 1)
        nn.init.zeros_(self.head.weight)  # f = 0 at initialization: the prior starts as the backbone's
        nn.init.zeros_(self.head.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(z)).squeeze(1)


class LatentEnergy(nn.Module):
    """The per-group terms f_alpha_i(z_i) of the joint EBM prior over latent groups of `latent_shapes` (top first).

    forward(z) -> (batch, L) float32 per-group values; `f(z)` -> (batch,) their sum f_alpha(z) (Eq. 6). The
    energy of the prior is -f: exp(f(z)) p(z) / Z. Inputs of any dtype are cast to the parameters' dtype (the engine
    may hold bf16/fp16 weights), outputs are fp32.
    """

    def __init__(self, config: LatentEnergyConfig, latent_shapes: Sequence[Sequence[int]]):
        super().__init__()
        config.validate()
        if not latent_shapes:
            raise ValueError("latent energy: the backbone has no latent groups")
        self.config = config
        self.latent_shapes = [tuple(int(d) for d in s) for s in latent_shapes]
        self.groups = nn.ModuleList(GroupEnergy(s, config) for s in self.latent_shapes)

    def forward(self, z: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(z) != len(self.groups):
            raise ValueError(f"latent energy expects {len(self.groups)} groups, got {len(z)}")
        dtype = self.groups[0].head.weight.dtype
        return torch.stack([g(zi.to(dtype)).float() for g, zi in zip(self.groups, z)], dim=1)

    def f(self, z: Sequence[torch.Tensor]) -> torch.Tensor:
        """f_alpha(z) = sum_i f_alpha_i(z_i), (batch,) fp32 (joint_latent_ebm_prior.md Eq. 6)."""
        return self(z).sum(dim=1)


__all__ = ["GroupEnergy", "LatentEnergy", "LatentEnergyConfig"]
