"""Residual cells, combiner cells and flow cells of the NVAE towers (NVAE paper Sec. 3, Fig. 2-3; arch `res_mbconv`)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.models.layers import (BNSwishConv, InvertedResidual, MaskedWNConv2d, SqueezeExcitation, WNConv2d,
                                skip_connection)

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


class ShiftFlowCell(nn.Module):
    """One autoregressive, shift-only flow step of q(z|x): z -> z - mu(z), mu autoregressive in raster order.

    NVAE's inverse-autoregressive cells (NVAE Sec. 3.2 "normalizing flows"; its implementation keeps only the shift):
    masked 3x3 expand (strictly earlier channels at the centre) -> ELU -> masked depthwise 5x5 -> ELU -> ELU ->
    masked 1x1 to the shift. The Jacobian is triangular with a unit diagonal, so log|det| = 0.
    """

    def __init__(self, channels: int, mirror: bool, expansion: int = 6, kernel_size: int = 5):
        super().__init__()
        hidden = channels * expansion
        self.expand = MaskedWNConv2d(channels, hidden, 3, padding=1, bias=False, diagonal=False, mirror=mirror)
        self.depthwise = MaskedWNConv2d(hidden, hidden, kernel_size, padding=kernel_size // 2, groups=hidden,
                                        bias=False, diagonal=True, mirror=mirror)
        self.shift = MaskedWNConv2d(hidden, channels, 1, bias=True, diagonal=True, mirror=mirror)
        with torch.no_grad():  # the shift starts at a tenth of its natural scale, as in NVAE
            self.shift.log_weight_norm += math.log(0.1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = F.elu(self.depthwise(F.elu(self.expand(z))))
        return z - self.shift(F.elu(h))


class FlowCell(nn.Module):
    """A pair of shift flow steps, the second in mirrored raster order, so every latent pixel can depend on all
    others (NVAE's paired AR cells)."""

    def __init__(self, channels: int):
        super().__init__()
        self.forward_order = ShiftFlowCell(channels, mirror=False)
        self.reverse_order = ShiftFlowCell(channels, mirror=True)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.reverse_order(self.forward_order(z))
