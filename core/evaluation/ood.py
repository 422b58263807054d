"""Out-of-distribution detection by likelihood (vaebm.md Sec. 5.3, Table 6).

AUROC of a score for which in-distribution data should score higher: the unnormalized log h(x) = log p(x) - E(x)
of VAEBM (log Z is a constant and cancels in a ranking), or a VAE's log p(x) estimate. 1.0 means every OOD sample
scores below every in-distribution sample, 0.5 chance; ties count one half (the Mann-Whitney statistic).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from sklearn.metrics import roc_auc_score


def _as_array(scores: torch.Tensor | np.ndarray) -> np.ndarray:
    a = scores.detach().cpu().double().numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores, np.float64)
    a = a.reshape(-1)
    if not np.isfinite(a).all():
        raise ValueError("OOD scores must be finite (a NaN or inf would make the ranking meaningless)")
    return a


def auroc(in_scores: torch.Tensor | np.ndarray, ood_scores: torch.Tensor | np.ndarray) -> float:
    """P(score_in > score_ood) + 0.5 P(equal): in-distribution is the positive class."""
    pos, neg = _as_array(in_scores), _as_array(ood_scores)
    if pos.size == 0 or neg.size == 0:
        raise ValueError("AUROC needs at least one in-distribution and one OOD score")
    labels = np.concatenate([np.ones(pos.size), np.zeros(neg.size)])
    return float(roc_auc_score(labels, np.concatenate([pos, neg])))


def ood_auroc(in_scores: torch.Tensor | np.ndarray,
              ood_scores: Mapping[str, torch.Tensor | np.ndarray]) -> dict[str, float]:
    """AUROC of the in-distribution scores against each named OOD set (vaebm.md Table 6 columns)."""
    return {name: auroc(in_scores, scores) for name, scores in ood_scores.items()}
