"""What VAEBM's energy and its outputs see: the decoder sample or the decoder mean (core.methods.vaebm,
`langevin_negatives`).

The official code scores the decoder sample mu(z) + sigma(z) eps_x during the Langevin chain, takes the decoder mean
for the CD negatives with --use_mu_cd, and saves decoder means as test-time images (FID included). These tests hold
our presets and our sampler to that, against potentials computed here by hand.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from presets import nvae_preset

from core.methods.bundles import SampleOptions
from core.methods.nvae import float_state, vae_bundle
from core.methods.potentials import chain_start, decode, join_state, make_vaebm_potential
from core.methods.vaebm import SamplerConfig, VAEBMModel, langevin_negatives
from core.models import NVAE
from core.models.distributions import sum_except_batch
from core.models.energy import EnergyNet, EnergyNetConfig
from core.sampling.langevin import LangevinConfig
from core.training.config import compose_job

PRESETS = sorted(p.stem for p in (Path(__file__).parents[1] / "conf/experiment/vaebm").glob("*.yaml"))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    backbone = NVAE(nvae_preset("tiny", image_size=16, num_channels_enc=8, num_channels_dec=8))
    backbone = backbone.double().eval().requires_grad_(False)
    energy = EnergyNet(EnergyNetConfig(arch="cifar10", image_size=16, in_channels=3, base_channels=4)).double().eval()
    energy = energy.requires_grad_(False)
    return backbone, energy


def _half_sq(t: torch.Tensor) -> torch.Tensor:
    return 0.5 * sum_except_batch(t.pow(2))


@pytest.mark.parametrize("chain_use_mean", [False, True])
def test_the_chain_scores_what_the_config_says_and_negatives_are_means(tiny, chain_use_mean):
    """U at the chain's start equals E(x) + |eps|^2/2 with x the decoder sample (official) or the mean, computed here
    by hand; x- is the decoder mean of the chain's end either way (use_mean=True, the --use_mu_cd presets)."""
    backbone, energy = tiny
    gen = torch.Generator().manual_seed(1)
    eps_x, eps_z = backbone.sample_noise(4, generator=gen)
    eps_x, eps_z = eps_x.double(), [e.double() for e in eps_z]
    x_neg, result = langevin_negatives(backbone, energy, join_state(eps_x, eps_z),
                                       LangevinConfig(num_steps=2, step_size=1e-3), torch.Generator().manual_seed(2),
                                       use_mean=True, chain_use_mean=chain_use_mean)
    x, tower = backbone.generate(eps_z, eps_x, 1.0)
    scored = tower.x_dist.mu if chain_use_mean else x
    u0 = energy(scored).reshape(-1) + _half_sq(eps_x) + sum(_half_sq(e) for e in eps_z)
    torch.testing.assert_close(result.energy[0].double(), u0.mean(), rtol=1e-6, atol=1e-9)
    other = energy(x if chain_use_mean else tower.x_dist.mu).reshape(-1)
    assert not torch.allclose(energy(scored).reshape(-1), other)  # the two settings are different targets
    torch.testing.assert_close(x_neg, decode(backbone, result.state, 1.0, use_mean=True).float())
    assert not torch.allclose(x_neg, decode(backbone, result.state, 1.0, use_mean=False).float())


@pytest.mark.parametrize("experiment", PRESETS)
def test_every_preset_samples_decoder_means_and_chains_as_configured(tiny, experiment):
    """Test-time images (grids, the sampling job, FID) are decoder means for every preset: the sampler's images equal
    mu_x of the chain's end, recomputed here from the same generator."""
    config, _, _ = compose_job([f"experiment={experiment}", "dry_run=true"], default_method="vaebm")
    s = config.sampler
    assert s.chain_use_mean == (experiment == "quickstart")  # paper presets score the decoder sample (official)
    backbone, energy = tiny
    model = VAEBMModel(backbone, energy, SamplerConfig(**{**vars(s), "temperature": 1.0}))
    options = SampleOptions(steps=2, step_size=1e-3)
    images = model.sample(3, torch.Generator().manual_seed(5), options).images
    gen = torch.Generator().manual_seed(5)
    init = chain_start(backbone, 3, gen, options.init, options.init_temperature, options.bn_iterations)
    lcfg = LangevinConfig(**{**vars(s.langevin), "num_steps": 2, "step_size": 1e-3, "record_every": 0})
    _, result = langevin_negatives(backbone, energy, init, lcfg, gen, s.target, 1.0, use_mean=True,
                                   chain_use_mean=s.chain_use_mean)
    torch.testing.assert_close(images, decode(backbone, result.state, 1.0, use_mean=True).float())


