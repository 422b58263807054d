"""MNIST IDX files (plain and .gz) as a shard-builder source, and the loader's dynamic binarization."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipelines.idx_source import idx_source, is_idx, read_idx
from data_pipelines.transforms import binarization_uniforms, dynamic_binarize


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> Path:
    """An IDX file written from the format's definition (magic 0 0 type ndim, big-endian uint32 dims, data)."""
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


@pytest.fixture()
def mnist_like(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=7).astype(np.uint8)
    return images, labels


@pytest.mark.parametrize("compress", [False, True])
def test_idx_images_and_labels_round_trip(tmp_path, mnist_like, compress):
    images, labels = mnist_like
    suffix = ".gz" if compress else ""
    img_path = write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", images, compress)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", labels, compress)
    assert is_idx(img_path) and np.array_equal(read_idx(img_path), images)
    source = idx_source(img_path)
    assert len(source) == 7 and source.description["kind"] == "idx" and source.description["labels"]
    for i, item in enumerate(source):
        pil = item.load()
        assert pil.mode == "L" and pil.size == (28, 28)
        assert np.array_equal(np.asarray(pil), images[i]) and item.label == int(labels[i])


def test_idx_without_labels_and_other_dtypes(tmp_path, mnist_like):
    images, _ = mnist_like
    path = write_idx(tmp_path / "t10k-images-idx3-ubyte", images)
    assert all(item.label is None for item in idx_source(path))
    ints = np.arange(12, dtype=np.int32).reshape(3, 4) - 5
    assert np.array_equal(read_idx(write_idx(tmp_path / "ints.idx", ints)), ints)  # big-endian signed ints


def test_malformed_idx_files_are_refused(tmp_path, mnist_like):
    images, labels = mnist_like
    good = write_idx(tmp_path / "a-images-idx3-ubyte", images).read_bytes()
    (tmp_path / "trunc").write_bytes(good[:-5])
    with pytest.raises(ValueError, match="declares shape"):
        read_idx(tmp_path / "trunc")
    (tmp_path / "png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 32)
    assert not is_idx(tmp_path / "png")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "png")
    with pytest.raises(ValueError, match="idx3"):
        idx_source(write_idx(tmp_path / "labels-only", labels))
    write_idx(tmp_path / "b-images-idx3-ubyte", images)
    write_idx(tmp_path / "b-labels-idx1-ubyte", labels[:3])
    with pytest.raises(ValueError, match="labels for 7 images"):
        idx_source(tmp_path / "b-images-idx3-ubyte")


def test_prepare_data_builds_shards_from_idx(tmp_path, mnist_like):
    """The shard builder reads IDX through open_path_source (the dispatch the lead adds to data_pipelines/sources)."""
    from data_pipelines.config import PrepareConfig
    from data_pipelines.shard_writer import build_dataset

    images, labels = mnist_like
    src = write_idx(tmp_path / "train-images-idx3-ubyte.gz", images, compress=True)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels, compress=True)
    manifest = build_dataset(PrepareConfig(source=str(src), out=str(tmp_path / "mnist")), progress=False)
    assert manifest.num_samples == 7


# ------------------------------------------------------------------------------------------ dynamic binarization
def test_dynamic_binarization_is_bernoulli_of_the_intensity_and_reproducible():
    p = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0]).repeat_interleave(40).reshape(1, 1, 10, 20)  # 200 pixels
    x = (p * 2 - 1).expand(4000, 1, 10, 20).contiguous()  # model range [-1, 1]
    positions = torch.arange(4000) + 123_456_789_012  # beyond 2^32: the high word enters the hash too
    b = dynamic_binarize(x, seed=7, positions=positions)
    assert set(b.unique().tolist()) == {-1.0, 1.0}
    freq = ((b + 1) / 2).mean(0).reshape(5, 40).mean(1)  # 160,000 draws per intensity level
    expected = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0])
    se = torch.sqrt(expected * (1 - expected) / 160_000)
    assert ((freq - expected).abs() <= 4.5 * se + 1e-12).all(), freq
    # a pure function of (seed, position, pixel): the same draw for a sample whatever batch it is in
    again = dynamic_binarize(x[17:19], seed=7, positions=positions[17:19])
    assert torch.equal(again, b[17:19])
    assert not torch.equal(dynamic_binarize(x, seed=8, positions=positions), b)  # the seed matters
    assert not torch.equal(b[0], b[1])  # a new draw at every position (epoch)
    # uncentered range as well
    assert torch.equal(dynamic_binarize(p.expand(2, 1, 10, 20), 7, positions[:2], centered=False), (b[:2] + 1) / 2)


def test_binarization_uniforms_are_uniform_and_decorrelated():
    u = binarization_uniforms(0, torch.arange(2000), 500).double()
    assert 0 <= float(u.min()) and float(u.max()) < 1
    counts = torch.histc(u, bins=20, min=0, max=1)
    expected = u.numel() / 20
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 50  # 19 degrees of freedom: P(chi2 > 50) ~ 1e-4
    corr = torch.corrcoef(torch.stack([u[:-1].flatten(), u[1:].flatten()]))[0, 1]  # neighbouring positions
    assert abs(float(corr)) < 0.01
