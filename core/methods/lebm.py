"""LEBM and the multi-layer joint EBM prior: a generator and its latent EBM prior learned jointly from scratch.

    p(x, z) = N(x; g(z1), sigma^2 I) p_{alpha,beta}(z),  p_{alpha,beta}(z) ∝ exp(sum_i f_i(z_i)) p_beta(z)
    (lebm_supplement.md A.4 with L = 1; joint_latent_ebm_prior.md Eq. 6 with L = 2, `generator.layers`)

One learning step (lebm_supplement.md A.8, Eq. 39-40; joint_latent_ebm_prior.md Sec. 3.2, Eq. 9-14):
- prior chains: K0 Langevin steps of size s0 on U(eps) = -f(T(eps)) + ||eps||^2 / 2, from eps ~ N(0, I)
  (App. A.3: the eps-space target; for L = 1, T is the identity and U(z) = -f(z) + ||z||^2 / 2);
- posterior chains: K1 steps of size s1 on U(z) = ||x - g(z1)||^2 / (2 sigma^2) - f(z) - log p_beta(z), the latents
  themselves (Eq. 14; for L = 1, U(z) = ||x - g(z)||^2 / (2 sigma^2) - f(z) + ||z||^2 / 2), started at a draw of the
  Gaussian prior z = T(eps), eps ~ N(0, I) (N(0, I) itself for L = 1, as the supplement's code); or, with
  `sampler.posterior=inference`, z+ ~ q(z|x) (lebm_supplement.md A.11; joint Sec. 3.3, Eq. 15-19);
- loss = ||x - g(z1+)||^2 / (2 sigma^2) + f(z-) - f(z+) [- log p(z1+|z2+) + log p(z1-|z2-)]   (Eq. 39-40, 9-11)
  with z+ and z- constants; the inference model adds log q(z+|x) - log p_beta(z+) on reparameterized z+ (Eq. 19).

Step sizes: the papers write z <- z - (s^2 / 2) grad U + s w; `core.sampling.langevin` runs z - (eta / 2) grad U
+ sqrt(eta) w, so the configured s (Table 1) becomes eta = s^2 (`langevin_config`). The supplement's listing (App. D)
adds `1.0 / z.data` to the gradient where the gradient of ||z||^2 / 2 is z: a transcription error, not the method.

Registered as `lebm-<dataset>`; the `lebm` model kind (sample, reconstruct) is rebuilt here too.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch

from core.methods.base import Method, MethodContext, StepCounter, register_method
from core.methods.bundles import SampleOptions, Samples, TrainedModel, freeze, register
from core.models.distributions import sum_except_batch
from core.models.lebm_nets import GeneratorConfig, InferenceConfig, LatentEBMModel, PriorEBMConfig
from core.optim.config import OptimConfig
from core.sampling.langevin import (ChainEnergyTrace, LangevinConfig, LangevinResult, PotentialTerms, SplitPotential,
                                    frozen, run_langevin)
from core.sampling.rng import rank_generator
from core.seeding import derive_seed
from core.visuals import chain_energy_figure, finish_figure, save_grid
from data_pipelines.builtin_sets import BUILTIN_SETS_DEFAULT_SIZE

_GRID_STREAM = 0x1EB0  # fixed noise of the sample grids and chain strips
_TEST_CHAIN_STREAM = 0x1EB1  # Langevin noise of the grids' chains
POSTERIOR_MODES = ("langevin", "inference")


def paper_step_to_eta(s: float) -> float:
    """The papers' Langevin step z <- z - (s^2/2) grad U + s w (lebm_supplement.md App. D; Table 1 gives s) is
    core.sampling.langevin's z <- z - (eta/2) grad U + sqrt(eta) w with eta = s^2."""
    return float(s) ** 2


@dataclass
class LEBMSamplerConfig:
    prior_steps: int = 60  # K0: prior Langevin steps per iteration (lebm_supplement.md Table 1)
    prior_step_size: float = 0.4  # s0 (Table 1), the papers' s: the Langevin implementation runs eta = s^2
    posterior_steps: int = 20  # K1: posterior Langevin steps (Table 1; 40 for CIFAR-10)
    posterior_step_size: float = 0.1  # s1 (Table 1), the papers' s (eta = s^2)
    posterior: str = "langevin"  # langevin: short-run posterior MCMC (A.8, Eq. 14) | inference: q(z|x) (A.11, Sec. 3.3)
    test_steps: int | None = None  # prior steps of sample grids and the sampling job; None: prior_steps
    autocast: str | None = None  # bf16 | fp16: dtype the networks run in inside the chains; None: as the weights
    strip_frames: int = 8  # about this many snapshots per chain strip
    compile: bool = False  # run each Langevin step as one torch.compile graph (core.sampling.langevin)


