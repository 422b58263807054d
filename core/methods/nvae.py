"""Stage 1: the NVAE backbone trained by maximizing the ELBO (vaebm.md Sec. 3.1, Eq. 3; NVAE Sec. 3-4).

    loss = -log p(x|z) + beta * sum_l gamma_l KL_l + lambda * (SR + BN)         (core/objectives/elbo.py)

The same stage trains the papers' MLP VAE on low-dimensional point data (`arch=mlp`: vaebm.md Sec. 5.4, the 2-D
likelihood protocol's backbone). Registered as `nvae-<dataset>`. The `nvae` and `mlp_vae` model kinds (any
noise-space VAE) are rebuilt here too.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from core.methods.base import Method, MethodContext, register_method
from core.methods.bundles import SampleOptions, Samples, TrainedModel, freeze, register
from core.methods.potentials import chain_start, decode, join_state
from core.models.mlp_vae import MLPVAE, MLPVAEConfig
from core.models.noise_space import NoiseSpaceVAE
from core.models.nvae import NVAE
from core.models.nvae_config import NVAEConfig
from core.objectives.elbo import ELBOConfig, kl_balance_weights, nelbo_loss
from core.optim.config import OptimConfig
from core.seeding import derive_seed
from core.visuals import save_grid, save_points

_GRID_STREAM = 0xF17ED  # fixed grid noise: the same images every report and every run


OPTIMIZERS = {"adamax": torch.optim.Adamax, "adam": torch.optim.Adam}


@dataclass
class VAEOptimConfig(OptimConfig):
    algorithm: str = "adamax"  # adamax (NVAE) | adam (the 2-D protocol's MLP VAE)


@dataclass
class NVAEMethodConfig:
    arch: str = "nvae"  # nvae: the hierarchical image VAE | mlp: the papers' MLP VAE for point data (section `mlp`)
    nvae: NVAEConfig = field(default_factory=NVAEConfig)  # the backbone (conf/nvae/<preset>.yaml: diffs over defaults)
    mlp: MLPVAEConfig = field(default_factory=MLPVAEConfig)  # the MLP VAE when arch=mlp (vaebm.md Sec. 5.4)
    objective: ELBOConfig = field(default_factory=ELBOConfig)  # KL warm-up/balancing, spectral + BN regularization
    optim: VAEOptimConfig = field(default_factory=VAEOptimConfig)  # Adamax (NVAE) with warm-up + cosine schedule

    def validate(self, dataset) -> None:
        """Raises ValueError naming the key when the model and the data disagree."""
        self.optim.validate()
        if self.optim.algorithm not in OPTIMIZERS:
            raise ValueError(f"optim.algorithm must be one of {sorted(OPTIMIZERS)}, got {self.optim.algorithm!r}")
        if self.arch not in ("nvae", "mlp"):
            raise ValueError(f"arch must be nvae or mlp, got {self.arch!r}")
        if self.arch == "mlp":  # point data: preflight checks the stored points' dimension (points_dim)
            return
        nvae = self.nvae
        if dataset.resolution not in (None, nvae.image_size):
            raise ValueError(f"dataset.resolution={dataset.resolution} but nvae.image_size={nvae.image_size}")
        if dataset.channels != nvae.in_channels:
            raise ValueError(f"dataset.channels={dataset.channels} but nvae.in_channels={nvae.in_channels}")
        if dataset.num_bits != nvae.num_x_bits:
            raise ValueError(f"dataset.num_bits={dataset.num_bits} but nvae.num_x_bits={nvae.num_x_bits}")

    def points_dim(self) -> int | None:
        """The dimension of the point data the model reads (`mlp.data_dim`), or None: it reads images."""
        return self.mlp.data_dim if self.arch == "mlp" else None


# The noise-space VAE kinds a bundle can describe: kind -> (module class, config class); the bundle stores the config
# under the kind's name, e.g. {"kind": "nvae", "nvae": {...}}.
_VAE_KINDS: dict[str, tuple[type[NoiseSpaceVAE], type]] = {"nvae": (NVAE, NVAEConfig), "mlp_vae": (MLPVAE, MLPVAEConfig)}


def vae_bundle(model: NoiseSpaceVAE) -> dict[str, Any]:
    """The typed description stored beside a noise-space VAE's weights."""
    for kind, (module_cls, _) in _VAE_KINDS.items():
        if isinstance(model, module_cls):
            return {"kind": kind, kind: dataclasses.asdict(model.config)}
    raise TypeError(f"no bundle format for {type(model).__name__}")


def float_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A module's state dict on the CPU with floating tensors in fp32 (what models are published as)."""
    return {k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()
            for k, v in module.state_dict().items()}


