"""The Langevin step (potential, gradient, update) under torch.compile: no graph breaks, and the compiled chains
follow the eager chains (same noise, same statistics, the stationary law of the discretised dynamics)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from core.methods.lebm import posterior_potential, posterior_start
from core.methods.potentials import join_state, make_vaebm_potential
from core.models.lebm_nets import GeneratorConfig, LatentEBMModel, PriorEBMConfig
from core.models.mlp_vae import MLPVAE, MLPVAEConfig
from core.sampling.langevin import (LangevinConfig, PotentialTerms, SplitPotential, _fused_step, compile_context,
                                    run_langevin)


def _graph_breaks(potential, state) -> tuple[int, list[str]]:
    init = [s.clone() for s in state]
    noise = [torch.randn_like(s) for s in state]
    torch._dynamo.reset()
    with compile_context(), torch.no_grad():  # as run_langevin calls the compiled step
        ex = torch._dynamo.explain(_fused_step)(potential, state, init, noise, 1e-2, 1.0, None, True)
    return ex.graph_break_count, [str(r.reason)[:200] for r in ex.break_reasons]


def test_vaebm_and_lebm_steps_trace_without_graph_breaks():
    torch.manual_seed(0)
    vae = MLPVAE(MLPVAEConfig(data_dim=2, latent_dim=4, hidden=16, num_layers=2)).eval()
    energy = nn.Sequential(nn.Linear(2, 16), nn.SiLU(), nn.Linear(16, 1))
    state = join_state(*vae.sample_noise(8, generator=torch.Generator().manual_seed(1)))
    assert _graph_breaks(make_vaebm_potential(vae, energy), state) == (0, [])
    assert all(p.requires_grad for p in energy.parameters())  # tracing left the trained net's flags alone
    model = LatentEBMModel(GeneratorConfig(arch="dcgan16", out_channels=1, ngf=4, z_dim=3, top_dim=2, layers=2),
                           PriorEBMConfig(hidden=8))
    x = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    start = posterior_start(model, model.sample_noise(8, generator=torch.Generator().manual_seed(3)))
    assert _graph_breaks(posterior_potential(model, x), start) == (0, [])


class _Quadratic(nn.Module):
    """E(x) = 1/2 |A (x - m)|^2 with fixed A, m: a network whose Langevin chain has a closed-form law."""

    def __init__(self, a: torch.Tensor, m: torch.Tensor):
        super().__init__()
        self.lin = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(a)
        self.register_buffer("m", m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * self.lin(x - self.m).pow(2).sum(1)


def _potential(net: _Quadratic) -> SplitPotential:
    def terms(state):
        e = net(state[0])
        return PotentialTerms(e + 0.5 * state[1].pow(2).sum(1), e)  # plus a pure N(0, I) coordinate
    return SplitPotential(terms)


def _ula_stationary(precision: torch.Tensor, eta: float) -> torch.Tensor:
    """Covariance of x <- x - (eta/2) P x + sqrt(eta) w: C = B C B^T + eta I with B = I - eta P / 2 (float64)."""
    b = torch.eye(2, dtype=torch.float64) - 0.5 * eta * precision
    kron = torch.kron(b, b)
    rhs = eta * torch.eye(2, dtype=torch.float64).flatten()
    vec = torch.linalg.solve(torch.eye(4, dtype=torch.float64) - kron, rhs)
    return vec.reshape(2, 2)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_compiled_chain_matches_the_eager_chain_and_the_stationary_law():
    torch.manual_seed(0)
    a = torch.tensor([[1.5, 0.0], [0.8, 0.7]])
    m = torch.tensor([1.0, -2.0])
    net = _Quadratic(a, m)
    n, steps, eta = 4096, 120, 0.2
    init = [torch.zeros(n, 2), torch.zeros(n, 3)]
    eager_cfg = LangevinConfig(num_steps=steps, step_size=eta, record_every=steps)
    eager = run_langevin(_potential(net), init, eager_cfg, torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    compiled = run_langevin(_potential(net), init, LangevinConfig(num_steps=steps, step_size=eta, record_every=steps,
                                                                  compile=True), torch.Generator().manual_seed(1))
    # Same ω (drawn eagerly from the same generator in the same order): the chains agree up to float rounding.
    for c, e in zip(compiled.state, eager.state):
        torch.testing.assert_close(c, e, rtol=0, atol=1e-4)
    for field in ("energy", "grad_norm", "model_energy", "model_energy_std"):
        torch.testing.assert_close(getattr(compiled, field), getattr(eager, field), rtol=1e-4, atol=1e-4)
    assert compiled.snapshot_steps == eager.snapshot_steps == [0, steps]
    assert compiled.num_nonfinite == 0
    # And both sample the discretised dynamics' stationary law (closed form) after mixing.
    precision = (a.T @ a).double()
    cov = _ula_stationary(precision, eta)
    for result in (compiled, eager):
        x = result.state[0].double()
        torch.testing.assert_close(x.mean(0), m.double(), rtol=0, atol=0.06)
        torch.testing.assert_close(torch.cov(x.T), cov, rtol=0, atol=0.06 * cov.diagonal().max().item())
        pure = result.state[1].double()  # the N(0, I) coordinate under ULA: variance 1 / (1 - eta / 4)
        torch.testing.assert_close(pure.var(0), torch.full((3,), 1 / (1 - eta / 4), dtype=torch.float64),
                                   rtol=0.06, atol=0)
    # The recorded per-step mean E settles at the stationary mean of E, trace(P C) / 2 in closed form.
    e_stationary = 0.5 * torch.trace(precision @ cov)
    assert abs(compiled.model_energy[-20:].double().mean() - e_stationary) < 0.05 * e_stationary
