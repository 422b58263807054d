"""Sampling from a trained VAEBM: load the registered model, run test-time Langevin chains, write images.

Test-time chains start from fresh (eps_x, eps_z) ~ N(0, I) and run longer than in training (16/20/24 steps, vaebm.md
App. E). Optionally they start from a low-temperature VAE sample: BN statistics are re-estimated at that temperature
(NVAE Sec. 5), a sample x is drawn, then encoded with the *original* statistics and inverted to noise (App. E).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core.models.energy import EnergyNet, EnergyNetConfig
from core.models.noise_space import NoiseSpaceVAE
from core.sampling.langevin import LangevinConfig, run_langevin
from core.sampling.targets import make_vaebm_potential, split_state
from core.tracking import load_registered_model
from core.training.backbone import build_backbone, freeze
from core.evaluation.fid import to_uint8
from core.visuals import save_grid


@dataclass
class VAEBMModel:
    """A trained VAEBM ready to sample: frozen backbone, frozen energy network and the training sampler settings."""

    backbone: NoiseSpaceVAE
    energy: EnergyNet
    sampler: dict[str, Any]  # Stage2Config.sampler as trained (target, use_mean, temperature, langevin, test_steps)
    bundle: dict[str, Any]


def load_vaebm(reference: str, device: torch.device, tracking_uri: str | None = None) -> VAEBMModel:
    """From `models:/vaebm-<dataset>@latest`, `runs:/...`, a run directory or a model directory."""
    path = Path(reference).expanduser()
    if "://" not in reference and (path / "model").is_dir():
        reference = str(path / "model")
    bundle, state = load_registered_model(reference, tracking_uri=tracking_uri)
    if bundle.get("kind") != "vaebm":
        raise ValueError(f"{reference} is a {bundle.get('kind')!r} model, not a VAEBM")
    backbone = build_backbone(bundle["backbone"])
    backbone.load_state_dict({k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")},
                             strict=True)
    energy = EnergyNet(EnergyNetConfig(**bundle["energy"]))
    energy.load_state_dict({k[len("energy."):]: v for k, v in state.items() if k.startswith("energy.")}, strict=True)
    energy = energy.to(device).eval().requires_grad_(False)
    return VAEBMModel(freeze(backbone, device, torch.float32), energy, bundle["sampler"], bundle)


@torch.no_grad()
def readjusted_bn_sample(backbone: NoiseSpaceVAE, batch: int, temperature: float, iterations: int,
                         generator: torch.Generator) -> torch.Tensor:
    """x from the VAE at `temperature` with BN statistics re-estimated at that temperature (NVAE Sec. 5).

    The backbone's own statistics are restored before returning.
    """
    bns = [m for m in backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.momentum) for m in bns]
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the re-estimation passes
            m.train()
        for _ in range(iterations):
            eps_x, eps_z = backbone.sample_noise(batch, generator=generator)
            backbone.generate(eps_z, eps_x, temperature)
        for m in bns:
            m.eval()
        eps_x, eps_z = backbone.sample_noise(batch, generator=generator)
        return backbone.T_z(eps_z, temperature).x_dist.mu
    finally:
        for m, (mean, var, momentum) in zip(bns, saved):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.momentum = momentum
            m.eval()


@torch.no_grad()
def low_temperature_init(backbone: NoiseSpaceVAE, batch: int, temperature: float, bn_iterations: int,
                         generator: torch.Generator) -> list[torch.Tensor]:
    """Chain start (vaebm.md App. E): encode a low-temperature sample, invert (x, z) to (eps_x, eps_z)."""
    x = readjusted_bn_sample(backbone, batch, temperature, bn_iterations, generator)
    tower = backbone.posterior(x)
    eps_x, eps_z = backbone.inverse(x, tower.z)
    return [eps_x, *eps_z]


@dataclass
class ChainSettings:
    steps: int  # Langevin steps
    step_size: float  # eta
    temperature: float  # prior temperature inside T_z
    record_every: int = 0  # keep snapshots for chain strips


def sample_vaebm(model: VAEBMModel, batch: int, settings: ChainSettings, generator: torch.Generator,
                 init: list[torch.Tensor] | None = None):
    """Run test-time chains; returns (x in [-1, 1], Langevin result)."""
    sampler = model.sampler
    device = next(model.energy.parameters()).device
    if init is None:
        eps_x, eps_z = model.backbone.sample_noise(batch, generator=generator, device=device)
        init = [eps_x, *eps_z]
    potential = make_vaebm_potential(model.backbone, model.energy, mode=sampler["target"],
                                     temperature=settings.temperature, use_mean=sampler["use_mean"])
    lcfg = dataclasses.replace(LangevinConfig(**sampler["langevin"]), num_steps=settings.steps,
                               step_size=settings.step_size, record_every=settings.record_every)
    result = run_langevin(potential, init, lcfg, generator=generator)
    with torch.no_grad():
        eps_x, eps_z = split_state(result.state)
        x, tower = model.backbone.generate(eps_z, eps_x, settings.temperature)
        images = tower.x_dist.mu if sampler["use_mean"] else x
    return images.float(), result


def run_sampling(config, resolved: dict[str, Any]) -> Path:
    """The sampling job: every rank draws its share of `n` samples, seeded by (seed, rank, batch)."""
    import numpy as np
    import torchvision

    from core import dist as vdist
    from core.tracking import resolve_tracking_uri

    info = vdist.init_distributed(config.dist_timeout_s)
    model = load_vaebm(config.model, info.device, resolve_tracking_uri(config.tracking))
    trained = model.sampler
    settings = ChainSettings(steps=config.steps or trained["test_steps"],
                             step_size=config.step_size or trained["langevin"]["step_size"],
                             temperature=config.temperature or trained["temperature"])
    out = Path(config.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    mine = range(info.rank, config.n, info.world_size)  # global sample indices of this rank
    images: list[np.ndarray] = []
    for b, start in enumerate(range(0, len(mine), config.batch_size)):
        indices = list(mine[start:start + config.batch_size])
        gen = torch.Generator(device=info.device).manual_seed(vdist.derive_seed(config.seed, info.rank, b))
        init = None
        if config.init == "low_temperature":
            init = low_temperature_init(model.backbone, len(indices), config.init_temperature, config.bn_iterations,
                                        gen)
        x, _ = sample_vaebm(model, len(indices), settings, gen, init=init)
        u8 = to_uint8(x).cpu()  # exactly the FID conversion: clamp, (x+1)/2, round (no per-image min-max)
        if config.format == "png":
            for i, img in zip(indices, u8):
                torchvision.io.write_png(img, str(out / f"{i:06d}.png"))
        images.append(u8.numpy())
    if config.format == "npz":
        np.savez(out / f"samples-rank{info.rank}.npz", images=np.concatenate(images), indices=np.array(list(mine)))
    if info.is_rank0 and config.grid:
        gen = torch.Generator(device=info.device).manual_seed(vdist.derive_seed(config.seed, 0xC4A1))
        strip = dataclasses.replace(settings, record_every=max(settings.steps // 8, 1))
        x, result = sample_vaebm(model, min(8, config.n), strip, gen)
        frames = [sample_frame(model, snap, settings.temperature) for snap in result.snapshots]
        save_grid(torch.stack(frames, 1).flatten(0, 1), out / "chains.png", nrow=len(frames))
        first = torch.from_numpy(np.concatenate(images)[:64]).float() / 127.5 - 1
        save_grid(first, out / "grid.png", nrow=8)
    vdist.barrier()
    return out


@torch.no_grad()
def sample_frame(model: VAEBMModel, state: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """Image of a chain state (for chain strips, vaebm.md Fig. 2b)."""
    eps_x, eps_z = split_state(state)
    x, tower = model.backbone.generate(eps_z, eps_x, temperature)
    return (tower.x_dist.mu if model.sampler["use_mean"] else x).float()


def describe_sampling(config, resolved: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(resolved, sort_keys=False)
