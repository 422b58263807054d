"""NCP-VAE (ncpvae_appendix.md): a noise-contrastive prior on the latent groups of a frozen noise-space VAE.

    p_NCP(z_k | z_<k) ∝ p(z_k | z_<k) r_k(z_k, c(z_<k)),   r_k = D_k / (1 - D_k) = exp(logit_k)      (App. C, Eq. 8)
    loss = sum_k NCE(D_k; z_k ~ q(z_k|z_<k,x), z'_k ~ p(z_k|z_<k) at the same z_<k)                   (Eq. 10-11)

One posterior walk of the backbone per batch yields, for every group, the positive z_k, the prior p(z_k | z_<k) at
the same posterior context (where the negative is drawn) and the context c(z_<k) (App. D: the decoder state before
the group); the K classifiers (core.models.ncp_classifier, App. E) are trained together in one engine.

Sampling (`sampler.method`):
- `sir`: hierarchical SIR (core.sampling.hierarchical_sir): group by group, M = `sampler.candidates` proposals from
  p_t(z_k | z_<k) (temperature t), one kept with probability ∝ r_k. Targets prod_k p_t(z_k|z_<k) r_k / Z_k(z_<k).
- `langevin`: Langevin in eps_z space on U(eps_z) = -sum_k log r_k(T_z(eps_z)) + 1/2 ||eps_z||^2
  (core.methods.potentials.make_latent_potential), from N(0, I) (or the sampling job's low-temperature start):
  targets the jointly tilted p_t(z) prod_k r_k / Z.
- `sir_langevin`: Langevin started at the SIR draw.
The two targets coincide when every Z_k(z_<k) is constant (so at the optimal classifiers, where r_k is the ratio of
two normalized conditionals); tests/test_ncp_vae.py checks each sampler against its own closed form.

Registered as `ncp_vae-<dataset>`; the `ncp_vae` model kind is rebuilt here too.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from core.methods.base import BackboneConfig, Method, MethodContext, register_method
from core.methods.bundles import SampleOptions, Samples, TrainedModel, freeze, register, sub_state
from core.methods.nvae import float_state, load_vae
from core.methods.potentials import chain_start, decode, join_state, make_latent_potential, split_state
from core.models.ncp_classifier import NCPClassifierConfig, NCPClassifiers
from core.models.nvae import NVAE
from core.models.nvae_config import NVAEConfig
from core.objectives.nce import nce_loss
from core.optim.config import OptimConfig
from core.sampling.hierarchical_sir import HierarchicalSIRResult, hierarchical_sir
from core.sampling.langevin import LangevinConfig, LangevinResult, autocast_context, run_langevin
from core.sampling.rng import rank_generator
from core.seeding import derive_seed
from core.visuals import chain_energy_figure, save_grid

SAMPLER_METHODS = ("sir", "langevin", "sir_langevin")
_GRID_STREAM = 0xF17ED  # fixed noise of the sample grids (the backbone's grids use the same stream)
_SIR_STREAM = 0x51A  # proposals and resampling of the grids' SIR draws
_CHAIN_STREAM = 0xC4A1  # Langevin noise of the grids' chains


@dataclass
class NCPOptimConfig(OptimConfig):
    lr: float = 1e-3  # Adam learning rate (Table 10)
    lr_min: float = 1e-7  # cosine-annealed to this (Table 10)
    warmup_nimg: int = 0  # no warm-up (Table 10 lists none)
    weight_decay: float = 0.0  # Table 10 names plain Adam: no weight decay
    eps: float = 1e-8  # Adam epsilon (PyTorch default)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # Adam betas (PyTorch default; not in Table 10)


@dataclass
class NCPSamplerConfig:
    method: str = "sir"  # sir: hierarchical SIR | langevin: eps_z Langevin | sir_langevin: Langevin from SIR draws
    candidates: int = 16  # M proposals per group and chain of the hierarchical SIR
    temperature: float = 1.0  # prior temperature t of proposals and of T_z (the paper shows t = 0.7 and 1.0)
    use_mean: bool = True  # images are the decoder mean mu_x(z) (True) or a decoder sample
    langevin: LangevinConfig = field(default_factory=lambda: LangevinConfig(num_steps=32, step_size=1e-2))
    # ^ eps_z Langevin at test time (steps, step size; autocast for a bf16 backbone)


@dataclass
class NCPVAEConfig(BackboneConfig):
    classifier: NCPClassifierConfig = field(default_factory=NCPClassifierConfig)  # the K classifiers (App. E)
    sampler: NCPSamplerConfig = field(default_factory=NCPSamplerConfig)  # grids, sampling job
    optim: NCPOptimConfig = field(default_factory=NCPOptimConfig)  # Adam, cosine 1e-3 -> 1e-7 (Table 10)
    nvae: NVAEConfig = field(default_factory=NVAEConfig)  # the backbone architecture the preset expects: sizes the
    # classifiers in dry_run summaries only; a run sizes them from the loaded backbone (`backbone`)

    def validate(self, dataset) -> None:
        """Raises ValueError naming the key on an invalid setting."""
        self.optim.validate()
        self.classifier.validate()
        if self.backbone_dtype not in ("fp32", "bf16"):
            raise ValueError("backbone_dtype must be fp32 or bf16")
        s = self.sampler
        if s.method not in SAMPLER_METHODS:
            raise ValueError(f"sampler.method must be one of {SAMPLER_METHODS}, got {s.method!r}")
        if s.candidates < 1:
            raise ValueError(f"sampler.candidates must be >= 1, got {s.candidates}")
        if not s.temperature > 0:
            raise ValueError("sampler.temperature must be > 0")


# ------------------------------------------------------------------------------------------------------- pieces
def group_shapes(backbone) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(z shape, context shape) per latent group, from one walk of two prior samples (any device, also meta)."""
    device = next(backbone.parameters()).device
    with torch.no_grad():
        _, eps_z = backbone.sample_noise(2, device=device)
        tower = backbone.T_z([e.to(next(backbone.parameters()).dtype) for e in eps_z])
    return [(tuple(g.z.shape[1:]), tuple(g.context.shape[1:])) for g in tower.groups]