@dataclass
class LEBMObjectiveConfig:
    max_energy_gap: float = 1e4  # |f(z+) - f(z-)| above this at a report counts as divergence
    max_nonfinite_fraction: float = 0.0  # a report whose share of reset (non-finite) chains exceeds this is unhealthy
    divergence_patience: int = 3  # consecutive unhealthy reports before training stops


@dataclass
class LEBMOptimConfig(OptimConfig):
    lr: float = 1e-4  # Adam rate of the generator (g and p(z1|z2)) (lebm_supplement.md App. D: 1e-4)
    lr_min: float = 1e-4  # equal to lr: a constant rate, as the supplement's code
    ebm_lr: float = 2e-5  # Adam rate of the latent EBM f (App. D: 2e-5); a parameter group of the same engine
    inference_lr: float = 1e-4  # Adam rate of q(z|x) (sampler.posterior=inference)
    betas: list[float] = field(default_factory=lambda: [0.5, 0.999])  # Adam betas (App. D)
    eps: float = 1e-8  # Adam epsilon (torch's default, as App. D)
    weight_decay: float = 0.0  # none in App. D


@dataclass
class LEBMConfig:
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)  # g, p(z1|z2) and sigma (layers=1|2)
    ebm: PriorEBMConfig = field(default_factory=PriorEBMConfig)  # f_1 (and f_2) (Table 2, Table 12)
    inference: InferenceConfig = field(default_factory=InferenceConfig)  # q(z|x) (used when posterior=inference)
    sampler: LEBMSamplerConfig = field(default_factory=LEBMSamplerConfig)  # short-run prior/posterior chains
    objective: LEBMObjectiveConfig = field(default_factory=LEBMObjectiveConfig)  # divergence detection
    optim: LEBMOptimConfig = field(default_factory=LEBMOptimConfig)  # Adam, three parameter groups

    def validate(self, dataset) -> None:
        """Raises ValueError naming the key on an invalid setting or a model/data mismatch."""
        self.optim.validate()
        if not (self.optim.ebm_lr > 0 and self.optim.inference_lr > 0):
            raise ValueError("optim.ebm_lr and optim.inference_lr must be > 0")
        for section in ("generator", "ebm", "inference"):
            try:
                getattr(self, section).validate()
            except ValueError as err:
                raise ValueError(str(err)) from None
        s = self.sampler
        if s.posterior not in POSTERIOR_MODES:
            raise ValueError(f"sampler.posterior must be one of {POSTERIOR_MODES}, got {s.posterior!r}")
        if s.prior_steps < 1 or s.posterior_steps < 1 or (s.test_steps is not None and s.test_steps < 1):
            raise ValueError("sampler.prior_steps, posterior_steps and test_steps must be >= 1")
        if not (s.prior_step_size > 0 and s.posterior_step_size > 0):
            raise ValueError("sampler.prior_step_size and sampler.posterior_step_size must be > 0")
        if s.strip_frames < 1:
            raise ValueError("sampler.strip_frames must be >= 1")
        LangevinConfig(autocast=s.autocast)  # checks the autocast name
        o = self.objective
        if o.divergence_patience < 1 or not 0 <= o.max_nonfinite_fraction <= 1:
            raise ValueError("objective.divergence_patience must be >= 1, max_nonfinite_fraction in [0, 1]")
        g = self.generator
        side = dataset.resolution or dataset.size or (BUILTIN_SETS_DEFAULT_SIZE.get(dataset.name)
                                                      if dataset.path is None else None)
        if side not in (None, g.image_size):  # None: shards of unknown size, checked on the first batch (setup)
            raise ValueError(f"generator.arch={g.arch} makes {g.image_size}x{g.image_size} images but the dataset "
                             f"gives {side}x{side}: set dataset.resolution={g.image_size}")
        if dataset.channels != g.out_channels:
            raise ValueError(f"dataset.channels={dataset.channels} but generator.out_channels={g.out_channels}")

    def model_inference(self) -> InferenceConfig:
        """The inference section as built: enabled exactly when the posterior is amortized."""
        return dataclasses.replace(self.inference, enabled=self.sampler.posterior == "inference")