@pytest.mark.parametrize("use_mean", [False, True])
def test_models_published_before_chain_use_mean_keep_their_chain(tiny, use_mean):
    """A bundle written before the chain and the negatives had separate settings (one `use_mean` for both) loads
    with the chain and the target it was trained with."""
    backbone, energy = tiny
    sampler = dataclasses.asdict(SamplerConfig(use_mean=use_mean, target="reference"))
    del sampler["chain_use_mean"]
    bundle = {"kind": "vaebm", "backbone": vae_bundle(backbone), "energy": dataclasses.asdict(energy.config),
              "sampler": sampler}
    weights = {**{f"backbone.{k}": v for k, v in float_state(backbone).items()},
               **{f"energy.{k}": v for k, v in float_state(energy).items()}}
    restored = VAEBMModel.from_bundle(bundle, weights).sampler
    assert restored.chain_use_mean is use_mean
    assert restored.target == "joint"  # what "reference" computed before it became the official code's target


def test_reference_target_needs_an_nvae_backbone():
    from core.methods.base import MethodContext
    from core.methods.vaebm import VAEBMConfig, VAEBMMethod
    from core.models.mlp_vae import MLPVAE, MLPVAEConfig

    cfg = VAEBMConfig(energy=EnergyNetConfig(arch="mlp", data_dim=2))
    cfg.sampler.target = "reference"
    ctx = MethodContext(device=torch.device("cpu"), seed=0, rank=0, total_nimg=64, sample_count=4)
    with pytest.raises(ValueError, match="needs an NVAE backbone"):
        VAEBMMethod(cfg, ctx, backbone=MLPVAE(MLPVAEConfig(data_dim=2, latent_dim=2)), backbone_bundle={})


def test_reference_target_is_the_official_formula(tiny):
    """target=reference against the official code's computation written out here in float64: the decoder sample
    clamped to [-1, 1] for E and log p(x|z), log sigma_x floored at -2 in log p(x|z) only, log p(z) of the walk. On
    this backbone some pixels fall outside [-1, 1] and some sigma_x under the floor, so every clause is exercised;
    "joint" (no clamp, no floor) gives a different value."""
    backbone, energy = tiny
    gen = torch.Generator().manual_seed(7)
    eps_x, eps_z = backbone.sample_noise(4, generator=gen)
    eps_x, eps_z = 3.0 * eps_x.double(), [e.double() for e in eps_z]
    with torch.no_grad():  # make the decoder sharp somewhere: sigma under exp(-2) + 0.01
        backbone.image_head[1].bias[3:] -= 2.5
    state = [t.clone().requires_grad_(True) for t in join_state(eps_x, eps_z)]
    mine = [t.clone().requires_grad_(True) for t in join_state(eps_x, eps_z)]
    try:
        u_ref = make_vaebm_potential(backbone, energy, mode="reference")(state)
        u_joint = make_vaebm_potential(backbone, energy, mode="joint")(join_state(eps_x, eps_z))
        x, tower = backbone.generate(mine[1:], mine[0], 1.0)
        mu, sigma = tower.x_dist.mu, tower.x_dist.sigma
        assert (x.abs() > 1).any() and (sigma < math.exp(-2) + 0.01).any()
        xc = x.clamp(-1, 1)
        sigma1 = torch.exp(torch.clamp(torch.log(sigma - 0.01), min=-2.0)) + 0.01  # Normal(clamp=True, val=-2)
        log_px = (-0.5 * ((xc - mu) / sigma1) ** 2 - torch.log(sigma1) - 0.5 * math.log(2 * math.pi)).sum((1, 2, 3))
        log_pz = sum(g.prior.log_prob(g.z).sum((1, 2, 3)) for g in tower.groups)
        want = energy(xc).reshape(-1) - log_pz - log_px
    finally:
        with torch.no_grad():
            backbone.image_head[1].bias[3:] += 2.5
    torch.testing.assert_close(u_ref.double(), want, rtol=1e-6, atol=1e-6)  # U is evaluated in fp32
    assert (u_ref - u_joint).abs().min() > 1.0
    # Langevin moves on the gradient: the clamp and the floor must act on it as in the formula
    got = torch.autograd.grad(u_ref.sum(), state)
    ref = torch.autograd.grad(want.sum(), mine)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-6)


def test_celebahq256_positives_have_256_levels_while_its_backbone_sees_32():
    """vaebm's CelebA-HQ-256 positives are the 8-bit images (the official code's); its NVAE trains on 5 bits."""
    from data_pipelines.transforms import to_model_range

    vaebm, _, _ = compose_job(["experiment=celebahq256", "dry_run=true"], default_method="vaebm")
    nvae, _, _ = compose_job(["experiment=celebahq256", "dry_run=true"], default_method="nvae")
    every_byte = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    levels = {name: to_model_range(every_byte, c.dataset.num_bits, True).unique().numel()
              for name, c in (("vaebm", vaebm), ("nvae", nvae))}
    assert levels == {"vaebm": 256, "nvae": 32}
