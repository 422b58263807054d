"""VAEBM (vaebm.md): an energy network on pixels over a frozen noise-space VAE, negatives by Langevin in (eps_x, eps_z).

    h(x) ∝ p_vae(x) exp(-E(x))                                                      (vaebm.md Eq. 4)
    loss = E(x+) - E(x-) + alpha_s * SR(E)                                          (vaebm.md Eq. 7, App. E)
    x- = T(eps) after Langevin on U(eps) = E(T(eps)) + 1/2 ||eps||^2                 (vaebm.md Eq. 9, App. B)

Chains start from fresh noise or, for eps_z, from the cross-rank replay buffer with a probability that ramps up
(App. E). Optionally the fresh starts are VAE draws resampled by exp(-E) (SIR, `sampler.init_candidates` > 1): the
exact importance weight of h's eps-space law over N(0, I) (Eq. 9), see `sir_chain_start`. Registered as
`vaebm-<dataset>`; the `vaebm` model kind is rebuilt here too.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from core.methods.base import BackboneConfig, Method, MethodContext, StepCounter, register_method
from core.methods.bundles import SampleOptions, Samples, TrainedModel, freeze, register, sub_state
from core.methods.nvae import float_state, load_vae
from core.methods.potentials import (TARGET_MODES, chain_start, decode, join_state, make_vaebm_potential,
                                     split_state)
from core.models.energy import EnergyNet, EnergyNetConfig, data_dependent_init
from core.models.nvae import NVAE
from core.objectives.ebm import magnitude_weight_at, vaebm_loss
from core.optim.clipped_adam import ClippedAdam
from core.optim.config import OptimConfig
from core.sampling.langevin import ChainEnergyTrace, LangevinConfig, LangevinResult, autocast_context, run_langevin
from core.sampling.replay_buffer import ReplayBuffer, ReplayBufferConfig, replay_probability
from core.sampling.resampled_init import SCHEMES as RESAMPLING_SCHEMES, ResampledInit, importance_resampled_init
from core.sampling.rng import rank_generator
from core.seeding import derive_seed
from core.visuals import chain_energy_figure, energy_histogram, save_grid, save_points

_GRID_STREAM = 0xF17ED  # fixed noise of the sample grids
_TEST_CHAIN_STREAM = 0x5A3  # Langevin noise of the grids' test-time chains


@dataclass
class EBMOptimConfig(OptimConfig):
    lr: float = 4e-5  # constant learning rate of Table 8
    lr_min: float = 4e-5  # equal to lr: VAEBM trains with a constant rate
    betas: list[float] = field(default_factory=lambda: [0.99, 0.999])  # Adam betas (vaebm.md App. E)
    eps: float = 1e-8  # Adam epsilon
    weight_decay: float = 3e-5  # Adam weight decay (vaebm.md App. E)
    clip_std: float = 3.0  # clamp each gradient element to clip_std * sqrt(v_hat) (+ clip_slack)
    clip_slack: float = 0.1  # additive slack of the official implementation; 0 for the bare formula


@dataclass
class SamplerConfig:
    langevin: LangevinConfig = field(default_factory=LangevinConfig)  # training chains (Table 8: steps, step size)
    target: str = "exact"  # exact: E(T(eps)) + |eps|^2/2 (vaebm.md Eq. 9) | joint | reference (core.methods.potentials)
    use_mean: bool = False  # CD negatives x- are decoder means mu(z), not samples (the official --use_mu_cd)
    chain_use_mean: bool = False  # E sees mu(z) during the Langevin chain too (official: the decoder sample)
    temperature: float = 1.0  # prior temperature inside T_z
    test_steps: int = 16  # chain length for sample grids and the sampling job (16/20/24 in App. E)
    persistent: bool = False  # eps_z chains start from the replay buffer with probability p (Table 8 "Persistent")
    init_candidates: int = 1  # chains start at VAE draws resampled by exp(-E) from K per chain (SIR); 1: N(0, I)
    init_resampling: str = "pooled"  # SIR scheme (core.sampling.resampled_init): pooled | per_chain


@dataclass
class EBMObjectiveConfig:
    alpha_s: float = 0.2  # spectral regularization coefficient (0.2 in App. E; 0.3 for CelebA-HQ-256)
    magnitude_weight: float = 0.0  # weight of mean(E(x+)^2) + mean(E(x-)^2) at the start (0: off; the 2-D protocol)
    magnitude_weight_final: float | None = None  # it decays linearly to this by the end of training (None: constant)
    max_energy_gap: float = 1e4  # |E(x+) - E(x-)| above this at a report counts as divergence
    divergence_patience: int = 3  # consecutive divergent reports before training stops


@dataclass
class VAEBMConfig(BackboneConfig):
    energy: EnergyNetConfig = field(default_factory=EnergyNetConfig)  # energy network (Table 7)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)  # Langevin negative phase
    buffer: ReplayBufferConfig = field(default_factory=ReplayBufferConfig)  # used when sampler.persistent
    objective: EBMObjectiveConfig = field(default_factory=EBMObjectiveConfig)  # CD loss, divergence detection
    optim: EBMOptimConfig = field(default_factory=EBMOptimConfig)  # ClippedAdam (App. E)

    def validate(self, dataset) -> None:
        """Raises ValueError naming the key on an invalid setting."""
        self.optim.validate()
        if self.backbone_dtype not in ("fp32", "bf16"):
            raise ValueError("backbone_dtype must be fp32 or bf16")
        if self.sampler.target not in TARGET_MODES:
            raise ValueError(f"sampler.target must be one of {TARGET_MODES}, got {self.sampler.target!r}")
        if self.sampler.langevin.num_steps < 1:
            raise ValueError("sampler.langevin.num_steps must be >= 1")
        if self.sampler.test_steps < 1:
            raise ValueError("sampler.test_steps must be >= 1")
        if self.sampler.init_candidates < 1:
            raise ValueError(f"sampler.init_candidates must be >= 1, got {self.sampler.init_candidates}")
        if self.sampler.init_resampling not in RESAMPLING_SCHEMES:
            raise ValueError(f"sampler.init_resampling must be one of {RESAMPLING_SCHEMES}, "
                             f"got {self.sampler.init_resampling!r}")
        if self.sampler.init_candidates > 1 and self.sampler.target != "exact":
            raise ValueError("sampler.init_candidates > 1 needs sampler.target=exact: exp(-E(T(eps))) is the "
                             "importance weight of the exact eps-space target only (vaebm.md Eq. 9)")
        if self.buffer.device not in ("cpu", "cuda"):
            raise ValueError("buffer.device must be cpu or cuda")
        if self.objective.alpha_s < 0 or self.objective.divergence_patience < 1:
            raise ValueError("objective.alpha_s must be >= 0 and objective.divergence_patience >= 1")
        o = self.objective
        if o.magnitude_weight < 0 or (o.magnitude_weight_final is not None and o.magnitude_weight_final < 0):
            raise ValueError("objective.magnitude_weight and objective.magnitude_weight_final must be >= 0")
        if self.optim.clip_std <= 0 or self.optim.clip_slack < 0:
            raise ValueError("optim.clip_std must be > 0 and optim.clip_slack >= 0")
        try:
            self.energy.validate()
        except (ValueError, KeyError) as err:
            raise ValueError(f"energy: {err}") from None
        # The energy sees the backbone's images, which are the data's (the backbone's own match is checked on load).
        if self.energy.arch != "mlp" and dataset.resolution not in (None, self.energy.image_size):
            raise ValueError(f"dataset.resolution={dataset.resolution} but energy.image_size={self.energy.image_size}")
        if self.energy.arch != "mlp" and dataset.channels != self.energy.in_channels:
            raise ValueError(f"dataset.channels={dataset.channels} but energy.in_channels={self.energy.in_channels}")

    def points_dim(self) -> int | None:
        """The dimension of the point data the energy reads (`energy.data_dim` of the MLP), or None: images."""
        return self.energy.data_dim if self.energy.arch == "mlp" else None


def sir_chain_start(backbone, energy_fn: Callable[[torch.Tensor], torch.Tensor],
                    propose: Callable[[int], list[torch.Tensor]], num_chains: int, candidates: int,
                    generator: torch.Generator | None, scheme: str = "pooled", temperature: float = 1.0,
                    use_mean: bool = False, autocast: str | None = None) -> ResampledInit:
    """Chain starts [eps_x, *eps_z] of VAEBM's negative phase by sampling-importance-resampling.

    `propose(n)` draws n eps-space candidates from N(0, I) (the VAE's base distribution); each is weighted by
    log w = -E(T(eps)), the exact log importance weight of h's eps-space law over N(0, I) (vaebm.md Eq. 4 and Eq. 9:
    U = E(T(eps)) + |eps|^2/2), with T = `decode` (the same decoder sample or mean the Langevin potential scores).
    num_chains are kept (core.sampling.resampled_init, `scheme` pooled | per_chain). candidates = 1: the proposal's
    draws, `energy_fn` is not called and `generator` draws nothing. The weights come back on the proposal's device
    (the resampling draws from `generator` there); the networks run on the backbone's device.
    """
    device = next(backbone.parameters()).device

    def log_weight(state: list[torch.Tensor]) -> torch.Tensor:
        with autocast_context(device.type, autocast):
            x = decode(backbone, [t.to(device) for t in state], temperature, use_mean)
            return -energy_fn(x).float().reshape(-1).to(state[0].device)  # vaebm.md Eq. 9: log w = -E(T(eps))

    return importance_resampled_init(propose, log_weight, num_chains, candidates, generator, scheme=scheme)


def langevin_negatives(backbone, energy_fn: Callable[[torch.Tensor], torch.Tensor], state: list[torch.Tensor],
                       langevin: LangevinConfig, generator: torch.Generator | None, target: str = "exact",
                       temperature: float = 1.0, use_mean: bool = False,
                       chain_use_mean: bool | None = None) -> tuple[torch.Tensor, LangevinResult]:
    """eps-space Langevin from `state` on U(eps) = E(T(eps)) + |eps|^2/2 (vaebm.md Eq. 9; `target`, see
    make_vaebm_potential), then x- = T(eps) (Eq. 8). Returns (x-, the chains).

    Decoder sample or mean, in one place: during the chain E sees the decoder mean mu(z) if `chain_use_mean` (None:
    as `use_mean`) else the sample mu(z) + sigma(z) eps_x; the returned x- is the mean if `use_mean`. The official
    VAEBM code scores the sample during the chain and, with --use_mu_cd, takes the mean for the CD negatives only
    (SamplerConfig: use_mean=true, chain_use_mean=false); images shown or scored (grids, the sampling job, FID) are
    decoder means, as the official sampler saves them."""
    chain_use_mean = use_mean if chain_use_mean is None else chain_use_mean
    potential = make_vaebm_potential(backbone, energy_fn, mode=target, temperature=temperature,
                                     use_mean=chain_use_mean)
    result = run_langevin(potential, state, langevin, generator=generator)
    with torch.no_grad():
        x_neg = decode(backbone, result.state, temperature, use_mean)
        if target == "reference" and not use_mean:
            x_neg = x_neg.clamp(-1.0, 1.0)  # the official decoder sample
    return x_neg, result


class CastingEnergy(torch.nn.Module):
    """E(x) as fp32 energies from fp32 pixels: the energy net may hold bf16/fp16 weights under the engine, and its
    first layer reads fp32 inputs whatever its dtype (core.models.energy.PixelWNConv2d)."""

    def __init__(self, energy: torch.nn.Module):
        super().__init__()
        self.energy = energy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.energy(x.float()).float()




def energy_divergence(metrics: dict[str, float], max_energy_gap: float) -> str | None:
    """Divergence as the official README describes it ("training eventually explodes"): the energy gap
    `ebm/energy_gap` blows up or the chains produce non-finite values (`langevin/nonfinite`). Shared by the methods
    whose negative phase is Langevin on an energy (VAEBM, the joint latent EBM prior)."""
    gap = metrics.get("ebm/energy_gap", 0.0)
    if not abs(gap) < max_energy_gap:  # also catches NaN
        return f"|E(x+) - E(x-)| = {abs(gap):.3g} exceeds {max_energy_gap:g}"
    if metrics.get("langevin/nonfinite", 0.0) > 0:
        return f"{metrics['langevin/nonfinite']:.3g} non-finite chain samples per step"
    return None


@register_method
class VAEBMMethod(Method):
    name = "vaebm"
    config_class = VAEBMConfig
    model_prefix = "vaebm"
    needs_backbone = True

    def __init__(self, config: VAEBMConfig, ctx: MethodContext, backbone=None, backbone_bundle=None):
        super().__init__(config, ctx, backbone, backbone_bundle)
        if backbone is None:
            raise ValueError("vaebm needs a frozen backbone")
        x_shape = tuple(backbone.x_shape())
        want = (config.energy.in_channels, config.energy.image_size, config.energy.image_size)
        if config.energy.arch != "mlp" and x_shape != want:
            raise ValueError(f"the backbone generates {x_shape} but the energy network expects {want}: "
                             f"set energy.image_size / energy.in_channels")
        if config.sampler.target == "reference" and not isinstance(backbone, NVAE):
            raise ValueError("sampler.target=reference is the official code's image target (pixels clamped to [-1, 1], "
                             "NVAE's log-sigma floor): it needs an NVAE backbone; use exact or joint")
        torch.manual_seed(ctx.seed)  # identical initial weights on every rank
        self.energy = EnergyNet(config.energy).to(ctx.device)
        self.energy_fp32 = CastingEnergy(self.energy)
        self.buffer = ReplayBuffer(backbone.latent_shapes(), config.buffer) if config.sampler.persistent else None
        self.iteration = StepCounter()
        self.divergence_patience = config.objective.divergence_patience
        gen = torch.Generator().manual_seed(derive_seed(ctx.seed, _GRID_STREAM))
        self.fixed_noise = backbone.sample_noise(ctx.sample_count, generator=gen, device=torch.device("cpu"))
        self.reference_batch: torch.Tensor | None = None  # data images for the energy histogram
        self.chain_trace = ChainEnergyTrace()  # per-step E of the training chains since the last visuals

    def trained_module(self) -> torch.nn.Module:
        return self.energy

    def make_optimizer(self, param_groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        o = self.config.optim
        return ClippedAdam(param_groups, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay,
                           clip_std=o.clip_std, clip_slack=o.clip_slack)

    def setup(self, first_batch: dict[str, Any], fresh: bool) -> None:
        """Weight-norm data-dependent init with moments over all ranks (identical weights everywhere) on a fresh
        run; a few data images kept for the energy histograms."""
        x = first_batch["x"].to(self.ctx.device).float()
        if fresh:
            data_dependent_init(self.energy, x, init_scale=self.config.energy.init_scale,
                                reduce=self.ctx.reduce_sum)
        self.reference_batch = x[: self.ctx.sample_count].cpu()

    # ------------------------------------------------------------------------------------------------ one step
    def negatives(self, batch_size: int):
        """This step's chains: (x-, final eps_z, Langevin result, replayed mask).

        Fresh starts are N(0, I), or with `sampler.init_candidates` K > 1 VAE draws resampled by exp(-E) from K per
        chain (`sir_chain_start`); with the replay buffer, replayed rows then take the buffer's eps_z."""
        s = self.config.sampler
        device, seed, rank, it = self.ctx.device, self.ctx.seed, self.ctx.rank, self.iteration.value
        init_gen = rank_generator(seed, rank, it, "cpu", stream=0)  # chain starts (the buffer draws on the CPU)
        noise_gen = rank_generator(seed, rank, it, device, stream=1)  # Langevin noise

        def propose(n: int) -> list[torch.Tensor]:  # the SIR proposal N(0, I), drawn on the CPU from init_gen
            return join_state(*self.backbone.sample_noise(n, generator=init_gen, device=torch.device("cpu")))

        init = sir_chain_start(self.backbone, self.energy_fp32, propose, batch_size, s.init_candidates, init_gen,
                               s.init_resampling, s.temperature, s.chain_use_mean, s.langevin.autocast)
        eps_x, eps_z = split_state(init.state)
        replayed = torch.zeros(batch_size, dtype=torch.bool)
        if self.buffer is not None:  # vaebm.md App. E: eps_z replayed with probability p, eps_x always fresh
            b = self.config.buffer
            p_replay = replay_probability(it, b.max_p, b.anneal_iterations)
            buffered, replayed = self.buffer.init_chains(batch_size, p_replay, init_gen, device=torch.device("cpu"))
            # K = 1: the buffer's own fresh rows are the N(0, I) starts; K > 1: only replayed rows leave the SIR draw
            eps_z = buffered if s.init_candidates == 1 else [
                torch.where(replayed.view(-1, *[1] * (r.dim() - 1)), r, e) for r, e in zip(buffered, eps_z)]
        state = join_state(eps_x.to(device), [e.to(device) for e in eps_z])
        x_neg, result = langevin_negatives(self.backbone, self.energy_fp32, state, s.langevin, noise_gen, s.target,
                                           s.temperature, s.use_mean, s.chain_use_mean)
        return x_neg, split_state(result.state)[1], result, replayed

    def loss(self, net: Callable[..., torch.Tensor], batch: dict[str, Any], nimg: int):
        x_pos = batch["x"].to(self.ctx.device, non_blocking=True).float()
        x_neg, eps_z, chain, replayed = self.negatives(x_pos.shape[0])
        e_pos, e_neg = net(torch.cat([x_pos, x_neg])).float().chunk(2)  # fp32 pixels into any engine dtype
        o = self.config.objective
        # alpha_s = 0: the penalty is not computed (no power iteration; ebm/spectral reads 0)
        spectral = self.energy.spectral_penalty().float() if o.alpha_s > 0 else torch.zeros((), device=x_pos.device)
        magnitude = magnitude_weight_at(nimg / self.ctx.total_nimg, o.magnitude_weight, o.magnitude_weight_final)
        terms = vaebm_loss(e_pos, e_neg, spectral, o.alpha_s, magnitude_weight=magnitude)
        if self.buffer is not None:
            self.buffer.push(eps_z)
        self.iteration.value += 1
        self.chain_trace.add(chain)
        metrics = {
            "ebm/energy_pos": terms.e_pos, "ebm/energy_neg": terms.e_neg, "ebm/energy_gap": terms.gap,
            "ebm/spectral": terms.spectral, "ebm/replay_ratio": replayed.float().mean(),
            **chain.metrics(),
        }
        if terms.magnitude is not None:
            metrics["ebm/magnitude"] = terms.magnitude
        return terms.loss, metrics

    # -------------------------------------------------------------------------------------- visuals and health
    def visuals(self, out_dir: Path, nimg: int) -> list[Path]:
        """Test-time chains from fixed noise: a sample grid, a chain strip (vaebm.md Fig. 2b), energy histograms."""
        out_dir.mkdir(parents=True, exist_ok=True)
        s = self.config.sampler
        lcfg = dataclasses.replace(s.langevin, num_steps=s.test_steps, record_every=max(s.test_steps // 8, 1))
        device = self.ctx.device
        eps_x, eps_z = self.fixed_noise
        gen = torch.Generator(device=device).manual_seed(derive_seed(self.ctx.seed, _TEST_CHAIN_STREAM))
        x, result = langevin_negatives(self.backbone, self.energy_fp32,
                                       join_state(eps_x.to(device), [e.to(device) for e in eps_z]), lcfg, gen,
                                       s.target, s.temperature, use_mean=True, chain_use_mean=s.chain_use_mean)
        tag = f"nimg-{nimg:012d}"
        points = len(self.backbone.x_shape()) == 1  # point data (the 2-D protocol): a scatter, no image strips
        paths = [out_dir / f"{tag}-samples.png", out_dir / f"{tag}-energies.png"]
        paths.append(chain_energy_figure(out_dir / f"{tag}-chain-energy.png", nimg,
                                         {"training chains": self.chain_trace}, {"test chain (fixed noise)": result}))
        with torch.no_grad():
            if points:
                save_points(x, paths[0], f"VAEBM samples at nimg={nimg}")
            else:
                save_grid(x, paths[0])
                rows = min(8, len(x))
                frames = [decode(self.backbone, [t[:rows] for t in snap], s.temperature, use_mean=True)
                          for snap in result.snapshots]
                paths.append(save_grid(torch.stack(frames, dim=1).flatten(0, 1), out_dir / f"{tag}-chains.png",
                                       nrow=len(frames)))
            e_neg = self.energy_fp32(x).cpu()
            e_pos = (self.energy_fp32(self.reference_batch.to(device)).cpu()
                     if self.reference_batch is not None else None)
        energy_histogram(e_pos, e_neg, paths[1], f"energies at nimg={nimg}")
        return paths

    def health(self, metrics: dict[str, float]) -> str | None:
        return energy_divergence(metrics, self.config.objective.max_energy_gap)

    def shared_state(self):
        return {"method": self.iteration}

    def rank_state(self):
        return {"buffer": self.buffer} if self.buffer is not None else {}

    def export(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        bundle = {"kind": "vaebm", "energy": dataclasses.asdict(self.config.energy), "backbone": self.backbone_bundle,
                  "sampler": dataclasses.asdict(self.config.sampler)}
        weights = {f"energy.{k}": v for k, v in float_state(self.energy).items()}
        weights.update({f"backbone.{k}": v.detach().cpu() for k, v in self.backbone.state_dict().items()})
        return bundle, weights

    @classmethod
    def describe(cls, config: VAEBMConfig):
        return [("Energy network", EnergyNet(config.energy))]


@register("vaebm")
class VAEBMModel(TrainedModel):
    """A trained VAEBM: frozen backbone, frozen energy network and the sampler settings it was trained with."""

    energy_based = True
    baseline = "backbone"  # zero Langevin steps: the backbone's sample from the same eps

    def __init__(self, backbone, energy: EnergyNet, sampler: SamplerConfig):
        self.backbone = backbone
        self.energy_net = energy
        self.sampler = sampler

    @classmethod
    def from_bundle(cls, bundle: dict[str, Any], weights: dict[str, torch.Tensor]) -> "VAEBMModel":
        backbone = load_vae(bundle["backbone"], sub_state(weights, "backbone"))
        energy = EnergyNet(EnergyNetConfig(**bundle["energy"]))
        energy.load_state_dict(sub_state(weights, "energy"), strict=True)
        s = dict(bundle["sampler"])
        if "chain_use_mean" not in s:  # published before the chain and the negatives had separate settings, when
            s["chain_use_mean"] = s.get("use_mean", False)  # one use_mean set both, and "reference" meant "joint"
            s["target"] = "joint" if s.get("target") == "reference" else s.get("target", "exact")
        sampler = SamplerConfig(**{**s, "langevin": LangevinConfig(**s["langevin"])})
        return cls(backbone, energy, sampler)

    def to(self, device: torch.device, dtype: torch.dtype = torch.float32) -> "VAEBMModel":
        self.backbone = freeze(self.backbone, device, dtype)
        self.energy_net = freeze(self.energy_net, device, torch.float32)
        return self

    @property
    def vae(self):
        return self.backbone

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.energy_net(x).double().reshape(-1)

    def sample(self, n: int, generator: torch.Generator, options: SampleOptions | None = None) -> Samples:
        """Test-time chains (vaebm.md App. E): `steps` Langevin updates from N(0, I) or a low-temperature start."""
        o = options or SampleOptions()
        s = self.sampler
        t = s.temperature if o.temperature is None else o.temperature
        use_mean = True if o.use_mean is None else o.use_mean  # images are decoder means unless asked otherwise
        steps = s.test_steps if o.steps is None else o.steps
        lcfg = dataclasses.replace(s.langevin, num_steps=steps, step_size=o.step_size or s.langevin.step_size,
                                   record_every=max(steps // o.strip_frames, 1) if o.strip_frames else 0)
        init = chain_start(self.backbone, n, generator, o.init, o.init_temperature, o.bn_iterations)
        images, result = langevin_negatives(self.backbone, self.energy_net, init, lcfg, generator, s.target, t,
                                            use_mean, s.chain_use_mean)
        with torch.no_grad():
            frames = [decode(self.backbone, snap, t, use_mean) for snap in result.snapshots] or None
        return Samples(images, frames)


__all__ = ["VAEBMMethod", "VAEBMConfig", "VAEBMModel", "SamplerConfig", "EBMOptimConfig", "EBMObjectiveConfig"]