def _backbone_autocast(backbone, langevin: LangevinConfig | None = None) -> str | None:
    """Autocast dtype for walks of a low-precision backbone with fp32 noise (None for an fp32 backbone)."""
    if langevin is not None and langevin.autocast is not None:
        return langevin.autocast
    return "bf16" if next(backbone.parameters()).dtype == torch.bfloat16 else None


@torch.no_grad()
def sir_eps_z(backbone, classifiers: NCPClassifiers, n: int, candidates: int, temperature: float,
              generator: torch.Generator) -> HierarchicalSIRResult:
    """eps_z of n chains by hierarchical SIR: at group k, M candidates z = mu_k + t sigma_k eps from
    p_t(z_k | z_<k) at the chain's chosen z_<k, weighted by r_k(z, c(z_<k)) = exp(logit_k). Returns the chosen eps
    (fp32; T_z(eps, t) gives the z) and the per-group ESS fractions.

    Each group's prior and context come from a walk of the groups chosen so far (groups >= k set to eps = 0, unused):
    the backbone interface exposes the context of a group only through a walk, so this costs K walks of n chains
    plus K classifier passes over n*M candidates."""
    device = next(backbone.parameters()).device
    shapes = backbone.latent_shapes()

    def propose(k: int, chosen: list[torch.Tensor], m: int) -> tuple[torch.Tensor, torch.Tensor]:
        eps = chosen + [torch.zeros((n, *s), device=device) for s in shapes[k:]]
        with autocast_context(device.type, _backbone_autocast(backbone)):
            g = backbone.T_z(eps, temperature).groups[k]
            eps_c = torch.randn((n, m, *shapes[k]), generator=generator, device=device)
            z_c = g.prior.mu.float().unsqueeze(1) + temperature * g.prior.sigma.float().unsqueeze(1) * eps_c
            ctx = g.context.unsqueeze(1).expand(n, m, *g.context.shape[1:])
            log_w = classifiers.group_logit(k, z_c.flatten(0, 1), ctx.flatten(0, 1)).float().view(n, m)
        return eps_c, log_w

    return hierarchical_sir(len(shapes), propose, candidates, generator)


