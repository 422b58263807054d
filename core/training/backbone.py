"""Finding and loading a frozen backbone for stage 2 (DESIGN.md "Seams": the backbone stays outside DeepSpeed).

A backbone reference is an MLflow model URI (`models:/nvae-<dataset>@latest`, `runs:/...`) or a local directory: a
run directory (its `model/` is used) or a model directory written by `core.tracking.write_model_dir`.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from core.models.mlp_vae import MLPVAE, MLPVAEConfig
from core.models.noise_space import NoiseSpaceVAE
from core.models.nvae import NVAE
from core.models.nvae_config import NVAEConfig
from core.tracking import load_registered_model


class BackboneNotFound(LookupError):
    """The reference names no loadable model (not registered yet, or a directory without one)."""


def build_backbone(bundle: dict[str, Any]) -> NoiseSpaceVAE:
    """Module from its typed description ({'kind': 'nvae'|'mlp_vae', ...}); weights are loaded separately."""
    kind = bundle.get("kind")
    if kind == "nvae":
        return NVAE(NVAEConfig(**bundle["nvae"]))
    if kind == "mlp_vae":
        return MLPVAE(MLPVAEConfig(**bundle["mlp_vae"]))
    raise ValueError(f"unknown backbone kind {kind!r}")


def load_backbone(reference: str, tracking_uri: str | None, device: torch.device,
                  dtype: torch.dtype = torch.float32) -> tuple[NoiseSpaceVAE, dict[str, Any]]:
    """Frozen backbone (eval mode, no gradients, strict load) and its bundle."""
    path = Path(reference).expanduser()
    if "://" not in reference and (path / "model").is_dir():
        path = path / "model"
    source = str(path) if "://" not in reference else reference
    try:
        bundle, state = load_registered_model(source, tracking_uri=tracking_uri)
    except Exception as err:  # MLflow raises several types for "no such model / alias / run"
        raise BackboneNotFound(f"no backbone at {reference}: {err}") from err
    model = build_backbone(bundle)
    model.load_state_dict(state, strict=True)
    return freeze(model, device, dtype), bundle


def freeze(model: NoiseSpaceVAE, device: torch.device, dtype: torch.dtype) -> NoiseSpaceVAE:
    """Stage 2 never trains the backbone: eval mode (BN uses running statistics), no parameter gradients."""
    model = model.to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    return model


def backbone_bundle(model: NoiseSpaceVAE) -> dict[str, Any]:
    """The typed description stored beside a backbone's weights."""
    if isinstance(model, NVAE):
        return {"kind": "nvae", "nvae": dataclasses.asdict(model.config)}
    if isinstance(model, MLPVAE):
        return {"kind": "mlp_vae", "mlp_vae": dataclasses.asdict(model.config)}
    raise TypeError(f"no bundle format for {type(model).__name__}")
