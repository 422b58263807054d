"""The data suite: loader throughput (images/s) for each backend x stored size x format on photos256 crops.

Backends: `torch` (DataLoader, `workers` processes, Pillow decode), `dali` (this package's DALI loader: CPU pipeline
without a GPU, `device="mixed"` decoding with one), `dali-reader` (DALI's own `fn.readers.webdataset` on the same
shards and indexes with identical decode/flip/scale, for comparison; it cannot follow the exact-once order). Rows
with `resize` decode the stored size and resize at load time. The datasets are built on first use.
"""
from __future__ import annotations

import time
from pathlib import Path

from core.evaluation.bench.config import DataBenchConfig


def _dataset(cfg: DataBenchConfig, size: int, fmt: str) -> Path:
    from data_pipelines import PrepareConfig, build_dataset
    from data_pipelines.config import default_cache_dir

    out = Path(cfg.cache_dir or default_cache_dir() / "bench") / f"photos{size}-{fmt}-{cfg.num_samples}"
    build_dataset(PrepareConfig(source="photos256", out=str(out), size=size, format=fmt, num_samples=cfg.num_samples),
                  progress=True)
    return out


def _rate(batches, cfg: DataBenchConfig) -> float:
    it = iter(batches)
    for _ in range(cfg.warmup_batches):
        next(it)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < cfg.seconds:
        n += len(next(it)["x"])
    return n / (time.perf_counter() - start)


def _dali_reader_batches(path: Path, fmt: str, cfg: DataBenchConfig, resolution: int | None):
    import torch
    from nvidia.dali import fn, pipeline_def, types

    from data_pipelines.dali_loader import resolve_dali_device
    from data_pipelines.manifest import load_manifest

    manifest = load_manifest(path)
    gpu = resolve_dali_device(cfg.dali_device) == "gpu"

    @pipeline_def(batch_size=cfg.batch_size, num_threads=cfg.workers, device_id=0 if gpu else None)
    def pipe():
        images, labels = fn.readers.webdataset(
            paths=[str(path / s.tar) for s in manifest.shards],
            index_paths=[str(path / s.index) for s in manifest.shards],
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


def run_data(cfg: DataBenchConfig, log=print) -> list[tuple[str, str, str, float]]:
    """(backend, size label, format, images/s) per row; DALI rows are skipped where DALI is not installed."""
    from data_pipelines import DatasetConfig, LoaderConfig, build_loader
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
                                          dali_threads=max(cfg.workers, 1), dali_device=cfg.dali_device)
                        batches = build_loader(ds, lc, rank=0, world_size=1, seed=0)
                        name = backend if backend == "torch" else f"dali-{resolve_dali_device(cfg.dali_device)}"
                    rate = _rate(batches, cfg)
                    rows.append((name, label, fmt, rate))
                    log(f"  {name:18s} {label:>9s} {fmt:4s} {rate:10.0f} img/s")
    return rows
