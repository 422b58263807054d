"""Shard builder, manifest and sources (data_pipelines issue 3). Real images: sklearn digits, scikit-image photos."""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipelines import (DataConfigError, DataCorruptionError, ManifestError, PrepareConfig, build_dataset,
                            load_manifest, manifest_hash, verify_dataset)
from data_pipelines.builtin_sets import digits_source, photos_source, toy2d_points
from data_pipelines.shard_index import read_index
from data_pipelines.shard_reader import ShardReader
from data_pipelines.image_prep import prepare_image

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "digits"
    build_dataset(PrepareConfig(source="digits", out=str(out), size=16, samples_per_shard=500), progress=False)
    return out


def _decoded(reader: ShardReader, i: int) -> tuple[np.ndarray, int]:
    data, label = reader.read_image(i)
    return np.asarray(Image.open(io.BytesIO(data))), label


def test_digits_round_trip_pixels_and_labels(digits_dir):
    manifest = load_manifest(digits_dir)
    assert manifest.num_samples == 1797 and manifest.image_size == [16, 16] and manifest.channels == 1
    assert [s.num_samples for s in manifest.shards] == [500, 500, 500, 297]
    assert [s.tar for s in manifest.shards] == [f"digits-{i:06d}.tar" for i in range(4)]
    reader = ShardReader(digits_dir, verify="sha256")
    source = digits_source()
    for i in (0, 1, 499, 500, 1001, 1796):  # both sides of shard boundaries
        expected = np.asarray(prepare_image(source.items[i].load(), 16, "center", "lanczos"))
        pixels, label = _decoded(reader, i)
        np.testing.assert_array_equal(pixels, expected)
        assert label == source.items[i].label


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_photos_round_trip(tmp_path, fmt):
    out = tmp_path / fmt
    build_dataset(PrepareConfig(source="photos256", out=str(out), num_samples=12, size=32, format=fmt), progress=False)
    reader = ShardReader(out)
    source = photos_source(12, seed=0)
    for i in range(12):
        expected = np.asarray(prepare_image(source.items[i].load(), 32, "center", "lanczos"))
        pixels, label = _decoded(reader, i)
        assert pixels.shape == (32, 32, 3) and label == i % 11
        if fmt == "png":
            np.testing.assert_array_equal(pixels, expected)
        else:  # JPEG q95 4:4:4: lossy, but close
            assert np.abs(pixels.astype(int) - expected).mean() < 3


def test_index_matches_dalis_wds2idx(digits_dir, tmp_path):
    wds2idx = pytest.importorskip("wds2idx")
    if shutil.which("tar") is None:
        pytest.skip("GNU tar needed by wds2idx")
    tar = digits_dir / "digits-000003.tar"
    with wds2idx.IndexCreator(str(tar), str(tmp_path / "ref.idx"), verbose=False) as creator:
        creator.create_index()
    assert (tmp_path / "ref.idx").read_text() == (digits_dir / "digits-000003.idx").read_text()
    assert len(read_index(digits_dir / "digits-000003.idx")) == 297


def test_deterministic_and_refuses_to_overwrite(digits_dir, tmp_path):
    out = tmp_path / "again"
    build_dataset(PrepareConfig(source="digits", out=str(out), size=16, samples_per_shard=500), progress=False)
    assert manifest_hash(out) == manifest_hash(digits_dir)
    assert (out / "digits-000001.tar").read_bytes() == (digits_dir / "digits-000001.tar").read_bytes()
    # same request again: a no-op; a different one: refused, then allowed with overwrite
    build_dataset(PrepareConfig(source="digits", out=str(out), size=16, samples_per_shard=500), progress=False)
    with pytest.raises(DataConfigError, match="refusing to overwrite"):
        build_dataset(PrepareConfig(source="digits", out=str(out), size=8), progress=False)
    build_dataset(PrepareConfig(source="digits", out=str(out), size=8, overwrite=True), progress=False)
    assert load_manifest(out).image_size == [8, 8]
    assert not list(tmp_path.glob(".again.tmp-*"))


