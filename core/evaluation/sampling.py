"""The sampling job behind `launchers/sample.py`: any registered model that can sample, on any number of ranks.

Energy-based kinds run their test-time chains (16/20/24 Langevin steps for VAEBM, vaebm.md App. E), optionally from
encoded low-temperature VAE samples (`init=low_temperature`); plain VAEs sample ancestrally. The job dispatches on
what the model can do (`TrainedModel.sample`), never on its kind.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from core.tracking import TrackingConfig
from core.training.config import ConfigError


@dataclass
class SampleConfig:
    model: str = "models:/vaebm-digits@latest"  # MLflow model URI, run directory or model directory
    n: int = 64  # samples in total (all ranks together)
    out: str = "samples"  # output directory
    format: str = "png"  # png: one file per image | npz: one uint8 array per rank (samples-rank<r>.npz)
    batch_size: int = 64  # chains per rank at a time
    seed: int = 0  # samples are a function of (seed, rank, batch index)
    steps: int | None = None  # Langevin steps; None: the model's test-time length (16/20/24 in App. E)
    step_size: float | None = None  # None: the training step size (App. E uses it at test time too)
    temperature: float | None = None  # prior temperature; None: as trained
    init: str = "normal"  # normal: eps ~ N(0, I) | low_temperature: encoded low-temperature VAE samples (App. E)
    init_temperature: float = 0.7  # temperature of those VAE samples
    bn_iterations: int = 20  # BN re-estimation passes for low_temperature init
    grid: bool = True  # also write grid.png (first 64 samples) and chains.png (a chain strip) on rank 0
    progress: bool = True  # a progress bar with the ETA on rank 0 (batches of this rank)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # only for resolving models:/ URIs
    dist_timeout_s: float = 600.0  # collective timeout
    dry_run: bool = False  # print the resolved config and exit

    def validate(self) -> None:
        def req(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        req(self.n > 0 and self.batch_size > 0, "n and batch_size must be positive")
        req(self.format in ("png", "npz"), f"format must be png or npz, got {self.format!r}")
        req(self.init in ("normal", "low_temperature"), "init must be normal or low_temperature")
        req(self.steps is None or self.steps >= 1, "steps must be >= 1")
        req(self.step_size is None or self.step_size > 0, "step_size must be > 0")

    def options(self, strip_frames: int = 0):
        from core.methods import SampleOptions

        return SampleOptions(steps=self.steps, step_size=self.step_size, temperature=self.temperature,
                             init=self.init, init_temperature=self.init_temperature,
                             bn_iterations=self.bn_iterations, strip_frames=strip_frames)


def load_trained_model(reference: str, device: torch.device, tracking_uri: str | None):
    """Any published model (frozen, eval mode) from an MLflow URI, a run directory or a model directory."""
    from core.methods import build_model
    from core.training.checkpoint import read_model

    bundle, weights = read_model(reference, tracking_uri)
    return build_model(bundle, weights, device)


def run_sampling(config: SampleConfig, resolved: dict[str, Any]) -> Path:
    """Every rank draws its share of `n` samples, seeded by (seed, rank, batch)."""
    import numpy as np
    import torchvision
    from tqdm import tqdm

    from core import dist as vdist
    from core.evaluation.fid import to_uint8
    from core.tracking import resolve_tracking_uri
    from core.visuals import save_grid

    info = vdist.init_distributed(config.dist_timeout_s)
    model = load_trained_model(config.model, info.device, resolve_tracking_uri(config.tracking))
    out = Path(config.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    mine = range(info.rank, config.n, info.world_size)  # global sample indices of this rank
    images: list[np.ndarray] = []
    t0 = time.perf_counter()
    batches = tqdm(range(0, len(mine), config.batch_size), desc="sampling", unit="batch",
                   disable=not (info.is_rank0 and config.progress))
    for b, start in enumerate(batches):
        indices = list(mine[start:start + config.batch_size])
        gen = torch.Generator(device=info.device).manual_seed(vdist.derive_seed(config.seed, info.rank, b))
        u8 = to_uint8(model.sample(len(indices), gen, config.options()).images).cpu()  # the FID conversion
        if config.format == "png":
            for i, img in zip(indices, u8):
                torchvision.io.write_png(img, str(out / f"{i:06d}.png"))
        images.append(u8.numpy())
    if config.format == "npz":
        np.savez(out / f"samples-rank{info.rank}.npz", images=np.concatenate(images), indices=np.array(list(mine)))
    if info.is_rank0 and config.grid:
        gen = torch.Generator(device=info.device).manual_seed(vdist.derive_seed(config.seed, 0xC4A1))
        strip = model.sample(min(8, config.n), gen, config.options(strip_frames=8))
        if strip.frames:
            save_grid(torch.stack(strip.frames, 1).flatten(0, 1), out / "chains.png", nrow=len(strip.frames))
        first = torch.from_numpy(np.concatenate(images)[:64]).float() / 127.5 - 1
        save_grid(first, out / "grid.png", nrow=8)
    vdist.barrier()
    if info.is_rank0:
        what = "one PNG each" if config.format == "png" else f"samples-rank<r>.npz, {info.world_size} file(s)"
        print(f"wrote {config.n} samples ({what}) to {out} in {time.perf_counter() - t0:.1f} s on "
              f"{info.world_size} rank(s)", flush=True)
    return out


def describe_sampling(config: SampleConfig, resolved: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(resolved, sort_keys=False)