def latent_langevin(backbone, classifiers: NCPClassifiers, eps_z: list[torch.Tensor], langevin: LangevinConfig,
                    generator: torch.Generator | None, temperature: float = 1.0) -> LangevinResult:
    """eps_z-space Langevin on U = -sum_k log r_k(T_z(eps_z)) + 1/2 ||eps_z||^2 (make_latent_potential). The
    classifiers must be in eval mode (a potential must not mix samples through batch statistics)."""
    potential = make_latent_potential(backbone, lambda tower: -classifiers.log_ratio(tower), temperature,
                                      modules=(classifiers,))
    cfg = dataclasses.replace(langevin, autocast=_backbone_autocast(backbone, langevin))
    return run_langevin(potential, eps_z, cfg, generator=generator)


def ncp_sample(backbone, classifiers: NCPClassifiers, n: int, generator: torch.Generator, s: NCPSamplerConfig,
               temperature: float, langevin: LangevinConfig, init_eps_z: list[torch.Tensor] | None = None,
               ) -> tuple[list[torch.Tensor], LangevinResult | None, HierarchicalSIRResult | None]:
    """eps_z of n NCP-VAE samples by `s.method` (module docstring). `init_eps_z`: Langevin start for `langevin`
    (default N(0, I) from `generator`). Returns (eps_z, the chains or None, the SIR draw or None)."""
    device = next(backbone.parameters()).device
    sir = None
    if s.method in ("sir", "sir_langevin"):
        sir = sir_eps_z(backbone, classifiers, n, s.candidates, temperature, generator)
        eps_z = sir.values
    elif init_eps_z is not None:
        eps_z = [e.to(device).float() for e in init_eps_z]
    else:
        eps_z = backbone.sample_noise(n, generator=generator, device=device)[1]
    if s.method == "sir":
        return eps_z, None, sir
    chains = latent_langevin(backbone, classifiers, eps_z, langevin, generator, temperature)
    return chains.state, chains, sir


def _decode(backbone, eps_x: torch.Tensor, eps_z: list[torch.Tensor], temperature: float,
            use_mean: bool) -> torch.Tensor:
    with torch.no_grad(), autocast_context(eps_x.device.type, _backbone_autocast(backbone)):
        return decode(backbone, join_state(eps_x, eps_z), temperature, use_mean)


class _Eval:
    """Context: modules in eval mode (BN running statistics), previous modes restored afterwards."""

    def __init__(self, *modules: torch.nn.Module):
        self.modules = modules

    def __enter__(self):
        self.modes = [m.training for m in self.modules]
        for m in self.modules:
            m.eval()

    def __exit__(self, *exc):
        for m, mode in zip(self.modules, self.modes):
            m.train(mode)


