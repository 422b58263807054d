"""Hierarchical sampling-importance-resampling: group by group, M proposals per chain, one kept by its weight.

For a prior reweighted per group, p_k(z_k | z_<k) ∝ p(z_k | z_<k) r_k(z_k, z_<k) (ncpvae_appendix.md App. C-D), each
group is drawn given the groups already chosen: M candidates from the proposal p(z_k | z_<k), self-normalized
weights w_m ∝ r_k(z_k^m, z_<k), one candidate kept per chain (multinomial). As M -> infinity the kept value follows
p_k(z_k | z_<k) exactly, so the chain follows prod_k p_k(z_k | z_<k): each conditional normalized by its own
Z_k(z_<k). (That equals the jointly tilted p(z) prod_k r_k / Z only when every Z_k is constant in z_<k, which holds at
the optimal classifiers, where r_k = q(z_k|z_<k) / p(z_k|z_<k).)

The caller supplies `propose(k, chosen, m)`: given the values chosen for groups < k, return m candidates per chain
(shape (batch, m, ...)) and their log-weights (batch, m). This module knows nothing of what a group is; resampling
is per chain because each chain's conditional differs (a pooled resample would mix conditionals).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

GroupProposal = Callable[[int, list[torch.Tensor], int], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class HierarchicalSIRResult:
    values: list[torch.Tensor]  # the chosen value of every group, (batch, ...) each
    ess_fraction: list[float]  # per group: mean over chains of the weights' effective sample size / M


def resample_per_chain(candidates: torch.Tensor, log_w: torch.Tensor,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One of each chain's M candidates, drawn with probability softmax(log_w) over that chain's row.

    candidates: (batch, M, ...); log_w: (batch, M) (NaN never chosen). Returns (chosen (batch, ...), ESS / M (batch,)).
    """
    batch, m = log_w.shape
    if candidates.shape[:2] != (batch, m):
        raise ValueError(f"candidates {tuple(candidates.shape)} do not match log-weights {tuple(log_w.shape)}")
    log_w = torch.nan_to_num(log_w.float(), nan=-torch.inf)
    probs = torch.softmax(log_w, dim=1)
    pick = torch.multinomial(probs.to(torch.float64), 1, generator=generator).reshape(batch).to(candidates.device)
    chosen = candidates[torch.arange(batch, device=candidates.device), pick]
    ess = 1.0 / probs.double().pow(2).sum(dim=1) / m
    return chosen, ess


@torch.no_grad()
def hierarchical_sir(num_groups: int, propose: GroupProposal, candidates: int,
                     generator: torch.Generator | None = None) -> HierarchicalSIRResult:
    """Draw every group in order by SIR with `candidates` (M) proposals per chain; see the module docstring.
    M = 1 returns the proposal's draws (no reweighting)."""
    if num_groups < 1 or candidates < 1:
        raise ValueError("hierarchical_sir: num_groups and candidates must be >= 1")
    chosen: list[torch.Tensor] = []
    ess: list[float] = []
    for k in range(num_groups):
        cand, log_w = propose(k, list(chosen), candidates)
        if log_w.dim() != 2 or log_w.shape[1] != candidates:
            raise ValueError(f"propose({k}) must return log-weights of shape (batch, {candidates}), "
                             f"got {tuple(log_w.shape)}")
        value, e = resample_per_chain(cand, log_w.to(cand.device), generator)
        chosen.append(value)
        ess.append(float(e.mean()))
    return HierarchicalSIRResult(values=chosen, ess_fraction=ess)
