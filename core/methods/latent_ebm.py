"""The joint latent-space EBM prior (joint_latent_ebm_prior.md) on a frozen noise-space VAE (NVAE or the 2-D MLP VAE).

    p_{alpha,beta}(z) = exp(f_alpha(z)) p_beta(z) / Z,   f_alpha(z) = sum_i f_alpha_i(z_i)          (Eq. 6-7)
    -grad_alpha L = E_{x~p_d, z+~q(z|x)}[grad f_alpha(z+)] - E_{z-~p_{alpha,beta}}[grad f_alpha(z-)]  (Eq. 10 / 17)
    z- = T_z(eps_z) after Langevin on U(eps_z) = -f_alpha(T_z(eps_z)) + 1/2 ||eps_z||^2               (App. A.3)

Second stage of the paper's "deep hierarchical models" setting (Sec. 5.2): the backbone (prior p_beta, decoder and
inference model q(z|x)) is trained first by the ELBO and frozen; only alpha is learned. The surrogate loss
E(z+).mean() - E(z-).mean() with E = -f_alpha (core.objectives.ebm, the same CD loss as VAEBM's Eq. 7) has exactly
the gradient of Eq. 17 when the negatives are constants. Positives are posterior samples of the frozen encoder
(Sec. 3.3: the inference model amortizes the posterior sampling of Eq. 14). Negatives: the same Langevin as VAEBM
(core.sampling.langevin) in eps_z space on `make_latent_potential` (the Jacobian of T_z cancels, as in vaebm.md
Eq. 9), from N(0, I), the cross-rank replay buffer of eps_z (VAEBM's option), or SIR starts weighted by
exp(f_alpha(T_z(eps))), the exact importance weight of the tilted eps-space law over N(0, I).

Generation: eps_z Langevin, then decode (x = decoder mean by default). The hierarchical-sampling figure (Sec. 5.3,
Fig. 7, 11/12): the top k groups of an encoded image are kept, the others are sampled from the EBM prior
conditioned on them (Langevin on their eps only). Registered as `latent_ebm-<dataset>`; the `latent_ebm` model kind
is rebuilt here too.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from core.methods.base import BackboneConfig, Method, MethodContext, StepCounter, register_method
from core.methods.bundles import SampleOptions, Samples, TrainedModel, freeze, register, sub_state
from core.methods.nvae import float_state, load_vae
from core.methods.potentials import chain_start, decode, join_state, make_latent_potential
from core.methods.vaebm import energy_divergence
from core.models.distributions import sum_except_batch
from core.models.latent_energy import LatentEnergy, LatentEnergyConfig
from core.objectives.ebm import vaebm_loss
from core.optim.config import OptimConfig
from core.sampling.langevin import (ChainEnergyTrace, LangevinConfig, LangevinResult, SplitPotential, autocast_context,
                                    run_langevin)
from core.sampling.replay_buffer import ReplayBuffer, ReplayBufferConfig, replay_probability
from core.sampling.resampled_init import SCHEMES as RESAMPLING_SCHEMES, ResampledInit, importance_resampled_init
from core.sampling.rng import rank_generator
from core.seeding import derive_seed
from core.visuals import chain_energy_figure, finish_figure, save_grid

_GRID_STREAM = 0x1A7E  # fixed eps_z of the sample grids
_TEST_CHAIN_STREAM = 0x1A7F  # Langevin noise of the grids' test-time chains
_HIERARCHY_STREAM = 0x1A80  # Langevin noise of the hierarchical-sampling figure


@dataclass
class LatentEBMOptimConfig(OptimConfig):
    lr: float = 5e-5  # constant Adam learning rate (the paper gives none for the NVAE setting; VAEBM's scale)
    lr_min: float = 5e-5  # equal to lr: a constant rate, as VAEBM
    betas: list[float] = field(default_factory=lambda: [0.5, 0.999])  # Adam betas (latent EBMs of LEBM use 0.5)
    eps: float = 1e-8  # Adam epsilon
    weight_decay: float = 0.0  # Adam (L2) weight decay


def _default_langevin() -> LangevinConfig:
    # k = 40 prior Langevin steps (Sec. 5.5, Table 8 of the paper). eta = 0.1 in the unit-variance eps_z space
    # (App. A.3: one fixed step size for every group): the Gaussian part contracts by (1 - eta/2)^40 = 0.13 over a
    # chain, so a chain relaxes towards the tilted law instead of staying at its start.
    return LangevinConfig(num_steps=40, step_size=0.1)


@dataclass
class LatentSamplerConfig:
    langevin: LangevinConfig = field(default_factory=_default_langevin)  # training chains (eps_z space)
    temperature: float = 1.0  # prior temperature inside T_z (z_l = mu_l + t sigma_l eps_l)
    test_steps: int = 40  # chain length for sample grids and the sampling job
    use_mean: bool = True  # images are the decoder mean mu_x(z) (False: a decoder sample mu_x + sigma_x eps_x)
    persistent: bool = False  # eps_z chains start from the replay buffer with probability p (VAEBM's option)
    init_candidates: int = 1  # fresh starts: SIR from K N(0, I) candidates per chain, weights exp(f); 1: N(0, I)
    init_resampling: str = "pooled"  # SIR scheme (core.sampling.resampled_init): pooled | per_chain


@dataclass
class LatentEBMObjectiveConfig:
    magnitude_weight: float = 0.0  # weight of mean(E(z+)^2) + mean(E(z-)^2) (core.objectives.ebm); 0: plain Eq. 17
    max_energy_gap: float = 1e4  # |E(z+) - E(z-)| above this at a report counts as divergence (as VAEBM)
    divergence_patience: int = 3  # consecutive divergent reports before training stops


def parse_latent_groups(spec: Sequence[str]) -> list[tuple[int, ...]]:
    """['30x20x16x16'] -> 30 x (20, 16, 16); '4x20' -> 4 x (20,): latent group shapes as 'count x dims', top first."""
    shapes: list[tuple[int, ...]] = []
    for item in spec:
        if not re.fullmatch(r"\d+(x\d+)+", str(item)):
            raise ValueError(f"expected_latent_groups: {item!r} is not 'count x C x H x W' (or 'count x D')")
        count, *dims = (int(v) for v in str(item).split("x"))
        shapes += [tuple(dims)] * count
    return shapes


@dataclass
class LatentEBMConfig(BackboneConfig):
    energy: LatentEnergyConfig = field(default_factory=LatentEnergyConfig)  # f_alpha_i networks (Table 12)
    sampler: LatentSamplerConfig = field(default_factory=LatentSamplerConfig)  # eps_z Langevin negative phase
    buffer: ReplayBufferConfig = field(default_factory=ReplayBufferConfig)  # used when sampler.persistent
    objective: LatentEBMObjectiveConfig = field(default_factory=LatentEBMObjectiveConfig)  # CD loss, divergence
    optim: LatentEBMOptimConfig = field(default_factory=LatentEBMOptimConfig)  # Adam, constant rate
    # The backbone's latent groups as 'count x C x H x W' strings, top first: dry_run=true prints the energy's
    # parameters for them (the backbone is not loaded there) and training checks them against the loaded backbone.
    # Empty: no check, no dry-run summary.
    expected_latent_groups: list[str] = field(default_factory=list)
    energy_posterior_samples: int = 16  # K posterior samples of the published model's E(x) (OOD scores)
    hierarchy_rows: int = 4  # encoded images in the hierarchical-sampling figure (0: no figure)

    def validate(self, dataset) -> None:
        """Raises ValueError naming the key on an invalid setting."""
        self.optim.validate()
        if self.backbone_dtype not in ("fp32", "bf16"):
            raise ValueError("backbone_dtype must be fp32 or bf16")
        s = self.sampler
        if self.backbone_dtype == "bf16" and s.langevin.autocast != "bf16":
            raise ValueError("backbone_dtype=bf16 needs sampler.langevin.autocast=bf16: the fp32 chain state meets the "
                             "backbone's bf16 weights only under autocast")
        if s.langevin.num_steps < 1 or s.test_steps < 1:
            raise ValueError("sampler.langevin.num_steps and sampler.test_steps must be >= 1")
        if s.temperature <= 0:
            raise ValueError("sampler.temperature must be > 0")
        if s.init_candidates < 1:
            raise ValueError(f"sampler.init_candidates must be >= 1, got {s.init_candidates}")
        if s.init_resampling not in RESAMPLING_SCHEMES:
            raise ValueError(f"sampler.init_resampling must be one of {RESAMPLING_SCHEMES}, got {s.init_resampling!r}")
        if self.buffer.device not in ("cpu", "cuda"):
            raise ValueError("buffer.device must be cpu or cuda")
        o = self.objective
        if o.magnitude_weight < 0 or o.divergence_patience < 1 or not o.max_energy_gap > 0:
            raise ValueError("objective.magnitude_weight must be >= 0, objective.divergence_patience >= 1 and "
                             "objective.max_energy_gap > 0")
        if self.energy_posterior_samples < 1 or self.hierarchy_rows < 0:
            raise ValueError("energy_posterior_samples must be >= 1 and hierarchy_rows >= 0")
        try:
            self.energy.validate()
            for shape in parse_latent_groups(self.expected_latent_groups):
                self.energy.num_convs(shape)
        except ValueError as err:
            raise ValueError(f"energy: {err}") from None


# ------------------------------------------------------------------------------------------------ sampling pieces
def latent_potential(backbone, energy: LatentEnergy, temperature: float = 1.0):
    """U(eps_z) = -f_alpha(T_z(eps_z)) + 1/2 ||eps_z||^2 (App. A.3; `make_latent_potential` with E = -f_alpha)."""
    return make_latent_potential(backbone, lambda tower: -energy.f(tower.z), temperature, modules=(energy,))


def latent_negatives(backbone, energy: LatentEnergy, eps_z: list[torch.Tensor], langevin: LangevinConfig,
                     generator: torch.Generator | None, temperature: float = 1.0) -> LangevinResult:
    """eps_z Langevin on the tilted prior's eps-space law exp(f_alpha(T_z(eps))) N(eps; 0, I) (App. A.3)."""
    return run_langevin(latent_potential(backbone, energy, temperature), eps_z, langevin, generator=generator)


