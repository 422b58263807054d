"""Contrastive-divergence loss (vaebm.md Eq. 7), the VAEBM loss terms (App. E) and the energy-magnitude penalty."""
import pytest
import torch

from core.models.energy import EnergyNet
from presets import energy_preset
from core.objectives.ebm import contrastive_divergence_loss, energy_magnitude_penalty, vaebm_loss


def test_cd_loss_value_and_gradient_signs():
    e_pos = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    e_neg = torch.tensor([5.0, 7.0], requires_grad=True)
    loss = contrastive_divergence_loss(e_pos, e_neg)
    assert loss.item() == pytest.approx(2.0 - 6.0)  # E(x+).mean() - E(x-).mean()
    loss.backward()
    # Eq. 7: descending this loss pushes data energies down and sample energies up, each with weight 1/batch
    torch.testing.assert_close(e_pos.grad, torch.full((3,), 1 / 3))
    torch.testing.assert_close(e_neg.grad, torch.full((2,), -1 / 2))


def test_cd_loss_rejects_non_per_sample_energies():
    with pytest.raises(ValueError):
        contrastive_divergence_loss(torch.zeros(4, 1), torch.zeros(4))


def test_vaebm_loss_terms():
    e_pos = torch.tensor([0.5, 1.5], requires_grad=True)
    e_neg = torch.tensor([4.0, 2.0, 3.0], requires_grad=True)
    spectral = torch.tensor(10.0, requires_grad=True)
    terms = vaebm_loss(e_pos, e_neg, spectral, alpha_s=0.2)
    assert terms.cd.item() == pytest.approx(1.0 - 3.0)
    assert terms.gap.item() == pytest.approx(2.0)
    assert (terms.e_pos.item(), terms.e_neg.item()) == pytest.approx((1.0, 3.0))
    assert terms.spectral.item() == pytest.approx(10.0)
    assert terms.loss.item() == pytest.approx(-2.0 + 0.2 * 10.0)
    terms.loss.backward()
    assert spectral.grad.item() == pytest.approx(0.2)
    assert not terms.cd.requires_grad and not terms.gap.requires_grad  # logging terms are detached
    metrics = terms.metrics()
    assert metrics["loss"] == pytest.approx(0.0, abs=1e-6) and metrics["gap"] == pytest.approx(2.0)
    with pytest.raises(ValueError):
        vaebm_loss(e_pos, e_neg, spectral, alpha_s=-0.1)


def test_descending_the_loss_separates_data_from_samples():
    net = EnergyNet(energy_preset("mlp", hidden=16))
    data, samples = torch.randn(64, 2) * 0.3, torch.randn(64, 2) * 0.3 + 2.0
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    gap_before = vaebm_loss(net(data), net(samples), torch.zeros(()), 0.0).gap
    for _ in range(20):
        opt.zero_grad()
        vaebm_loss(net(data), net(samples), net.spectral_penalty(), alpha_s=0.2).loss.backward()
        opt.step()
    gap_after = vaebm_loss(net(data), net(samples), torch.zeros(()), 0.0).gap
    assert gap_after > gap_before + 1.0  # sample energies rose relative to data energies


def test_energy_magnitude_penalty_against_a_hand_computation():
    e_pos = torch.tensor([0.5, -1.5], dtype=torch.float64, requires_grad=True)
    e_neg = torch.tensor([2.0, -1.0, 3.0], dtype=torch.float64, requires_grad=True)
    pen = energy_magnitude_penalty(e_pos, e_neg)
    # mean(E(x+)^2) + mean(E(x-)^2) = (0.25 + 2.25) / 2 + (4 + 1 + 9) / 3
    assert pen.dtype == torch.float64
    assert pen.item() == pytest.approx(1.25 + 14.0 / 3.0, abs=1e-15)
    pen.backward()  # d/dE_i = 2 E_i / batch
    assert torch.equal(e_pos.grad, torch.tensor([0.5, -1.5], dtype=torch.float64))
    torch.testing.assert_close(e_neg.grad, torch.tensor([4.0, -2.0, 6.0], dtype=torch.float64) / 3, rtol=0, atol=1e-15)


def test_vaebm_loss_accepts_the_magnitude_penalty():
    e_pos = torch.tensor([0.5, 1.5], dtype=torch.float64)
    e_neg = torch.tensor([4.0, 2.0, 3.0], dtype=torch.float64)
    spectral = torch.tensor(10.0)
    plain = vaebm_loss(e_pos, e_neg, spectral, alpha_s=0.2)
    assert plain.magnitude is None and "magnitude" not in plain.metrics()  # weight 0: not computed, not logged
    terms = vaebm_loss(e_pos, e_neg, spectral, alpha_s=0.2, magnitude_weight=0.1)
    magnitude = (0.25 + 2.25) / 2 + (16 + 4 + 9) / 3
    assert terms.magnitude.dtype == torch.float32  # like the other terms: energies may come out of bf16 autocast
    assert terms.magnitude.item() == pytest.approx(magnitude, rel=1e-6)
    assert terms.loss.item() == pytest.approx(-2.0 + 0.2 * 10.0 + 0.1 * magnitude, abs=1e-6)
    assert terms.metrics()["magnitude"] == pytest.approx(magnitude, rel=1e-6)
    assert torch.equal(terms.cd, plain.cd) and torch.equal(terms.gap, plain.gap)  # the CD terms are unchanged
    with pytest.raises(ValueError):
        vaebm_loss(e_pos, e_neg, spectral, alpha_s=0.2, magnitude_weight=-0.1)
