"""Loader throughput: images/s for each backend x stored size x format (photos256 crops built on first use).

    python launchers/bench_data.py                                   # quick: ~3 s per row
    python launchers/bench_data.py seconds=10 batch_size=128 workers=8 backends=[torch,dali]

Backends: `torch` (DataLoader, `workers` processes, Pillow decode), `dali` (this package's DALI loader: CPU pipeline
here, `device="mixed"` decoding when a GPU is present), `dali-reader` (DALI's own `fn.readers.webdataset` on the
same shards and indexes with identical decode/flip/scale, for comparison; it cannot follow the exact-once order).
Rows with `resize` decode the stored size and resize at load time (the issue's 256->64 reference measurement).
"""
from __future__ import annotations

import logging
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from a checkout without relying on how the package was installed

from omegaconf import OmegaConf  # noqa: E402
from omegaconf.errors import OmegaConfBaseException  # noqa: E402

from data_pipelines import DataConfigError, DatasetConfig, LoaderConfig, PrepareConfig, build_dataset  # noqa: E402
from data_pipelines.config import default_cache_dir  # noqa: E402


@dataclass
class BenchConfig:
    """Options of bench_data.py (key=value)."""

    sizes: list[int] = field(default_factory=lambda: [32, 256])  # stored image sides
    formats: list[str] = field(default_factory=lambda: ["png", "jpg"])  # stored encodings
    backends: list[str] = field(default_factory=lambda: ["torch", "dali", "dali-reader"])  # what to time
    resize: int | None = 64  # also time load-time resize of larger stored images to this side (None: skip)
    num_samples: int = 512  # photos256 crops per dataset (the stream cycles through them)
    batch_size: int = 64  # per batch
    workers: int = 2  # torch DataLoader workers / DALI threads
    seconds: float = 3.0  # timed duration per row, after warmup
    warmup_batches: int = 3  # untimed batches first (worker start, pipeline build)
    num_bits: int = 8  # quantization, as training would use
    dali_device: str = "auto"  # auto | cpu | gpu
    cache_dir: str | None = None  # where bench datasets are built (default: <dataset cache>/bench)


def _dataset(cfg: BenchConfig, size: int, fmt: str) -> Path:
    out = Path(cfg.cache_dir or default_cache_dir() / "bench") / f"photos{size}-{fmt}-{cfg.num_samples}"
    build_dataset(PrepareConfig(source="photos256", out=str(out), size=size, format=fmt, num_samples=cfg.num_samples),
                  progress=True)
    return out


def _time(batches, cfg: BenchConfig) -> float:
    it = iter(batches)
    for _ in range(cfg.warmup_batches):
        next(it)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < cfg.seconds:
        n += len(next(it)["x"])
    return n / (time.perf_counter() - start)


def _dali_reader_batches(path: Path, fmt: str, cfg: BenchConfig, resolution: int | None):
    import torch
    from nvidia.dali import fn, pipeline_def, types

    from data_pipelines.dali_loader import resolve_dali_device
    from data_pipelines.manifest import load_manifest

    manifest = load_manifest(path)
    gpu = resolve_dali_device(cfg.dali_device) == "gpu"

    @pipeline_def(batch_size=cfg.batch_size, num_threads=cfg.workers, device_id=0 if gpu else None)
    def pipe():
        images, labels = fn.readers.webdataset(
            paths=[str(path / s.tar) for s in manifest.shards], index_paths=[str(path / s.index) for s in manifest.shards],
            ext=[fmt, "label"], dtypes=[types.UINT8, types.INT32], missing_component_behavior="error",
            random_shuffle=True, initial_fill=256, seed=0, name="reader")
        images = fn.decoders.image(images, device="mixed" if gpu else "cpu", output_type=types.RGB)
        if resolution is not None:
            images = fn.resize(images, resize_x=resolution, resize_y=resolution, antialias=True)
        images = fn.flip(images, horizontal=fn.random.coin_flip())
        x = fn.cast(fn.transpose(images, perm=[2, 0, 1]), dtype=types.FLOAT) / 255.0 * 2.0 - 1.0
        return x, labels

    p = pipe()
    p.build()
    while True:
        x, _ = p.run()
        yield {"x": torch.empty(len(x))}  # outputs stay in DALI buffers; the count is what is timed


def run(cfg: BenchConfig) -> list[tuple[str, str, str, float]]:
    from data_pipelines import build_loader
    from data_pipelines.dali_loader import dali_available, resolve_dali_device

    rows = []
    for size in cfg.sizes:
        for fmt in cfg.formats:
            path = _dataset(cfg, size, fmt)
            for resolution in [None] + ([cfg.resize] if cfg.resize and cfg.resize < size else []):
                label = f"{size}" if resolution is None else f"{size}->{resolution}"
                for backend in cfg.backends:
                    if backend.startswith("dali") and not dali_available():
                        continue
                    if backend == "dali-reader":
                        batches = _dali_reader_batches(path, fmt, cfg, resolution)
                        name = f"dali-reader-{resolve_dali_device(cfg.dali_device)}"
                    else:
                        ds = DatasetConfig(name="bench", path=str(path), resolution=resolution, flip=True,
                                           num_bits=cfg.num_bits)
                        lc = LoaderConfig(backend=backend, batch_size=cfg.batch_size, num_workers=cfg.workers,
                                          dali_threads=cfg.workers, dali_device=cfg.dali_device)
                        batches = build_loader(ds, lc, rank=0, world_size=1, seed=0)
                        name = backend if backend == "torch" else f"dali-{resolve_dali_device(cfg.dali_device)}"
                    rate = _time(batches, cfg)
                    rows.append((name, label, fmt, rate))
                    print(f"  {name:18s} {label:>9s} {fmt:4s} {rate:10.0f} img/s", flush=True)
    return rows


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING)
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(BenchConfig), OmegaConf.from_dotlist(argv)))
        bad = set(cfg.backends) - {"torch", "dali", "dali-reader"}
        if bad or set(cfg.formats) - {"png", "jpg"}:
            raise DataConfigError(f"backends must be torch|dali|dali-reader and formats png|jpg, got {cfg.backends} "
                                  f"{cfg.formats}")
    except (OmegaConfBaseException, DataConfigError, ValueError) as e:
        print(f"bench_data: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    import os

    print(f"# {platform.machine()}, {os.cpu_count()} CPUs, batch {cfg.batch_size}, workers/threads {cfg.workers}, "
          f"{cfg.seconds:g} s per row")
    rows = run(cfg)
    print("\n| backend | size | format | images/s |\n| --- | --- | --- | ---: |")
    for name, label, fmt, rate in rows:
        print(f"| {name} | {label} | {fmt} | {rate:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
