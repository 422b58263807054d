"""Residual cells and combiner cells of the NVAE towers (NVAE paper Sec. 3, Fig. 2-3; arch `res_mbconv`)."""
from __future__ import annotations

import torch
import torch.nn as nn

from core.models.layers import BNSwishConv, InvertedResidual, SqueezeExcitation, WNConv2d, skip_connection

# Cell kinds: (stride, residual-branch factory). Encoder-side cells stack two BN-Swish-conv ops, decoder-side cells use
# one inverted-residual op (expansion 6 in the decoder tower, 3 in post-processing), as in NVAE's `res_mbconv`.
_STRIDES = {"normal": 1, "down": 2, "up": -1}
RESIDUAL_SCALE = 0.1  # NVAE scales the residual branch by 0.1 so a deep tower starts close to identity.


class Cell(nn.Module):
    """skip(x) + 0.1 * SE(ops(x)); `side` is 'enc' (BN-Swish-conv x2) or 'dec'/'post' (inverted residual)."""

    def __init__(self, c_in: int, c_out: int, kind: str, side: str, use_se: bool):
        super().__init__()
        stride = _STRIDES[kind]
        self.skip = skip_connection(c_in, c_out, stride)
        if side == "enc":
            self.ops = nn.Sequential(BNSwishConv(c_in, c_out, stride), BNSwishConv(c_out, c_out, 1))
        elif side in ("dec", "post"):
            self.ops = InvertedResidual(c_in, c_out, stride, expansion=6 if side == "dec" else 3)
        else:
            raise ValueError(f"unknown cell side {side!r}")
        self.se = SqueezeExcitation(c_out) if use_se else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + RESIDUAL_SCALE * self.se(self.ops(x))


class EncoderCombiner(nn.Module):
    """Mixes the decoder state into the bottom-up feature: enc + conv1x1(dec) (q(z_l | x, z_<l), NVAE Fig. 2)."""

    def __init__(self, c_enc: int, c_dec: int):
        super().__init__()
        self.conv = WNConv2d(c_dec, c_enc, 1)

    def forward(self, enc: torch.Tensor, dec: torch.Tensor) -> torch.Tensor:
        return enc + self.conv(dec)


class DecoderCombiner(nn.Module):
    """Feeds a sampled group into the decoder state: conv1x1(concat(state, z))."""

    def __init__(self, c_dec: int, c_latent: int):
        super().__init__()
        self.conv = WNConv2d(c_dec + c_latent, c_dec, 1)

    def forward(self, state: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([state, z], dim=1))
