"""Chain initialization by sampling-importance-resampling (SIR) from the VAE, for VAEBM in low dimensions.

VAEBM's density is h(x) ∝ p_vae(x) exp(-E(x)) (vaebm.md Eq. 4). In ε-space the VAE is the proposal N(0, I) and
exp(-E(T(ε))) is the exact importance weight of h's ε-space law (Eq. 9: U = E(T(ε)) + ‖ε‖²/2), so drawing K
proposals per chain and keeping one with probability ∝ exp(-E(T(ε))) gives chains distributed as h up to the
finite-K error of SIR (exact as K -> ∞); the Langevin steps that follow leave h invariant up to discretization.

Two schemes (`scheme`):
- "pooled" (default): all num_chains·K candidates form one pool and num_chains draws are taken from it by systematic
  resampling. Each draw then follows the SIR law of a pool of num_chains·K proposals, so the bias towards the VAE
  is that of K·num_chains candidates, not of K; draws can repeat (the Langevin steps that follow separate them).
- "per_chain": each chain keeps one of its own K candidates (multinomial). Draws are independent but each carries
  the larger bias of K proposals; it is the scheme that still spreads the chains where the pooled weights degenerate.

Why it exists: short ε-space Langevin chains started at N(0, I) can sit far from h when E has moved mass between
regions the chains must cross barriers to reach. On the 2-D 25-Gaussians protocol (docs/benchmarks.md) 300 steps
left the chains' mean energy at 0.71 where the exact E_h[E] is -0.10. Where it does not fit: images. There the
weights of N(0, I) proposals degenerate (one candidate takes all the weight), which the effective sample size
returned here makes visible.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from core.models.interface import NoiseSpaceBackbone
from core.sampling.targets import join_state


@dataclass
class ResampledInit:
    state: list[torch.Tensor]  # [eps_x, *eps_z] of the chosen candidates, (num_chains, ...) each, fp32
    ess_fraction: float  # effective sample size of the weights over the number of candidates it covers


SCHEMES = ("pooled", "per_chain")


def systematic_resample(probs: torch.Tensor, num: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """`num` indices into the normalized weights `probs` (1-D) by systematic resampling (one uniform offset, strata
    of width 1/num): every index i is drawn floor(num·p_i) or ceil(num·p_i) times, unbiased, lower variance than
    multinomial draws."""
    u = (torch.rand((), generator=generator, device=probs.device) + torch.arange(num, device=probs.device)) / num
    cdf = torch.cumsum(probs.double(), dim=0)
    cdf[-1] = 1.0  # guard against the last cumulative sum rounding below a stratum point
    return torch.searchsorted(cdf, u.double()).clamp_(max=probs.numel() - 1)


@torch.no_grad()
def importance_resampled_init(backbone: NoiseSpaceBackbone, energy_fn: Callable[[torch.Tensor], torch.Tensor],
                              num_chains: int, candidates: int, generator: torch.Generator | None = None,
                              temperature: float = 1.0, scheme: str = "pooled") -> ResampledInit:
    """Draw num_chains·`candidates` ε ~ N(0, I), weight them by exp(-E(T(ε))) and resample num_chains of them (SIR),
    from one pool (`scheme="pooled"`) or within each chain's own candidates (`"per_chain"`). candidates = 1 is plain
    N(0, I). `ess_fraction` is the effective sample size of the weights (of the pool, or the mean over chains)
    divided by the number of candidates it is computed over."""
    if num_chains < 1 or candidates < 1:
        raise ValueError("importance_resampled_init: num_chains and candidates must be >= 1")
    if scheme not in SCHEMES:
        raise ValueError(f"importance_resampled_init: scheme must be one of {SCHEMES}, got {scheme!r}")
    n = num_chains * candidates
    eps_x, eps_z = backbone.sample_noise(n, generator=generator)
    state = join_state(eps_x, eps_z)
    if candidates == 1:
        return ResampledInit(state=state, ess_fraction=1.0)
    x, _ = backbone.generate(eps_z, eps_x, temperature)
    log_w = torch.nan_to_num(-energy_fn(x).float().reshape(n), nan=-torch.inf)  # non-finite E: never chosen
    if scheme == "pooled":
        probs = torch.softmax(log_w, dim=0)
        rows = systematic_resample(probs, num_chains, generator)
        ess_fraction = float(1.0 / probs.double().pow(2).sum()) / n
    else:
        probs = torch.softmax(log_w.reshape(num_chains, candidates), dim=1)
        pick = torch.multinomial(probs, 1, generator=generator).reshape(num_chains)
        rows = torch.arange(num_chains, device=pick.device) * candidates + pick
        ess_fraction = float((1.0 / probs.pow(2).sum(dim=1)).mean()) / candidates
    return ResampledInit(state=[s[rows] for s in state], ess_fraction=ess_fraction)
