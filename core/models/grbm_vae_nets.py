"""Encoder, decoder and data spaces of the VAE with a GRBM prior (unnormalized_prior_vae_grbm.md Sec. 4).

- `mlp` (Sec. 4.1, binarized MNIST): encoder 784-512-512-128 with ReLUs, its output split into the mean and
  log-variance of 64 Gaussian latents; decoder 64-512-512-784 with ReLUs giving Bernoulli logits.
- `conv` (Sec. 4.2, CIFAR-10): four 4x4 stride-2 padding-1 convolutions (32, 64, 128, 256 channels, ReLU after each),
  a linear layer to the mean and log-variance of 512 latents; decoder: a linear layer back to the last feature map,
  then four 4x4 stride-2 transposed convolutions (128, 64, 32, C channels, ReLU between them) giving the mean of a
  Laplace likelihood whose scale is calibrated analytically from the L1 error (Rybkin et al. 2021).

Data spaces (`DataSpace`): the loader delivers x in [-1, 1]. `binary` (dynamically binarized by the loader) targets
are y = (x + 1) / 2 in {0, 1} with a Bernoulli decoder; `logit` targets follow Papamakarios et al. 2018 as Sec. 4.2
says: the 8-bit values are dequantized with uniform noise, rescaled to [0, 1], squeezed into [lam, 1 - lam] and
logit-transformed, y = logit(lam + (1 - 2 lam) (u + noise) / 256); `log_det` is log |dy/dx| for x = u + noise in
[0, 256)^D, so log p(x) = log p(y) + log_det and bits/dim = -log p(x) / (D ln 2).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

ARCHS = ("mlp", "conv")
LIKELIHOODS = ("bernoulli", "laplace")
DATA_SPACES = ("binary", "logit")


@dataclass
class GRBMVAENetsConfig:
    arch: str = "mlp"  # mlp (Sec. 4.1) | conv (Sec. 4.2)
    image_size: int = 28  # side of the (square) images
    channels: int = 1  # image channels
    latent_dim: int = 64  # Gaussian latents (64 MNIST, 512 CIFAR-10); the GRBM's visible units
    hidden: list[int] = field(default_factory=lambda: [512, 512])  # mlp: hidden widths (the decoder mirrors them)
    conv_channels: list[int] = field(default_factory=lambda: [32, 64, 128, 256])  # conv: encoder channels per layer
    likelihood: str = "bernoulli"  # bernoulli (binary data) | laplace (logit data, calibrated scale)
    data_space: str = "binary"  # binary: y = (x+1)/2 | logit: dequantize + logit (Papamakarios et al. 2018)
    logit_lambda: float = 0.05  # logit space: y = logit(lam + (1 - 2 lam) x / 256) (0.05 for CIFAR-10 in MAF)
    laplace_scale_momentum: float = 0.99  # the evaluation scale is this EMA of the training batches' calibrated scale
    min_laplace_scale: float = 1e-3  # floor on the calibrated Laplace scale

    def validate(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"nets.arch must be one of {ARCHS}, got {self.arch!r}")
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"nets.likelihood must be one of {LIKELIHOODS}, got {self.likelihood!r}")
        if self.data_space not in DATA_SPACES:
            raise ValueError(f"nets.data_space must be one of {DATA_SPACES}, got {self.data_space!r}")
        if (self.likelihood == "bernoulli") != (self.data_space == "binary"):
            raise ValueError("nets.likelihood=bernoulli goes with nets.data_space=binary, laplace with logit")
        if self.latent_dim < 1 or self.image_size < 1 or self.channels < 1:
            raise ValueError("nets.latent_dim, nets.image_size and nets.channels must be >= 1")
        if self.arch == "conv":
            if not self.conv_channels or self.image_size % (2 ** len(self.conv_channels)):
                raise ValueError(f"nets.image_size={self.image_size} must be divisible by 2^len(conv_channels)")
        elif not self.hidden:
            raise ValueError("nets.hidden needs at least one width")
        if not 0 < self.logit_lambda < 0.5:
            raise ValueError("nets.logit_lambda must be in (0, 0.5)")

    @property
    def data_dim(self) -> int:
        return self.channels * self.image_size * self.image_size


def _mlp(widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """q(z|x) = N(mean(x), diag exp(logvar(x))) on targets y (B, C, H, W)."""

    def __init__(self, c: GRBMVAENetsConfig):
        super().__init__()
        self.arch = c.arch
        if c.arch == "mlp":
            self.body = _mlp([c.data_dim, *c.hidden, 2 * c.latent_dim])
        else:
            convs: list[nn.Module] = []
            prev = c.channels
            for ch in c.conv_channels:
                convs += [nn.Conv2d(prev, ch, 4, stride=2, padding=1), nn.ReLU()]
                prev = ch
            side = c.image_size // 2 ** len(c.conv_channels)
            self.body = nn.Sequential(*convs, nn.Flatten(), nn.Linear(prev * side * side, 2 * c.latent_dim))

    def forward(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(y.flatten(1) if self.arch == "mlp" else y)
        mean, logvar = h.chunk(2, dim=-1)
        return mean, logvar


class Decoder(nn.Module):
    """Bernoulli logits or Laplace means (B, C, H, W) from z (B, latent_dim)."""

    def __init__(self, c: GRBMVAENetsConfig):
        super().__init__()
        self.arch, self.shape = c.arch, (c.channels, c.image_size, c.image_size)
        if c.arch == "mlp":
            self.body = _mlp([c.latent_dim, *reversed(c.hidden), c.data_dim])
        else:
            chans = list(reversed(c.conv_channels))  # 256, 128, 64, 32
            self.side = c.image_size // 2 ** len(chans)
            self.first = chans[0]
            self.fc = nn.Linear(c.latent_dim, chans[0] * self.side * self.side)
            outs = [*chans[1:], c.channels]  # 128, 64, 32, C
            layers: list[nn.Module] = []
            for i, (a, b) in enumerate(zip(chans, outs)):
                layers.append(nn.ConvTranspose2d(a, b, 4, stride=2, padding=1))
                if i < len(outs) - 1:
                    layers.append(nn.ReLU())
            self.body = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.arch == "mlp":
            return self.body(z).view(-1, *self.shape)
        return self.body(self.fc(z).view(-1, self.first, self.side, self.side))


def gaussian_log_prob(z: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mean, diag exp(logvar)) summed over the last dimension."""
    return -0.5 * (math.log(2 * math.pi) + logvar + (z - mean) ** 2 * torch.exp(-logvar)).sum(-1)


