"""The epsilon interface of the NVAE (vaebm.md Eq. 8, App. B) checked against independent computations."""
import dataclasses

import pytest
import torch
from torch.distributions import Normal

from core.models import NVAE, NoiseSpaceBackbone, NVAEConfig, count_parameters
from core.models.distributions import DiagNormal
from core.training.config import load_preset, preset_names

PRESETS = {name: load_preset("nvae", name, NVAEConfig) for name in preset_names("nvae")}


def _model(name: str) -> NVAE:
    model = NVAE(PRESETS[name].at_test_size()).double().eval()
    # Push BN running statistics off their identity init so the test also covers them.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_inverse_of_generate_recovers_noise_in_float64(name, temperature):
    model = _model(name)
    assert isinstance(model, NoiseSpaceBackbone)
    eps_x, eps_z = model.sample_noise(3)
    eps_x, eps_z = eps_x.double(), [e.double() for e in eps_z]
    x, tower = model.generate(eps_z, eps_x, temperature)
    assert x.shape == (3, *model.x_shape())
    assert [tuple(z.shape[1:]) for z in tower.z] == model.latent_shapes()
    back_x, back_z = model.inverse(x, tower.z, temperature)
    torch.testing.assert_close(back_x, eps_x, rtol=0, atol=1e-9)
    for got, want in zip(back_z, eps_z):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-9)
    # T_x(T_z(eps_z), eps_x) is the same map as the fused generate
    torch.testing.assert_close(model.T_x(model.T_z(eps_z, temperature).z, eps_x), x, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["tiny", "celebahq256"])
def test_log_p_z_equals_independent_normal_densities(name):
    model = _model(name)
    eps_x, eps_z = model.sample_noise(4)
    eps_z = [e.double() for e in eps_z]
    tower = model.T_z(eps_z)
    reference = sum(Normal(g.prior.mu, g.prior.sigma).log_prob(g.z).sum(dim=(1, 2, 3)) for g in tower.groups)
    torch.testing.assert_close(model.log_p_z(tower.z), reference, rtol=1e-12, atol=1e-9)
    # change of variables (vaebm.md Eq. 12): log p(z) = log N(eps; 0, I) - sum log sigma
    cov = sum(Normal(0.0, 1.0).log_prob(e).sum(dim=(1, 2, 3)) - torch.log(g.prior.sigma).sum(dim=(1, 2, 3))
              for e, g in zip(eps_z, tower.groups))
    torch.testing.assert_close(model.log_p_z(tower.z), cov, rtol=1e-12, atol=1e-9)
    # the top group's prior is exactly standard normal, later ones are not
    assert torch.equal(tower.groups[0].prior.sigma, torch.ones_like(tower.groups[0].prior.sigma))
    assert not torch.allclose(tower.groups[-1].prior.sigma, torch.ones_like(tower.groups[-1].prior.sigma))


def test_posterior_log_q_and_kl_match_reference():
    model = _model("celeba64")
    x = torch.rand(3, *model.x_shape(), dtype=torch.float64) * 2 - 1
    tower = model.posterior(x)
    ref_q = sum(Normal(g.posterior.mu, g.posterior.sigma).log_prob(g.z).sum(dim=(1, 2, 3)) for g in tower.groups)
    torch.testing.assert_close(model.log_q_z(tower.z, x), ref_q, rtol=1e-12, atol=1e-9)
    ref_kl = torch.stack([torch.distributions.kl_divergence(Normal(g.posterior.mu, g.posterior.sigma),
                                                            Normal(g.prior.mu, g.prior.sigma)).sum(dim=(1, 2, 3))
                          for g in tower.groups], dim=1)
    torch.testing.assert_close(tower.kl_per_group(), ref_kl, rtol=1e-10, atol=1e-9)
    # residual posterior: q's raw parameters are offsets from the prior's, so they differ from it
    assert not torch.allclose(tower.groups[1].posterior.mu, tower.groups[1].prior.mu)


def test_context_is_decoder_state_before_group():
    model = _model("celeba64")
    tower = model.T_z([e.double() for e in model.sample_noise(2)[1]])
    first = tower.groups[0].context
    torch.testing.assert_close(first, model.prior_ftr0.unsqueeze(0).expand(2, -1, -1, -1))
    # each later context feeds that group's prior head
    for l, g in enumerate(tower.groups[1:], start=1):
        params = model.prior_heads[l - 1](g.context)
        mu, log_sigma = params.chunk(2, dim=1)
        ref = DiagNormal.from_nvae_params(mu, log_sigma, model.config.min_sigma)
        torch.testing.assert_close(ref.mu, g.prior.mu)
        torch.testing.assert_close(ref.sigma, g.prior.sigma)


