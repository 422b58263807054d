"""How a method adds a row to the 2-D likelihood protocol (`metric=ll2d`, core/evaluation/toy2d.py).

The protocol trains the papers' MLP VAE once per seed; every method is scored on the same splits and, when it refines
that VAE (NCP-VAE, the joint latent EBM prior), on the same frozen VAE. A row module `core/evaluation/ll2d_<name>.py`
defines a typed config dataclass and `ll2d_row(ctx: LL2DContext, config) -> LL2DRow`; toy2d registers it under
`<name>` and prints `gap_closed[<name>]` = (row - vae) / (true - vae).

This module holds the two data classes and the two pieces every row's training shares (validation-selected weights,
a cache of trained networks); it imports nothing of toy2d, so row modules and toy2d import it freely.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from core.training.selection import BestWeights


@dataclass
class LL2DRow:
    """What a row reports. Log-likelihoods in nats."""

    log_likelihood: torch.Tensor  # (N_test,) float64 per-point log-likelihood estimates on ctx.test
    log_z: float  # the log-partition estimate used by `log_likelihood` (0.0 for a normalized model)
    log_z_stderr: float  # its standard error (0.0 when exact)
    log_z_check: float | None = None  # a second, independent estimate of the same log Z
    extra: dict[str, float] = field(default_factory=dict)  # further diagnostics (printed and logged as ll2d/<row>/<k>)


@dataclass
class LL2DContext:
    """Everything a row may use. Built by `toy2d.build_context`."""

    vae: Any  # the protocol's trained MLPVAE, frozen (eval mode, no gradients): the backbone of refining methods
    train: torch.Tensor  # (N, 2) float32 training points
    val: torch.Tensor  # (N, 2) float32 validation points (model selection; never the test points)
    test: torch.Tensor  # (N, 2) float32 test points
    protocol: Any  # the Toy2DProtocol (seed, grid, sample counts)
    seed: int  # root seed of this protocol run
    eps_z: list[torch.Tensor]  # prior noise of the M shared decoder components (one (M, d) tensor per group)
    z: list[torch.Tensor]  # their latents z = T_z(eps_z)
    mu: torch.Tensor  # (M, 2) decoder means of those components
    sigma: torch.Tensor  # (M, 2) decoder standard deviations
    log_p_vae_test: torch.Tensor  # (N_test,) float64 log p_vae(test) by the marginal mixture of the M components
    mixture_fn: Callable[..., torch.Tensor]  # toy2d.mixture_log_density
    grid_fn: Callable[[Callable[[torch.Tensor], torch.Tensor]], float]  # log of a grid integral of exp(fn)
    cache_dir: Path | None = None  # where rows may cache trained networks
    training_key: str = ""  # hash of the data split and the VAE's training settings

    def generator(self, offset: int) -> torch.Generator:
        """A CPU generator seeded from the protocol seed and a row-specific offset."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + offset)

    def log_mixture(self, x: torch.Tensor, log_weights: torch.Tensor | None = None) -> torch.Tensor:
        """float64 log (1/M) sum_m w_m N(x; mu_m, diag sigma_m^2) over the shared components, w_m = exp(log_weights).
        With log_weights = log r(z_m) this is the unnormalized log E_{z~p}[p(x|z) r(z)]."""
        return self.mixture_fn(x, self.mu, self.sigma, log_weights=log_weights)

    def grid_log_integral(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> float:
        """log of the integral of exp(fn(x)) over the protocol's grid; fn maps (n, 2) float32 points to (n,) float64
        log values (-inf allowed)."""
        return self.grid_fn(fn)

    def cache_path(self, name: str) -> Path | None:
        """A file for a row's trained networks, keyed by the VAE's training key; None without a cache directory."""
        if self.cache_dir is None:
            return None
        return self.cache_dir / f"ll2d-{self.training_key}-{name}.pt"


class BestState(BestWeights):
    """Model selection of a row on validation points (test points never choose): the job's best-keeping rule
    (core.training.selection.BestWeights, `step` = the row's training step), summarized under the rows' names."""

    def summary(self) -> dict[str, float]:
        return {"val_best_log_likelihood": self.score, "val_best_step": float(self.step)}


def load_or_train(path: Path | None, train: Callable[[], dict[str, Any]], required: tuple[str, ...]) -> dict[str, Any]:
    """A row's trained networks: the blob cached at `path` when it holds every `required` key, else `train()`'s,
    written there atomically (tensors, numbers and dicts of them only: read back with weights_only)."""
    if path is not None and path.is_file():
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(blob, dict) and all(k in blob for k in required):
            return blob
    blob = train()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(blob, tmp)
        tmp.replace(path)
    return blob