# ------------------------------------------------------------------------------------------------------- method
@register_method
class NCPVAEMethod(Method):
    name = "ncp_vae"
    config_class = NCPVAEConfig
    model_prefix = "ncp_vae"
    needs_backbone = True

    def __init__(self, config: NCPVAEConfig, ctx: MethodContext, backbone=None, backbone_bundle=None):
        super().__init__(config, ctx, backbone, backbone_bundle)
        if backbone is None:
            raise ValueError("ncp_vae needs a frozen backbone")
        self.shapes = group_shapes(backbone)
        torch.manual_seed(ctx.seed)  # identical initial weights on every rank
        self.classifiers = NCPClassifiers(self.shapes, config.classifier).to(ctx.device)
        gen = torch.Generator().manual_seed(derive_seed(ctx.seed, _GRID_STREAM))
        self.fixed_noise = backbone.sample_noise(ctx.sample_count, generator=gen, device=torch.device("cpu"))

    def trained_module(self) -> torch.nn.Module:
        return self.classifiers

    def make_optimizer(self, param_groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        o = self.config.optim
        return torch.optim.Adam(param_groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)

    def loss(self, net: Callable[..., Any], batch: dict[str, Any], nimg: int):
        """Eq. 10-11: one posterior walk gives z_k ~ q(z_k|z_<k,x), p(z_k|z_<k) and c(z_<k) for every group; the
        negatives are drawn from that prior at the same context. Positives and negatives pass the classifiers in
        one batch, so batch-norm statistics cannot tell them apart."""
        device = self.ctx.device
        dtype = next(self.backbone.parameters()).dtype
        x = batch["x"].to(device, non_blocking=True).to(dtype)
        gen = rank_generator(self.ctx.seed, self.ctx.rank, nimg, device, stream=0)  # per rank, per step
        n = x.shape[0]
        with torch.no_grad():
            eps_q = [torch.randn((n, *s), generator=gen, device=device).to(dtype)
                     for s in self.backbone.latent_shapes()]
            tower = self.backbone.posterior(x, eps_z=eps_q)
            zs, contexts = [], []
            for g in tower.groups:
                eps_p = torch.randn(g.z.shape, generator=gen, device=device).to(dtype)
                zs.append(torch.cat([g.z, g.prior.sample(eps_p)]))  # negatives at t = 1: the prior itself
                contexts.append(torch.cat([g.context, g.context]))
        logits = net(zs, contexts)
        pos, neg = zip(*[lg.float().chunk(2) for lg in logits])
        terms = nce_loss(list(pos), list(neg))
        metrics = {"ncp/loss": terms.loss.detach(), "ncp/accuracy": terms.accuracy.mean(),
                   "ncp/log_r_pos": terms.logit_pos.sum(), "ncp/log_r_neg": terms.logit_neg.sum()}
        for k, acc in enumerate(terms.accuracy):
            metrics[f"ncp_accuracy/group_{k:02d}"] = acc
        return terms.loss, metrics

    # -------------------------------------------------------------------------------------- visuals and health
    def visuals(self, out_dir: Path, nimg: int) -> list[Path]:
        """Per temperature: the NCP-VAE grid (hierarchical SIR) next to the backbone's grid from the same noise; one
        eps_z Langevin chain strip (rows: chains, columns: time) and its per-step energy E = -sum_k log r_k."""
        out_dir.mkdir(parents=True, exist_ok=True)
        s, device = self.config.sampler, self.ctx.device
        eps_x, eps_z = self.fixed_noise
        eps_x, eps_z = eps_x.to(device), [e.to(device) for e in eps_z]
        n = eps_x.shape[0]
        tag = f"nimg-{nimg:012d}"
        paths: list[Path] = []
        with _Eval(self.classifiers):
            for t in self.ctx.sample_temperatures:
                gen = torch.Generator(device=device).manual_seed(derive_seed(self.ctx.seed, _SIR_STREAM))
                sir = sir_eps_z(self.backbone, self.classifiers, n, s.candidates, t, gen)
                paths.append(save_grid(_decode(self.backbone, eps_x, sir.values, t, s.use_mean),
                                       out_dir / f"{tag}-t{t:g}-ncp.png"))
                paths.append(save_grid(_decode(self.backbone, eps_x, eps_z, t, s.use_mean),
                                       out_dir / f"{tag}-t{t:g}-backbone.png"))
            t = self.ctx.sample_temperatures[0]
            rows = min(8, n)
            steps = s.langevin.num_steps
            lcfg = dataclasses.replace(s.langevin, record_every=max(steps // 8, 1))
            gen = torch.Generator(device=device).manual_seed(derive_seed(self.ctx.seed, _CHAIN_STREAM))
            chains = latent_langevin(self.backbone, self.classifiers, [e[:rows] for e in eps_z], lcfg, gen, t)
            frames = [_decode(self.backbone, eps_x[:rows], snap, t, s.use_mean) for snap in chains.snapshots]
        paths.append(save_grid(torch.stack(frames, dim=1).flatten(0, 1), out_dir / f"{tag}-chains.png",
                               nrow=len(frames)))
        # Training draws no chains (NCE on prior samples): the curve is the strip's chain, E = -sum_k log r_k.
        paths.append(chain_energy_figure(out_dir / f"{tag}-chain-energy.png", nimg, {},
                                         {f"eps_z chain (t={t:g}, fixed noise)": chains}))
        return paths

    def health(self, metrics: dict[str, float]) -> str | None:
        loss = metrics.get("ncp/loss", 0.0)
        if not abs(loss) < float("inf"):
            return f"NCE loss is {loss}"
        return None

    def export(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        bundle = {"kind": "ncp_vae", "classifier": dataclasses.asdict(self.config.classifier),
                  "group_shapes": [[list(z), list(c)] for z, c in self.shapes], "backbone": self.backbone_bundle,
                  "sampler": dataclasses.asdict(self.config.sampler)}
        weights = {f"classifier.{k}": v for k, v in float_state(self.classifiers).items()}
        weights.update({f"backbone.{k}": v for k, v in float_state(self.backbone).items()})
        return bundle, weights

    @classmethod
    def describe(cls, config: NCPVAEConfig):
        """The classifiers sized for the backbone the preset expects (`nvae`), built on the meta device."""
        return [("NCP classifiers", NCPClassifiers(group_shapes(NVAE(config.nvae).eval()), config.classifier))]


def sampler_from_dict(d: dict[str, Any]) -> NCPSamplerConfig:
    return NCPSamplerConfig(**{**d, "langevin": LangevinConfig(**d["langevin"])})


@register("ncp_vae")
class NCPVAEModel(TrainedModel):
    """A trained NCP-VAE: frozen backbone, frozen group classifiers and the sampler settings it was trained with.
    `vae` is the backbone (its ELBO/IWAE likelihoods are those of the plain VAE; the reweighted prior's likelihood
    needs log Z, see core/evaluation/ll2d_ncp_vae.py for the 2-D protocol)."""

    reweighted_prior = True
    baseline = "backbone"  # steps=0: the backbone's sample from the same noise, without SIR or Langevin

    def __init__(self, backbone, classifiers: NCPClassifiers, sampler: NCPSamplerConfig):
        self.backbone = backbone
        self.classifiers = classifiers
        self.sampler = sampler

    @classmethod
    def from_bundle(cls, bundle: dict[str, Any], weights: dict[str, torch.Tensor]) -> "NCPVAEModel":
        backbone = load_vae(bundle["backbone"], sub_state(weights, "backbone"))
        shapes = [(tuple(z), tuple(c)) for z, c in bundle["group_shapes"]]
        classifiers = NCPClassifiers(shapes, NCPClassifierConfig(**bundle["classifier"]))
        classifiers.load_state_dict(sub_state(weights, "classifier"), strict=True)
        return cls(backbone, classifiers, sampler_from_dict(bundle["sampler"]))

    def to(self, device: torch.device, dtype: torch.dtype = torch.float32) -> "NCPVAEModel":
        self.backbone = freeze(self.backbone, device, dtype)
        self.classifiers = freeze(self.classifiers, device, torch.float32)
        return self

    @property
    def vae(self):
        return self.backbone

    def log_ratio(self, z: list[torch.Tensor]) -> torch.Tensor:
        """sum_k log r_k(z_k, c(z_<k)) of given latent groups, (batch,) float64."""
        with torch.no_grad():
            return self.prior_log_tilt(self.backbone.walk(z[0].shape[0], lambda i, _p, _q: z[i]))

    def prior_log_tilt(self, tower) -> torch.Tensor:
        """sum_k log r_k(z_k, c(z_<k)) at the walk's latents and contexts (App. C: p_NCP(z) = p(z) prod_k r_k / Z)."""
        with torch.no_grad():
            return self.classifiers.log_ratio(tower).double()

    def sample(self, n: int, generator: torch.Generator, options: SampleOptions | None = None) -> Samples:
        """`sampler.method` draws (SIR, eps_z Langevin or both); `steps` / `step_size` set the Langevin chain,
        `init=low_temperature` starts it from encoded low-temperature VAE samples (vaebm.md App. E)."""
        o = options or SampleOptions()
        s = self.sampler
        t = s.temperature if o.temperature is None else o.temperature
        use_mean = s.use_mean if o.use_mean is None else o.use_mean
        steps = s.langevin.num_steps if o.steps is None else o.steps
        lcfg = dataclasses.replace(s.langevin, num_steps=steps, step_size=o.step_size or s.langevin.step_size,
                                   record_every=max(steps // o.strip_frames, 1) if o.strip_frames else 0)
        start = chain_start(self.backbone, n, generator, o.init, o.init_temperature, o.bn_iterations)
        eps_x, init_eps_z = split_state(start)
        if o.steps == 0:  # the baseline: the backbone's own sample from the same noise, no reweighting at all
            eps_z, chains = init_eps_z, None
        else:
            eps_z, chains, _ = ncp_sample(self.backbone, self.classifiers, n, generator, s, t, lcfg, init_eps_z)
        images = _decode(self.backbone, eps_x, eps_z, t, use_mean)
        frames = None
        if chains is not None and chains.snapshots:
            frames = [_decode(self.backbone, eps_x, snap, t, use_mean) for snap in chains.snapshots]
        return Samples(images, frames)


__all__ = ["NCPVAEMethod", "NCPVAEConfig", "NCPVAEModel", "NCPSamplerConfig", "NCPOptimConfig", "sir_eps_z",
           "latent_langevin", "ncp_sample", "group_shapes"]
