"""The epsilon interface of the NVAE (vaebm.md Eq. 8, App. B) checked against independent computations."""
import dataclasses

import pytest
import torch
from torch.distributions import Normal

from core.models import NVAE, NoiseSpaceBackbone, NVAEConfig, count_parameters
from core.models.distributions import DiagNormal
from core.training.config import load_preset, preset_names

PRESETS = {name: load_preset("nvae", name, NVAEConfig) for name in preset_names("nvae")}


def _model(name: str, **overrides) -> NVAE:
    model = NVAE(dataclasses.replace(PRESETS[name].at_test_size(), **overrides)).double().eval()
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
    # the top group's prior is NVAE's N(0, (exp(0) + min_sigma)^2) = N(0, 1.01^2) exactly, later ones are not
    top = tower.groups[0].prior
    assert torch.equal(top.mu, torch.zeros_like(top.mu))
    assert torch.equal(top.sigma, torch.full_like(top.sigma, 1.0 + model.config.min_sigma))
    assert not torch.allclose(tower.groups[-1].prior.sigma, torch.ones_like(tower.groups[-1].prior.sigma))


def test_posterior_log_q_and_kl_match_reference():
    model = _model("celeba64", num_nf=0)  # a Normal q: analytic KL (flow cells: the test below)
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


@pytest.mark.parametrize("num_nf", [1, 2])
def test_posterior_with_flow_cells_log_q_kl_and_elbo_match_reference(num_nf):
    """q(z|x) ends with shift-only autoregressive flow cells: z = flow(mu_q + sigma_q * eps), log|det| = 0, so
    log q(z|x) = log N(z_q; mu_q, sigma_q) at the pre-flow draw z_q and KL_l = log q - log p at the sample."""
    model = _model("celeba64", num_nf=num_nf)
    x = torch.rand(3, *model.x_shape(), dtype=torch.float64) * 2 - 1
    eps = [torch.randn(3, *s, dtype=torch.float64) for s in model.latent_shapes()]
    tower = model.posterior(x, eps_z=eps)
    for l, (g, e) in enumerate(zip(tower.groups, eps)):
        torch.testing.assert_close(g.z_q, g.posterior.mu + g.posterior.sigma * e, rtol=0, atol=1e-12)
        torch.testing.assert_close(g.z, model.flows[l](g.z_q), rtol=0, atol=0)
        assert not torch.allclose(g.z, g.z_q)  # the flow moved the draw
    ref_q = [Normal(g.posterior.mu, g.posterior.sigma).log_prob(g.z_q).sum(dim=(1, 2, 3)) for g in tower.groups]
    ref_p = [Normal(g.prior.mu, g.prior.sigma).log_prob(g.z).sum(dim=(1, 2, 3)) for g in tower.groups]
    torch.testing.assert_close(tower.log_q_z(), sum(ref_q), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(tower.log_p_z(), sum(ref_p), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(tower.kl_per_group(), torch.stack(ref_q, 1) - torch.stack(ref_p, 1), rtol=1e-12,
                               atol=1e-9)
    # the generative path never uses the flows: teacher-forcing the flowed z gives the same priors and decoder
    forced = model.walk(3, lambda i, _p, _q: tower.z[i])
    torch.testing.assert_close(forced.x_dist.mu, tower.x_dist.mu, rtol=0, atol=1e-12)
    torch.testing.assert_close(forced.log_p_z(), tower.log_p_z(), rtol=0, atol=1e-9)
    with pytest.raises(NotImplementedError, match="flow cells"):
        model.log_q_z(tower.z, x)


def test_flow_cell_is_autoregressive_with_unit_jacobian_diagonal():
    """Each shift step z - mu(z) has a Jacobian that is unit lower triangular in raster order (pixel, then channel;
    reversed for the mirrored step), so log|det| = 0 exactly (what the KL with flows relies on)."""
    from core.models.cells import FlowCell

    torch.manual_seed(0)
    c, h, w = 3, 4, 5
    cell = FlowCell(c).double()
    with torch.no_grad():
        for p in cell.parameters():
            p.normal_(0, 0.5)
    z = torch.randn(1, c, h, w, dtype=torch.float64)
    raster = torch.arange(h * w).repeat_interleave(c) * c + torch.arange(c).repeat(h * w)  # (pixel, channel) order
    for step, order in ((cell.forward_order, raster), (cell.reverse_order, (h * w - 1 - raster // c) * c + raster % c)):
        jac = torch.autograd.functional.jacobian(lambda v: step(v.view(1, c, h, w)).flatten(),
                                                 z.flatten()).detach()
        # element (ch, y, x) of the flattened tensor has flat index ch*h*w + y*w + x; sort it by `order`
        flat = torch.arange(c * h * w).view(c, h, w).permute(1, 2, 0).flatten()  # raster (pixel, channel) -> flat
        rank = torch.empty_like(order)
        rank[flat] = order
        perm = torch.argsort(rank)
        j = jac[perm][:, perm]
        torch.testing.assert_close(torch.diagonal(j), torch.ones(c * h * w, dtype=torch.float64), rtol=0, atol=0)
        assert torch.count_nonzero(torch.triu(j, diagonal=1)) == 0
        assert torch.count_nonzero(torch.tril(j, diagonal=-1)) > 0  # it does depend on earlier elements
        z = step(z).detach()


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


def test_an_nvae_saved_before_the_official_skip_path_is_refused_with_the_reason():
    from core.methods.nvae import float_state, load_vae, vae_bundle

    model = NVAE(PRESETS["tiny"].at_test_size())
    weights = float_state(model)
    assert torch.equal(load_vae(vae_bundle(model), weights).prior_ftr0, model.prior_ftr0)
    old = {**weights, "dec_up.0.skip.conv.bias": torch.zeros(model.dec_up[0].skip.conv.out_channels)}
    with pytest.raises(ValueError, match="earlier version of vaebm"):
        load_vae(vae_bundle(model), old)