def sir_latent_start(backbone, energy: LatentEnergy, propose: Callable[[int], list[torch.Tensor]], num_chains: int,
                     candidates: int, generator: torch.Generator | None, scheme: str = "pooled",
                     temperature: float = 1.0, autocast: str | None = None) -> ResampledInit:
    """eps_z chain starts by SIR: N(0, I) candidates from `propose` weighted by log w = f_alpha(T_z(eps)), the exact
    log importance weight of the tilted eps-space law over N(0, I) (App. A.3). candidates = 1: the proposal's draws.
    The weights come back on the proposal's device; the networks run on the backbone's."""
    device = next(backbone.parameters()).device

    @torch.no_grad()
    def log_weight(state: list[torch.Tensor]) -> torch.Tensor:
        with autocast_context(device.type, autocast):
            z = backbone.T_z([t.to(device) for t in state], temperature).z
            return energy.f(z).float().reshape(-1).to(state[0].device)

    return importance_resampled_init(propose, log_weight, num_chains, candidates, generator, scheme=scheme)


def decode_latents(backbone, eps_z: list[torch.Tensor], temperature: float, use_mean: bool = True,
                   eps_x: torch.Tensor | None = None) -> torch.Tensor:
    """x = T_x(T_z(eps_z), eps_x) as fp32 images through `potentials.decode`; eps_x = 0 gives the decoder mean."""
    if eps_x is None:
        if not use_mean:
            raise ValueError("decoder samples need eps_x")
        eps_x = torch.zeros((eps_z[0].shape[0], *backbone.x_shape()), device=eps_z[0].device)
    with torch.no_grad():
        return decode(backbone, join_state(eps_x, eps_z), temperature, use_mean)


