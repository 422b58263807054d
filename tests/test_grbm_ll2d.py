"""The `grbm_vae` row of the 2-D likelihood protocol on a tiny protocol: it trains its own VAE and prior, its log Z is
exact (enumeration) and the AIS cross-check agrees with it, and the per-point estimates respect the bounds."""
import math

import torch

from core.evaluation.ll2d_grbm_vae import GRBMVAERowConfig, ll2d_row
from core.evaluation.toy2d import Toy2DProtocol, build_context

TINY = dict(vae_overrides=["loop.total_nimg=15360"], train_points=2000, test_points=1000, val_points=500,
            marginal_samples=2000, mc_samples=2000, iwae_points=4, iwae_samples=50, grid_n=40, val_grid_n=30, val_marginal_samples=3000)


def test_grbm_vae_row_on_a_tiny_protocol(tmp_path):
    ctx = build_context(Toy2DProtocol(**TINY), "gaussians25", cache_dir=tmp_path)
    config = GRBMVAERowConfig(grbm_hidden=10, net_hidden=32, steps=200, eval_every=100, val_points=300,
                              importance_samples=16, ais_chains=100, ais_betas=300, extra_points=300,
                              classifier_steps=50, classifier_prior_samples=1000, gibbs_sweeps=20)
    row = ll2d_row(ctx, config)
    assert row.log_likelihood.shape == (1000,) and row.log_likelihood.dtype == torch.float64
    assert torch.isfinite(row.log_likelihood).all()
    assert row.log_z_stderr == 0.0 and abs(row.log_z_check - row.log_z) < 4 * row.extra["log_z_ais_stderr"]
    e = row.extra
    assert e["elbo_exact_log_z"] <= e["iwae_subset"] + 1e-9  # K-sample IS is tighter than the ELBO
    assert all(math.isfinite(v) for v in e.values())
    assert e["val_best_step"] in (100.0, 200.0)
    # the trained networks are cached: a second call reuses them and gives the same numbers
    again = ll2d_row(ctx, config)
    assert again.extra["train_seconds"] == e["train_seconds"] and again.log_z == row.log_z
