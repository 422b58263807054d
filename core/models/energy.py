"""Energy networks E_psi(x) of VAEBM (vaebm.md App. E, Table 7) and their data-dependent initialization.

Images: 3x3 conv stem -> Swish -> ResBlocks (Table 7) -> global sum pooling -> linear -> scalar energy.
2-D toy data: a weight-normalized Swish MLP -> scalar. There is no batch norm anywhere, so a sample's energy never
depends on the rest of its batch (Langevin drifts are per-sample; DESIGN.md "Seams").

Weight normalization with data-dependent init replaces Du & Mordatch's spectral normalization (App. E, change 2);
the spectral *regularizer* (`spectral_penalty`, coefficient alpha_s = 0.2, 0.3 on CelebA-HQ) still bounds the convs.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.models.energy_blocks import ACTIVATIONS, EnergyResBlock, Swish
from core.models.layers import WNConv2d, WNLinear
from core.models.spectral import SpectralRegularizer

# vaebm.md Table 7: (output width as a multiple of base_channels, down-samples?) per ResBlock, after a 3x3 conv stem
# of width base_channels. Down blocks halve the resolution with 2x2 average pooling; every preset ends at 4x4.
TABLE7_BLOCKS: dict[str, tuple[tuple[int, bool], ...]] = {
    "cifar10": ((1, True), (1, False), (2, True), (2, False), (2, True), (2, False)),
    "celeba64": ((1, True), (2, True), (2, False), (2, True), (4, False), (4, True), (4, False)),
    "lsun_church64": ((1, True), (1, False), (2, True), (2, False), (2, False), (2, True), (4, False), (4, False),
                      (4, True), (4, False)),
    "celebahq256": ((1, True), (1, False), (2, True), (2, True), (2, False), (4, True), (4, False), (4, True),
                    (4, False), (8, True), (8, False)),
}
# The official code's nets for CelebA-64 and CelebA-HQ-256 (ebm_models.py), behind the published FIDs: one more
# block than Table 7 each, with different down-sampling positions.
OFFICIAL_BLOCKS: dict[str, tuple[tuple[int, bool], ...]] = {
    "celeba64_official": ((1, True), (1, False), (2, True), (2, False), (2, True), (4, False), (4, True), (4, False)),
    "celebahq256_official": ((1, True), (1, False), (2, True), (2, False), (2, True), (2, False), (4, True),
                             (4, False), (4, True), (4, False), (8, True), (8, False)),
}
ARCH_BLOCKS = {**TABLE7_BLOCKS, **OFFICIAL_BLOCKS}
ARCHS = (*ARCH_BLOCKS, "mlp")


@dataclass
class EnergyNetConfig:
    arch: str = "cifar10"  # Table 7: cifar10 | celeba64 | lsun_church64 | celebahq256; OFFICIAL_BLOCKS; mlp (2-D)
    image_size: int = 32  # height = width of the input images; forward rejects other sizes (unused for mlp)
    in_channels: int = 3  # image channels
    base_channels: int = 128  # stem width; Table 7 widths are 1x/2x/4x/8x this (official n_channel: 128 CIFAR, else 64)
    swish: str = "swish"  # "swish": x*sigmoid(x) (paper) | "swish_official": x*sigmoid(x)/1.1 (VAEBM's code)
    data_dim: int = 2  # mlp only: dimension D of the (B, D) inputs
    hidden: int = 128  # mlp only: width of every hidden layer
    num_layers: int = 3  # mlp only: number of hidden (weight-normalized linear + Swish) layers
    weight_norm: bool = True  # weight-normalize every conv/linear (needed by data_dependent_init)
    init_scale: float = 0.2  # data-dependent init output std per layer (VAEBM's code: 1/5; Salimans & Kingma: 1)
    # one data-dependent-init output std per weight-normalized layer, in forward order (`wn_layers`, counted by
    # `num_wn_layers`); None: init_scale for all
    init_scales: list[float] | None = None

    def validate(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.swish not in ACTIVATIONS:
            raise ValueError(f"swish must be one of {ACTIVATIONS}, got {self.swish!r}")
        if self.arch == "mlp":
            if min(self.data_dim, self.hidden, self.num_layers) < 1:
                raise ValueError("mlp needs data_dim, hidden and num_layers >= 1")
        else:
            if min(self.in_channels, self.base_channels) < 1:
                raise ValueError("in_channels and base_channels must be >= 1")
            downs = sum(down for _, down in ARCH_BLOCKS[self.arch])
            if self.image_size % (2 ** downs) != 0:
                raise ValueError(f"{self.arch} down-samples {downs} times: image_size must be a multiple of "
                                 f"{2 ** downs}, got {self.image_size}")
        if self.init_scales is not None:
            count = self.num_wn_layers()
            if len(self.init_scales) != count:
                raise ValueError(f"init_scales: {self.arch} has {count} weight-normalized layers, got "
                                 f"{len(self.init_scales)} scales")
            if not all(math.isfinite(s) and s > 0 for s in self.init_scales):
                raise ValueError(f"init_scales must be finite and > 0, got {list(self.init_scales)}")

    def num_wn_layers(self) -> int:
        """Number of weight-normalized layers EnergyNet builds from this config (0 without weight_norm)."""
        if not self.weight_norm:
            return 0
        if self.arch == "mlp":
            return self.num_layers + 1  # hidden layers + head
        count, mult_in = 1, 1  # stem
        for mult, down in ARCH_BLOCKS[self.arch]:
            count += 2 + (mult != mult_in or down)  # conv1, conv2, and the 1x1 shortcut where EnergyResBlock has one
            mult_in = mult
        return count + 1  # head


def _fp32_pixels(layer: WNConv2d | WNLinear,
                 op: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]) -> torch.Tensor:
    """A pixel-reading layer computed in at least fp32 (float64 stays float64) whatever the parameter dtype or
    autocast: `op(dtype, weight, bias)` gets the compute dtype and the weight and bias cast to it. The result comes
    back in the parameter dtype (as it is under autocast, which casts it for the next layer)."""
    device = layer.weight.device.type
    dtype = torch.promote_types(layer.weight.dtype, torch.float32)
    autocast = device in ("cpu", "cuda") and torch.is_autocast_enabled(device)  # (no autocast on "meta")
    with torch.autocast(device, enabled=False) if autocast else contextlib.nullcontext():
        h = op(dtype, layer.normalized_weight().to(dtype), None if layer.bias is None else layer.bias.to(dtype))
    return h if autocast else h.to(layer.weight.dtype)


class PixelWNConv2d(WNConv2d):
    """The energy's first conv: it reads pixels in fp32 even when the net holds bf16 weights or runs under autocast.

    bf16 carries 8 significant bits, so casting x in [-1, 1] to bf16 moves a pixel in [0.5, 1) by up to 2^-9, a
    quarter of an 8-bit level (2/255), on every positive and at every Langevin step (and Langevin moves smaller than
    the spacing vanish). Past this layer the features run in the engine's
    dtype. Same parameters (and state-dict keys) as WNConv2d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _fp32_pixels(self, lambda dt, w, b: F.conv2d(x.to(dt), w, b, self.stride, self.padding, self.dilation,
                                                            self.groups))


