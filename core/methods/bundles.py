"""Typed model bundles: what a trained model is, how to rebuild it, and what it can do.

A published model is a JSON description (`kind` plus typed config sections) and a flat state dict. Each kind is a
`TrainedModel` subclass registered with `@register("<kind>")`; `build_model` is the one place that turns a bundle back
into modules (strict loading, nothing unpickled). Jobs dispatch on capabilities, never on kind strings:

- `sample(n, generator, options)`: images in [-1, 1] (every kind);
- `vae`: the noise-space VAE inside (encode, ELBO/IWAE likelihoods), or None;
- `energy(x)`: an energy with log density log p_vae(x) - E(x) + const, or None for a plain VAE;
- `baseline`: the name of what zero MCMC steps give (the model without its method), or None;
- `reconstruct(x, generator)`: reconstructions through the model's inference (posterior chains or encoder), or None.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch


@dataclass
class SampleOptions:
    """How to draw samples at test time; None fields fall back to what the model was trained with."""

    steps: int | None = None  # MCMC steps (energy-based kinds); None: the model's test-time length; 0: the baseline
    step_size: float | None = None  # MCMC step size; None: as trained
    temperature: float | None = None  # prior temperature; None: as trained (1.0 for a plain VAE)
    use_mean: bool | None = None  # images are the decoder mean (True) or a decoder sample (False); None: the mean
    init: str = "normal"  # normal: chains start at eps ~ N(0, I) | low_temperature: encoded low-temperature samples
    init_temperature: float = 0.7  # temperature of those samples
    bn_iterations: int = 20  # BN re-estimation passes for low_temperature init
    strip_frames: int = 0  # about this many evenly spaced chain snapshots (chain strips); 0: none


@dataclass
class Samples:
    images: torch.Tensor  # (n, C, H, W) in [-1, 1], fp32
    frames: list[torch.Tensor] | None = None  # chain snapshots decoded to images (when strip_frames > 0)


class TrainedModel(abc.ABC):
    """A frozen, evaluation-mode model rebuilt from a bundle."""

    kind: str = "?"  # the bundle's kind, set by `build_model`
    energy_based: ClassVar[bool] = False  # `energy(x)` is defined (log density log p_vae - E + const)
    reweighted_prior: ClassVar[bool] = False  # `prior_log_tilt(tower)` is defined (prior p(z) r(z) / Z)
    # What `sample(n, gen, SampleOptions(steps=0))` draws, from the same starting noise as the method's chains (e.g.
    # "backbone"): the reference the end-of-run report compares against; None: the kind has no baseline.
    baseline: ClassVar[str | None] = None

    @classmethod
    @abc.abstractmethod
    def from_bundle(cls, bundle: dict[str, Any], weights: dict[str, torch.Tensor]) -> "TrainedModel":
        """Rebuild from the JSON description and the state dict (strict)."""

    @abc.abstractmethod
    def to(self, device: torch.device, dtype: torch.dtype = torch.float32) -> "TrainedModel": ...

    @abc.abstractmethod
    def sample(self, n: int, generator: torch.Generator, options: SampleOptions | None = None) -> Samples: ...

    @property
    def vae(self):
        """The noise-space VAE inside (core.models.NoiseSpaceVAE), or None."""
        return None

    def reconstruct(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor | None:
        """Reconstructions of x (same shape, model space) through the model's inference, or None if it has none.
        Default: a VAE inside reconstructs with its decoder mean at a posterior sample."""
        if self.vae is None:
            return None
        with torch.no_grad():
            return self.vae.posterior(x).x_dist.mu.float()

    def energy(self, x: torch.Tensor) -> torch.Tensor | None:
        """Per-sample energy E(x) of an energy-refined model (log h = log p_vae - E - log Z), or None."""
        return None

    def prior_log_tilt(self, tower) -> torch.Tensor | None:
        """log r(z), (batch,) float64, for a model whose prior is the VAE's reweighted, p(z) r(z) / Z (NCP-VAE:
        sum_k log r_k; the joint latent EBM prior: f_alpha), at the latents of a walk of `vae` (a TowerPass); None
        when the prior is the VAE's own. Lets `metric=iwae` estimate the model's log-likelihood."""
        return None


MODEL_KINDS: dict[str, type[TrainedModel]] = {}


def register(kind: str) -> Callable[[type[TrainedModel]], type[TrainedModel]]:
    """Class decorator: bundles with `kind` are rebuilt by this class."""
    def wrap(cls: type[TrainedModel]) -> type[TrainedModel]:
        if kind in MODEL_KINDS and MODEL_KINDS[kind] is not cls:
            raise ValueError(f"model kind {kind!r} registered twice")
        MODEL_KINDS[kind] = cls
        return cls
    return wrap


def build_model(bundle: dict[str, Any], weights: dict[str, torch.Tensor],
                device: torch.device | str = "cpu") -> TrainedModel:
    """The one place a bundle becomes a model: frozen, eval mode, on `device`."""
    import core.methods  # noqa: F401  (registers every kind)

    kind = bundle.get("kind")
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; known kinds: {sorted(MODEL_KINDS)}")
    model = MODEL_KINDS[kind].from_bundle(bundle, weights).to(torch.device(device))
    model.kind = kind
    return model


def sub_state(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of a flat state dict under `prefix.`, with the prefix removed."""
    return {k[len(prefix) + 1:]: v for k, v in weights.items() if k.startswith(prefix + ".")}


def freeze(module: torch.nn.Module, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A model that is only evaluated: eval mode (BN uses running statistics), no parameter gradients."""
    module = module.to(device=device, dtype=dtype).eval()
    module.requires_grad_(False)
    return module