# ------------------------------------------------------------------------------------------------ potentials
def _half_sq_norm(state: list[torch.Tensor]) -> torch.Tensor:
    return sum(0.5 * sum_except_batch(e.float().pow(2)) for e in state)


def prior_potential(model: LatentEBMModel) -> SplitPotential:
    """U(eps) = -f(T(eps)) + ||eps||^2 / 2: the eps-space law of the EBM prior (joint_latent_ebm_prior.md App. A.3;
    for L = 1, U(z) = -f_alpha(z) + ||z||^2 / 2, lebm_supplement.md A.4). Parameters are frozen while U runs. The
    energy term is E = -f (the chains' diagnostics)."""
    def terms(state: list[torch.Tensor]) -> PotentialTerms:
        with frozen(model):
            energy = -model.energy(model.transform(state))
            return PotentialTerms(energy + _half_sq_norm(state), energy)

    return SplitPotential(terms)


def posterior_potential(model: LatentEBMModel, x: torch.Tensor) -> SplitPotential:
    """U(z) = ||x - g(z1)||^2 / (2 sigma^2) - f(z) - log p_beta(z) = -log p(z|x) + const on the latents
    (lebm_supplement.md A.8; joint_latent_ebm_prior.md Eq. 14 with log p_beta(z) = log p(z1|z2) + log N(z2; 0, I)).
    Unlike the prior's (App. A.3), the posterior chains move z itself, as Sec. 3.2 describes: their step then does
    not scale with sigma(z2). The energy term is E = -f(z), as for the prior chains (the chains' diagnostics); the
    reconstruction and Gaussian-prior terms are the rest of U."""
    def terms(state: list[torch.Tensor]) -> PotentialTerms:
        with frozen(model):
            rec = model.reconstruction_energy(x, state[0])  # first, as before: autograd sums the drift in this order
            f = model.energy(state)
            return PotentialTerms(rec - f - model.log_gaussian_prior(state), -f)

    return SplitPotential(terms)


@torch.no_grad()
def posterior_start(model: LatentEBMModel, eps: list[torch.Tensor]) -> list[torch.Tensor]:
    """Posterior chains start at a Gaussian-prior draw z = T(eps) (N(0, I) for L = 1), fp32."""
    return [z.float() for z in model.transform(eps)]


def langevin_config(steps: int, s: float, autocast: str | None = None, record_every: int = 0,
                    compile: bool = False) -> LangevinConfig:
    """The short-run chain of `steps` updates with the papers' step size s (eta = s^2, `paper_step_to_eta`);
    non-finite chains are reset to their start and counted (as in VAEBM). `compile`: LangevinConfig.compile."""
    return LangevinConfig(num_steps=steps, step_size=paper_step_to_eta(s), autocast=autocast,
                          record_every=record_every, reset_nonfinite=True, compile=compile)


def sample_prior(model: LatentEBMModel, init: list[torch.Tensor], steps: int, s: float,
                 generator: torch.Generator | None, autocast: str | None = None,
                 record_every: int = 0, compile: bool = False) -> LangevinResult:
    """Short-run prior chains from `init` (eps, fp32)."""
    return run_langevin(prior_potential(model), init, langevin_config(steps, s, autocast, record_every, compile),
                        generator)


def sample_posterior(model: LatentEBMModel, x: torch.Tensor, init: list[torch.Tensor], steps: int, s: float,
                     generator: torch.Generator | None, autocast: str | None = None,
                     record_every: int = 0, compile: bool = False) -> LangevinResult:
    """Short-run posterior chains of p(z|x) from the latents `init` (e.g. `posterior_start(model, eps)`)."""
    return run_langevin(posterior_potential(model, x), init,
                        langevin_config(steps, s, autocast, record_every, compile), generator)


@torch.no_grad()
def decode_state(model: LatentEBMModel, state: list[torch.Tensor]) -> torch.Tensor:
    """Images g(z1) at z = T(eps) of a prior chain's state, fp32."""
    return model.decode(model.transform(state)[0])