class PixelWNLinear(WNLinear):
    """The mlp energy's first layer, fp32 on its inputs like `PixelWNConv2d`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _fp32_pixels(self, lambda dt, w, b: F.linear(x.to(dt), w, b))


class EnergyNet(nn.Module):
    """E_psi(x) -> Tensor[B]; images in [-1, 1] NCHW, or (B, D) points for arch="mlp"."""

    def __init__(self, config: EnergyNetConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.act = Swish(config.swish)
        wn = config.weight_norm
        if config.arch == "mlp":
            widths = [config.data_dim] + [config.hidden] * config.num_layers
            self.hidden_layers = nn.ModuleList(
                (PixelWNLinear if i == 0 else WNLinear)(a, b, weight_norm=wn)
                for i, (a, b) in enumerate(zip(widths, widths[1:])))
            self.head = WNLinear(config.hidden, 1, weight_norm=wn)
            penalized = list(self.hidden_layers)  # the MLP's analogue of "every conv" (the head is left out too)
        else:
            c = config.base_channels
            self.stem = PixelWNConv2d(config.in_channels, c, 3, padding=1, weight_norm=wn)
            blocks, c_in = [], c
            for mult, down in ARCH_BLOCKS[config.arch]:
                blocks.append(EnergyResBlock(c_in, mult * c, down, swish=config.swish, weight_norm=wn))
                c_in = mult * c
            self.blocks = nn.ModuleList(blocks)
            self.head = WNLinear(c_in, 1, weight_norm=wn)
            penalized = [m for m in self.modules() if isinstance(m, WNConv2d)]  # every conv, as in App. E
        self.spectral = SpectralRegularizer(penalized)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if cfg.arch == "mlp":
            if x.dim() != 2 or x.shape[1] != cfg.data_dim:
                raise ValueError(f"mlp energy expects (B, {cfg.data_dim}) inputs, got {tuple(x.shape)}")
            h = x
            for layer in self.hidden_layers:
                h = self.act(layer(h))
            return self.head(h).squeeze(1)
        if x.dim() != 4 or x.shape[1] != cfg.in_channels or x.shape[2:] != (cfg.image_size, cfg.image_size):
            raise ValueError(f"{cfg.arch} energy expects (B, {cfg.in_channels}, {cfg.image_size}, {cfg.image_size}) "
                             f"inputs, got {tuple(x.shape)}")
        h = self.act(self.stem(x))
        for block in self.blocks:
            h = block(h)
        # global *sum* pooling (Table 7): the energy scales with image area, like a sum of per-pixel terms
        return self.head(h.sum(dim=(2, 3))).squeeze(1)

    def spectral_penalty(self) -> torch.Tensor:
        """Sum of spectral norms of every conv (hidden linears for mlp), one batched power-iteration step.

        vaebm.md App. E: added to the CD loss with coefficient alpha_s (0.2; 0.3 for CelebA-HQ 256).
        """
        return self.spectral()


def wn_layers(module: nn.Module) -> list[nn.Module]:
    """Weight-normalized layers of `module` in registration order, which for EnergyNet is also the order the forward
    pass reaches them (the order of EnergyNetConfig.init_scales)."""
    return [m for m in module.modules() if isinstance(m, (WNConv2d, WNLinear)) and m.weight_norm]


def _direction_output(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Layer output with g = 0 and no bias, i.e. with weight V / (||V|| + 1e-5) exactly as normalized_weight uses."""
    v = layer.weight / (layer._direction_norm(layer.weight) + 1e-5)
    if isinstance(layer, WNConv2d):
        return F.conv2d(x, v, None, layer.stride, layer.padding, layer.dilation, layer.groups)
    return F.linear(x, v)


