"""Importance-resampled chain initialization: with a linear-Gaussian VAE and a quadratic energy the VAEBM density
h ∝ p_vae e^{-E} (vaebm.md Eq. 4) is a known Gaussian; SIR draws (proposal N(0, I) in eps-space, log-weight
-E(T(eps)), Eq. 9) must have its mean and variance."""
import math

import pytest
import torch

from core.models import MLPVAE, MLPVAEConfig
from core.sampling import importance_resampled_init
from core.sampling.resampled_init import systematic_resample

W, B, S = 0.8, 0.5, 0.6  # x = W z + B + S eps_x: p_vae = N(B, W^2 + S^2) = N(0.5, 1.0)
C, M = 1.5, -1.0  # E(x) = C (x - M)^2 / 2


def _vae() -> MLPVAE:
    vae = MLPVAE(MLPVAEConfig(data_dim=1, latent_dim=1, num_layers=1, homoscedastic_decoder=True))
    with torch.no_grad():
        vae.decoder[0].weight.fill_(W)
        vae.decoder[0].bias.fill_(B)
        vae.decoder_log_sigma.fill_(math.log(S))
    return vae.eval().requires_grad_(False)


def _energy(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * C * (x.reshape(-1) - M) ** 2


def _sir_callables(vae: MLPVAE, generator: torch.Generator):
    """The VAEBM case: candidates eps ~ N(0, I) from the VAE's base distribution, log w = -E(T(eps))."""
    def propose(n: int) -> list[torch.Tensor]:
        eps_x, eps_z = vae.sample_noise(n, generator=generator)
        return [eps_x, *eps_z]

    def log_weight(state: list[torch.Tensor]) -> torch.Tensor:
        return -_energy(_decode(vae, state))

    return propose, log_weight


def _decode(vae: MLPVAE, state: list[torch.Tensor]) -> torch.Tensor:
    return vae.generate(list(state[1:]), state[0])[0].reshape(-1)


def _draw(candidates: int, n: int = 20000, scheme: str = "pooled") -> tuple[torch.Tensor, float]:
    vae = _vae()
    gen = torch.Generator().manual_seed(0)
    out = importance_resampled_init(*_sir_callables(vae, gen), n, candidates, gen, scheme=scheme)
    eps_x, eps_z = out.state
    assert eps_x.shape == (n, 1) and eps_z.shape == (n, 1)
    return _decode(vae, out.state).double(), out.ess_fraction


@pytest.mark.parametrize("scheme,candidates", [("per_chain", 256), ("pooled", 4)])
def test_resampled_chains_follow_the_vaebm_density(scheme, candidates):
    v = W**2 + S**2
    precision = 1.0 / v + C
    mean, var = (B / v + C * M) / precision, 1.0 / precision  # -0.4, 0.4
    x, ess = _draw(candidates=candidates, scheme=scheme)
    se = math.sqrt(var / len(x))
    # per chain: SIR's O(1/K) bias is ~1e-3 here. Pooled: the pool of 80k draws makes the bias negligible, but the
    # systematic draws are not independent, so the mean's spread is not the i.i.d. one (allow 2x).
    assert abs(float(x.mean()) - mean) < 10 * se + 0.01
    assert float(x.var()) == pytest.approx(var, rel=0.05)
    assert 0.05 < ess < 1.0


def test_pooled_resampling_beats_per_chain_at_few_candidates():
    """With 2 candidates per chain, per-chain SIR is visibly biased towards the VAE (mean 0.5) while the pooled
    draws follow h: the mean error of per-chain is several times the pooled one."""
    exact = (B / (W**2 + S**2) + C * M) / (1.0 / (W**2 + S**2) + C)
    per_chain = abs(float(_draw(2, scheme="per_chain")[0].mean()) - exact)
    pooled = abs(float(_draw(2, scheme="pooled")[0].mean()) - exact)
    assert per_chain > 0.2 and pooled < 0.03


def test_systematic_resampling_counts():
    """Every index is drawn floor(n p_i) or ceil(n p_i) times, and the counts sum to n."""
    probs = torch.softmax(torch.randn(50, generator=torch.Generator().manual_seed(1)), dim=0)
    n = 1000
    idx = systematic_resample(probs, n, torch.Generator().manual_seed(2))
    counts = torch.bincount(idx, minlength=50).double()
    expected = n * probs.double()
    assert int(counts.sum()) == n
    assert bool(((counts >= torch.floor(expected)) & (counts <= torch.ceil(expected))).all())


def test_one_candidate_is_the_vae():
    x, ess = _draw(candidates=1)
    assert ess == 1.0
    assert abs(float(x.mean()) - B) < 5 * math.sqrt((W**2 + S**2) / len(x))
    assert float(x.var()) == pytest.approx(W**2 + S**2, rel=0.05)


def test_log_weight_is_not_called_for_one_candidate_and_nan_rows_are_never_chosen():
    calls = []
    state = importance_resampled_init(lambda n: [torch.zeros(n, 1)], lambda s: calls.append(s) or torch.zeros(3),
                                      3, 1).state
    assert calls == [] and state[0].shape == (3, 1)
    # rows 0..7 carry their index; even rows have a NaN log-weight, odd rows equal finite weights
    rows = lambda n: [torch.arange(n, dtype=torch.float32)[:, None]]  # noqa: E731
    nan_even = lambda s: torch.where(s[0][:, 0] % 2 == 0, torch.nan, 0.0)  # noqa: E731
    for scheme in ("pooled", "per_chain"):
        picked = importance_resampled_init(rows, nan_even, 4, 2, torch.Generator().manual_seed(0), scheme=scheme)
        assert bool((picked.state[0] % 2 == 1).all()), scheme
        assert picked.ess_fraction == pytest.approx(0.5)  # half of the candidates carry all the weight


def test_invalid_arguments():
    propose, log_weight = _sir_callables(_vae(), None)
    with pytest.raises(ValueError):
        importance_resampled_init(propose, log_weight, 0, 4)
    with pytest.raises(ValueError, match="scheme"):
        importance_resampled_init(propose, log_weight, 4, 4, scheme="stratified")
    with pytest.raises(ValueError, match="rows"):
        importance_resampled_init(lambda n: [torch.zeros(n + 1, 1)], log_weight, 4, 4)
    with pytest.raises(ValueError, match="one value per row"):
        importance_resampled_init(propose, lambda s: torch.zeros(3), 4, 4)
