"""Building blocks of the VAEBM energy networks (vaebm.md App. E, Table 7).

The blocks follow Du & Mordatch (2019)'s ResNet as VAEBM's official code uses it, with VAEBM's two changes:
Swish instead of LeakyReLU and weight normalization (with data-dependent init) instead of spectral normalization.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.models.layers import WNConv2d

ACTIVATIONS = ("swish", "swish_official")


class Swish(nn.Module):
    """x * sigmoid(x); `variant="swish_official"` divides by 1.1 as VAEBM's code does (its "Lip_swish").

    The 1/1.1 factor makes the activation 1-Lipschitz (Swish's slope peaks at ~1.0998), which matters only together
    with a Lipschitz bound on the convs; the paper itself just says "Swish".
    """

    def __init__(self, variant: str = "swish"):
        super().__init__()
        if variant not in ACTIVATIONS:
            raise ValueError(f"swish must be one of {ACTIVATIONS}, got {variant!r}")
        self.scale = 1.0 / 1.1 if variant == "swish_official" else 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.silu(x)
        return out * self.scale if self.scale != 1.0 else out


class EnergyResBlock(nn.Module):
    """conv3x3 -> act -> conv3x3, plus shortcut; then avg-pool by 2 ("down" blocks) and a final activation.

    Order as in VAEBM's code: the shortcut joins before the pooling, and the activation comes after the pooling.
    The shortcut is the identity unless the width changes or the block down-samples; then it is a weight-normalized
    1x1 conv (average pooling commutes with it, so pooling the sum equals pooling both branches).
    """

    def __init__(self, c_in: int, c_out: int, down: bool, swish: str = "swish", weight_norm: bool = True):
        super().__init__()
        self.down = down
        self.conv1 = WNConv2d(c_in, c_out, 3, padding=1, weight_norm=weight_norm)
        self.conv2 = WNConv2d(c_out, c_out, 3, padding=1, weight_norm=weight_norm)
        # bias on the shortcut (VAEBM's has none) so data-dependent init can centre every WN layer's output
        self.skip = WNConv2d(c_in, c_out, 1, weight_norm=weight_norm) if (c_in != c_out or down) else None
        self.act = Swish(swish)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.act(self.conv1(x)))
        out = out + (self.skip(x) if self.skip is not None else x)
        if self.down:
            out = F.avg_pool2d(out, 2)
        return self.act(out)
