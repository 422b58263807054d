"""Chain initialization by sampling-importance-resampling (SIR): draw candidates from a proposal q, weight them by
w ∝ p/q and keep num_chains of them, so the chains start (approximately) at the target p.

The caller supplies the proposal (`propose(n)`: n candidate states) and the log-weight (`log_weight(state)`, one
value per row, up to a constant); this module knows nothing of what the state means. For VAEBM, h(x) ∝ p_vae(x)
exp(-E(x)) (vaebm.md Eq. 4): in ε-space the VAE is the proposal N(0, I) and log w = -E(T(ε)) is the exact log
importance weight of h's ε-space law (Eq. 9: U = E(T(ε)) + ‖ε‖²/2), so the kept candidates follow h up to the
finite-K error of SIR (exact as K -> ∞); the Langevin steps that follow leave h invariant up to discretization.

Two schemes (`scheme`):
- "pooled" (default): all num_chains·K candidates form one pool and num_chains draws are taken from it by systematic
  resampling. Each draw then follows the SIR law of a pool of num_chains·K proposals, so the bias towards the
  proposal is that of K·num_chains candidates, not of K; draws can repeat (the Langevin steps that follow separate
  them).
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


@dataclass
class ResampledInit:
    state: list[torch.Tensor]  # the chosen candidates' state, as `propose` lays it out: (num_chains, ...) each
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
def importance_resampled_init(propose: Callable[[int], list[torch.Tensor]],
                              log_weight: Callable[[list[torch.Tensor]], torch.Tensor], num_chains: int,
                              candidates: int, generator: torch.Generator | None = None,
                              scheme: str = "pooled") -> ResampledInit:
    """Draw num_chains·`candidates` candidates with `propose(n)` (a list of tensors with n rows each), weight them by
    exp(`log_weight(state)`) (one value per row) and resample num_chains of them (SIR), from one pool
    (`scheme="pooled"`) or within each chain's own consecutive `candidates` rows (`"per_chain"`). candidates = 1
    returns the proposal's draws without calling `log_weight`. Rows with a NaN log-weight are never chosen.

    `generator` drives the resampling only; `propose` draws from its own (close it over the same generator for one
    reproducible stream: the proposal consumes it first, then the resampling). `ess_fraction` is the effective sample
    size of the weights (of the pool, or the mean over chains) divided by the number of candidates it covers."""
    if num_chains < 1 or candidates < 1:
        raise ValueError("importance_resampled_init: num_chains and candidates must be >= 1")
    if scheme not in SCHEMES:
        raise ValueError(f"importance_resampled_init: scheme must be one of {SCHEMES}, got {scheme!r}")
    n = num_chains * candidates
    state = list(propose(n))
    if not state or any(s.shape[0] != n for s in state):
        raise ValueError(f"importance_resampled_init: propose({n}) must return tensors with {n} rows each, got "
                         f"{[tuple(s.shape) for s in state]}")
    if candidates == 1:
        return ResampledInit(state=state, ess_fraction=1.0)
    log_w = log_weight(state).float()
    if log_w.numel() != n:
        raise ValueError(f"importance_resampled_init: log_weight must return one value per row ({n}), got shape "
                         f"{tuple(log_w.shape)}")
    # NaN: never chosen; ±inf: clamped to the extreme finite floats (the softmax stays defined)
    log_w = torch.nan_to_num(log_w.reshape(n), nan=-torch.inf)
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
