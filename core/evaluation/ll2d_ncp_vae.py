"""The NCP-VAE row of the 2-D likelihood protocol (`metric=ll2d`; ncpvae_appendix.md App. J).

On the protocol's frozen MLP VAE (one 20-d latent group, so the context c is empty) a classifier of 4 fully connected
layers of 256 units (App. J; core.models.ncp_classifier, the image method's module) is trained by NCE (Eq. 10-11,
core.objectives.nce): positives z ~ q(z|x), x from the training split; negatives z ~ p(z) = N(0, I). Its logit is
log r(z), and the model is

    p_NCP(x) = E_{z~p}[p(x|z) r(z)] / Z,   Z = E_{z~p}[r(z)]                                     (App. C, J)

- E_{z~p}[p(x|z) r(z)]: the protocol's M shared decoder components weighted by r(z_m) (`ctx.log_mixture`), the same
  estimator the `vae` row uses with all weights 1;
- log Z: log of the mean of r over `log_z_samples` (20k, App. J) fresh prior draws; its standard error is the
  delta-method std(r) / (sqrt(N) mean(r)). Cross-checked (`log_z_check`) by the grid integral of the unnormalized
  density (`ctx.grid_log_integral`): since each p(x|z_m) integrates to 1, it estimates the mean of r over the M
  shared components (other draws than the 20k) whenever the grid holds the mass.

What bounds this row: with the optimal classifier r = q(z) / p(z) (q the aggregate posterior), so p_NCP(x) is the
decoder averaged over the aggregate posterior; the decoder p(x|z) is the frozen VAE's. `oracle_log_likelihood` in
`extra` is that ceiling, estimated with the decoder components of posterior draws of the training points.

Model selection: the classifier is scored every `eval_every` steps by the validation log-likelihood (validation
points only, a subset of the components, self-normalized) and the best weights are kept; test points never choose.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from core.evaluation.ll2d_seam import BestState, LL2DContext, LL2DRow, load_or_train
from core.models.ncp_classifier import NCPClassifierConfig, NCPClassifiers
from core.objectives.nce import nce_loss


@dataclass
class NCPVAERowConfig:
    steps: int = 3000  # Adam steps of the classifier
    batch: int = 512  # positives per step, and as many negatives (Table 10: 512 for the small datasets)
    lr: float = 1e-3  # Adam learning rate (Table 10)
    lr_min: float = 1e-7  # cosine-annealed to this (Table 10)
    hidden: int = 256  # hidden units per layer (App. J: 256)
    layers: int = 4  # fully connected layers including the output (App. J: 4)
    log_z_samples: int = 20_000  # prior draws of the Monte Carlo log Z (App. J: 20k)
    eval_every: int = 250  # steps between validation scores (model selection on validation points only)
    val_components: int = 20_000  # decoder components of the validation score (the first of ctx's M)
    seed_offset: int = 7  # the row's random streams: ctx.generator(seed_offset + i)

    def validate(self) -> None:
        for name in ("steps", "batch", "lr", "hidden", "log_z_samples", "eval_every", "val_components"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ll2d ncp_vae: {name} must be > 0")
        if self.layers < 2 or not 0 <= self.lr_min <= self.lr:
            raise ValueError("ll2d ncp_vae: need layers >= 2 and 0 <= lr_min <= lr")


def classifier(config: NCPVAERowConfig, latent_dim: int) -> NCPClassifiers:
    """One vector-group classifier (empty context): App. J's 4 x 256 MLP."""
    cfg = NCPClassifierConfig(mlp_hidden=config.hidden, mlp_layers=config.layers)
    return NCPClassifiers([((latent_dim,), (0,))], cfg)


