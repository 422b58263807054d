"""Importance-weighted log-likelihood estimates for any NoiseSpaceBackbone (Burda et al., 2015; vaebm.md Sec. 5.4).

    log p(x) ~= log (1/K) sum_k p(x | z_k) p(z_k) / q(z_k | x),   z_k ~ q(z | x)

The bound is exact for K -> infinity, equals the ELBO in expectation for K = 1 (vaebm.md Eq. 3), and is
nondecreasing in K in expectation. The K samples are drawn in chunks so memory is bounded by `chunk_size` copies of
the batch; the running logsumexp over chunks is exact.

Priors reweighted on the latent groups, p_r(z) = p(z) r(z) / Z (NCP-VAE: r = prod_k r_k, ncpvae_appendix.md App. C;
the joint latent EBM prior: r = exp f_alpha), pass `log_tilt` = log r at a walk's latents: the weights become
p(x|z) p(z) r(z) / q(z|x), and log Z = log E_{z~p}[r(z)] comes from `prior_log_partition` (Monte Carlo over prior
draws; being the log of a mean, it is biased low by about var/2, so the reported log-likelihood errs high by as much).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from core.models.distributions import sum_except_batch
from core.models.interface import NoiseSpaceBackbone, TowerPass

LogTilt = Callable[[TowerPass], torch.Tensor]  # log r(z) (batch,) at the latents of a walk


@dataclass
class IWAEConfig:
    num_samples: int = 1000  # K importance samples per data point (the paper uses 10,000 on 2-D data)
    chunk_size: int = 100  # importance samples evaluated per forward pass (memory: batch * chunk_size inputs)

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.chunk_size < 1:
            raise ValueError("IWAEConfig: num_samples and chunk_size must be >= 1")


def log_importance_weights(model: NoiseSpaceBackbone, x: torch.Tensor, num_samples: int,
                           log_tilt: LogTilt | None = None) -> torch.Tensor:
    """(num_samples, batch) log w_k = log p(x|z_k) + log p(z_k) [+ log r(z_k)] - log q(z_k|x) in float64,
    z_k ~ q(z|x)."""
    batch = x.shape[0]
    x_rep = x.repeat(num_samples, *([1] * (x.ndim - 1)))  # sample-major: row k*batch + i is data point i
    tower = model.posterior(x_rep)
    log_px_z = sum_except_batch(tower.x_dist.log_prob(x_rep))
    log_w = log_px_z.double() + tower.log_p_z().double() - tower.log_q_z().double()
    if log_tilt is not None:
        log_w = log_w + log_tilt(tower).double()
    return log_w.view(num_samples, batch)


@torch.no_grad()
def iwae_log_likelihood(model: NoiseSpaceBackbone, x: torch.Tensor, num_samples: int = 1000,
                        chunk_size: int = 100, log_tilt: LogTilt | None = None) -> torch.Tensor:
    """Per-sample IWAE estimate of log p(x) in nats (float64): logsumexp_k log w_k - log K. With `log_tilt`, of the
    unnormalized log p(x) Z of the reweighted prior (subtract `prior_log_partition`)."""
    if num_samples < 1 or chunk_size < 1:
        raise ValueError("num_samples and chunk_size must be >= 1")
    partial = []  # logsumexp of each chunk: combining them is exact, unlike averaging per-chunk estimates
    remaining = num_samples
    while remaining > 0:
        k = min(chunk_size, remaining)
        partial.append(torch.logsumexp(log_importance_weights(model, x, k, log_tilt), dim=0))
        remaining -= k
    return torch.logsumexp(torch.stack(partial), dim=0) - math.log(num_samples)


@torch.no_grad()
def prior_log_partition(model: NoiseSpaceBackbone, log_tilt: LogTilt, num_samples: int, chunk_size: int,
                        generator: torch.Generator) -> tuple[float, float]:
    """(log Z, its standard error) for Z = E_{z~p}[r(z)], z = T_z(eps), eps ~ N(0, I): log of the Monte Carlo mean
    of r over `num_samples` prior draws; the error is the delta method's std(r) / (sqrt(N) mean(r))."""
    if num_samples < 2 or chunk_size < 1:
        raise ValueError("prior_log_partition needs num_samples >= 2 and chunk_size >= 1")
    values = []
    for start in range(0, num_samples, chunk_size):
        _, eps_z = model.sample_noise(min(chunk_size, num_samples - start), generator=generator)
        values.append(log_tilt(model.T_z(eps_z)).double().reshape(-1))
    log_r = torch.cat(values)
    log_z = float(torch.logsumexp(log_r, 0)) - math.log(num_samples)
    r = torch.exp(log_r - log_r.max())
    return log_z, float(r.std() / (math.sqrt(num_samples) * r.mean()))


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
