"""Noise-contrastive estimation of the prior's density ratio per latent group (ncpvae_appendix.md App. C).

    min_{D_k} E_{p_d(x) q(z_<k|x)} [ -E_{q(z_k|z_<k,x)} log D_k(z_k, c(z_<k))
                                    -E_{p(z_k|z_<k)}     log(1 - D_k(z_k, c(z_<k))) ]           (Eq. 10-11)

With D_k = sigmoid(l_k), -log D_k = softplus(-l_k) and -log(1 - D_k) = softplus(l_k). At the optimum
D_k = q / (q + p), so the logit l_k is log r_k = log q(z_k|z_<k) / p(z_k|z_<k) (Eq. 8). The K classifiers are
independent, so their losses are summed: one backbone pass trains all of them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class NCETerms:
    loss: torch.Tensor  # scalar: sum over groups of the per-group NCE loss (Eq. 11), for backward
    per_group: torch.Tensor  # (K,) detached per-group losses
    accuracy: torch.Tensor  # (K,) detached share of positives with l > 0 and negatives with l < 0, per group
    logit_pos: torch.Tensor  # (K,) detached mean logit (estimated log r_k) on the positives
    logit_neg: torch.Tensor  # (K,) detached mean logit on the negatives


def nce_group_loss(logit_pos: torch.Tensor, logit_neg: torch.Tensor) -> torch.Tensor:
    """Eq. 11 for one group: mean softplus(-l+) + mean softplus(l-) (binary cross-entropy, positives labelled 1)."""
    return F.softplus(-logit_pos.float()).mean() + F.softplus(logit_neg.float()).mean()


def nce_loss(logits_pos: list[torch.Tensor], logits_neg: list[torch.Tensor]) -> NCETerms:
    """The NCE objective over all groups (Eq. 10-11): positives z_k ~ q(z_k|z_<k, x), negatives z_k ~ p(z_k|z_<k)
    at the same z_<k."""
    if len(logits_pos) != len(logits_neg) or not logits_pos:
        raise ValueError("nce_loss: need the same positive number of positive and negative logit groups")
    losses = torch.stack([nce_group_loss(p, n) for p, n in zip(logits_pos, logits_neg)])
    with torch.no_grad():
        acc = torch.stack([0.5 * ((p > 0).float().mean() + (n < 0).float().mean())
                           for p, n in zip(logits_pos, logits_neg)])
        mpos = torch.stack([p.float().mean() for p in logits_pos])
        mneg = torch.stack([n.float().mean() for n in logits_neg])
    return NCETerms(loss=losses.sum(), per_group=losses.detach(), accuracy=acc, logit_pos=mpos, logit_neg=mneg)
