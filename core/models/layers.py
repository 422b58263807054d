"""Building blocks of the NVAE towers (NVAE paper Fig. 2-3; vaebm.md App. E uses NVAE unchanged but for the decoder).

All convolutions are weight-normalized (`WNConv2d`) so that the spectral regularizer (`spectral.py`) can bound their
Lipschitz constants; batch norms use NVAE's momentum 0.05.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

BN_MOMENTUM = 0.05
BN_EPS = 1e-5


def batch_norm(channels: int) -> nn.BatchNorm2d:
    """BatchNorm with NVAE's running-statistics momentum (converted to SyncBatchNorm by the trainer when distributed)."""
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class WeightNormalized:
    """Mixin for nn.Conv2d / nn.Linear: W = exp(g) * V / ||V|| per output unit (Salimans & Kingma 2016).

    The log-norm `g` is initialised to log||V|| so the layer starts as the plain layer. `normalized_weight()` is what
    the forward pass, the spectral regularizer and data-dependent init all see. A layer trained without weight
    normalization is reproduced by V = its weight, g = `log_norm_reproducing(V)`.
    """

    weight: torch.Tensor

    def _init_weight_norm(self, weight_norm: bool) -> None:
        self.weight_norm = weight_norm
        if weight_norm:
            with torch.no_grad():
                init = torch.log(self._direction_norm(self.direction()) + 1e-2)
            self.log_weight_norm = nn.Parameter(init)

    @staticmethod
    def _direction_norm(w: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(torch.sum(w * w, dim=tuple(range(1, w.dim())), keepdim=True))

    def direction(self) -> torch.Tensor:
        """V: the weight whose per-row norm is divided out (masked layers mask it first)."""
        return self.weight

    def normalized_weight(self) -> torch.Tensor:
        if not self.weight_norm:
            return self.direction()
        return torch.exp(self.log_weight_norm) * self.direction() / (self._direction_norm(self.direction()) + 1e-5)

    @classmethod
    def log_norm_reproducing(cls, weight: torch.Tensor) -> torch.Tensor:
        """The g that makes the layer reproduce a plain (not weight-normalized) layer's `weight` given as V:
        g = log(||V|| + 1e-5), computed in float64 (exact to rounding in the dtype it is stored in)."""
        return torch.log(cls._direction_norm(weight.double()) + 1e-5)


class WNConv2d(WeightNormalized, nn.Conv2d):
    """Weight-normalized Conv2d."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 groups: int = 1, bias: bool = True, weight_norm: bool = True):
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                           groups=groups, bias=bias)
        self._init_weight_norm(weight_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.normalized_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)


def autoregressive_mask(c_in: int, c_out: int, kernel_size: int, groups: int = 1, diagonal: bool = True,
                        mirror: bool = False) -> torch.Tensor:
    """(c_out, c_in / groups, k, k) 0/1 mask that makes a conv autoregressive in raster order (PixelCNN-style, as in
    NVAE's flow cells): every pixel above the centre row and left of the centre is visible; at the centre, channels
    are ordered and output channel o (group o // (c_out / c_in) when expanding) sees the input channels ordered before
    it, and its own when `diagonal`. A depthwise conv sees its own channel at the centre when `diagonal`.
    `mirror` flips the spatial order (bottom-right to top-left)."""
    if kernel_size % 2 != 1:
        raise ValueError(f"autoregressive_mask: kernel_size must be odd, got {kernel_size}")
    m = kernel_size // 2
    mask = torch.zeros(c_out, c_in // groups, kernel_size, kernel_size)
    mask[:, :, :m, :] = 1.0
    mask[:, :, m, :m] = 1.0
    if groups == 1:
        if c_out % c_in and c_in % c_out:
            raise ValueError(f"autoregressive_mask: channels {c_in} -> {c_out} are not multiples of each other")
        order_out = torch.arange(c_out) // max(c_out // c_in, 1)
        order_in = torch.arange(c_in) // max(c_in // c_out, 1)
        visible = order_in[None, :] <= order_out[:, None] if diagonal else order_in[None, :] < order_out[:, None]
        mask[:, :, m, m] = visible.float()
    elif groups == c_in == c_out:
        mask[:, :, m, m] = 1.0 if diagonal else 0.0
    else:
        raise ValueError("autoregressive_mask: groups must be 1 or equal to the channel count")
    return mask.flip(2, 3) if mirror else mask


class MaskedWNConv2d(WNConv2d):
    """Weight-normalized conv whose weight is multiplied by a fixed `autoregressive_mask` before normalization."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int = 0, groups: int = 1,
                 bias: bool = True, diagonal: bool = True, mirror: bool = False):
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, padding=padding, groups=groups, bias=bias)
        # Derived from the architecture, so not part of the state dict.
        self.register_buffer("mask", autoregressive_mask(in_channels, out_channels, kernel_size, groups, diagonal,
                                                         mirror), persistent=False)
        self._init_weight_norm(True)

    def direction(self) -> torch.Tensor:
        return self.weight * self.mask


class WNLinear(WeightNormalized, nn.Linear):
    """Weight-normalized Linear (a 1x1 conv on a 1x1 image, for the spectral regularizer and data-dependent init)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, weight_norm: bool = True):
        nn.Linear.__init__(self, in_features, out_features, bias=bias)
        self._init_weight_norm(weight_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.normalized_weight(), self.bias)


class SqueezeExcitation(nn.Module):
    """Channel gating (Hu et al. 2018) with NVAE's hidden width max(C/16, 4)."""

    def __init__(self, channels: int):
        super().__init__()
        hidden = max(channels // 16, 4)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3))))))
        return x * gate[:, :, None, None]


class FactorizedReduce(nn.Module):
    """Stride-2 skip path: four shifted 1x1 stride-2 convs concatenated, so no pixel is dropped."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        quarter = c_out // 4
        widths = [quarter, quarter, quarter, c_out - 3 * quarter]
        self.convs = nn.ModuleList(WNConv2d(c_in, w, 1, stride=2) for w in widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(x)
        shifted = (x, x[:, :, 1:, 1:], x[:, :, :, 1:], x[:, :, 1:, :])
        return torch.cat([conv(v) for conv, v in zip(self.convs, shifted)], dim=1)


class UpsampleSkip(nn.Module):
    """Up-sampling skip path: bilinear x2 (align_corners=True) then a bias-free 1x1 conv to the new width, as NVAE's
    up cells do (its `UpSample` + `Conv2D(C, C/2, 1)`; the conv's bias defaults to off there)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = WNConv2d(c_in, c_out, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True))


def skip_connection(c_in: int, c_out: int, stride: int) -> nn.Module:
    """stride 1: identity, 2: factorized reduce, -1: up-sample (NVAE's convention for up cells)."""
    if stride == 1:
        return nn.Identity()
    if stride == 2:
        return FactorizedReduce(c_in, c_out)
    if stride == -1:
        return UpsampleSkip(c_in, c_out)
    raise ValueError(f"stride must be 1, 2 or -1, got {stride}")


class BNSwishConv(nn.Module):
    """BN -> Swish -> 3x3 conv: the residual op of encoder and pre-processing cells (NVAE Fig. 3b)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.upsample = stride == -1
        self.bn = batch_norm(c_in)
        self.conv = WNConv2d(c_in, c_out, 3, stride=abs(stride) if stride != -1 else 1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.bn(x))
        if self.upsample:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x)


class InvertedResidual(nn.Module):
    """BN -> 1x1 expand -> BN-Swish -> depthwise kxk -> BN-Swish -> 1x1 project -> BN (NVAE Fig. 3a, decoder cells).

    `expansion` is 6 in decoder cells and 3 in post-processing cells; the depthwise kernel is 5x5.
    """

    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int, kernel_size: int = 5):
        super().__init__()
        hidden = c_in * expansion
        self.upsample = stride == -1
        self.bn_in = batch_norm(c_in)
        self.expand = WNConv2d(c_in, hidden, 1, bias=False)
        self.bn_expand = batch_norm(hidden)
        self.depthwise = WNConv2d(hidden, hidden, kernel_size, stride=1 if stride == -1 else stride,
                                  padding=kernel_size // 2, groups=hidden, bias=False)
        self.bn_depthwise = batch_norm(hidden)
        self.project = WNConv2d(hidden, c_out, 1, bias=False, weight_norm=False)
        self.bn_out = batch_norm(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.upsample:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        x = self.bn_in(x)
        x = F.silu(self.bn_expand(self.expand(x)))
        x = F.silu(self.bn_depthwise(self.depthwise(x)))
        return self.bn_out(self.project(x))
