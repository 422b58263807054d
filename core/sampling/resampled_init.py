"""Chain initialization by sampling-importance-resampling (SIR) from the VAE, for VAEBM in low dimensions.

VAEBM's density is h(x) ∝ p_vae(x) exp(-E(x)) (vaebm.md Eq. 4). In ε-space the VAE is the proposal N(0, I) and
exp(-E(T(ε))) is the exact importance weight of h's ε-space law (Eq. 9: U = E(T(ε)) + ‖ε‖²/2), so drawing K
proposals per chain and keeping one with probability ∝ exp(-E(T(ε))) gives chains distributed as h up to the
finite-K error of SIR (exact as K -> ∞); the Langevin steps that follow leave h invariant up to discretization.

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
    ess_fraction: float  # mean over chains of the effective sample size of their K weights, divided by K


@torch.no_grad()
def importance_resampled_init(backbone: NoiseSpaceBackbone, energy_fn: Callable[[torch.Tensor], torch.Tensor],
                              num_chains: int, candidates: int, generator: torch.Generator | None = None,
                              temperature: float = 1.0) -> ResampledInit:
    """For each of `num_chains` chains draw `candidates` ε ~ N(0, I), weight them by exp(-E(T(ε))) and keep one
    by multinomial resampling within the chain's own candidates (SIR). candidates = 1 is plain N(0, I)."""
    if num_chains < 1 or candidates < 1:
        raise ValueError("importance_resampled_init: num_chains and candidates must be >= 1")
    n = num_chains * candidates
    eps_x, eps_z = backbone.sample_noise(n, generator=generator)
    state = join_state(eps_x, eps_z)
    if candidates == 1:
        return ResampledInit(state=state, ess_fraction=1.0)
    x, _ = backbone.generate(eps_z, eps_x, temperature)
    log_w = (-energy_fn(x).float().reshape(n)).reshape(num_chains, candidates)
    log_w = torch.nan_to_num(log_w, nan=-torch.inf)  # a non-finite energy never gets chosen
    probs = torch.softmax(log_w, dim=1)
    ess = 1.0 / probs.pow(2).sum(dim=1)
    pick = torch.multinomial(probs, 1, generator=generator).reshape(num_chains)
    rows = torch.arange(num_chains, device=pick.device) * candidates + pick
    return ResampledInit(state=[s[rows] for s in state], ess_fraction=float(ess.mean()) / candidates)