def test_manifest_catches_modified_shard(digits_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(digits_dir, data)
    tar = data / "digits-000002.tar"
    raw = bytearray(tar.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, different content
    tar.write_bytes(bytes(raw))
    ShardReader(data, verify="size")  # size check alone cannot see it...
    with pytest.raises(ManifestError, match="SHA-256 mismatch for shard .*digits-000002.tar"):
        ShardReader(data, verify="sha256")  # ...the checksum can
    with pytest.raises(ManifestError, match="digits-000002.tar"):
        verify_dataset(data)
    result = subprocess.run([sys.executable, str(REPO / "launchers" / "prepare_data.py"), f"verify={data}"],
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1 and "digits-000002.tar" in result.stderr


def test_missing_or_mismatched_manifest_is_a_clear_error(digits_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(digits_dir, data)
    (data / "digits-000001.idx").unlink()
    with pytest.raises(ManifestError, match="missing: .*digits-000001.idx"):
        ShardReader(data)
    (data / "manifest.json").unlink()
    with pytest.raises(ManifestError, match=r"missing manifest: .*data/manifest.json"):
        ShardReader(data)
    grown = tmp_path / "grown"
    shutil.copytree(digits_dir, grown)
    with open(grown / "digits-000000.tar", "ab") as f:
        f.write(b"\0" * 512)
    with pytest.raises(ManifestError, match="digits-000000.tar has .* bytes, manifest records"):
        ShardReader(grown)


def _write_image(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, quality=95)  # format from the suffix; quality only matters for JPEG


def test_folder_source_with_labels_and_a_corrupt_file(tmp_path):
    from skimage.data import astronaut, coffee

    images = {"cats/a.png": astronaut()[:100, :120], "cats/b.jpg": coffee()[:90, :90], "dogs/c.png": coffee()[100:200, :150]}
    for name, array in images.items():
        _write_image(tmp_path / "src" / name, array)
    (tmp_path / "src" / "dogs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    cfg = PrepareConfig(source=str(tmp_path / "src"), out=str(tmp_path / "out"), size=24, labels="subdir",
                        max_bad_fraction=0.5)
    manifest = build_dataset(cfg, progress=False)
    assert manifest.num_samples == 3 and manifest.num_classes == 2
    assert [s["origin"].endswith("broken.png") for s in manifest.skipped_inputs] == [True]
    reader = ShardReader(tmp_path / "out")
    assert [reader.read_image(i)[1] for i in range(3)] == [0, 0, 1]
    expected = np.asarray(prepare_image(Image.fromarray(images["cats/a.png"]), 24, "center", "lanczos"))
    np.testing.assert_array_equal(_decoded(reader, 0)[0], expected)
    cfg.max_bad_fraction, cfg.out = 0.0, str(tmp_path / "out2")
    with pytest.raises(DataCorruptionError, match="broken.png"):
        build_dataset(cfg, progress=False)


def test_zip_and_array_sources(tmp_path):
    digits = digits_source()
    arrays = np.stack([np.asarray(digits.items[i].load()) for i in range(20)])
    labels = np.array([digits.items[i].label for i in range(20)])
    with zipfile.ZipFile(tmp_path / "d.zip", "w") as z:
        for i in range(20):
            buf = io.BytesIO()
            Image.fromarray(arrays[i]).save(buf, format="PNG")
            z.writestr(f"imgs/{i:03d}.png", buf.getvalue())
    np.savez(tmp_path / "d.npz", images=arrays, labels=labels)
    for src in ("d.zip", "d.npz"):
        out = tmp_path / f"out-{src}"
        m = build_dataset(PrepareConfig(source=str(tmp_path / src), out=str(out)), progress=False)
        assert m.num_samples == 20 and m.image_size == [8, 8]
        reader = ShardReader(out)
        for i in (0, 7, 19):
            pixels, label = _decoded(reader, i)
            np.testing.assert_array_equal(pixels, arrays[i])
            assert label == (labels[i] if src == "d.npz" else -1)


def test_lmdb_source_in_nvae_layout(tmp_path):
    lmdb = pytest.importorskip("lmdb")
    from skimage.data import chelsea

    photo = chelsea()[:64, :64]
    env = lmdb.open(str(tmp_path / "db"), map_size=1 << 24)
    with env.begin(write=True) as txn:
        txn.put(b"0", photo.tobytes())  # NVAE is_encoded=False: raw square RGB
        buf = io.BytesIO()
        Image.fromarray(photo[::-1].copy()).save(buf, format="PNG")
        txn.put(b"1", buf.getvalue())  # NVAE is_encoded=True
    env.close()
    build_dataset(PrepareConfig(source=str(tmp_path / "db"), out=str(tmp_path / "out")), progress=False)
    reader = ShardReader(tmp_path / "out")
    np.testing.assert_array_equal(_decoded(reader, 0)[0], photo)
    np.testing.assert_array_equal(_decoded(reader, 1)[0], photo[::-1])


def test_toy2d_points_stored_exactly(tmp_path):
    m = build_dataset(PrepareConfig(source="toy2d", out=str(tmp_path / "toy"), num_samples=10000,
                                    samples_per_shard=4096), progress=False)
    assert m.kind == "points" and m.num_samples == 10000 and len(m.shards) == 3
    points, labels = ShardReader(tmp_path / "toy").read_points()
    ref_points, ref_labels = toy2d_points("25gaussians", 10000, 0)
    np.testing.assert_array_equal(points, ref_points)
    np.testing.assert_array_equal(labels, ref_labels)
    centers = np.array([-4, -2, 0, 2, 4])[np.stack([labels // 5, labels % 5], 1)]
    assert (points - centers).std() == pytest.approx(0.1, rel=0.05)


def test_prepare_data_cli_errors_are_one_line(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cases = ((["source=digits", f"out={tmp_path}/x", "size=abc"], "could not be converted"),
             (["source=nope", f"out={tmp_path}/x"], "neither a built-in set"),
             (["source=digits"], "out is required"))

    def launch(args: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(REPO / "launchers" / "prepare_data.py"), *args],
                              capture_output=True, text=True, env=env)

    with ThreadPoolExecutor(2) as pool:  # separate processes as before, two at a time (one per core)
        procs = list(pool.map(launch, [args for args, _ in cases]))
    for (_, needle), r in zip(cases, procs):
        assert r.returncode == 2, r.stderr
        assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_celeba_box_crop_is_nvae_face_box_and_loaders_refuse_other_crops(tmp_path):
    """crop=celeba_box cuts rows 40..187 and columns 15..162 of a 178x218 frame (NVAE's CelebA-64 box), computed here
    by array slicing; other sizes are skipped and counted; the celeba64 dataset config refuses center-cropped shards."""
    from skimage.data import astronaut

    from data_pipelines import DatasetConfig, LoaderConfig, build_loader

    frames = [np.asarray(Image.fromarray(astronaut()).resize((178, 218)))[..., :3] for _ in range(2)]
    frames[1] = np.ascontiguousarray(frames[1][::-1])  # a second, different frame
    for i, frame in enumerate(frames):
        _write_image(tmp_path / "src" / f"{i}.png", frame)
    _write_image(tmp_path / "src" / "odd.png", astronaut()[:100, :100])  # not a CelebA frame
    cfg = PrepareConfig(source=str(tmp_path / "src"), out=str(tmp_path / "box"), size=64, crop="celeba_box",
                        max_bad_fraction=0.5)
    manifest = build_dataset(cfg, progress=False)
    assert manifest.num_samples == 2 and manifest.preprocessing["crop"] == "celeba_box"
    assert [s["reason"] for s in manifest.skipped_inputs] == ["wrong_size"]
    reader = ShardReader(tmp_path / "box")
    for i, frame in enumerate(frames):
        by_hand = Image.fromarray(frame[40:188, 15:163]).resize((64, 64), Image.Resampling.LANCZOS)
        np.testing.assert_array_equal(_decoded(reader, i)[0], np.asarray(by_hand))
    center = tmp_path / "center"
    build_dataset(PrepareConfig(source=str(tmp_path / "src"), out=str(center), size=64, max_bad_fraction=0.5),
                  progress=False)
    loader_cfg = LoaderConfig(batch_size=2, num_workers=0, backend="torch")
    for path, ok in ((tmp_path / "box", True), (center, False)):
        dataset = DatasetConfig(name="celeba64", path=str(path), expect_crop="celeba_box")
        if ok:
            build_loader(dataset, loader_cfg, rank=0, world_size=1, seed=0).close()
        else:
            with pytest.raises(DataConfigError, match="crop=celeba_box"):
                build_loader(dataset, loader_cfg, rank=0, world_size=1, seed=0)