@torch.no_grad()
def decode_latents(model: LatentEBMModel, z: list[torch.Tensor]) -> torch.Tensor:
    """Images g(z1) of a posterior chain's state (latents), fp32."""
    return model.decode(z[0])




class _Curves:
    """f(z+) and f(z-) per step on this rank (the curves users watch), kept to at most `limit` points by halving.

    The step's values stay on the device until the curve is read (a plot, a checkpoint) or `limit` steps are
    pending: then one copy brings them all to the host, so the training step never waits on the device for them.
    """

    def __init__(self, limit: int = 4096):
        self.limit = limit
        self.nimg: list[int] = []
        self.f_pos: list[float] = []
        self.f_neg: list[float] = []
        self._pending: list[tuple[int, torch.Tensor]] = []

    def add(self, nimg: int, f_pos: torch.Tensor, f_neg: torch.Tensor) -> None:
        self._pending.append((int(nimg), torch.stack([f_pos.detach().float(), f_neg.detach().float()])))
        if len(self._pending) >= self.limit:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        values = torch.stack([v for _, v in self._pending]).tolist()  # the one device-to-host copy
        for (nimg, _), (pos, neg) in zip(self._pending, values):
            self.nimg.append(nimg)
            self.f_pos.append(pos)
            self.f_neg.append(neg)
            if len(self.nimg) > self.limit:
                self.nimg, self.f_pos, self.f_neg = self.nimg[::2], self.f_pos[::2], self.f_neg[::2]
        self._pending.clear()

    def state_dict(self) -> dict[str, Any]:
        self._flush()
        return {"nimg": list(self.nimg), "f_pos": list(self.f_pos), "f_neg": list(self.f_neg)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending.clear()
        self.nimg = [int(v) for v in state.get("nimg", [])]
        self.f_pos = [float(v) for v in state.get("f_pos", [])]
        self.f_neg = [float(v) for v in state.get("f_neg", [])]

    def plot(self, path: Path, title: str) -> Path:
        self._flush()
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
        ax.plot(self.nimg, self.f_pos, label="f(z+) posterior", lw=1)
        ax.plot(self.nimg, self.f_neg, label="f(z-) prior", lw=1)
        ax.set_xlabel("images seen")
        ax.set_ylabel("f")
        return finish_figure(fig, ax, title, path)


def strip(frames: list[torch.Tensor], first: torch.Tensor | None = None) -> torch.Tensor:
    """Chain snapshots (each (n, C, H, W)) as rows of one grid: chain i is row i, time runs left to right; `first`
    (e.g. the data being explained) is prepended as column 0."""
    cols = ([first] if first is not None else []) + frames
    return torch.stack(cols, dim=1).flatten(0, 1)


# ------------------------------------------------------------------------------------------------ the method
@register_method
class LEBMMethod(Method):
    name = "lebm"
    config_class = LEBMConfig
    model_prefix = "lebm"
    needs_backbone = False  # generator, prior and inference model are all trained here, from scratch

    def __init__(self, config: LEBMConfig, ctx: MethodContext, backbone=None, backbone_bundle=None):
        super().__init__(config, ctx)
        torch.manual_seed(ctx.seed)  # identical initial weights on every rank
        self.model = LatentEBMModel(config.generator, config.ebm, config.model_inference()).to(ctx.device)
        self.iteration = StepCounter()
        self.curves = _Curves()
        self.prior_trace = ChainEnergyTrace()  # per-step E = -f of the training prior chains since the last visuals
        self.posterior_trace = ChainEnergyTrace()  # the same for the posterior chains (posterior=langevin)
        self.divergence_patience = config.objective.divergence_patience
        gen = torch.Generator().manual_seed(derive_seed(ctx.seed, _GRID_STREAM))
        self.fixed_noise = self.model.sample_noise(ctx.sample_count, generator=gen)
        self.fixed_posterior_noise = self.model.sample_noise(ctx.sample_count, generator=gen)
        self.reference_batch: torch.Tensor | None = None  # data images for reconstructions and posterior strips

    def trained_module(self) -> torch.nn.Module:
        return self.model

    def param_groups(self) -> list[dict[str, Any]]:
        """generator (beta) at optim.lr, EBM (alpha) at optim.ebm_lr, inference (omega) at optim.inference_lr."""
        o = self.config.optim
        groups = [{"params": self.model.generator_parameters(), "lr": o.lr},
                  {"params": self.model.ebm_parameters(), "lr": o.ebm_lr}]
        if self.model.inference_parameters():
            groups.append({"params": self.model.inference_parameters(), "lr": o.inference_lr})
        return groups

    def make_optimizer(self, param_groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        o = self.config.optim
        return torch.optim.Adam(param_groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)

    def setup(self, first_batch: dict[str, Any], fresh: bool) -> None:
        """Checks the data's shape against the generator's and keeps a few data images for reconstruction grids and
        posterior chain strips."""
        shape = tuple(first_batch["x"].shape[1:])
        if shape != self.model.x_shape():
            raise ValueError(f"the data has shape {shape} but the generator makes {self.model.x_shape()}: set "
                             f"dataset.resolution / dataset.channels or generator.arch / generator.out_channels")
        self.reference_batch = first_batch["x"][: min(8, self.ctx.sample_count)].float().cpu()

    # -------------------------------------------------------------------------------------------- one step
    def loss(self, net: Callable[..., Any], batch: dict[str, Any], nimg: int):
        s = self.config.sampler
        device, seed, rank, it = self.ctx.device, self.ctx.seed, self.ctx.rank, self.iteration.value
        x = batch["x"].to(device, non_blocking=True).float()
        n = x.shape[0]
        init_gen = rank_generator(seed, rank, it, "cpu", stream=0)  # chain starts and q's noise
        prior_gen = rank_generator(seed, rank, it, device, stream=1)  # prior Langevin noise
        post_gen = rank_generator(seed, rank, it, device, stream=2)  # posterior Langevin noise
        eps_neg0 = [e.to(device) for e in self.model.sample_noise(n, generator=init_gen)]
        eps_pos0 = [e.to(device) for e in self.model.sample_noise(n, generator=init_gen)]
        prior = sample_prior(self.model, eps_neg0, s.prior_steps, s.prior_step_size, prior_gen, s.autocast,
                             compile=s.compile)
        self.prior_trace.add(prior)
        amortized = s.posterior == "inference"
        if amortized:  # z+ ~ q(z|x) by reparameterization with these normals (Sec. 3.3)
            post, positive = None, eps_pos0
        else:
            post = sample_posterior(self.model, x, posterior_start(self.model, eps_pos0), s.posterior_steps,
                                    s.posterior_step_size, post_gen, s.autocast, compile=s.compile)
            self.posterior_trace.add(post)
            positive = post.state
        t = net(x, positive, prior.state, amortized)
        f_pos, f_neg = t["f_pos"].mean(), t["f_neg"].mean()
        # lebm_supplement.md Eq. 39-40 (as losses to minimize); joint_latent_ebm_prior.md Eq. 9-11 for p(z1|z2).
        loss = t["rec"].mean() + f_neg - f_pos - t["logc_pos"].mean() + t["logc_neg"].mean()
        if amortized:  # Eq. 19: + E_q[log q(z|x) - log p_beta(z)]; its -log p(z1|z2) part is already above
            loss = loss + (t["log_q"] - t["log_prior"] + t["logc_pos"]).mean()
        self.iteration.value += 1
        self.curves.add(nimg, f_pos, f_neg)
        pixels = x[0].numel()
        metrics = {
            "lebm/f_pos": f_pos.detach(), "lebm/f_neg": f_neg.detach(), "lebm/f_gap": (f_pos - f_neg).detach(),
            "lebm/mse": (t["rec"].mean() * 2 * self.config.generator.sigma ** 2 / pixels).detach(),
            **prior.metrics("langevin/prior_"),
        }
        metrics["langevin/prior_nonfinite"] = metrics["langevin/prior_nonfinite"] / n  # a fraction of the chains
        if self.model.layers == 2:
            metrics["lebm/log_p_z1_pos"] = t["logc_pos"].mean().detach()
            metrics["lebm/log_p_z1_neg"] = t["logc_neg"].mean().detach()
            with torch.no_grad():  # the scale of p(z1|z2) at the prior's z2: nothing but the data pins it
                metrics["lebm/log_sigma_z1"] = self.model.conditional(prior.state[1])[1].mean()
        if post is not None:
            metrics.update(post.metrics("langevin/posterior_"))
            metrics["langevin/posterior_nonfinite"] = metrics["langevin/posterior_nonfinite"] / n
        else:
            metrics["lebm/log_q"] = t["log_q"].mean().detach()
        return loss, metrics

    # -------------------------------------------------------------------------------------- visuals and health
    def visuals(self, out_dir: Path, nimg: int) -> list[Path]:
        """Prior samples and prior chain strips from fixed noise, posterior chain strips and reconstructions of a
        few data images, the f(z+) / f(z-) curves, and the chains' per-step energy E = -f (training chains averaged
        since the previous visuals, and these test chains)."""
        out_dir.mkdir(parents=True, exist_ok=True)
        s = self.config.sampler
        device = self.ctx.device
        tag = f"nimg-{nimg:012d}"
        steps = s.test_steps or s.prior_steps
        gen = torch.Generator(device=device).manual_seed(derive_seed(self.ctx.seed, _TEST_CHAIN_STREAM))
        prior = sample_prior(self.model, [e.to(device) for e in self.fixed_noise], steps, s.prior_step_size, gen,
                             s.autocast, record_every=max(steps // s.strip_frames, 1))
        rows = min(8, self.ctx.sample_count)
        paths = [out_dir / f"{tag}-samples.png", out_dir / f"{tag}-prior-chains.png",
                 out_dir / f"{tag}-reconstructions.png", out_dir / f"{tag}-posterior-chains.png",
                 out_dir / f"{tag}-energies.png"]
        save_grid(decode_state(self.model, prior.state), paths[0])
        save_grid(strip([decode_state(self.model, [t[:rows] for t in snap]) for snap in prior.snapshots]), paths[1],
                  nrow=len(prior.snapshots))
        post = None
        if self.reference_batch is not None:
            x = self.reference_batch.to(device)
            k = x.shape[0]
            if s.posterior == "langevin":
                start = posterior_start(self.model, [e[:k].to(device) for e in self.fixed_posterior_noise])
                post = sample_posterior(self.model, x, start, s.posterior_steps, s.posterior_step_size, gen,
                                        s.autocast, record_every=max(s.posterior_steps // s.strip_frames, 1))
                frames = [decode_latents(self.model, snap) for snap in post.snapshots]
                recon = frames[-1]
            else:
                with torch.no_grad():
                    recon = self.model.decode(self.model.encode(x, use_mean=True)[0][0])
                frames = [recon]
            save_grid(strip([recon], x), paths[2], nrow=2)
            save_grid(strip(frames, x), paths[3], nrow=len(frames) + 1)
        else:
            paths = [p for p in paths if "reconstructions" not in p.name and "posterior" not in p.name]
        self.curves.plot(paths[-1], f"latent EBM f at nimg={nimg}")
        paths.append(chain_energy_figure(out_dir / f"{tag}-chain-energy.png", nimg,
                                         {"training prior chains": self.prior_trace,
                                          "training posterior chains": self.posterior_trace},
                                         {"test prior chain (fixed noise)": prior, "test posterior chain": post}))
        return paths

    def health(self, metrics: dict[str, float]) -> str | None:
        gap, limit = metrics.get("lebm/f_gap", 0.0), self.config.objective.max_energy_gap
        if not abs(gap) < limit:  # also catches NaN
            return f"|f(z+) - f(z-)| = {abs(gap):.3g} exceeds {limit:g}"
        frac = max(metrics.get("langevin/prior_nonfinite", 0.0), metrics.get("langevin/posterior_nonfinite", 0.0))
        if frac > self.config.objective.max_nonfinite_fraction:
            return f"{frac:.3g} of the chains went non-finite (reset) per step"
        return None

    def shared_state(self):
        return {"method": self.iteration}

    def rank_state(self):
        return {"curves": self.curves}

    def export(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        c = self.config
        bundle = {"kind": "lebm", "generator": dataclasses.asdict(c.generator), "ebm": dataclasses.asdict(c.ebm),
                  "inference": dataclasses.asdict(c.model_inference()), "sampler": dataclasses.asdict(c.sampler)}
        weights = {k: v.detach().float().cpu() for k, v in self.model.state_dict().items()}
        return bundle, weights

    @classmethod
    def describe(cls, config: LEBMConfig):
        model = LatentEBMModel(config.generator, config.ebm, config.model_inference())
        out = [("Generator (g, p(z1|z2))", _Group(model.g, model.top)), ("Latent EBM f", model.f)]
        if model.enc is not None:
            out.append(("Inference model q(z|x)", _Group(model.enc, model.enc_top)))
        return out


class _Group(torch.nn.Module):
    """Several submodules under one title (dry-run parameter summaries)."""

    def __init__(self, *modules: torch.nn.Module | None):
        super().__init__()
        self.parts = torch.nn.ModuleList([m for m in modules if m is not None])


# ------------------------------------------------------------------------------------------------ the model kind
@register("lebm")
class LEBMModel(TrainedModel):
    """A trained LEBM / joint EBM prior model: samples by short-run prior Langevin, reconstructs by short-run
    posterior Langevin (or the inference model)."""

    # steps=0: the same generator under its Gaussian prior (N(0, I), or p(z1|z2) N(z2; 0, I) for two layers), from
    # the same starting noise: what the latent EBM prior is compared against (lebm_supplement.md Table 4).
    baseline: ClassVar[str | None] = "generator (Gaussian prior)"

    def __init__(self, model: LatentEBMModel, sampler: LEBMSamplerConfig):
        self.model = model
        self.sampler = sampler

    @classmethod
    def from_bundle(cls, bundle: dict[str, Any], weights: dict[str, torch.Tensor]) -> "LEBMModel":
        model = LatentEBMModel(GeneratorConfig(**bundle["generator"]), PriorEBMConfig(**bundle["ebm"]),
                               InferenceConfig(**bundle["inference"]))
        model.load_state_dict(weights, strict=True)
        return cls(model, LEBMSamplerConfig(**bundle["sampler"]))

    def to(self, device: torch.device, dtype: torch.dtype = torch.float32) -> "LEBMModel":
        self.model = freeze(self.model, device, dtype)
        return self

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def sample(self, n: int, generator: torch.Generator, options: SampleOptions | None = None) -> Samples:
        """Prior chains from eps ~ N(0, I): `steps` (default: the test length; 0: the Gaussian-prior baseline) of size
        `step_size` (the papers' s, default s0), then x = g(z1) (the decoder mean; `use_mean=False` adds the
        N(0, sigma^2) pixel noise).
        Temperature is not a parameter of this model; only `init=normal` applies."""
        o = options or SampleOptions()
        if o.init != "normal":
            raise ValueError(f"lebm models start their chains from N(0, I); init={o.init!r} is not supported")
        s = self.sampler
        steps = o.steps if o.steps is not None else (s.test_steps or s.prior_steps)  # 0: the baseline
        device = self._device()
        init = self.model.sample_noise(n, generator=generator, device=generator.device)
        init = [e.to(device) for e in init]
        result = sample_prior(self.model, init, steps, o.step_size or s.prior_step_size, generator, s.autocast,
                              record_every=max(steps // o.strip_frames, 1) if o.strip_frames else 0,
                              compile=s.compile)
        images = decode_state(self.model, result.state)
        if o.use_mean is False:
            noise = torch.randn(images.shape, generator=generator, device=generator.device).to(device)
            images = images + self.model.config.sigma * noise
        frames = [decode_state(self.model, snap) for snap in result.snapshots] or None
        return Samples(images, frames)

    def reconstruct(self, x: torch.Tensor, generator: torch.Generator, steps: int | None = None) -> torch.Tensor:
        """g(z1+) for z+ from the posterior chains (K1 steps from N(0, I), as trained) or, for an amortized model,
        the mean of q(z|x)."""
        s = self.sampler
        x = x.to(self._device()).float()
        if s.posterior == "inference":
            with torch.no_grad():
                return self.model.decode(self.model.encode(x, use_mean=True)[0][0])
        eps = [e.to(x.device) for e in self.model.sample_noise(x.shape[0], generator=generator,
                                                               device=generator.device)]
        result = sample_posterior(self.model, x, posterior_start(self.model, eps), steps or s.posterior_steps,
                                  s.posterior_step_size, generator, s.autocast)
        return decode_latents(self.model, result.state)


__all__ = ["LEBMMethod", "LEBMConfig", "LEBMModel", "LEBMSamplerConfig", "LEBMOptimConfig", "LEBMObjectiveConfig",
           "prior_potential", "posterior_potential", "posterior_start", "paper_step_to_eta", "langevin_config", "sample_prior",
           "sample_posterior"]
