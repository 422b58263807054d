"""Langevin mechanics: fp32 state under autocast, per-sample drift, non-finite isolation, snapshots, generators."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from core.dist import seed_everything
from core.models.mlp_vae import MLPVAE, MLPVAEConfig
from core.methods.potentials import join_state, make_vaebm_potential, split_state
from core.sampling import LangevinConfig, energy_and_grad, langevin_update, rank_generator, run_langevin


def _vaebm(seed: int = 0):
    torch.manual_seed(seed)
    vae = MLPVAE(MLPVAEConfig(data_dim=2, latent_dim=4, hidden=32, num_layers=3)).eval()
    energy = nn.Sequential(nn.Linear(2, 32), nn.SiLU(), nn.Linear(32, 32), nn.SiLU(), nn.Linear(32, 1))
    return vae, energy


def test_bf16_autocast_moves_like_fp32_and_keeps_fp32_state():
    vae, energy = _vaebm()
    seen = []

    def spy(x):
        out = energy(x)
        seen.append(out.dtype)
        return out

    potential = make_vaebm_potential(vae, spy)
    eps_x, eps_z = vae.sample_noise(256, generator=torch.Generator().manual_seed(1))
    cfg = dict(num_steps=20, step_size=1e-2, record_every=5)
    r32 = run_langevin(potential, join_state(eps_x, eps_z), LangevinConfig(**cfg), torch.Generator().manual_seed(2))
    assert set(seen) == {torch.float32}
    seen.clear()
    r16 = run_langevin(potential, join_state(eps_x, eps_z), LangevinConfig(**cfg, autocast="bf16"),
                       torch.Generator().manual_seed(2))
    assert set(seen) == {torch.bfloat16}  # the networks really ran in bf16
    for s in r16.state + [t for snap in r16.snapshots for t in snap]:
        assert s.dtype == torch.float32
    # Same drift statistics: per-step mean energy and gradient norm agree to bf16 accuracy.
    torch.testing.assert_close(r16.energy, r32.energy, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(r16.grad_norm, r32.grad_norm, rtol=2e-2, atol=2e-2)
    # Same chains: the bf16 displacement differs from the fp32 one by a small fraction of the drift itself.
    for a, b, s0 in zip(r16.state, r32.state, join_state(eps_x, eps_z)):
        drift = (b - s0).norm()
        assert (a - b).norm() < 0.05 * drift


def test_tiny_step_on_unit_state_survives_in_fp32_under_bf16_autocast():
    """A 3e-6 step (vaebm.md Table 8, CelebA-HQ) on ε ≈ 1 vanishes in bf16 but not in the fp32 state."""
    lin = nn.Linear(8, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(2.0)  # ∇U = 2 everywhere, so the drift (η/2)·∇U is exactly η
    eta = 3e-6
    one = torch.ones(4, 8)
    assert torch.equal((one.bfloat16() - eta).float(), one)  # what a bf16 state would do: nothing
    out = run_langevin(lambda s: lin(s[0]).squeeze(1), [one], LangevinConfig(num_steps=1, step_size=eta,
                                                                             noise_scale=0.0, autocast="bf16"))
    assert out.state[0].dtype == torch.float32
    torch.testing.assert_close(out.state[0], one - eta, rtol=0, atol=2e-7)
    # With noise: exactly s − (η/2)∇U + √η ω in fp32 for the generator's ω.
    g = torch.Generator().manual_seed(5)
    out = run_langevin(lambda s: lin(s[0]).squeeze(1), [one], LangevinConfig(num_steps=1, step_size=eta,
                                                                             autocast="bf16"), g)
    omega = torch.randn(4, 8, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(out.state[0], one - eta + eta**0.5 * omega, rtol=0, atol=2e-7)


def test_per_sample_drift_does_not_depend_on_batch():
    vae, energy = _vaebm()
    potential = make_vaebm_potential(vae, energy)
    state = join_state(*vae.sample_noise(7, generator=torch.Generator().manual_seed(3)))
    noise = [torch.randn(s.shape, generator=torch.Generator().manual_seed(4)) for s in state]
    u_all, g_all = energy_and_grad(potential, state)
    new_all = langevin_update(state, g_all, noise, step_size=1e-2)
    for i in (0, 3, 6):
        one = [s[i:i + 1] for s in state]
        u_one, g_one = energy_and_grad(potential, one)
        torch.testing.assert_close(u_one, u_all[i:i + 1])
        for a, b in zip(g_one, g_all):
            torch.testing.assert_close(a, b[i:i + 1], rtol=1e-5, atol=1e-6)
        new_one = langevin_update(one, g_one, [w[i:i + 1] for w in noise], step_size=1e-2)
        for a, b in zip(new_one, new_all):
            torch.testing.assert_close(a, b[i:i + 1], rtol=1e-5, atol=1e-6)
    # Whole chains (deterministic part): sample 3 alone follows the same path as inside the batch.
    cfg = LangevinConfig(num_steps=5, step_size=1e-2, noise_scale=0.0)
    batch = run_langevin(potential, state, cfg).state
    alone = run_langevin(potential, [s[3:4] for s in state], cfg).state
    for a, b in zip(alone, batch):
        torch.testing.assert_close(a, b[3:4], rtol=1e-5, atol=1e-6)


def test_exact_potential_value_and_frozen_parameters():
    vae, energy = _vaebm()
    state = join_state(*vae.sample_noise(5))
    eps_x, eps_z = split_state(state)
    x, _ = vae.generate(eps_z, eps_x)
    expected = energy(x).squeeze(1) + 0.5 * eps_x.pow(2).sum(1) + 0.5 * sum(e.pow(2).sum(1) for e in eps_z)
    u, grads = energy_and_grad(make_vaebm_potential(vae, energy), state)
    torch.testing.assert_close(u, expected.detach())
    assert all(p.grad is None for p in list(vae.parameters()) + list(energy.parameters()))
    assert all(p.requires_grad for p in energy.parameters())  # flags restored for the EBM update
    with pytest.raises(ValueError):
        make_vaebm_potential(vae, energy, mode="official")


def test_nonfinite_chains_are_counted_and_reset_without_poisoning_the_batch():
    calls = {"n": 0}

    def potential(s, poison: bool):
        calls["n"] += 1
        u = 0.5 * s[0].pow(2).sum(1)
        if poison and calls["n"] == 3:  # sample 1 blows up at the third step
            u = u * torch.where(torch.arange(len(u)) == 1, float("nan"), 1.0)  # NaN energy and gradient
        return u

    init = [torch.randn(4, 3)]
    cfg = LangevinConfig(num_steps=6, step_size=0.1)
    clean = run_langevin(lambda s: potential(s, False), init, cfg, torch.Generator().manual_seed(0))
    calls["n"] = 0
    hit = run_langevin(lambda s: potential(s, True), init, cfg, torch.Generator().manual_seed(0))
    assert hit.num_nonfinite == 1 and hit.nonfinite.tolist() == [False, True, False, False]
    assert torch.isfinite(hit.state[0]).all() and torch.isfinite(hit.energy).all()
    keep = torch.tensor([0, 2, 3])
    torch.testing.assert_close(hit.state[0][keep], clean.state[0][keep], rtol=0, atol=0)
    assert clean.num_nonfinite == 0
    calls["n"] = 0
    kept = run_langevin(lambda s: potential(s, True), init, LangevinConfig(num_steps=6, step_size=0.1,
                                                                            reset_nonfinite=False),
                        torch.Generator().manual_seed(0))
    assert kept.num_nonfinite == 1 and torch.isnan(kept.state[0][1]).all()
    torch.testing.assert_close(kept.state[0][keep], clean.state[0][keep], rtol=0, atol=0)


def test_reset_restarts_from_the_initial_state():
    """A chain that fails at its last step ends exactly at its initial value."""
    init = [torch.randn(3, 2), torch.randn(3, 5)]
    steps = {"n": 0}

    def potential(s):
        steps["n"] += 1
        u = 0.5 * (s[0].pow(2).sum(1) + s[1].pow(2).sum(1))
        return u + torch.where(torch.arange(3) == 2, float("inf") if steps["n"] == 4 else 0.0, 0.0)

    out = run_langevin(potential, init, LangevinConfig(num_steps=4, step_size=0.05))
    assert out.num_nonfinite == 1
    for s, s0 in zip(out.state, init):
        assert torch.equal(s[2], s0[2]) and not torch.equal(s[0], s0[0])


def test_snapshots_and_statistics_shapes():
    init = [torch.zeros(6, 2)]
    out = run_langevin(lambda s: 0.5 * s[0].pow(2).sum(1), init,
                       LangevinConfig(num_steps=7, step_size=0.1, record_every=3), torch.Generator().manual_seed(0))
    assert out.snapshot_steps == [0, 3, 6, 7]
    assert torch.equal(out.snapshots[0][0], init[0]) and torch.equal(out.snapshots[-1][0], out.state[0])
    assert out.energy.shape == (7,) and out.grad_norm.shape == (7,)
    assert out.energy[0] == 0 and out.grad_norm[0] == 0  # first step starts at the minimum
    assert run_langevin(lambda s: s[0].sum(1), init, LangevinConfig(num_steps=2)).snapshots == []
    with pytest.raises(ValueError):
        LangevinConfig(autocast="int8")
    with pytest.raises(ValueError):  # a potential that reduces over the batch is rejected
        run_langevin(lambda s: s[0].sum(), init, LangevinConfig(num_steps=1))


def test_rank_generators_differ_per_rank_and_step_and_are_reproducible():
    draw = lambda g: torch.randn(16, generator=g)  # noqa: E731
    a = draw(rank_generator(7, rank=0, step=3))
    assert torch.equal(a, draw(rank_generator(7, rank=0, step=3)))
    assert not torch.allclose(a, draw(rank_generator(7, rank=1, step=3)))
    assert not torch.allclose(a, draw(rank_generator(7, rank=0, step=4)))
    assert not torch.allclose(a, draw(rank_generator(7, rank=0, step=3, stream=1)))
    seed_everything(7, 0, 3)  # the global stream of the same (seed, rank, step) is a different stream
    assert not torch.allclose(a, torch.randn(16))


def test_state_tensor_unused_by_the_potential_only_diffuses():
    init = [torch.ones(5, 2), torch.ones(5, 3)]
    g = torch.Generator().manual_seed(0)
    out = run_langevin(lambda s: 0.5 * s[0].pow(2).sum(1), init, LangevinConfig(num_steps=1, step_size=0.04), g)
    g = torch.Generator().manual_seed(0)
    w0, w1 = torch.randn(5, 2, generator=g), torch.randn(5, 3, generator=g)
    torch.testing.assert_close(out.state[0], 1 - 0.02 + 0.2 * w0)
    torch.testing.assert_close(out.state[1], 1 + 0.2 * w1)
