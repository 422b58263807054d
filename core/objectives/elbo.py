"""Stage-1 objective: negative ELBO with KL warm-up, KL balancing and NVAE's spectral/BN regularization.

    loss = mean_b[ -log p(x_b|z_b) + beta * sum_l gamma_l * KL_l(b) ] + lambda * (SR + BN)        (NVAE Sec. 3.2, 4)

beta is the KL warm-up coefficient, gamma_l the KL-balancing weights (only while beta < 1), lambda the regularization
coefficient, annealed log-linearly from `norm_coeff_init` to `norm_coeff` along with the KL warm-up.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from core.models.interface import TowerPass
from core.models.distributions import sum_except_batch


@dataclass
class ELBOConfig:
    kl_anneal_portion: float = 0.3  # fraction of training over which the KL coefficient rises linearly to 1
    kl_const_portion: float = 1e-4  # fraction of training at the start with the KL coefficient held at its minimum
    kl_min_coeff: float = 1e-4  # smallest KL coefficient
    kl_balance: bool = True  # balance per-group KL terms during warm-up so no group collapses (NVAE Sec. 4)
    norm_coeff: float = 1e-1  # lambda: weight of spectral + BN regularization after warm-up (weight_decay_norm)
    norm_coeff_init: float = 10.0  # lambda at the start of warm-up when annealed (weight_decay_norm_init)
    norm_coeff_anneal: bool = False  # anneal lambda log-linearly from norm_coeff_init with the KL coefficient

    def __post_init__(self) -> None:
        if not 0.0 < self.kl_anneal_portion <= 1.0:
            raise ValueError("ELBOConfig: kl_anneal_portion must be in (0, 1]")
        if not 0.0 <= self.kl_min_coeff <= 1.0:
            raise ValueError("ELBOConfig: kl_min_coeff must be in [0, 1]")
        if self.norm_coeff < 0 or self.norm_coeff_init <= 0:
            raise ValueError("ELBOConfig: norm coefficients must be positive")


def kl_coefficient(progress: float, config: ELBOConfig) -> float:
    """beta(progress), progress = fraction of training done (counted in images seen)."""
    beta = (progress - config.kl_const_portion) / config.kl_anneal_portion
    return max(min(beta, 1.0), config.kl_min_coeff)


def norm_coefficient(kl_coeff: float, config: ELBOConfig) -> float:
    """lambda: log-linear interpolation between norm_coeff_init (beta=0) and norm_coeff (beta=1) when annealed."""
    if not config.norm_coeff_anneal:
        return config.norm_coeff
    if config.norm_coeff == 0:
        return 0.0
    log_l = (1.0 - kl_coeff) * math.log(config.norm_coeff_init) + kl_coeff * math.log(config.norm_coeff)
    return math.exp(log_l)


def kl_balance_weights(latent_shapes: list[tuple[int, ...]]) -> torch.Tensor:
    """alpha_l: NVAE's balancing prior, proportional to a group's spatial size divided by the groups at its scale.

    Larger (finer) groups are allowed proportionally more KL; normalized so the smallest weight is 1.
    """
    sizes = [math.prod(s[1:]) if len(s) > 1 else 1 for s in latent_shapes]
    counts = {size: sizes.count(size) for size in sizes}
    alpha = torch.tensor([size / counts[size] for size in sizes], dtype=torch.float64)
    return (alpha / alpha.min()).float()


def balanced_kl(kl_per_group: torch.Tensor, kl_coeff: float, alpha: torch.Tensor | None,
                balance: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample KL term beta * sum_l gamma_l KL_l and the gammas used (for logging).

    While beta < 1 and balancing is on: gamma_l ∝ mean_b |KL_l| / alpha_l (+0.01), normalized to mean 1, treated as
    constants (no gradient). Groups that carry much KL relative to their share are pushed harder, which keeps the
    others from collapsing early. At beta = 1 every gamma is 1 and the term is the exact KL of the ELBO.
    """
    groups = kl_per_group.shape[1]
    if balance and kl_coeff < 1.0:
        if alpha is None:
            raise ValueError("balanced_kl: alpha is required when balancing")
        per_group = kl_per_group.abs().mean(dim=0) + 0.01
        gamma = per_group / alpha.to(per_group) * per_group.sum()
        gamma = (gamma / gamma.mean()).detach()
    else:
        gamma = torch.ones(groups, dtype=kl_per_group.dtype, device=kl_per_group.device)
    return kl_coeff * (kl_per_group * gamma).sum(dim=1), gamma


@dataclass
class ELBOTerms:
    loss: torch.Tensor  # scalar to minimize
    nelbo: torch.Tensor  # per-sample negative ELBO (unweighted KL: the number users compare)
    reconstruction: torch.Tensor  # per-sample -log p(x|z)
    kl_per_group: torch.Tensor  # (batch, groups)
    kl_weights: torch.Tensor  # gamma_l used this step
    spectral: torch.Tensor  # spectral penalty (scalar)
    batchnorm: torch.Tensor  # BN penalty (scalar)
    kl_coeff: float
    norm_coeff: float


def nelbo_loss(tower: TowerPass, x: torch.Tensor, progress: float, config: ELBOConfig,
               alpha: torch.Tensor | None, spectral: torch.Tensor, batchnorm: torch.Tensor) -> ELBOTerms:
    """The stage-1 training loss from a posterior tower pass (`model.posterior(x)`)."""
    reconstruction = -sum_except_batch(tower.x_dist.log_prob(x))
    kl = tower.kl_per_group()
    beta = kl_coefficient(progress, config)
    weighted_kl, gamma = balanced_kl(kl, beta, alpha, config.kl_balance)
    lam = norm_coefficient(beta, config)
    loss = (reconstruction + weighted_kl).mean() + lam * (spectral + batchnorm)
    return ELBOTerms(loss=loss, nelbo=reconstruction + kl.sum(dim=1), reconstruction=reconstruction,
                     kl_per_group=kl, kl_weights=gamma, spectral=spectral, batchnorm=batchnorm,
                     kl_coeff=beta, norm_coeff=lam)