def bernoulli_log_prob(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log Bernoulli(y; sigmoid(logits)) per sample (summed over C, H, W)."""
    return -F.binary_cross_entropy_with_logits(logits, y, reduction="none").flatten(1).sum(-1)


def laplace_log_prob(mean: torch.Tensor, y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """log Laplace(y; mean, scale) per sample (summed over C, H, W), one shared scale."""
    d = y[0].numel()
    return -d * torch.log(2 * scale) - (y - mean).abs().flatten(1).sum(-1) / scale


class DataSpace:
    """The map from the loader's x in [-1, 1] to the decoder's targets y, its log-determinant, and back."""

    def __init__(self, config: GRBMVAENetsConfig):
        self.space, self.lam = config.data_space, config.logit_lambda

    def to_targets(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor,
                                                                                          torch.Tensor]:
        """(y, log_det) per sample; `binary`: y = (x + 1)/2 (log_det 0); `logit`: dequantize with uniform noise from
        `generator`, then y = logit(lam + (1 - 2 lam) x_deq / 256) (Sec. 4.2), log_det = log |dy/dx_deq|."""
        if self.space == "binary":
            return (x + 1) / 2, torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        u = torch.round((x.float() + 1) * 127.5)  # the 8-bit values 0..255
        noise = torch.rand(u.shape, generator=generator, device=u.device, dtype=u.dtype)
        s = self.lam + (1 - 2 * self.lam) * (u + noise) / 256.0
        y = torch.log(s) - torch.log1p(-s)
        log_det = (math.log((1 - 2 * self.lam) / 256.0) - torch.log(s) - torch.log1p(-s)).flatten(1).sum(-1)
        return y, log_det

    def to_images(self, decoded: torch.Tensor) -> torch.Tensor:
        """Decoder output (Bernoulli logits or Laplace means in logit space) as images in [-1, 1]."""
        if self.space == "binary":
            return torch.sigmoid(decoded) * 2 - 1
        s = torch.sigmoid(decoded)
        return ((s - self.lam) / (1 - 2 * self.lam)).clamp(0, 1) * 2 - 1


class GRBMVAENets(nn.Module):
    """Encoder + decoder + the Laplace scale buffer (the GRBM prior is a separate module)."""

    def __init__(self, config: GRBMVAENetsConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        # Laplace: the scale used at evaluation (EMA of the calibrated training-batch scales); unused for Bernoulli.
        self.register_buffer("laplace_scale", torch.ones(()))
        self.data = DataSpace(config)

    def log_likelihood(self, decoded: torch.Tensor, y: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """log p(y | z) per sample; Laplace with `scale` (default: the stored evaluation scale)."""
        if self.config.likelihood == "bernoulli":
            return bernoulli_log_prob(decoded, y)
        return laplace_log_prob(decoded, y, self.laplace_scale if scale is None else scale)


__all__ = ["GRBMVAENetsConfig", "GRBMVAENets", "Encoder", "Decoder", "DataSpace", "gaussian_log_prob",
           "bernoulli_log_prob", "laplace_log_prob"]