def test_generation_is_per_sample_in_eval_mode():
    """Langevin drift must not depend on the batch: sample i's x depends only on its own noise."""
    model = _model("tiny")
    eps_x, eps_z = model.sample_noise(4)
    eps_x, eps_z = eps_x.double(), [e.double() for e in eps_z]
    x_batch, _ = model.generate(eps_z, eps_x)
    x_single, _ = model.generate([e[2:3] for e in eps_z], eps_x[2:3])
    torch.testing.assert_close(x_batch[2:3], x_single, rtol=0, atol=1e-12)


def test_state_dict_round_trip_is_strict_and_exact():
    config = NVAEConfig(image_size=16)
    model = NVAE(config).eval()
    model.spectral_penalty()  # advance power iteration so buffers differ from init
    state = model.state_dict()
    assert any(k.startswith("spectral.u") for k in state) and "spectral.initialized" in state
    clone = NVAE(dataclasses.replace(config)).eval()
    clone.load_state_dict(state, strict=True)
    eps_x, eps_z = model.sample_noise(2)
    torch.testing.assert_close(clone.generate(eps_z, eps_x)[0], model.generate(eps_z, eps_x)[0], rtol=0, atol=0)
    torch.testing.assert_close(clone.spectral_penalty(), model.spectral_penalty(), rtol=0, atol=0)
    with pytest.raises(RuntimeError):
        NVAE(NVAEConfig(image_size=16, num_latent_per_group=4)).load_state_dict(state, strict=True)


EXPECTED = {  # groups, latent shape of top and bottom group, base channels (vaebm.md App. E, issue spec)
    "cifar10": (30, (20, 16, 16), (20, 16, 16), 128),
    "celeba64": (15, (20, 8, 8), (20, 32, 32), 48),
    "lsun_church64": (15, (20, 8, 8), (20, 32, 32), 48),
    "celebahq256": (20, (20, 8, 8), (20, 128, 128), 32),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_paper_presets_construct_on_meta_device(name):
    groups, top, bottom, channels = EXPECTED[name]
    config = PRESETS[name]
    with torch.device("meta"):
        model = NVAE(config)
    shapes = model.latent_shapes()
    assert (len(shapes), shapes[0], shapes[-1], config.num_channels_enc) == (groups, top, bottom, channels)
    assert len(model.dec_combiners) == groups and len(model.prior_heads) == groups - 1
    assert count_parameters(model) > 10_000_000


def test_invalid_configs_fail_clearly():
    with pytest.raises(ValueError, match="divisible"):
        NVAEConfig(image_size=30)
    with pytest.raises(KeyError, match="unknown nvae preset"):
        load_preset("nvae", "cifar100", NVAEConfig)
    with pytest.raises(KeyError, match="num_chanels_enc"):
        load_preset("nvae", "tiny", NVAEConfig, num_chanels_enc=3)


def test_ada_groups_put_more_groups_on_finer_scales():
    config = load_preset("nvae", "celebahq256", NVAEConfig, num_groups_per_scale=16, ada_groups=True, min_groups_per_scale=4)
    assert config.groups_per_scale == [4, 4, 4, 8, 16]
    small = NVAE(dataclasses.replace(config.at_test_size())).double().eval()
    eps_x, eps_z = small.sample_noise(2)
    x, tower = small.generate([e.double() for e in eps_z], eps_x.double())
    back_x, _ = small.inverse(x, tower.z)
    torch.testing.assert_close(back_x, eps_x.double(), rtol=0, atol=1e-9)


def test_conf_presets_are_diffs_over_the_defaults():
    """conf/nvae/<name>.yaml holds only what differs from NVAEConfig's defaults (one source of each number), and
    `tiny` is the defaults themselves."""
    import pathlib

    import yaml

    assert PRESETS["tiny"] == NVAEConfig()
    defaults = dataclasses.asdict(NVAEConfig())
    for name in PRESETS:
        path = pathlib.Path(__file__).resolve().parents[1] / "conf" / "nvae" / f"{name}.yaml"
        diff = yaml.safe_load(path.read_text()) or {}
        assert all(defaults[k] != v for k, v in diff.items()), f"{path.name} repeats a default"
