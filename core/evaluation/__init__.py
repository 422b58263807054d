"""Evaluation metrics: FID (fid.py), IWAE likelihoods and bits/dim (iwae.py), exact 2-D likelihoods (density2d.py),
OOD AUROC (ood.py), sample quality without downloads (sample_score.py). Library functions only: the evaluate launcher wires them to data, checkpoints and MLflow.

Submodules are imported on first use: fid.py pulls in torchvision and pytorch-fid, which the others do not need.
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    # fid
    "FIDStatistics": "fid", "FeatureStats": "fid", "InceptionConfig": "fid", "InceptionWeightsError": "fid",
    "compute_fid": "fid", "compute_statistics": "fid", "fid_between": "fid", "frechet_distance": "fid",
    "load_inception": "fid", "reference_stats": "fid", "to_uint8": "fid",
    # iwae
    "IWAEConfig": "iwae", "bits_per_dim": "iwae", "iwae": "iwae", "iwae_log_likelihood": "iwae",
    # density2d
    "Grid2D": "density2d", "MCEstimate": "density2d", "gaussians25_log_density": "density2d",
    "grid_log_partition": "density2d", "mc_log_partition": "density2d", "sample_gaussians25": "density2d",
    "vaebm_log_likelihood": "density2d",
    # ood
    "auroc": "ood", "ood_auroc": "ood",
    # sample_score
    "DigitsScorer": "sample_score", "DigitsScorerConfig": "sample_score",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
