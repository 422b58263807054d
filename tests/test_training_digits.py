"""A few hundred steps of plain stage-1 training on real images (sklearn's handwritten digits) lower the NELBO."""
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from core.models import NVAE, NVAEConfig
from core.training.config import load_preset
from core.objectives.elbo import ELBOConfig, kl_balance_weights, nelbo_loss


def _digits(size: int) -> torch.Tensor:
    images = torch.tensor(load_digits().images / 16.0, dtype=torch.float32)[:, None]
    images = F.interpolate(images, size=size, mode="bilinear", align_corners=False).clamp(0, 1)
    return images.repeat(1, 3, 1, 1) * 2 - 1  # RGB in [-1, 1]


def test_training_on_digits_lowers_negative_elbo():
    torch.manual_seed(0)
    x = _digits(16)
    train, held_out = x[:1500], x[1500:1628]
    config = NVAEConfig(image_size=16, num_channels_enc=8, num_channels_dec=8)
    model = NVAE(config)
    alpha = kl_balance_weights(config.latent_shapes())
    objective = ELBOConfig(kl_anneal_portion=0.5)
    optimizer = torch.optim.Adamax(model.parameters(), lr=5e-3)

    def held_out_nelbo() -> float:
        with torch.no_grad():
            return -model.elbo(held_out).mean().item()

    before = held_out_nelbo()
    steps = 250
    for step in range(steps):
        batch = train[torch.randint(0, len(train), (16,))]
        terms = nelbo_loss(model.posterior(batch), batch, step / steps, objective, alpha,
                           model.spectral_penalty(), model.batchnorm_penalty())
        optimizer.zero_grad(set_to_none=True)
        terms.loss.backward()
        optimizer.step()
    after = held_out_nelbo()
    assert torch.isfinite(torch.tensor(after))
    # 768 dims: an untrained model sits in the thousands of nats; training must at least halve it
    assert after < 0.5 * before, (before, after)