def log_r(net: NCPClassifiers, z: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """(N,) float64 log r(z) = the classifier's logit."""
    empty = z.new_zeros((0,))
    with torch.no_grad():
        return torch.cat([net.group_logit(0, z[i:i + chunk], empty.expand(len(z[i:i + chunk]), 0)).double()
                          for i in range(0, len(z), chunk)])


def mc_log_z(log_w: torch.Tensor) -> tuple[float, float]:
    """(log mean exp(log_w), its delta-method standard error std(w) / (sqrt(N) mean(w)))."""
    n = log_w.numel()
    log_mean = float(torch.logsumexp(log_w, 0)) - math.log(n)
    w = torch.exp(log_w - log_w.max())
    return log_mean, float(w.std() / (math.sqrt(n) * w.mean()))


def train_classifier(ctx: LL2DContext, config: NCPVAERowConfig) -> tuple[NCPClassifiers, dict[str, float]]:
    """NCE (Eq. 10-11) with Adam, cosine 1e-3 -> 1e-7 (Table 10); keeps the weights with the best validation score."""
    vae = ctx.vae
    torch.manual_seed(ctx.seed * 1_000_003 + config.seed_offset)
    latent_dim = ctx.z[0].shape[1]
    net = classifier(config, latent_dim)
    opt = torch.optim.Adam(net.parameters(), lr=config.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, config.steps, eta_min=config.lr_min)
    gen = ctx.generator(config.seed_offset)
    m = min(config.val_components, ctx.mu.shape[0])
    val_z, val_mu, val_sigma = ctx.z[0][:m], ctx.mu[:m], ctx.sigma[:m]
    empty = torch.zeros((2 * config.batch, 0))
    selection = BestState()
    accuracy = math.nan

    def score() -> float:
        net.eval()
        lw = log_r(net, val_z)
        net.train()
        # self-normalized: log sum_m w_m N(x; m) / sum_m w_m over the validation components
        lp = ctx.mixture_fn(ctx.val, val_mu, val_sigma, log_weights=lw) - (torch.logsumexp(lw, 0) - math.log(m))
        return float(lp.mean())

    t0 = time.perf_counter()
    for step in range(config.steps):
        x = ctx.train[torch.randint(len(ctx.train), (config.batch,), generator=gen)]
        with torch.no_grad():
            eps_q = torch.randn((config.batch, latent_dim), generator=gen)
            z_pos = vae.posterior(x, eps_z=[eps_q]).groups[0].z.float()
            z_neg = torch.randn((config.batch, latent_dim), generator=gen)  # p(z) = N(0, I)
        logit = net([torch.cat([z_pos, z_neg])], [empty])[0]
        terms = nce_loss([logit[:config.batch]], [logit[config.batch:]])
        opt.zero_grad(set_to_none=True)
        terms.loss.backward()
        opt.step()
        sched.step()
        done = step + 1
        if done % config.eval_every == 0 or done == config.steps:
            selection.consider(done, score(), net)
            accuracy = float(terms.accuracy[0])
    selection.restore(net)
    info = {"train_s": time.perf_counter() - t0, **selection.summary(), "final_train_accuracy": accuracy}
    return net.eval().requires_grad_(False), info


def ll2d_row(ctx: LL2DContext, config: NCPVAERowConfig) -> LL2DRow:
    """Train (or reuse from ctx.cache_path) the classifier and score the test points (module docstring)."""
    config.validate()
    latent_dim = ctx.z[0].shape[1]
    path = ctx.cache_path(f"ncp_vae-{config.steps}-{config.batch}-{config.lr:g}-{config.lr_min:g}-{config.hidden}-"
                          f"{config.layers}-{config.eval_every}-{config.val_components}-{config.seed_offset}")

    def train() -> dict:
        net, info = train_classifier(ctx, config)
        return {"state": net.state_dict(), "info": info}

    blob = load_or_train(path, train, required=("state", "info"))
    net = classifier(config, latent_dim)
    net.load_state_dict(blob["state"], strict=True)
    net = net.eval().requires_grad_(False)
    info = {k: float(v) for k, v in blob["info"].items()}
    # log Z = log E_p[r] by 20k fresh prior draws (App. J), on a stream of its own
    z_mc = torch.randn((config.log_z_samples, latent_dim), generator=ctx.generator(config.seed_offset + 1))
    log_z, log_z_se = mc_log_z(log_r(net, z_mc))
    lw = log_r(net, ctx.z[0])  # log r(z_m) of the shared components
    log_ll = ctx.log_mixture(ctx.test, log_weights=lw) - log_z
    # second estimator: the grid integral of the unnormalized density E_p[p(x|z) r(z)] (~ mean of r over the M
    # components when the grid holds the mass); independent draws from the 20k above
    log_z_grid = ctx.grid_log_integral(lambda x: ctx.log_mixture(x, log_weights=lw))
    m = lw.numel()
    with torch.no_grad():  # the ceiling: r = q/p exactly, i.e. the decoder over posterior draws of training points
        k = min(len(ctx.train), ctx.mu.shape[0])
        eps = torch.randn((k, latent_dim), generator=ctx.generator(config.seed_offset + 2))
        d = ctx.vae.posterior(ctx.train[:k], eps_z=[eps]).x_dist
        oracle = float(ctx.mixture_fn(ctx.test, d.mu.float(), d.sigma.float()).mean())
    extra = {**info, "oracle_log_likelihood": oracle, "log_z_components": float(torch.logsumexp(lw, 0)) - math.log(m),
             "ess_fraction_components": float(torch.exp(2 * torch.logsumexp(lw, 0) - torch.logsumexp(2 * lw, 0)) / m)}
    return LL2DRow(log_likelihood=log_ll, log_z=log_z, log_z_stderr=log_z_se, log_z_check=log_z_grid, extra=extra)
