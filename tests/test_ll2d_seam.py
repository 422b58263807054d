"""The 2-D likelihood protocol (metric=ll2d) on the shared pieces: its energy is trained by the VAEBM method on the
job (tests/test_evaluate_ll2d.py), whose negatives with the SIR option are checked here against the code path before
that option existed; every log h comes from one Eq. 5 (`vaebm_log_density`), and the validation score is that
expression exactly. The rows' helpers (validation-selected weights, the network cache) are tested here too.
"""
import math

import pytest
import torch

from core.evaluation.ll2d_seam import BestState, load_or_train
from core.evaluation.toy2d import Toy2DProtocol, ValidationScorer, vaebm_log_density
from core.methods.base import MethodContext
from core.methods.potentials import decode, join_state, make_vaebm_potential, split_state
from core.methods.vaebm import VAEBMConfig, VAEBMMethod
from core.models.energy import EnergyNet, EnergyNetConfig, data_dependent_init
from core.models.mlp_vae import MLPVAE, MLPVAEConfig
from core.sampling.langevin import LangevinConfig, run_langevin
from core.sampling.replay_buffer import replay_probability
from core.sampling.rng import rank_generator

@pytest.fixture(scope="module")
def vae_and_energy():
    torch.manual_seed(0)
    vae = MLPVAE(MLPVAEConfig()).eval().requires_grad_(False)
    energy = EnergyNet(EnergyNetConfig(arch="mlp", data_dim=2, hidden=32, num_layers=3))
    data_dependent_init(energy, torch.randn(256, 2, generator=torch.Generator().manual_seed(1)) * 3, init_scale=1.0)
    return vae, energy


def test_validation_score_is_the_pre_seam_expression(vae_and_energy):
    vae, energy = vae_and_energy
    proto = Toy2DProtocol(val_points=300, val_marginal_samples=2000, val_grid_n=30, grid_half_width=10.0)
    val = torch.randn(300, 2, generator=torch.Generator().manual_seed(2)) * 2
    scorer = ValidationScorer(vae, val, proto)
    with torch.no_grad():
        e_grid, e_val = energy(scorer.grid).double().reshape(-1), energy(scorer.val).double().reshape(-1)
    log_w = scorer.lp_grid - e_grid
    log_z = float(torch.logsumexp(log_w, dim=0)) + scorer.log_cell
    assert scorer.score(energy) == float((scorer.lp_val - e_val).mean()) - log_z  # exact


def test_vaebm_log_density_is_eq5():
    lp = torch.tensor([-1.0, -2.5, 0.25], dtype=torch.float64)
    e = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    # log h = log p_vae - E - log Z (vaebm.md Eq. 5), by hand
    assert torch.equal(vaebm_log_density(lp, e, 0.75), torch.tensor([-2.25, -2.25, -2.5], dtype=torch.float64))
    assert torch.equal(vaebm_log_density(lp, e), torch.tensor([-1.5, -1.5, -1.75], dtype=torch.float64))  # Eq. 4
    avg = vaebm_log_density(lp, e, 0.75, average=True)
    assert isinstance(avg, float) and avg == pytest.approx(-7.0 / 3.0, abs=1e-15)


# ------------------------------------------------------------------------------- the image method's negative phase
def _method(persistent: bool, **sampler) -> VAEBMMethod:
    torch.manual_seed(0)
    vae = MLPVAE(MLPVAEConfig()).eval().requires_grad_(False)
    cfg = VAEBMConfig(energy=EnergyNetConfig(arch="mlp", data_dim=2, hidden=32, num_layers=3, init_scale=1.0))
    cfg.sampler.langevin = LangevinConfig(num_steps=3, step_size=1e-3)
    cfg.sampler.persistent = persistent
    for k, v in sampler.items():
        setattr(cfg.sampler, k, v)
    cfg.buffer.capacity, cfg.buffer.max_p, cfg.buffer.anneal_iterations = 64, 0.9, 1
    cfg.validate(None)
    ctx = MethodContext(device=torch.device("cpu"), seed=7, rank=0, total_nimg=1000, sample_count=8)
    m = VAEBMMethod(cfg, ctx, backbone=vae, backbone_bundle={"kind": "mlp_vae"})
    m.setup({"x": torch.randn(256, 2, generator=torch.Generator().manual_seed(1)) * 3}, fresh=True)
    return m


