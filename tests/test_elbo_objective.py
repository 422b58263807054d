"""KL warm-up, KL balancing and the regularization schedule against brute-force float64 references (NVAE Sec. 4)."""
import math

import pytest
import torch

from core.objectives.elbo import (ELBOConfig, balanced_kl, kl_balance_weights, kl_coefficient, nelbo_loss,
                                  norm_coefficient)
from core.models import NVAE, NVAEConfig
from core.training.config import load_preset


def test_kl_coefficient_schedule():
    cfg = ELBOConfig(kl_anneal_portion=0.3, kl_const_portion=0.0001, kl_min_coeff=0.0001)
    assert kl_coefficient(0.0, cfg) == pytest.approx(1e-4)
    assert kl_coefficient(0.15 + 0.0001, cfg) == pytest.approx(0.5)
    assert kl_coefficient(0.31, cfg) == 1.0
    assert kl_coefficient(1.0, cfg) == 1.0


def test_norm_coefficient_anneals_log_linearly():
    cfg = ELBOConfig(norm_coeff=1e-2, norm_coeff_init=10.0, norm_coeff_anneal=True)
    assert norm_coefficient(0.0, cfg) == pytest.approx(10.0)
    assert norm_coefficient(1.0, cfg) == pytest.approx(1e-2)
    assert norm_coefficient(0.5, cfg) == pytest.approx(math.sqrt(10.0 * 1e-2))
    assert norm_coefficient(0.5, ELBOConfig(norm_coeff=0.1)) == 0.1


def test_kl_balance_weights_follow_group_size_per_scale():
    shapes = load_preset("nvae", "celebahq256", NVAEConfig, num_groups_per_scale=16, ada_groups=True, min_groups_per_scale=4).latent_shapes()
    alpha = kl_balance_weights(shapes)
    # scales 8,16,32,64,128 with 4,4,4,8,16 groups: area / groups, normalized to min 1
    raw = [64 / 4] * 4 + [256 / 4] * 4 + [1024 / 4] * 4 + [4096 / 8] * 8 + [16384 / 16] * 16
    expected = torch.tensor(raw) / min(raw)
    torch.testing.assert_close(alpha, expected)


def test_balanced_kl_matches_brute_force():
    torch.manual_seed(3)
    kl = torch.rand(5, 4, dtype=torch.float64) * torch.tensor([1.0, 10.0, 3.0, 0.1], dtype=torch.float64)
    alpha = torch.tensor([1.0, 1.0, 4.0, 4.0])
    out, gamma = balanced_kl(kl, 0.5, alpha)
    ref_gamma = []
    for l in range(4):
        mean_abs = sum(abs(kl[b, l].item()) for b in range(5)) / 5 + 0.01
        ref_gamma.append(mean_abs / alpha[l].item())
    total = sum(sum(abs(kl[b, l].item()) for b in range(5)) / 5 + 0.01 for l in range(4))
    ref_gamma = [g * total for g in ref_gamma]
    mean = sum(ref_gamma) / 4
    ref_gamma = torch.tensor([g / mean for g in ref_gamma], dtype=torch.float64)
    torch.testing.assert_close(gamma, ref_gamma)
    torch.testing.assert_close(out, 0.5 * (kl * ref_gamma).sum(1))
    # at the end of warm-up the term is the plain KL
    plain, ones = balanced_kl(kl, 1.0, alpha)
    torch.testing.assert_close(plain, kl.sum(1))
    assert torch.equal(ones, torch.ones(4, dtype=torch.float64))


def test_nelbo_terms_are_consistent():
    model = NVAE(NVAEConfig(image_size=16)).double()
    x = torch.rand(4, 3, 16, 16, dtype=torch.float64) * 2 - 1
    tower = model.posterior(x)
    terms = nelbo_loss(tower, x, progress=1.0, config=ELBOConfig(), alpha=None,
                       spectral=torch.tensor(2.0, dtype=torch.float64), batchnorm=torch.tensor(3.0, dtype=torch.float64))
    recon = -tower.x_dist.log_prob(x).sum(dim=(1, 2, 3))
    kl = tower.kl_per_group().sum(1)
    torch.testing.assert_close(terms.nelbo, recon + kl)
    torch.testing.assert_close(terms.loss, (recon + kl).mean() + 0.1 * 5.0)