@register_method
class NVAEMethod(Method):
    name = "nvae"
    config_class = NVAEMethodConfig
    model_prefix = "nvae"

    def __init__(self, config: NVAEMethodConfig, ctx: MethodContext, backbone=None, backbone_bundle=None):
        super().__init__(config, ctx)
        torch.manual_seed(ctx.seed)  # identical initial weights on every rank
        self.model = build_backbone(config).to(ctx.device)
        self.alpha = kl_balance_weights(self.model.latent_shapes()).to(ctx.device)
        gen = torch.Generator().manual_seed(derive_seed(ctx.seed, _GRID_STREAM))
        self.fixed_noise = self.model.sample_noise(ctx.sample_count, generator=gen, device=torch.device("cpu"))

    def trained_module(self) -> torch.nn.Module:
        return self.model

    def make_optimizer(self, param_groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        o = self.config.optim
        return OPTIMIZERS[o.algorithm](param_groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                       weight_decay=o.weight_decay)

    def loss(self, net: Callable[..., Any], batch: dict[str, Any], nimg: int):
        dtype = next(self.model.parameters()).dtype  # bf16/fp16 once the engine has cast the network
        x = batch["x"].to(self.ctx.device, non_blocking=True).to(dtype)
        tower = net(x).to(torch.float32)  # objectives in fp32 whatever the network runs in
        terms = nelbo_loss(tower, x.float(), nimg / self.ctx.total_nimg, self.config.objective, self.alpha,
                           self.model.spectral_penalty().float(), self.model.batchnorm_penalty().float())
        metrics = {
            "train/nelbo": terms.nelbo.mean().detach(),
            "train/reconstruction": terms.reconstruction.mean().detach(),
            "train/kl": terms.kl_per_group.sum(1).mean().detach(),
            "train/spectral": terms.spectral.detach(),
            "train/batchnorm": terms.batchnorm.detach(),
            "train/kl_coeff": torch.tensor(terms.kl_coeff),
            "train/norm_coeff": torch.tensor(terms.norm_coeff),
        }
        for group, kl in enumerate(terms.kl_per_group.mean(0).detach()):
            metrics[f"kl/group_{group:02d}"] = kl
        return terms.loss, metrics

    @torch.no_grad()
    def visuals(self, out_dir: Path, nimg: int) -> list[Path]:
        """One grid of decoder means per temperature, from fixed noise (what the prior generates, no pixel noise)."""
        out_dir.mkdir(parents=True, exist_ok=True)
        was_training = self.model.training
        self.model.eval()
        dtype = next(self.model.parameters()).dtype
        eps_x, eps_z = self.fixed_noise
        state = join_state(eps_x.to(self.ctx.device, dtype), [e.to(self.ctx.device, dtype) for e in eps_z])
        paths = []
        for t in self.ctx.sample_temperatures:
            path = out_dir / f"nimg-{nimg:012d}-t{t:g}.png"
            if self.config.arch == "mlp":  # points: decoder samples (the model's density), scattered
                x = decode(self.model, state, temperature=t, use_mean=False)
                paths.append(save_points(x, path, f"samples at nimg={nimg}, t={t:g}"))
            else:
                paths.append(save_grid(decode(self.model, state, temperature=t, use_mean=True), path))
        self.model.train(was_training)
        return paths

    def export(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return vae_bundle(self.model), float_state(self.model)

    @classmethod
    def describe(cls, config: NVAEMethodConfig):
        return [("NVAE" if config.arch == "nvae" else "MLP VAE", build_backbone(config))]


def build_backbone(config: NVAEMethodConfig) -> NoiseSpaceVAE:
    """The untrained VAE of `config.arch`."""
    return NVAE(config.nvae) if config.arch == "nvae" else MLPVAE(config.mlp)


class VAEModel(TrainedModel):
    """A trained noise-space VAE: samples by ancestral sampling, likelihoods through `vae`."""

    def __init__(self, model: NoiseSpaceVAE):
        self.model = model

    @classmethod
    def from_bundle(cls, bundle: dict[str, Any], weights: dict[str, torch.Tensor]) -> "VAEModel":
        return cls(load_vae(bundle, weights))

    def to(self, device: torch.device, dtype: torch.dtype = torch.float32) -> "VAEModel":
        self.model = freeze(self.model, device, dtype)
        return self

    @property
    def vae(self) -> NoiseSpaceVAE:
        return self.model

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator, options: SampleOptions | None = None) -> Samples:
        o = options or SampleOptions()
        t = 1.0 if o.temperature is None else o.temperature
        state = chain_start(self.model, n, generator, o.init, o.init_temperature, o.bn_iterations)
        return Samples(decode(self.model, state, t, use_mean=True if o.use_mean is None else o.use_mean))


for _kind in _VAE_KINDS:
    register(_kind)(VAEModel)


def build_vae(bundle: dict[str, Any]) -> NoiseSpaceVAE:
    """An untrained noise-space VAE module from its description ({'kind': 'nvae'|'mlp_vae', ...})."""
    kind = bundle.get("kind")
    if kind not in _VAE_KINDS:
        raise ValueError(f"{kind!r} is not a VAE backbone kind ({', '.join(_VAE_KINDS)})")
    module_cls, config_cls = _VAE_KINDS[kind]
    return module_cls(config_cls(**bundle[kind]))


def load_vae(bundle: dict[str, Any], weights: dict[str, torch.Tensor]) -> NoiseSpaceVAE:
    """`build_vae` with its weights loaded strictly. An NVAE saved before its up-sampling skip became the official
    bilinear, bias-free one (and its top prior sigma 1.01) carries `skip.conv.bias` keys: refused with the reason."""
    model = build_vae(bundle)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        old_skip = [k for k in weights if k.startswith(("dec_up.", "postprocess.")) and k.endswith("skip.conv.bias")]
        if bundle.get("kind") == "nvae" and old_skip:
            raise ValueError("this NVAE was saved by an earlier version of vaebm (nearest-neighbour up-sampling skip "
                             "with a bias, top prior N(0, 1)), a different model than the official NVAE; retrain "
                             "it, or import the official checkpoint (launchers/import_nvae.py)") from err
        raise
    return model
