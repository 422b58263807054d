"""SVHN from the official .mat files a user provides (nothing is downloaded): `prepare_data.py source=<x.mat>`
writes shards whose pixels and labels are those of the .mat arrays (X is (H, W, C, N); label 10 is the digit 0)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipelines import DatasetConfig, PrepareConfig, build_dataset, load_manifest
from data_pipelines.shard_reader import ShardReader
from data_pipelines.sources import open_path_source

scipy_io = pytest.importorskip("scipy.io")
REPO = Path(__file__).resolve().parents[1]


def _write_mat(path: Path, n: int = 7, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A file with the official layout: X uint8 (32, 32, 3, n), y uint8 (n, 1) in 1..10."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
    y = (np.arange(n) % 10 + 1).astype(np.uint8).reshape(n, 1)  # includes 10 (the digit 0)
    scipy_io.savemat(str(path), {"X": x, "y": y})
    return x, y


def test_mat_shards_hold_the_arrays_pixels_and_digit_labels(tmp_path):
    x, y = _write_mat(tmp_path / "train_32x32.mat")
    source = open_path_source(tmp_path / "train_32x32.mat")
    assert len(source) == 7 and source.description["kind"] == "svhn_mat"
    out = tmp_path / "svhn"
    build_dataset(PrepareConfig(source=str(tmp_path / "train_32x32.mat"), out=str(out)), progress=False)
    manifest = load_manifest(out)
    assert manifest.num_samples == 7 and manifest.image_size == [32, 32] and manifest.channels == 3
    reader = ShardReader(out)
    for i in range(7):
        data, label = reader.read_image(i)
        pixels = np.asarray(Image.open(io.BytesIO(data)))
        np.testing.assert_array_equal(pixels, x[..., i])  # lossless PNG of image i, H x W x C
        assert label == int(y[i, 0]) % 10


def test_mat_without_svhn_arrays_is_a_clear_error(tmp_path):
    scipy_io.savemat(str(tmp_path / "other.mat"), {"A": np.zeros((3, 3))})
    with pytest.raises(ValueError, match="SVHN's X array"):
        open_path_source(tmp_path / "other.mat")


def test_svhn_preset_is_a_dataset_config():
    import yaml

    values = yaml.safe_load((REPO / "conf/dataset/svhn.yaml").read_text())
    values["path"] = "/data/svhn"  # the preset's ${oc.env:...} is resolved by Hydra in the jobs
    cfg = DatasetConfig(**values)
    cfg.validate()
    assert cfg.name == "svhn" and cfg.channels == 3 and not cfg.flip
