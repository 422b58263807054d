"""Likelihoods of the VAE with a GRBM prior that users can trust (unnormalized_prior_vae_grbm.md Sec. 2).

The prior p(z) = exp(-E(z)) / Z leaves log Z in every likelihood. This module estimates it and reports, side by side:

- `log_z`: annealed importance sampling (Salakhutdinov and Murray 2008) from N(mu, sigma^2) x uniform hidden units
  (the GRBM with W and b scaled by beta = 0) to the GRBM (beta = 1) through GRBMs with W and b scaled by beta, each
  transition one exact block-Gibbs sweep of the intermediate GRBM. Its standard error is the delta-method error of
  log(mean w): std(w) / (sqrt(n) mean(w)). For H up to ~20, `exact_log_partition` (core/models/grbm.py) enumerates
  the 2^H hidden states instead: the oracle AIS is tested against.
- per image, with K samples z_k ~ q(z|x) and l_k = log p(x|z_k) - E(z_k) - log q(z_k|x):
  `elbo`       E_q[l] - log Z                                          (Eq. 2, AIS log Z)
  `iwae`       log mean_k exp(l_k) - log Z                              (Eq. 4's numerator with the AIS log Z: a
                                                                         consistent log p(x) estimate, K -> inf)
  `eq3`        E_q[l] - log mean_k exp(-E(z_k) - log q(z_k|x))          (Eq. 3: log Z self-normalized from q(z|x))
  `eq4`        log mean_k exp(l_k) - log mean_k exp(-E(z_k) - log q)    (Eq. 4: both self-normalized)
  Eq. 3 and 4 replace log Z by an importance estimate whose proposal q(z|x) covers a small region of the prior: they
  underestimate log Z and so overestimate log p(x), which the paper itself warns about (below Eq. 6).
- `classifier` (Algorithm 2): a classifier T(x, z) is trained to tell (x, z ~ q(z|x)) from (x, z ~ p(z)) (density
  ratio matching, Mohamed and Lakshminarayanan 2017; Mescheder et al. 2018); at the optimum T = log q(z|x) - log p(z),
  so E_q[log p(x|z) - T(x, z)] estimates the ELBO with no log Z, given prior samples of good enough quality.

Binary data report nats; logit-space data (CIFAR-10) add the transform's log-determinant and report bits/dim.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.models.grbm import (GRBMParams, MAX_EXACT_HIDDEN, exact_log_partition, hidden_preactivation, sample_hidden,
                              sample_visible)


# ------------------------------------------------------------------------------------------------------------- AIS
@dataclass
class AISConfig:
    chains: int = 100  # independent AIS runs (importance weights)
    betas: int = 10_000  # intermediate distributions between beta = 0 and beta = 1
    schedule: str = "sigmoid"  # linear | sigmoid (denser near both ends, where the weights change fastest)
    gibbs_sweeps: int = 1  # block-Gibbs sweeps per intermediate distribution

    def validate(self) -> None:
        if self.chains < 2 or self.betas < 2 or self.gibbs_sweeps < 1:
            raise ValueError("ais.chains >= 2, ais.betas >= 2 and ais.gibbs_sweeps >= 1 are needed")
        if self.schedule not in ("linear", "sigmoid"):
            raise ValueError(f"ais.schedule must be linear or sigmoid, got {self.schedule!r}")


@dataclass
class AISResult:
    log_z: float  # log of the mean importance weight times Z_0
    stderr: float  # delta-method standard error of log_z
    log_weights: torch.Tensor  # (chains,) float64 log importance weights (log Z_0 included)
    ess: float  # effective sample size of the weights


def beta_schedule(config: AISConfig, dtype=torch.float64) -> torch.Tensor:
    """Inverse temperatures 0 = beta_0 < ... < beta_K = 1."""
    t = torch.linspace(0, 1, config.betas, dtype=dtype)
    if config.schedule == "linear":
        return t
    s = torch.sigmoid(12.0 * (t - 0.5))
    return (s - s[0]) / (s[-1] - s[0])


def _log_f(p: GRBMParams, z: torch.Tensor, beta: float) -> torch.Tensor:
    """log of the unnormalized marginal of the GRBM with W, b scaled by beta: -quad(z) + sum softplus(beta a(z))."""
    quad = 0.5 * (((z - p.mu) / torch.exp(p.log_sigma)) ** 2).sum(-1)
    return -quad + F.softplus(beta * hidden_preactivation(p, z)).sum(-1)


def ais_log_partition(p: GRBMParams, config: AISConfig, generator: torch.Generator | None = None) -> AISResult:
    """log Z of a GRBM by annealed importance sampling (float64), with its standard error."""
    config.validate()
    p = p.detach().to(torch.float64)
    D, H = p.W.shape
    # beta = 0: f_0(z) = exp(-quad(z)) 2^H, Z_0 = 2^H (2 pi)^(D/2) prod sigma.
    log_z0 = H * math.log(2.0) + 0.5 * D * math.log(2 * math.pi) + float(p.log_sigma.sum())
    z = p.mu + torch.exp(p.log_sigma) * torch.randn(config.chains, D, generator=generator, dtype=torch.float64,
                                                    device=p.W.device)
    betas = beta_schedule(config).tolist()
    log_w = torch.zeros(config.chains, dtype=torch.float64, device=p.W.device)
    for prev, beta in zip(betas[:-1], betas[1:]):
        log_w += _log_f(p, z, beta) - _log_f(p, z, prev)
        pk = p.scaled(beta)
        for _ in range(config.gibbs_sweeps):  # leaves the beta-GRBM invariant (exact conditionals)
            z = sample_visible(pk, sample_hidden(pk, z, generator), generator)
    log_w = log_w + log_z0
    return _summarize(log_w)


def _summarize(log_w: torch.Tensor) -> AISResult:
    n = log_w.numel()
    log_mean = torch.logsumexp(log_w, 0) - math.log(n)
    w = torch.exp(log_w - log_w.max())
    stderr = float(w.std(unbiased=True) / (math.sqrt(n) * w.mean()))
    ess = float(w.sum() ** 2 / (w**2).sum())
    return AISResult(float(log_mean), stderr, log_w, ess)


def log_partition(p: GRBMParams, config: AISConfig, generator: torch.Generator | None = None,
                  exact_max_hidden: int = 20) -> dict[str, float]:
    """{'log_z', 'log_z_stderr', 'log_z_ais', 'log_z_exact' (nan when H > exact_max_hidden), 'ais_ess'}: the value
    used is the exact one when the hidden layer is small enough to enumerate, otherwise AIS."""
    ais = ais_log_partition(p, config, generator)
    H = p.W.shape[1]
    exact = (float(exact_log_partition(p.detach().to(torch.float64)))
             if H <= min(exact_max_hidden, MAX_EXACT_HIDDEN) else float("nan"))
    use_exact = not math.isnan(exact)
    return {"log_z": exact if use_exact else ais.log_z, "log_z_stderr": 0.0 if use_exact else ais.stderr,
            "log_z_ais": ais.log_z, "log_z_ais_stderr": ais.stderr, "log_z_exact": exact, "ais_ess": ais.ess}


# -------------------------------------------------------------------------------- importance-sampled estimators
def importance_estimates(log_px_z: torch.Tensor, energy: torch.Tensor, log_q: torch.Tensor,
                         log_z: float) -> dict[str, torch.Tensor]:
    """Per-datum estimates (N,) from K posterior samples each ((N, K) arrays, float64): elbo, iwae, eq3, eq4."""
    log_px_z, energy, log_q = log_px_z.double(), energy.double(), log_q.double()
    k = log_px_z.shape[1]
    l = log_px_z - energy - log_q
    log_mean_l = torch.logsumexp(l, 1) - math.log(k)
    log_z_self = torch.logsumexp(-energy - log_q, 1) - math.log(k)  # per-datum self-normalized log Z (Eq. 3-4)
    return {"elbo": l.mean(1) - log_z, "iwae": log_mean_l - log_z, "eq3": l.mean(1) - log_z_self,
            "eq4": log_mean_l - log_z_self, "log_z_self": log_z_self}


# ---------------------------------------------------------------------------------------- Algorithm 2 classifier
@dataclass
class ClassifierConfig:
    hidden: int = 256  # width of the two hidden layers of T(x, z)
    steps: int = 2000  # Adam steps
    batch_size: int = 256  # pairs of each class per step
    lr: float = 1e-3  # Adam learning rate

    def validate(self) -> None:
        if self.hidden < 1 or self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("classifier: hidden, steps, batch_size must be >= 1 and lr > 0")


class RatioClassifier(nn.Module):
    """T(x, z): an MLP on [flatten(x), z] whose logit estimates log q(z|x) - log p(z)."""

    def __init__(self, x_dim: int, z_dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(x_dim + z_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x.flatten(1), z], 1)).squeeze(-1)


def train_ratio_classifier(x: torch.Tensor, z_post: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
                           z_prior: torch.Tensor, config: ClassifierConfig,
                           generator: torch.Generator) -> RatioClassifier:
    """Logistic regression of (x, z ~ q(z|x)) [label 1] against (x, z ~ p(z)) [label 0] (Algorithm 2's T).

    `x` (N, ...) training data, `z_post(x_batch, gen)` draws posterior samples, `z_prior` (M, D) prior samples.
    """
    config.validate()
    clf = RatioClassifier(x[0].numel(), z_prior.shape[1], config.hidden).to(x.device)
    opt = torch.optim.Adam(clf.parameters(), lr=config.lr)
    n, m = x.shape[0], z_prior.shape[0]
    for _ in range(config.steps):
        i = torch.randint(0, n, (config.batch_size,), generator=generator, device=generator.device).to(x.device)
        j = torch.randint(0, m, (config.batch_size,), generator=generator, device=generator.device).to(x.device)
        xb = x[i]
        with torch.no_grad():
            zq = z_post(xb, generator)
        logits = clf(torch.cat([xb, xb]), torch.cat([zq, z_prior[j]]))
        labels = torch.cat([torch.ones(config.batch_size), torch.zeros(config.batch_size)]).to(logits)
        loss = F.binary_cross_entropy_with_logits(logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return clf.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------- the trained model, end to end
@dataclass
class GRBMLikelihoodConfig:
    importance_samples: int = 100  # K posterior samples per image (Eqs. 2-4)
    chunk: int = 50  # posterior samples per decoder pass (memory)
    ais: AISConfig = field(default_factory=AISConfig)  # log Z
    exact_max_hidden: int = 20  # enumerate 2^H hidden states for log Z when H is at most this
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)  # Algorithm 2
    classifier_prior_samples: int = 10_000  # prior samples the classifier sees (drawn by the model's sampler)
    classifier_samples: int = 10  # posterior samples per image in Algorithm 2's expectation

    def validate(self) -> None:
        if self.importance_samples < 1 or self.chunk < 1 or self.classifier_prior_samples < 1:
            raise ValueError("importance_samples, chunk and classifier_prior_samples must be >= 1")
        if self.classifier_samples < 1:
            raise ValueError("classifier_samples must be >= 1")
        self.ais.validate()
        self.classifier.validate()


@torch.no_grad()
def posterior_terms(model: Any, y: torch.Tensor, k: int, chunk: int,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log p(y|z), E(z), log q(z|y)) for k samples z ~ q(z|y) per datum: three (N, k) float64 arrays.

    `model` has `encode(y) -> (mean, logvar)`, `log_likelihood(y, z) -> (N,)` and `prior_energy(z) -> (N,)`."""
    mean, logvar = model.encode(y)
    std = torch.exp(0.5 * logvar)
    cols: list[list[torch.Tensor]] = [[], [], []]
    for start in range(0, k, chunk):
        kk = min(chunk, k - start)
        eps = torch.randn((kk, *mean.shape), generator=generator, device=mean.device, dtype=mean.dtype)
        z = (mean + std * eps).reshape(-1, mean.shape[-1])  # (kk * N, D), sample-major
        yy = y.unsqueeze(0).expand(kk, *y.shape).reshape(-1, *y.shape[1:])
        lp = model.log_likelihood(yy, z).reshape(kk, -1)
        en = model.prior_energy(z).reshape(kk, -1)
        lq = (-0.5 * (math.log(2 * math.pi) + logvar + eps**2)).sum(-1)
        for col, t in zip(cols, (lp, en, lq)):
            col.append(t.double().T)
    return tuple(torch.cat(c, 1) for c in cols)  # type: ignore[return-value]


def evaluate_grbm_vae(model: Any, test_images: Iterable[torch.Tensor], train_images: torch.Tensor,
                      config: GRBMLikelihoodConfig, generator: torch.Generator) -> tuple[list[dict], dict[str, float]]:
    """All estimators on a trained `grbm_vae` model (core.methods.grbm_vae.GRBMVAEModel) for evaluate.py.

    test_images: batches of x in [-1, 1] (binary data: already binarized); train_images: x for the classifier.
    Returns (rows of a markdown table, flat metrics). Units: nats for binary data, bits/dim for logit data.
    """
    config.validate()
    params = model.grbm_params()
    z_info = log_partition(params, config.ais, generator, config.exact_max_hidden)
    log_z = z_info["log_z"]
    # Algorithm 2: prior samples by the model's own sampler, then the classifier on training pairs.
    prior = model.sample_latents(config.classifier_prior_samples, generator)
    y_train, _ = model.targets(train_images, generator)

    def z_post(yb: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        mean, logvar = model.encode(yb)
        return mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen, device=mean.device)

    clf = train_ratio_classifier(y_train, z_post, prior, config.classifier, generator)
    sums: dict[str, float] = {}
    count, dims = 0, None
    for x in test_images:
        y, log_det = model.targets(x, generator)
        dims = y[0].numel()
        lp, en, lq = posterior_terms(model, y, config.importance_samples, config.chunk, generator)
        est = importance_estimates(lp, en, lq, log_z)
        with torch.no_grad():  # Algorithm 2: E_q[log p(x|z) - T(x, z)]
            mean, logvar = model.encode(y)
            vals = []
            for _ in range(config.classifier_samples):
                z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator, device=mean.device)
                vals.append((model.log_likelihood(y, z) - clf(y, z)).double())
            est["classifier"] = torch.stack(vals).mean(0)
        for name in ("elbo", "iwae", "eq3", "eq4", "classifier"):
            sums[name] = sums.get(name, 0.0) + float((est[name] + log_det.double()).sum())
        count += y.shape[0]
    if not count:
        raise ValueError("no test images")
    logit = model.data_space == "logit"
    unit = "bits/dim" if logit else "nats"
    metrics: dict[str, float] = {}
    rows = []
    for name, label in (("iwae", f"log p(x), IS K={config.importance_samples}, log Z by "
                                 f"{'enumeration' if z_info['log_z_stderr'] == 0 else 'AIS'}"),
                        ("elbo", "ELBO (Eq. 2) with that log Z"),
                        ("classifier", "ELBO by the density-ratio classifier (Algorithm 2)"),
                        ("eq3", "Eq. 3 (log Z self-normalized from q(z|x))"),
                        ("eq4", "Eq. 4 (both terms self-normalized)")):
        mean_ll = sums[name] / count
        value = -mean_ll / (dims * math.log(2)) if logit else -mean_ll
        metrics[f"grbm/{name}_nll"] = value
        rows.append({"estimator": label, f"NLL ({unit})": round(value, 4)})
    metrics.update({f"grbm/{k}": float(v) for k, v in z_info.items()})
    metrics["grbm/images"] = float(count)
    return rows, metrics


__all__ = ["AISConfig", "AISResult", "ais_log_partition", "beta_schedule", "log_partition", "importance_estimates",
           "ClassifierConfig", "RatioClassifier", "train_ratio_classifier", "GRBMLikelihoodConfig",
           "posterior_terms", "evaluate_grbm_vae"]
