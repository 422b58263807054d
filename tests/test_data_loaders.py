"""Loaders (data_pipelines issue 3): exact-once coverage over ranks x workers, resume, bad input, DALI == torch."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipelines import (DataCorruptionError, DatasetConfig, LoaderConfig, PrepareConfig, build_dataset,
                            build_loader, quantize, resolve_dataset_dir, to_model_range)
from data_pipelines.manifest import load_manifest
from data_pipelines.shard_index import read_index

HAS_DALI = True
try:
    import nvidia.dali  # noqa: F401
except ImportError:
    HAS_DALI = False
needs_dali = pytest.mark.skipif(not HAS_DALI, reason="nvidia-dali not installed")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loader-shards")
    out = {}
    # one shard only: fewer shards than ranks x workers (2 x 2)
    for name, cfg in {
        "digits": PrepareConfig(source="digits", size=16),
        "digits4": PrepareConfig(source="digits", size=16, samples_per_shard=500),
        "photos_png": PrepareConfig(source="photos256", num_samples=40, size=32, format="png", samples_per_shard=16),
        "photos_jpg": PrepareConfig(source="photos256", num_samples=40, size=32, format="jpg"),
        "toy": PrepareConfig(source="toy2d", num_samples=5000),
    }.items():
        cfg.out = str(root / name)
        build_dataset(cfg, progress=False)
        out[name] = root / name
    return out


def _loader(path: Path, rank=0, world_size=1, seed=0, cur_nimg=0, backend="torch", **kw):
    ds_fields = {k: kw.pop(k) for k in list(kw) if k in DatasetConfig.__dataclass_fields__}
    ds = DatasetConfig(name="test", path=str(path), **ds_fields)
    lc = LoaderConfig(backend=backend, **{"num_workers": 0, "batch_size": 32, **kw})
    return build_loader(ds, lc, rank=rank, world_size=world_size, seed=seed, cur_nimg=cur_nimg)


def _take(it, n):
    return [b for _, b in zip(range(n), it)]


def test_epoch_coverage_2_ranks_x_2_workers_single_shard(shards):
    n = load_manifest(shards["digits"]).num_samples
    assert len(load_manifest(shards["digits"]).shards) == 1
    seen, counts = [], []
    for rank in (0, 1):
        loader = _loader(shards["digits"], rank=rank, world_size=2, seed=7, num_workers=2, batch_size=64)
        batches = list(loader.epoch(3))
        counts.append(len(batches))
        for b in batches:
            assert b["x"].shape == (64, 3, 16, 16) and b["x"].dtype == torch.float32
            seen.append(b["index"][~b["is_pad"]])
    assert counts[0] == counts[1] == -(-n // 128)
    seen = torch.cat(seen).numpy()
    assert len(seen) == n and set(seen.tolist()) == set(range(n))  # disjoint and complete


def test_stream_coverage_and_order_is_a_function_of_seed_and_epoch(shards):
    n = 1797
    per_rank = [torch.cat([b["index"] for b in _take(iter(_loader(shards["digits4"], rank=r, world_size=2,
                                                                   seed=1, num_workers=2, batch_size=50)), 18)])
                for r in (0, 1)]
    # rank r holds blocks r, r+2, ... of 50 positions; reassemble the global stream
    stream = torch.stack([p.view(-1, 50) for p in per_rank], 1).reshape(-1).numpy()
    assert sorted(stream[:n].tolist()) == list(range(n))  # epoch 0 exactly once
    assert len(set(stream[n:].tolist())) == len(stream) - n  # epoch 1 starts a fresh permutation, no repeats
    assert not np.array_equal(stream[:100], stream[n : n + 100])
    again = torch.cat([b["index"] for b in _take(iter(_loader(shards["digits4"], rank=0, world_size=2, seed=1,
                                                               batch_size=50)), 18)])
    assert torch.equal(again, per_rank[0])  # workers do not change the order
    other = torch.cat([b["index"] for b in _take(iter(_loader(shards["digits4"], seed=2, batch_size=50)), 2)])
    assert not torch.equal(other, per_rank[0][:100])


def test_resume_from_cursor_neither_repeats_nor_skips(shards):
    path = shards["digits4"]
    full = [torch.cat([b["index"] for b in _take(iter(_loader(path, rank=r, world_size=2, seed=3, batch_size=40)),
                                                 50)]) for r in (0, 1)]
    first = [_loader(path, rank=r, world_size=2, seed=3, batch_size=40) for r in (0, 1)]
    head = [torch.cat([b["index"] for b in _take(iter(l), 20)]) for l in first]
    cursor = first[0].cur_nimg
    assert cursor == first[1].cur_nimg == 20 * 80
    tail = [torch.cat([b["index"] for b in _take(iter(_loader(path, rank=r, world_size=2, seed=3, batch_size=40,
                                                               cur_nimg=cursor)), 30)]) for r in (0, 1)]
    for r in (0, 1):  # crosses the epoch boundary at 1797
        assert torch.equal(torch.cat([head[r], tail[r]]), full[r])
    # resuming on a different world size still continues the same global stream
    stream = torch.stack([f.view(-1, 40) for f in full], 1).reshape(-1)
    single = torch.cat([b["index"] for b in _take(iter(_loader(path, seed=3, batch_size=80, cur_nimg=cursor)), 30)])
    assert torch.equal(single, stream[cursor:])


def _corrupt_sample(directory: Path, shard: str, entry: int) -> int:
    """Flip bytes inside one PNG's data (same file size); returns that sample's global index."""
    manifest = load_manifest(directory)
    sid = [s.tar for s in manifest.shards].index(shard)
    offset, size = read_index(directory / manifest.shards[sid].index)[entry].members["png"]
    with open(directory / shard, "r+b") as f:
        f.seek(offset + size // 2)
        f.write(b"\x00\xff\x00\xff\x00\xff")
    return sum(s.num_samples for s in manifest.shards[:sid]) + entry


@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=needs_dali)])
def test_corrupt_sample_is_skipped_counted_and_reported(shards, tmp_path, caplog, backend):
    data = tmp_path / "data"
    shutil.copytree(shards["digits4"], data)
    bad = _corrupt_sample(data, "digits-000001.tar", 17)
    loader = _loader(data, backend=backend, shuffle=False, batch_size=100, num_workers=1 if backend == "torch" else 0)
    with caplog.at_level(logging.WARNING):
        batches = list(loader.epoch(0))
    indices = torch.cat([b["index"] for b in batches])
    assert bad not in indices.tolist() and len(indices) == 1800  # batch shapes kept: replaced by the next sample
    assert (indices[bad] == bad + 1) and (indices[bad + 1] == bad + 1)
    assert loader.stats.bad_samples == 1 and loader.metrics()["data/bad_samples"] == 1.0
    assert any(f"bad sample {bad}" in r.message and "digits-000001.tar" in r.message for r in caplog.records)
    strict = _loader(data, backend=backend, shuffle=False, batch_size=100, max_bad_fraction=0.0)
    with pytest.raises(DataCorruptionError, match="max_bad_fraction"):
        list(strict.epoch(0))


def test_truncated_shard_loses_only_its_tail(shards, tmp_path, caplog):
    data = tmp_path / "data"
    shutil.copytree(shards["digits4"], data)
    tar = data / "digits-000003.tar"  # 297 samples at global indices 1500..1796
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size - 10 * 1024])
    with caplog.at_level(logging.WARNING):
        loader = _loader(data, shuffle=False, batch_size=100, max_bad_fraction=0.05)
    assert any("digits-000003.tar is truncated" in r.message for r in caplog.records)
    lost = sorted(loader.reader.lost)
    assert lost and lost[-1] == 1796 and lost[0] > 1500
    indices = torch.cat([b["index"] for b in loader.epoch(0)])
    assert not set(lost) & set(indices.tolist())
    assert loader.stats.bad_samples >= len(lost)
    with pytest.raises(DataCorruptionError, match="truncated"):
        _loader(data, max_bad_fraction=0.001)


def test_quantize_matches_nvae_formula():
    u8 = torch.arange(256, dtype=torch.uint8).view(1, 1, 1, 256)
    x01 = u8.float() / 255.0
    for bits in (1, 5, 8):
        nvae = np.floor(np.arange(256) / 2 ** (8 - bits)) / (2**bits - 1)
        assert torch.equal(quantize(x01, bits).view(-1).double(), torch.from_numpy(nvae).float().double())
        assert torch.equal(to_model_range(u8, bits, centered=False), quantize(x01, bits))
        assert torch.equal(to_model_range(u8, bits, centered=True), quantize(x01, bits) * 2.0 - 1.0)


@needs_dali
@pytest.mark.parametrize("name,channels,num_bits,centered", [
    ("digits4", 3, 8, True), ("digits4", 1, 5, False), ("photos_png", 3, 5, True), ("photos_jpg", 3, 8, True),
    ("photos_png", 1, 8, False),
])
def test_dali_cpu_equals_torch(shards, name, channels, num_bits, centered):
    kw = dict(channels=channels, num_bits=num_bits, centered=centered, flip=True, batch_size=16, seed=5,
              world_size=2, rank=1, cur_nimg=48, dali_device="cpu")
    torch_batches = _take(iter(_loader(shards[name], backend="torch", **kw)), 4)
    dali_batches = _take(iter(_loader(shards[name], backend="dali", **kw)), 4)
    for t, d in zip(torch_batches, dali_batches):
        assert torch.equal(t["index"], d["index"]) and torch.equal(t["label"], d["label"])
        assert t["x"].shape == d["x"].shape == (16, channels, *t["x"].shape[2:])
        if name.startswith("photos") and channels == 1:
            # RGB -> luma: libpng and DALI round the weighted sum differently; within one level
            assert (t["x"] - d["x"]).abs().max() <= 1 / 255 + 1e-6
        else:
            assert torch.equal(t["x"], d["x"])
    assert any(b["x"].flip(-1).ne(b["x"]).any() for b in torch_batches)


@needs_dali
def test_dali_cpu_load_time_resize_matches_torch_inside_the_border(shards):
    kw = dict(resolution=16, centered=False, batch_size=20, shuffle=False, dali_device="cpu")
    t = torch.cat([b["x"] for b in _loader(shards["photos_png"], backend="torch", **kw).epoch(0)])
    d = torch.cat([b["x"] for b in _loader(shards["photos_png"], backend="dali", **kw).epoch(0)])
    diff = ((t - d) * 255).round().abs()
    assert t.shape == (40, 3, 16, 16)
    # both are antialiased bilinear; they differ only in how the filter treats the image edge
    assert diff[..., 1:-1, 1:-1].max() <= 1 and diff.mean() < 0.5


def test_point_loader(shards):
    loaders = [_loader(shards["toy"], rank=r, world_size=2, batch_size=100, seed=0) for r in (0, 1)]
    batches = [list(l.epoch(0)) for l in loaders]
    assert len(batches[0]) == len(batches[1]) == 25
    b = batches[0][0]
    assert b["x"].shape == (100, 2) and b["x"].dtype == torch.float32 and b["label"].max() < 25
    idx = torch.cat([b["index"][~b["is_pad"]] for bs in batches for b in bs])
    assert sorted(idx.tolist()) == list(range(5000))


def test_builtin_built_once_into_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VAEBM_DATA_CACHE", str(tmp_path / "cache"))
    ds = DatasetConfig(name="faces25")
    path = resolve_dataset_dir(ds)
    assert path.parent == tmp_path / "cache" and load_manifest(path).num_samples == 200
    mtime = (path / "manifest.json").stat().st_mtime_ns
    assert resolve_dataset_dir(ds) == path and (path / "manifest.json").stat().st_mtime_ns == mtime
    loader = build_loader(ds, LoaderConfig(backend="torch", num_workers=0, batch_size=10), rank=0, world_size=1,
                          seed=0)
    b = next(iter(loader))
    assert b["x"].shape == (10, 3, 32, 32) and set(b["label"].tolist()) <= {0, 1}