def hierarchical_samples(backbone, energy: LatentEnergy, x: torch.Tensor, keep: Sequence[int],
                         langevin: LangevinConfig, generator: torch.Generator | None,
                         temperature: float = 1.0) -> list[torch.Tensor]:
    """Sec. 5.3 / Fig. 7, 11-12: for each k in `keep`, the top k groups come from the encoder (eps of q's sample
    under the prior), the others from the EBM prior conditioned on them: Langevin on their eps only, on the same
    U (the fixed eps are constants). Returns one batch of decoder means per k (k = L: the reconstruction)."""
    device = next(backbone.parameters()).device
    with torch.no_grad():
        tower = backbone.posterior(x.to(device))
        _, eps_post = backbone.inverse(tower.x_dist.mu, tower.z, temperature)
    eps_post = [e.float() for e in eps_post]
    full = latent_potential(backbone, energy, temperature)
    out = []
    for k in keep:
        fixed = eps_post[:k]
        if k >= len(eps_post):
            eps = eps_post
        else:
            free = [torch.randn(e.shape, generator=generator, device=e.device) for e in eps_post[k:]]
            conditioned = SplitPotential(lambda state, fixed=fixed: full.terms([*fixed, *state]))
            result = run_langevin(conditioned, free, langevin, generator)
            eps = [*fixed, *result.state]
        out.append(decode_latents(backbone, eps, temperature))
    return out