def _channel_moments(y: torch.Tensor, channel_dim: int,
                     reduce: Callable[[torch.Tensor], torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (population) variance over every other axis, in float64; with `reduce` (a sum over
    ranks) over the concatenated batches of all ranks.

    Two reductions (sums and counts, then centred squares) give the moments of the global batch, so the init equals a
    single-process init on that batch whatever the split (averaging per-rank std, as VAEBM's code does, would not).
    """
    y = y.movedim(channel_dim, 0).reshape(y.shape[channel_dim], -1).double()
    first = torch.cat([y.sum(dim=1), torch.tensor([float(y.shape[1])], dtype=torch.float64, device=y.device)])
    if reduce is not None:
        first = reduce(first)
    mean = first[:-1] / first[-1]
    second = ((y - mean[:, None]) ** 2).sum(dim=1)
    if reduce is not None:
        second = reduce(second)
    return mean, second / first[-1]


@torch.no_grad()
def data_dependent_init(net: nn.Module, x_batch: torch.Tensor, init_scale: float = 1.0, eps: float = 1e-6, *,
                        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
    """Salimans & Kingma (2016) data-dependent init of every weight-normalized layer, layer by layer.

    One forward pass on `x_batch`. A pre-hook on each WN layer sees the layer's input as produced by the
    already-initialised layers before it, computes y = (V/||V||) * x, and sets
        g = log(s / std[y]),   b = -mean[y] * s / std[y]
    so the layer's output exp(g) * y + b has per-channel mean 0 and std s. s is the layer's entry of the net's
    `EnergyNetConfig.init_scales` when set, else `init_scale` for every layer. VAEBM's code uses s = 0.2 (it divides
    by 5 * std); the default 1 is the paper's unit variance.

    reduce: sums a float64 tensor over ranks and returns the sum (None: a single process). With it, `x_batch` is this
    rank's share of the init batch, the moments are those of all ranks' batches together, and ranks that start from
    identical parameters (same seed, or rank 0's broadcast) end with identical weights; every rank must call it.
    """
    layers = wn_layers(net)
    if not layers:
        raise ValueError("data_dependent_init needs weight-normalized layers (EnergyNetConfig.weight_norm=True)")
    per_layer = net.config.init_scales if isinstance(net, EnergyNet) else None
    scales = [float(s) for s in per_layer] if per_layer is not None else [float(init_scale)] * len(layers)
    if len(scales) != len(layers):
        raise ValueError(f"data_dependent_init: {len(layers)} weight-normalized layers, {len(scales)} init_scales")

    def make_hook(scale: float):
        def init_layer(layer: nn.Module, inputs: tuple) -> None:
            y = _direction_output(layer, inputs[0])
            mean, var = _channel_moments(y, 1 if isinstance(layer, WNConv2d) else -1, reduce)
            inv_std = scale / torch.sqrt(var + eps)
            layer.log_weight_norm.copy_(torch.log(inv_std).reshape(layer.log_weight_norm.shape))
            if layer.bias is not None:
                layer.bias.copy_(-mean * inv_std)
        return init_layer

    handles = [layer.register_forward_pre_hook(make_hook(s)) for layer, s in zip(layers, scales)]
    try:
        net(x_batch)
    finally:
        for handle in handles:
            handle.remove()