def _pre_seam_negatives(m: VAEBMMethod, batch_size: int):
    """VAEBMMethod.negatives as it was before the SIR option (reference only)."""
    device, seed, rank, it = m.ctx.device, m.ctx.seed, m.ctx.rank, m.iteration.value
    init_gen = rank_generator(seed, rank, it, "cpu", stream=0)
    noise_gen = rank_generator(seed, rank, it, device, stream=1)
    eps_x, eps_z = m.backbone.sample_noise(batch_size, generator=init_gen, device=torch.device("cpu"))
    replayed = torch.zeros(batch_size, dtype=torch.bool)
    if m.buffer is not None:
        b = m.config.buffer
        eps_z, replayed = m.buffer.init_chains(batch_size, replay_probability(it, b.max_p, b.anneal_iterations),
                                               init_gen, device=torch.device("cpu"))
    state = join_state(eps_x.to(device), [e.to(device) for e in eps_z])
    s = m.config.sampler
    potential = make_vaebm_potential(m.backbone, m.energy_fp32, mode=s.target, temperature=s.temperature,
                                     use_mean=s.chain_use_mean)
    result = run_langevin(potential, state, s.langevin, generator=noise_gen)
    with torch.no_grad():
        x_neg = decode(m.backbone, result.state, m.config.sampler.temperature, m.config.sampler.use_mean)
    return x_neg, split_state(result.state)[1], result, replayed


@pytest.mark.parametrize("persistent", [False, True])
def test_method_negatives_with_default_fields_equal_the_pre_seam_path(persistent):
    m = _method(persistent)
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(3)) * 2
    for it in range(4):
        new, old = m.negatives(16), _pre_seam_negatives(m, 16)
        assert torch.equal(new[0], old[0]) and torch.equal(new[3], old[3])
        assert all(torch.equal(a, b) for a, b in zip(new[1], old[1]))
        assert all(torch.equal(a, b) for a, b in zip(new[2].state, old[2].state))
        loss, metrics = m.loss(m.energy, {"x": x}, 16 * (it + 1))  # advances the step and fills the buffer
        assert math.isfinite(loss.item())
    if persistent:
        assert float(metrics["ebm/replay_ratio"]) > 0  # the buffer branch ran


def test_method_sir_starts_with_the_replay_buffer():
    """K > 1 with persistent chains: replayed rows take the buffer's eps_z, the others keep their SIR draw."""
    m = _method(True, init_candidates=4)
    m.config.sampler.langevin = LangevinConfig(num_steps=0)  # no update: the negatives are the chains' starts
    m.buffer.push([torch.full((32, *s), 7.0) for s in m.backbone.latent_shapes()])
    m.iteration.value = 5
    _, eps_z, _, replayed = m.negatives(64)
    assert 0 < int(replayed.sum()) < 64
    rows = eps_z[0].reshape(64, -1)
    assert bool((rows[replayed] == 7.0).all()) and not bool((rows[~replayed] == 7.0).any())


def test_method_sir_starts_are_low_energy_draws():
    """Resampling by exp(-E) moves the chain starts to lower energy than N(0, I) starts: for a Gaussian E under the
    proposal the shift is Var(E) (0.17 here); the test asks for 6 standard errors of the difference."""
    energies = {}
    for k in (1, 16):
        m = _method(False, init_candidates=k, langevin=LangevinConfig(num_steps=1, step_size=1e-8))
        with torch.no_grad():
            energies[k] = m.energy(m.negatives(2048)[0]).double()
    shift = float(energies[1].mean() - energies[16].mean())
    se = math.sqrt(sum(float(e.var()) / len(e) for e in energies.values()))
    assert shift > 6 * se, (shift, se)


@pytest.mark.parametrize("sampler,match", [
    (dict(init_candidates=0), "init_candidates"),
    (dict(init_resampling="best"), "init_resampling"),
    (dict(init_candidates=4, target="reference"), "target=exact"),
])
def test_sir_fields_are_validated(sampler, match):
    cfg = VAEBMConfig(energy=EnergyNetConfig(arch="mlp", data_dim=2, hidden=32, num_layers=3))
    for k, v in sampler.items():
        setattr(cfg.sampler, k, v)
    with pytest.raises(ValueError, match=match):
        cfg.validate(None)


def test_best_state_keeps_the_best_finite_weights_and_restores_them():
    net = torch.nn.Linear(2, 1)
    best = BestState()
    for step, score in ((1, -3.0), (2, -1.0), (3, float("nan")), (4, -2.0)):
        with torch.no_grad():
            net.weight.fill_(float(step))
        best.consider(step, score, net)
    assert (best.step, best.score) == (2, -1.0) and [s for s, _ in best.history] == [1, 2, 3, 4]
    best.restore(net)
    assert torch.equal(net.weight, torch.full((1, 2), 2.0))


def test_load_or_train_caches_and_retrains_a_stale_blob(tmp_path):
    calls = []

    def train() -> dict:
        calls.append(1)
        return {"state": {"w": torch.ones(2)}, "info": {"val_best_step": 3.0}}

    path = tmp_path / "row.pt"
    torch.save({"w": torch.zeros(2)}, path)  # a blob of an earlier layout: no "state"/"info"
    first = load_or_train(path, train, required=("state", "info"))
    again = load_or_train(path, train, required=("state", "info"))
    assert len(calls) == 1 and torch.equal(again["state"]["w"], first["state"]["w"])
    assert again["info"]["val_best_step"] == 3.0
