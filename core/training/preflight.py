"""What a job checks and says before it trains: does the data exist and fit the model, how is each optimizer step's
batch split over the ranks, how long will it take. `dry_run=true` prints all of it; the job runs the data check on
every rank before any collective, so a wrong path or a 64x64 dataset under a 32x32 model ends in seconds with one
line (exit code 2) instead of a shape error deep in the first step.

Time estimates come from the measured figures in docs/benchmarks.md (its fenced ```throughput block: one YAML list
of {method, experiment, device, ranks, images_per_s, date}); a run with no matching figure says so.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from core.training.config import BatchPlan, JobConfig, batch_plan
from data_pipelines.builtin_sets import BUILTIN_SETS_DEFAULT_SIZE
from data_pipelines.errors import DataConfigError, ManifestError

BENCHMARKS = Path(__file__).resolve().parents[2] / "docs" / "benchmarks.md"


@dataclass
class DataCheck:
    """What the job will read, as far as it can be known without reading images."""

    directory: Path | None  # shard directory (None: a built-in set not built yet)
    num_samples: int | None  # samples in the dataset (None: not built yet)
    stored_size: int | None  # side of the stored images (None: point sets)
    side: int | None  # side the model sees (dataset.resolution, else the stored side)
    kind: str  # image | points
    note: str  # one line for the dry run


def check_data(config: JobConfig) -> DataCheck:
    """The manifest exists and the images fit the model: the method's `validate` sees the side it will really get.
    Raises ManifestError (no or unreadable manifest) or DataConfigError (data and model disagree), each one line."""
    from data_pipelines.loader_factory import builtin_dir
    from data_pipelines.manifest import MANIFEST_NAME, load_manifest

    ds = config.dataset
    if ds.path is not None:
        directory = Path(ds.path).expanduser()
        if not (directory / MANIFEST_NAME).is_file():
            hint = ("the directory does not exist" if not directory.exists() else f"it has no {MANIFEST_NAME}")
            raise ManifestError(f"dataset.path={ds.path}: {hint}; write shards there with "
                                f"`python launchers/prepare_data.py source=<images> out={ds.path}`")
        manifest = load_manifest(directory)
        built = True
    else:
        directory = builtin_dir(ds)
        built = (directory / MANIFEST_NAME).is_file()
        manifest = load_manifest(directory) if built else None
    if manifest is not None:
        kind = manifest.kind
        stored = manifest.image_size[0] if manifest.image_size else None
        if manifest.image_size and manifest.image_size[0] != manifest.image_size[1] and ds.resolution is None:
            raise DataConfigError(f"{directory}: images are {manifest.image_size[1]}x{manifest.image_size[0]} "
                                  f"(not square); set dataset.resolution or rebuild with a square crop")
        num = manifest.num_samples
    else:
        kind = "points" if ds.name == "toy2d" else "image"
        stored = ds.size or BUILTIN_SETS_DEFAULT_SIZE.get(ds.name)
        num = None
    side = ds.resolution or stored
    # Point data or images: what the model reads (a method config's `points_dim`, None or absent: images).
    points_dim = getattr(type(config).method_config_class, "points_dim", lambda _: None)(config)
    where = f"{directory}" if built else f"built-in {ds.name}"
    if (kind == "points") != (points_dim is not None):
        raise DataConfigError(f"the data does not fit the model: {where} holds {kind}, but method {config.method} "
                              f"reads {'images' if points_dim is None else f'{points_dim}-D points'}")
    if kind == "points" and manifest is not None and manifest.channels != points_dim:
        raise DataConfigError(f"the data does not fit the model: {where} holds {manifest.channels}-D points, but "
                              f"method {config.method} reads {points_dim}-D points")
    if kind == "image" and side is not None:
        probe = dataclasses.replace(ds, resolution=side)
        try:
            type(config).method_config_class.validate(config, probe)
        except (ValueError, KeyError, TypeError) as err:
            raise DataConfigError(f"the data does not fit the model: {where} gives {side}x{side} images "
                                  f"({'stored' if ds.resolution is None else 'dataset.resolution'}), but "
                                  f"{err.args[0] if err.args else err}") from None
    if built:
        note = (f"{directory}: {num} {'images' if kind == 'image' else 'points'}"
                + (f", stored {stored}x{stored}, model sees {side}x{side}x{ds.channels}" if kind == "image" else ""))
    else:
        note = f"built-in {ds.name}: built on first use into {directory}"
    return DataCheck(directory if built else None, num, stored, side, kind, note)


def measured_throughput(method: str, experiment: str, device: str, ranks: int,
                        source: Path = BENCHMARKS) -> dict[str, Any] | None:
    """The docs' measured figure for this method, preset, device kind and rank count (or the nearest rank count on
    the same device, scaled linearly), or None."""
    if not source.is_file():
        return None
    blocks = re.findall(r"```throughput\n(.*?)```", source.read_text(), flags=re.S)
    rows = [r for block in blocks for r in (yaml.safe_load(block) or [])]
    same = [r for r in rows if r.get("method") == method and r.get("experiment") == experiment
            and r.get("device") == device]
    if not same:
        return None
    best = min(same, key=lambda r: abs(int(r.get("ranks", 1)) - ranks))
    scale = ranks / int(best.get("ranks", 1))
    return {**best, "images_per_s": float(best["images_per_s"]) * scale, "scaled": scale != 1.0}


def plan_lines(config: JobConfig, world_size: int, device: str) -> list[str]:
    """The batch split, the step count and the estimated time, one fact per line."""
    plan: BatchPlan = batch_plan(config.loop, world_size)
    steps = -(-config.loop.total_nimg // plan.global_batch)
    lines = [
        f"ranks: {world_size} ({device})",
        f"global batch: {plan.global_batch} images per optimizer step = {world_size} rank(s) x "
        f"{plan.accumulation} pass(es) x {plan.micro} images (loader.batch_size is set to {plan.micro})",
        f"training: {config.loop.total_nimg} images = {steps} optimizer steps",
    ]
    figure = measured_throughput(config.method, config.experiment, device, world_size)
    if figure is None:
        lines.append(f"estimate: no measured figure for method={config.method} experiment={config.experiment} on "
                     f"{world_size} {device} rank(s) in docs/benchmarks.md")
    else:
        seconds = config.loop.total_nimg / figure["images_per_s"]
        lines.append(f"estimate: {figure['images_per_s']:.1f} images/s -> {seconds / 60:.1f} min of training "
                     f"(measured {figure.get('date', '?')} on {figure.get('ranks', 1)} {device} rank(s)"
                     f"{', scaled linearly to ' + str(world_size) if figure['scaled'] else ''}; "
                     f"nested stages and the end-of-run report not included)")
    return lines
