"""Importance-weighted log-likelihood estimates for any NoiseSpaceBackbone (Burda et al., 2015; vaebm.md Sec. 5.4).

    log p(x) ~= log (1/K) sum_k p(x | z_k) p(z_k) / q(z_k | x),   z_k ~ q(z | x)

The bound is exact for K -> infinity, equals the ELBO in expectation for K = 1 (vaebm.md Eq. 3), and is
nondecreasing in K in expectation. The K samples are drawn in chunks so memory is bounded by `chunk_size` copies of
the batch; the running logsumexp over chunks is exact.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from core.models.distributions import sum_except_batch
from core.models.interface import NoiseSpaceBackbone


@dataclass
class IWAEConfig:
    num_samples: int = 1000  # K importance samples per data point (the paper uses 10,000 on 2-D data)
    chunk_size: int = 100  # importance samples evaluated per forward pass (memory: batch * chunk_size inputs)

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.chunk_size < 1:
            raise ValueError("IWAEConfig: num_samples and chunk_size must be >= 1")


def log_importance_weights(model: NoiseSpaceBackbone, x: torch.Tensor, num_samples: int) -> torch.Tensor:
    """(num_samples, batch) log w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x) in float64, z_k ~ q(z|x)."""
    batch = x.shape[0]
    x_rep = x.repeat(num_samples, *([1] * (x.ndim - 1)))  # sample-major: row k*batch + i is data point i
    tower = model.posterior(x_rep)
    log_px_z = sum_except_batch(tower.x_dist.log_prob(x_rep))
    log_w = log_px_z.double() + tower.log_p_z().double() - tower.log_q_z().double()
    return log_w.view(num_samples, batch)


@torch.no_grad()
def iwae_log_likelihood(model: NoiseSpaceBackbone, x: torch.Tensor, num_samples: int = 1000,
                        chunk_size: int = 100) -> torch.Tensor:
    """Per-sample IWAE estimate of log p(x) in nats (float64): logsumexp_k log w_k - log K."""
    if num_samples < 1 or chunk_size < 1:
        raise ValueError("num_samples and chunk_size must be >= 1")
    partial = []  # logsumexp of each chunk: combining them is exact, unlike averaging per-chunk estimates
    remaining = num_samples
    while remaining > 0:
        k = min(chunk_size, remaining)
        partial.append(torch.logsumexp(log_importance_weights(model, x, k), dim=0))
        remaining -= k
    return torch.logsumexp(torch.stack(partial), dim=0) - math.log(num_samples)


def iwae(model: NoiseSpaceBackbone, x: torch.Tensor, config: IWAEConfig) -> torch.Tensor:
    """`iwae_log_likelihood` with a config."""
    return iwae_log_likelihood(model, x, config.num_samples, config.chunk_size)


def bits_per_dim(log_px_nats: torch.Tensor | float, dims: int, num_bits: int = 8,
                 data_range: float = 2.0) -> torch.Tensor | float:
    """Negative log-likelihood of the discrete data in bits per dimension from a continuous density in model space.

    Convention (the data pipeline's, data_pipelines/transforms.py): integers u in {0, ..., 2^b - 1} are mapped to
    x = data_range * u / (2^b - 1) + offset, i.e. x = 2u/(2^b - 1) - 1 for [-1, 1] images. Neighbouring levels are
    Delta = data_range / (2^b - 1) apart, so each level owns a cell of volume Delta^D and
        P(u) ~= p(x) * Delta^D        (exact for a density of uniformly dequantized data, Theis et al. 2016)
        bpd  = -log2 P(u) / D = (-log p(x) / D + log((2^b - 1) / data_range)) / log 2.
    For 8-bit images in [-1, 1] the offset term is log2(127.5) = 6.994 bits. NVAE and most flow papers instead
    dequantize to [0, 1] with bins of width 1/2^b (x = (u + noise) / 2^b), which gives log2(256) = 8 bits for data in
    [0, 1] (7 for [-1, 1]); the two conventions differ by log2(256/255) = 0.0056 bpd at 8 bits. The estimate is only a
    bound on the discrete likelihood if the model was trained on dequantized data; a Gaussian decoder fit to the bin
    centres can put arbitrarily high density there.
    """
    if dims < 1 or num_bits < 1 or data_range <= 0:
        raise ValueError("dims and num_bits must be >= 1 and data_range > 0")
    log_cells = math.log((2**num_bits - 1) / data_range)  # -log Delta
    return (-log_px_nats / dims + log_cells) / math.log(2.0)