def energy_bars(e_pos: torch.Tensor | None, e_neg: torch.Tensor, path: Path, title: str) -> Path:
    """Per-group mean energy -f_alpha_i of posterior latents (positives) and of samples (negatives)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = torch.arange(e_neg.shape[1]).numpy()
    fig, ax = plt.subplots(figsize=(max(5.0, 0.25 * len(groups)), 3.2), dpi=100)
    width = 0.4
    if e_pos is not None:
        ax.bar(groups - width / 2, e_pos.mean(0).numpy(), width, label="q(z|x): -f_i(z+)")
    ax.bar(groups + width / 2, e_neg.mean(0).numpy(), width, label="samples: -f_i(z-)")
    ax.set_xlabel("latent group (top first)")
    ax.set_ylabel("mean energy")
    return finish_figure(fig, ax, title, path)


# ------------------------------------------------------------------------------------------------------- method
@register_method
class LatentEBMMethod(Method):
    name = "latent_ebm"
    config_class = LatentEBMConfig
    model_prefix = "latent_ebm"
    needs_backbone = True

    def __init__(self, config: LatentEBMConfig, ctx: MethodContext, backbone=None, backbone_bundle=None):
        super().__init__(config, ctx, backbone, backbone_bundle)
        if backbone is None:
            raise ValueError("latent_ebm needs a frozen backbone")
        shapes = [tuple(s) for s in backbone.latent_shapes()]
        expected = parse_latent_groups(config.expected_latent_groups)
        if expected and expected != shapes:
            raise ValueError(f"the backbone's latent groups {shapes} differ from expected_latent_groups "
                             f"{config.expected_latent_groups}")
        torch.manual_seed(ctx.seed)  # identical initial weights on every rank
        self.energy = LatentEnergy(config.energy, shapes).to(ctx.device)
        self.buffer = ReplayBuffer(shapes, config.buffer) if config.sampler.persistent else None
        self.iteration = StepCounter()
        self.divergence_patience = config.objective.divergence_patience
        gen = torch.Generator().manual_seed(derive_seed(ctx.seed, _GRID_STREAM))
        self.fixed_noise = backbone.sample_noise(ctx.sample_count, generator=gen, device=torch.device("cpu"))
        self.reference_batch: torch.Tensor | None = None  # data images for the energy plot and the hierarchy figure
        self.chain_trace = ChainEnergyTrace()  # per-step E of the training chains since the last visuals

    def trained_module(self) -> torch.nn.Module:
        return self.energy

    def make_optimizer(self, param_groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        o = self.config.optim
        return torch.optim.Adam(param_groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)

    def setup(self, first_batch: dict[str, Any], fresh: bool) -> None:
        """Keeps a few data images for the per-group energy plot and the hierarchical-sampling figure."""
        self.reference_batch = first_batch["x"][: self.ctx.sample_count].float().cpu()

    def _backbone_dtype(self) -> torch.dtype:
        return next(self.backbone.parameters()).dtype

    def _autocast(self):
        """The networks' precision outside the chains too (fp32 state, possibly bf16 backbone)."""
        return autocast_context(self.ctx.device.type, self.config.sampler.langevin.autocast)

    # ------------------------------------------------------------------------------------------------ one step
    def positives(self, x: torch.Tensor) -> list[torch.Tensor]:
        """z+ ~ q(z|x) of the frozen encoder (Eq. 17's inner expectation), reparameterized with this rank's noise."""
        gen = rank_generator(self.ctx.seed, self.ctx.rank, self.iteration.value, "cpu", stream=2)
        eps = [torch.randn((x.shape[0], *s), generator=gen).to(x.device, self._backbone_dtype())
               for s in self.backbone.latent_shapes()]
        with torch.no_grad(), self._autocast():
            return [z.float() for z in self.backbone.posterior(x.to(self._backbone_dtype()), eps_z=eps).z]

    def negatives(self, batch_size: int) -> tuple[list[torch.Tensor], list[torch.Tensor], LangevinResult,
                                                  torch.Tensor, float]:
        """This step's chains: (z-, final eps_z, Langevin result, replayed mask, SIR effective sample fraction)."""
        s = self.config.sampler
        device, seed, rank, it = self.ctx.device, self.ctx.seed, self.ctx.rank, self.iteration.value
        init_gen = rank_generator(seed, rank, it, "cpu", stream=0)  # chain starts (the buffer draws on the CPU)
        noise_gen = rank_generator(seed, rank, it, device, stream=1)  # Langevin noise

        def propose(n: int) -> list[torch.Tensor]:  # the SIR proposal N(0, I), drawn on the CPU from init_gen
            return self.backbone.sample_noise(n, generator=init_gen, device=torch.device("cpu"))[1]

        init = sir_latent_start(self.backbone, self.energy, propose, batch_size, s.init_candidates, init_gen,
                                s.init_resampling, s.temperature, s.langevin.autocast)
        eps_z = init.state
        replayed = torch.zeros(batch_size, dtype=torch.bool)
        if self.buffer is not None:  # vaebm.md App. E: eps_z replayed with probability p
            b = self.config.buffer
            buffered, replayed = self.buffer.init_chains(batch_size, replay_probability(it, b.max_p,
                                                                                        b.anneal_iterations),
                                                         init_gen, device=torch.device("cpu"))
            eps_z = buffered if s.init_candidates == 1 else [
                torch.where(replayed.view(-1, *[1] * (r.dim() - 1)), r, e) for r, e in zip(buffered, eps_z)]
        result = latent_negatives(self.backbone, self.energy, [e.to(device) for e in eps_z], s.langevin, noise_gen,
                                  s.temperature)
        with torch.no_grad(), self._autocast():
            z_neg = [z.float() for z in self.backbone.T_z(result.state, s.temperature).z]
        return z_neg, result.state, result, replayed, init.ess_fraction

    def loss(self, net: Callable[..., torch.Tensor], batch: dict[str, Any], nimg: int):
        x = batch["x"].to(self.ctx.device, non_blocking=True).float()
        z_pos = self.positives(x)
        z_neg, eps_z, chain, replayed, ess = self.negatives(x.shape[0])
        f = net([torch.cat([p, n]) for p, n in zip(z_pos, z_neg)]).float()  # (2B, L): f_alpha_i per group
        f_pos, f_neg = f.chunk(2)
        e_pos, e_neg = -f_pos.sum(1), -f_neg.sum(1)  # E = -f_alpha: the CD loss's gradient is -(Eq. 17)
        terms = vaebm_loss(e_pos, e_neg, torch.zeros((), device=f.device), 0.0, self.config.objective.magnitude_weight)
        if self.buffer is not None:
            self.buffer.push(eps_z)
        self.iteration.value += 1
        self.chain_trace.add(chain)
        metrics = {
            "ebm/energy_pos": terms.e_pos, "ebm/energy_neg": terms.e_neg, "ebm/energy_gap": terms.gap,
            "ebm/replay_ratio": replayed.float().mean(), "ebm/init_ess": torch.tensor(ess),
            **chain.metrics(),
        }
        for i, (p, n) in enumerate(zip(f_pos.detach().mean(0), f_neg.detach().mean(0))):
            metrics[f"energy_pos/group_{i:02d}"] = -p
            metrics[f"energy_neg/group_{i:02d}"] = -n
        return terms.loss, metrics

    # -------------------------------------------------------------------------------------- visuals and health
    def visuals(self, out_dir: Path, nimg: int) -> list[Path]:
        """From fixed noise: the method's samples beside the backbone's own (same eps_z, same temperature), a chain
        strip, per-group energies of posterior latents vs samples, and the hierarchical-sampling figure."""
        out_dir.mkdir(parents=True, exist_ok=True)
        s = self.config.sampler
        device, t = self.ctx.device, s.temperature
        lcfg = dataclasses.replace(s.langevin, num_steps=s.test_steps, record_every=max(s.test_steps // 8, 1))
        eps_z = [e.to(device) for e in self.fixed_noise[1]]
        gen = torch.Generator(device=device).manual_seed(derive_seed(self.ctx.seed, _TEST_CHAIN_STREAM))
        result = latent_negatives(self.backbone, self.energy, eps_z, lcfg, gen, t)
        tag = f"nimg-{nimg:012d}"
        paths = [out_dir / f"{tag}-samples.png", out_dir / f"{tag}-backbone.png", out_dir / f"{tag}-chains.png",
                 out_dir / f"{tag}-energies.png"]
        paths.append(chain_energy_figure(out_dir / f"{tag}-chain-energy.png", nimg,
                                         {"training chains": self.chain_trace}, {"test chain (fixed noise)": result}))
        with torch.no_grad(), self._autocast():
            save_grid(decode_latents(self.backbone, result.state, t), paths[0])
            save_grid(decode_latents(self.backbone, eps_z, t), paths[1])
            rows = min(8, len(eps_z[0]))
            frames = [decode_latents(self.backbone, [e[:rows] for e in snap], t) for snap in result.snapshots]
            save_grid(torch.stack(frames, dim=1).flatten(0, 1), paths[2], nrow=len(frames))
            e_neg = -self.energy(self.backbone.T_z(result.state, t).z).cpu()
            e_pos = None
            if self.reference_batch is not None:
                x = self.reference_batch.to(device, self._backbone_dtype())
                e_pos = -self.energy(self.backbone.posterior(x).z).cpu()
        energy_bars(e_pos.float() if e_pos is not None else None, e_neg.float(), paths[3],
                    f"per-group energies at nimg={nimg}")
        if self.reference_batch is not None and self.config.hierarchy_rows > 0:
            with self._autocast():
                paths.append(self.hierarchy_figure(out_dir / f"{tag}-hierarchy.png"))
        return paths

    def hierarchy_figure(self, path: Path) -> Path:
        """Rows: encoded images; columns: the image, then k = L, L-1, ..., 0 top groups kept from the encoder."""
        s = self.config.sampler
        x = self.reference_batch[: self.config.hierarchy_rows].to(self.ctx.device, self._backbone_dtype())
        num_groups = len(self.backbone.latent_shapes())
        gen = torch.Generator(device=self.ctx.device).manual_seed(derive_seed(self.ctx.seed, _HIERARCHY_STREAM))
        lcfg = dataclasses.replace(s.langevin, num_steps=s.test_steps, record_every=0)
        cols = hierarchical_samples(self.backbone, self.energy, x, range(num_groups, -1, -1), lcfg, gen,
                                    s.temperature)
        grid = torch.stack([x.float(), *cols], dim=1).flatten(0, 1)
        return save_grid(grid, path, nrow=num_groups + 2)

    def health(self, metrics: dict[str, float]) -> str | None:
        """VAEBM's divergence detection on this method's metrics (same names, same objective fields)."""
        return energy_divergence(metrics, self.config.objective.max_energy_gap)

    def shared_state(self):
        return {"method": self.iteration}

    def rank_state(self):
        return {"buffer": self.buffer} if self.buffer is not None else {}

    def export(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        bundle = {"kind": "latent_ebm", "energy": dataclasses.asdict(self.config.energy),
                  "latent_shapes": [list(s) for s in self.energy.latent_shapes], "backbone": self.backbone_bundle,
                  "sampler": dataclasses.asdict(self.config.sampler),
                  "energy_posterior_samples": self.config.energy_posterior_samples}
        weights = {f"energy.{k}": v for k, v in float_state(self.energy).items()}
        weights.update({f"backbone.{k}": v for k, v in float_state(self.backbone).items()})
        return bundle, weights

    @classmethod
    def describe(cls, config: LatentEBMConfig):
        shapes = parse_latent_groups(config.expected_latent_groups)
        return [("Latent energy f_alpha", LatentEnergy(config.energy, shapes))] if shapes else []


# ------------------------------------------------------------------------------------------------ published model
@register("latent_ebm")
class LatentEBMModel(TrainedModel):
    """A trained joint latent EBM prior: frozen backbone, frozen f_alpha and the sampler it was trained with."""

    energy_based = True
    reweighted_prior = True
    baseline = "backbone"  # zero Langevin steps: the backbone's sample from the same eps

    def __init__(self, backbone, energy: LatentEnergy, sampler: LatentSamplerConfig, posterior_samples: int = 16):
        self.backbone = backbone
        self.energy_net = energy
        self.sampler = sampler
        self.posterior_samples = posterior_samples

    @classmethod
    def from_bundle(cls, bundle: dict[str, Any], weights: dict[str, torch.Tensor]) -> "LatentEBMModel":
        backbone = load_vae(bundle["backbone"], sub_state(weights, "backbone"))
        energy = LatentEnergy(LatentEnergyConfig(**bundle["energy"]), bundle["latent_shapes"])
        energy.load_state_dict(sub_state(weights, "energy"), strict=True)
        s = dict(bundle["sampler"])
        sampler = LatentSamplerConfig(**{**s, "langevin": LangevinConfig(**s["langevin"])})
        return cls(backbone, energy, sampler, int(bundle.get("energy_posterior_samples", 16)))

    def to(self, device: torch.device, dtype: torch.dtype = torch.float32) -> "LatentEBMModel":
        self.backbone = freeze(self.backbone, device, dtype)
        self.energy_net = freeze(self.energy_net, device, torch.float32)
        return self

    @property
    def vae(self):
        return self.backbone

    @torch.no_grad()
    def prior_log_tilt(self, tower) -> torch.Tensor:
        """f_alpha(z) at the walk's latents: the prior is p(z) exp(f_alpha(z)) / Z (joint_latent_ebm_prior.md)."""
        return self.energy_net.f(tower.z).double()

    @torch.no_grad()
    def energy(self, x: torch.Tensor) -> torch.Tensor:
        """E(x) with log h(x) = log p_vae(x) - E(x) - log Z for the tilted model p(x) = int p(x|z) e^f p(z) / Z:
        h / p_vae = E_{p_vae(z|x)}[exp f(z)], so E(x) = -log E_{p_vae(z|x)}[exp f(z)], estimated by self-normalized
        importance sampling with K posterior samples: E ~= -(logsumexp_k(log w_k + f(z_k)) - logsumexp_k log w_k),
        log w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x). Consistent as K grows; float64 per-sample values."""
        k = self.posterior_samples
        x_rep = x.repeat(k, *([1] * (x.ndim - 1)))
        tower = self.backbone.posterior(x_rep)
        log_w = (sum_except_batch(tower.x_dist.log_prob(x_rep)).double() + tower.log_p_z().double()
                 - tower.log_q_z().double()).view(k, -1)
        f = self.prior_log_tilt(tower).view(k, -1)
        return -(torch.logsumexp(log_w + f, dim=0) - torch.logsumexp(log_w, dim=0))

    def sample(self, n: int, generator: torch.Generator, options: SampleOptions | None = None) -> Samples:
        """eps_z Langevin for `steps` updates (from N(0, I) or encoded low-temperature samples), then decode."""
        o = options or SampleOptions()
        s = self.sampler
        t = s.temperature if o.temperature is None else o.temperature
        use_mean = s.use_mean if o.use_mean is None else o.use_mean
        steps = s.test_steps if o.steps is None else o.steps  # 0: the baseline (the backbone from the same eps)
        lcfg = dataclasses.replace(s.langevin, num_steps=steps, step_size=o.step_size or s.langevin.step_size,
                                   record_every=max(steps // o.strip_frames, 1) if o.strip_frames else 0)
        eps_x, *eps_z = chain_start(self.backbone, n, generator, o.init, o.init_temperature, o.bn_iterations)
        result = latent_negatives(self.backbone, self.energy_net, eps_z, lcfg, generator, t)
        images = decode_latents(self.backbone, result.state, t, use_mean, eps_x)
        frames = [decode_latents(self.backbone, snap, t, use_mean, eps_x) for snap in result.snapshots] or None
        return Samples(images, frames)


__all__ = ["LatentEBMMethod", "LatentEBMConfig", "LatentEBMModel", "LatentSamplerConfig", "LatentEBMObjectiveConfig",
           "LatentEBMOptimConfig", "latent_negatives", "latent_potential", "sir_latent_start", "hierarchical_samples",
           "decode_latents", "parse_latent_groups"]
