"""Batched power iteration against exact spectral norms; BN penalty against its definition."""
import torch

from core.models import NVAE, NVAEConfig
from core.training.config import load_preset
from core.models.layers import WNConv2d
from core.models.spectral import SpectralRegularizer


def test_power_iteration_estimates_within_one_percent_of_exact_norm():
    model = NVAE(NVAEConfig(image_size=16))
    convs = [m for m in model.modules() if isinstance(m, WNConv2d)]
    for _ in range(20):  # first call runs 40 iterations, later ones 4 each
        model.spectral_penalty()
    estimates = model.spectral.estimates()
    exact = [torch.linalg.matrix_norm(c.normalized_weight().detach().reshape(c.weight.shape[0], -1), 2) for c in convs]
    assert len(estimates) == len(exact) > 50
    for est, ref in zip(estimates, exact):
        assert abs(est.item() - ref.item()) <= 0.01 * ref.item(), (est.item(), ref.item())
    # the penalty is the sum of the per-layer estimates and is differentiable in the weights
    penalty = model.spectral_penalty()
    torch.testing.assert_close(penalty, torch.stack(model.spectral.estimates()).sum(), rtol=1e-4, atol=1e-4)
    penalty.backward()
    assert convs[0].log_weight_norm.grad is not None and convs[0].log_weight_norm.grad.abs().sum() > 0


def test_penalty_gradient_shrinks_largest_singular_value():
    conv = WNConv2d(4, 6, 3)
    reg = SpectralRegularizer([conv], power_iterations=20)
    before = torch.linalg.matrix_norm(conv.normalized_weight().detach().reshape(6, -1), 2)
    opt = torch.optim.SGD(conv.parameters(), lr=0.05)
    for _ in range(10):
        opt.zero_grad()
        reg().backward()
        opt.step()
    after = torch.linalg.matrix_norm(conv.normalized_weight().detach().reshape(6, -1), 2)
    assert after < 0.9 * before


def test_batchnorm_penalty_is_sum_of_max_abs_gamma():
    model = NVAE(NVAEConfig(image_size=16))
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for i, bn in enumerate(bns):
            bn.weight.fill_(0.5)
            bn.weight[0] = -(1.0 + i)
    expected = sum(1.0 + i for i in range(len(bns)))
    assert abs(model.batchnorm_penalty().item() - expected) < 1e-4


def test_a_loaded_regularizer_skips_the_warm_up_like_the_one_it_was_saved_from():
    """The warm-up flag lives in a buffer (checkpointed) and, for the step, in a Python bool: a regularizer loaded
    from a warmed-up one runs the short iteration count, exactly as the saved one would have (resume bit-identity)."""
    torch.manual_seed(0)
    layers = [WNConv2d(4, 6, 3), WNConv2d(6, 6, 3)]
    saved = SpectralRegularizer(layers, power_iterations=1, warmup_factor=10)
    saved()  # warm-up call
    state = {k: v.clone() for k, v in saved.state_dict().items()}
    loaded = SpectralRegularizer(layers, power_iterations=1, warmup_factor=10)
    loaded.load_state_dict(state)
    assert loaded._warm and saved._warm
    assert torch.equal(loaded(), saved())  # one iteration each from identical vectors
    fresh = SpectralRegularizer(layers, power_iterations=1, warmup_factor=10)
    fresh.load_state_dict({**state, "initialized": torch.tensor(False)})
    assert not fresh._warm  # a checkpoint saved before the first call warms up on its first call
