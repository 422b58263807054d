"""Chain-energy diagnostics: the per-step mean and spread of the energy term E (without the Gaussian terms) that
run_langevin records, checked against E recomputed here on the recorded chain states, and the curve a method
averages over its training steps, plots and logs."""
from __future__ import annotations

import torch
import torch.nn as nn

from core.methods.base import MethodContext
from core.methods.lebm import LEBMConfig, LEBMMethod, sample_prior
from core.methods.potentials import join_state, make_vaebm_potential
from core.models.lebm_nets import GeneratorConfig
from core.models.mlp_vae import MLPVAE, MLPVAEConfig
from core.sampling.langevin import LangevinConfig, run_langevin
from core.sampling.rng import rank_generator


def test_recorded_energy_is_the_energy_term_on_the_recorded_states():
    torch.manual_seed(0)
    vae = MLPVAE(MLPVAEConfig(data_dim=2, latent_dim=4, hidden=32, num_layers=3)).eval()
    energy = nn.Sequential(nn.Linear(2, 32), nn.SiLU(), nn.Linear(32, 1))
    state = join_state(*vae.sample_noise(64, generator=torch.Generator().manual_seed(1)))
    steps = 6
    result = run_langevin(make_vaebm_potential(vae, energy), state,
                          LangevinConfig(num_steps=steps, step_size=5e-2, record_every=1),
                          torch.Generator().manual_seed(2))
    assert result.model_energy.shape == result.model_energy_std.shape == (steps,)
    with torch.no_grad():
        for k in range(steps):  # step k's statistics are taken at the state it started from: snapshot k
            eps_x, *eps_z = result.snapshots[k]
            x, _ = vae.generate(eps_z, eps_x)
            e = energy(x).squeeze(1).double()
            gauss = 0.5 * (eps_x.pow(2).sum(1) + sum(z.pow(2).sum(1) for z in eps_z)).double()
            torch.testing.assert_close(result.model_energy[k].double(), e.mean(), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(result.model_energy_std[k].double(), e.std(unbiased=False), rtol=1e-4,
                                       atol=1e-5)
            torch.testing.assert_close(result.energy[k].double(), (e + gauss).mean(), rtol=1e-5, atol=1e-5)
    assert (result.energy - result.model_energy).abs().min() > 1.0  # U and E really differ (the Gaussian terms)


def _lebm() -> LEBMMethod:
    torch.manual_seed(0)
    cfg = LEBMConfig(generator=GeneratorConfig(arch="dcgan16", out_channels=1, ngf=4, z_dim=4))
    cfg.sampler.prior_steps, cfg.sampler.posterior_steps, cfg.sampler.strip_frames = 6, 3, 2
    ctx = MethodContext(device=torch.device("cpu"), seed=3, rank=0, total_nimg=64, sample_count=4)
    method = LEBMMethod(cfg, ctx)
    method.setup({"x": torch.rand(4, 1, 16, 16) * 2 - 1}, fresh=True)
    return method


def test_lebm_training_steps_average_the_prior_chain_energy_and_plot_it(tmp_path):
    method = _lebm()
    s = method.config.sampler
    opt = method.make_optimizer(method.param_groups())
    n, expected = 8, []
    for step in range(2):
        x = torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(10 + step)) * 2 - 1
        it = method.iteration.value
        # The same prior chains, rerun here with every state recorded, from the step's own random streams.
        init_gen = rank_generator(method.ctx.seed, method.ctx.rank, it, "cpu", stream=0)
        eps0 = method.model.sample_noise(n, generator=init_gen)
        replay = sample_prior(method.model, eps0, s.prior_steps, s.prior_step_size,
                              rank_generator(method.ctx.seed, method.ctx.rank, it, "cpu", stream=1), record_every=1)
        with torch.no_grad():
            e = torch.stack([-method.model.energy(method.model.transform(snap)).double()
                             for snap in replay.snapshots[:-1]])  # (steps, n): E = -f on each recorded state
        expected.append(e)
        loss, metrics = method.loss(method.model, {"x": x}, step * n)
        for key in ("langevin/prior_energy_first", "langevin/prior_energy_last", "langevin/posterior_energy_first",
                    "langevin/posterior_energy_last"):
            assert isinstance(metrics[key], torch.Tensor) and metrics[key].dim() == 0
        torch.testing.assert_close(metrics["langevin/prior_energy_first"].double(), e[0].mean(), rtol=1e-5,
                                   atol=1e-5)
        torch.testing.assert_close(metrics["langevin/prior_energy_last"].double(), e[-1].mean(), rtol=1e-5,
                                   atol=1e-5)
        opt.zero_grad()
        loss.backward()
        opt.step()
    mean, std = method.prior_trace.take()
    torch.testing.assert_close(mean.double(), sum(e.mean(1) for e in expected) / 2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(std.double(), sum(e.std(1, unbiased=False) for e in expected) / 2, rtol=1e-4,
                               atol=1e-5)
    assert method.prior_trace.take() is None  # read once per interval
    # visuals: the chain-energy plot is among the images the loop logs
    method.loss(method.model, {"x": torch.rand(n, 1, 16, 16) * 2 - 1}, 2 * n)
    paths = method.visuals(tmp_path, 3 * n)
    plot = [p for p in paths if p.name.endswith("chain-energy.png")]
    assert len(plot) == 1 and plot[0].stat().st_size > 1000
    assert method.prior_trace.take() is None and method.posterior_trace.take() is None  # the plot consumed them
