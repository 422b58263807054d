"""Exact likelihoods on 2-D data: the 25-Gaussians experiment of vaebm.md Sec. 5.4.

In two dimensions the VAEBM partition function Z = int p_vae(x) exp(-E(x)) dx (vaebm.md Eq. 4) can be computed by
numerical integration, so log h(x) = log p_vae(x) - E(x) - log Z (vaebm.md Eq. 5) is a likelihood, not a bound.
Everything is accumulated in float64 with logsumexp: exp(f) spans hundreds of orders of magnitude over the grid.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

LogDensityFn = Callable[[torch.Tensor], torch.Tensor]  # (M, 2) points -> (M,) values
Bounds = tuple[tuple[float, float], tuple[float, float]]

GAUSSIANS25_GRID = (-4.0, -2.0, 0.0, 2.0, 4.0)  # component centres per axis (data_pipelines/builtin_sets.py)
GAUSSIANS25_STD = 0.1  # per-coordinate standard deviation of every component


def gaussians25_centers(dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> torch.Tensor:
    g = torch.tensor(GAUSSIANS25_GRID, dtype=dtype, device=device)
    return torch.stack(torch.meshgrid(g, g, indexing="ij"), dim=-1).reshape(-1, 2)


def gaussians25_log_density(x: torch.Tensor, std: float = GAUSSIANS25_STD) -> torch.Tensor:
    """Analytic log density of the equal-weight mixture of N(c, std^2 I) over the 25 grid centres, float64."""
    x = x.to(torch.float64)
    c = gaussians25_centers(device=x.device)
    sq = ((x[:, None, :] - c[None, :, :]) ** 2).sum(dim=-1)
    log_comp = -0.5 * sq / std**2 - math.log(2.0 * math.pi * std**2)
    return torch.logsumexp(log_comp, dim=1) - math.log(len(c))


def sample_gaussians25(n: int, generator: torch.Generator | None = None, std: float = GAUSSIANS25_STD) -> torch.Tensor:
    """n float64 draws from the mixture (same law as data_pipelines' toy2d '25gaussians' source)."""
    c = gaussians25_centers()
    idx = torch.randint(len(c), (n,), generator=generator)
    return c[idx] + std * torch.randn(n, 2, dtype=torch.float64, generator=generator)


def gaussians25_expected_log_likelihood(std: float = GAUSSIANS25_STD) -> float:
    """E_p[log p(x)] = -H(p) for well-separated components (centres 2 apart = 20 std): each sample sees only its own
    component, so H = log(2 pi e std^2) + log 25. The overlap correction is below exp(-50) at std 0.1."""
    return -(math.log(2.0 * math.pi * math.e * std**2) + math.log(25.0))


@dataclass
class Grid2D:
    bounds: Bounds = ((-6.0, 6.0), (-6.0, 6.0))  # integration box; must hold all mass (25-Gaussians: +-4 plus 20 std)
    n: int = 1200  # cells per axis (midpoint rule); 1200 over 12 gives 10 cells per std of the 25-Gaussians
    chunk_size: int = 65536  # points evaluated per call of the log-density (memory of a network)
    input_dtype: torch.dtype = torch.float64  # dtype of the points passed to the functions (float32 for fp32 nets)
    device: str = "cpu"  # where the points are created

    def __post_init__(self) -> None:
        (x0, x1), (y0, y1) = self.bounds
        if not (x1 > x0 and y1 > y0 and self.n >= 2 and self.chunk_size >= 1):
            raise ValueError("Grid2D: bounds must be increasing, n >= 2, chunk_size >= 1")


def grid_points(grid: Grid2D) -> tuple[torch.Tensor, float]:
    """Cell centres of an n x n grid and the log cell area."""
    (x0, x1), (y0, y1) = grid.bounds
    hx, hy = (x1 - x0) / grid.n, (y1 - y0) / grid.n
    i = torch.arange(grid.n, dtype=torch.float64, device=grid.device) + 0.5
    xs, ys = x0 + i * hx, y0 + i * hy
    pts = torch.stack(torch.meshgrid(xs, ys, indexing="ij"), dim=-1).reshape(-1, 2)
    return pts, math.log(hx * hy)


@torch.no_grad()
def _chunked(fn: LogDensityFn, points: torch.Tensor, chunk_size: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.cat([fn(points[i:i + chunk_size].to(dtype)).to(torch.float64).reshape(-1)
                      for i in range(0, len(points), chunk_size)])


def grid_log_partition(log_unnormalized_fn: LogDensityFn, bounds: Bounds = Grid2D.bounds, n: int = Grid2D.n,
                       chunk_size: int = Grid2D.chunk_size, input_dtype: torch.dtype = torch.float64) -> float:
    """log Z = log int exp(f(x)) dx over `bounds` by the midpoint rule on an n x n grid, as a float64 logsumexp.

    For smooth f whose exp(f) vanishes at the box edges the midpoint rule converges faster than any power of the
    cell width (it is the trapezoid rule's twin), so a grid a few cells per std wide is exact to ~1e-10.
    """
    grid = Grid2D(bounds=bounds, n=n, chunk_size=chunk_size, input_dtype=input_dtype)
    return log_partition_on(grid, log_unnormalized_fn)


def log_partition_on(grid: Grid2D, log_unnormalized_fn: LogDensityFn) -> float:
    pts, log_cell = grid_points(grid)
    f = _chunked(log_unnormalized_fn, pts, grid.chunk_size, grid.input_dtype)
    if torch.isnan(f).any():
        raise ValueError("log-density returned NaN on the integration grid")
    return float(torch.logsumexp(f, dim=0)) + log_cell


@dataclass
class MCEstimate:
    log_z: float  # log of the importance-sampling estimate of Z
    std_error: float  # standard error of log_z (delta method: std(w) / (sqrt(n) mean(w)))
    num_samples: int  # number of proposal draws


@torch.no_grad()
def mc_log_partition(log_weight_fn: LogDensityFn, sample_fn: Callable[[int], torch.Tensor], num_samples: int,
                     chunk_size: int = 65536) -> MCEstimate:
    """Importance-sampling cross-check of the grid: Z = E_{x~q}[w(x)], log w = f(x) - log q(x).

    For VAEBM with the VAE as proposal, f = log p_vae - E and q = p_vae, so log w(x) = -E(x) exactly
    (log Z = log E_{x~p_vae}[exp(-E(x))]) and no likelihood estimate of the VAE enters: pass
    `log_weight_fn = lambda x: -energy(x)` and `sample_fn` drawing from the VAE.
    """
    if num_samples < 2:
        raise ValueError("mc_log_partition needs at least 2 samples for an error estimate")
    parts, left = [], num_samples
    while left > 0:
        k = min(chunk_size, left)
        x = sample_fn(k)
        parts.append(log_weight_fn(x).to(torch.float64).reshape(-1))
        left -= k
    log_w = torch.cat(parts)
    log_z = float(torch.logsumexp(log_w, dim=0)) - math.log(num_samples)
    w = torch.exp(log_w - log_w.max())  # scaled weights: the ratio std/mean is scale-free
    rel = float(w.std() / w.mean()) / math.sqrt(num_samples)
    return MCEstimate(log_z=log_z, std_error=rel, num_samples=num_samples)


@torch.no_grad()
def vaebm_log_density(log_p_vae: torch.Tensor, energy: torch.Tensor, log_z: float = 0.0,
                      average: bool = False) -> torch.Tensor | float:
    """log h(x) = log p_vae(x) - E(x) - log Z per point (vaebm.md Eq. 5); with log_z = 0 the unnormalized
    log p_vae(x) - E(x) of Eq. 4 (the integrand of log Z). `average=True` returns the mean over the points as a float,
    computed as mean(log p_vae - E) - log Z: Eq. 5 is affine, so log Z leaves the mean (one subtraction, not N).
    Every log h of the 2-D protocol (validation score, grid integrands, test rows) goes through here."""
    log_h = log_p_vae - energy
    if average:
        return float(log_h.mean()) - log_z
    return log_h - log_z


def vaebm_log_likelihood(log_p_vae_fn: LogDensityFn, energy_fn: LogDensityFn, x_test: torch.Tensor,
                         grid: Grid2D | None = None, log_z: float | None = None) -> torch.Tensor:
    """Per-sample log h(x) = log p_vae(x) - E(x) - log Z (vaebm.md Eq. 5) with log Z from the grid (float64).

    `log_p_vae_fn` is the VAE's log-density (an IWAE estimate with many samples, as in the paper, for a trained VAE);
    pass a precomputed `log_z` to evaluate several test sets against one integration.
    """
    grid = grid or Grid2D()

    def log_unnormalized(x: torch.Tensor) -> torch.Tensor:
        return vaebm_log_density(log_p_vae_fn(x).to(torch.float64), energy_fn(x).to(torch.float64).reshape(-1))

    if log_z is None:
        log_z = log_partition_on(grid, log_unnormalized)
    return vaebm_log_density(_chunked(log_unnormalized, x_test, grid.chunk_size, grid.input_dtype), 0.0, log_z)
