"""OOD AUROC (vaebm.md Table 6) against a brute-force Mann-Whitney count, ties included."""
import numpy as np
import pytest
import torch

from core.evaluation.ood import auroc, ood_auroc


def _brute_force(pos, neg):
    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (pos.size * neg.size)


def test_auroc_matches_pairwise_count_with_ties():
    rng = np.random.default_rng(0)
    in_scores = rng.integers(0, 6, size=57).astype(np.float64)  # few distinct values: many ties
    oods = {"near": rng.integers(0, 6, size=31).astype(np.float64),
            "far": rng.integers(-4, 3, size=44).astype(np.float64),
            "continuous": rng.normal(1.0, 2.0, size=23)}
    got = ood_auroc(torch.from_numpy(in_scores), {k: torch.from_numpy(v) for k, v in oods.items()})
    assert set(got) == set(oods)
    for name, scores in oods.items():
        assert got[name] == pytest.approx(_brute_force(in_scores, scores), abs=1e-12)
    assert got["far"] > got["near"]


def test_orientation_and_extremes():
    assert auroc([3.0, 4.0], [1.0, 2.0]) == 1.0  # in-distribution scores higher: detected
    assert auroc([1.0, 2.0], [3.0, 4.0]) == 0.0
    assert auroc([1.0, 1.0], [1.0]) == 0.5  # all tied
    with pytest.raises(ValueError):
        auroc([1.0, float("nan")], [0.0])
    with pytest.raises(ValueError):
        auroc([], [0.0])
