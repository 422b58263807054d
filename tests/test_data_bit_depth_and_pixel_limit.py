"""Source bit depth (16-bit inputs reduced by bit depth, recorded in the manifest) and the pixel limit (oversize
images skipped and counted from their header, in prepare_data and in the loaders). Real files written to disk."""
from __future__ import annotations

import io
import json
import logging
import struct
import sys
import tarfile
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from data_pipelines import (DataConfigError, DataCorruptionError, DatasetConfig, LoaderConfig, PrepareConfig,
                            build_dataset, build_loader, load_manifest)
from data_pipelines.errors import ImageTooLargeError
from data_pipelines.image_prep import DEFAULT_MAX_IMAGE_PIXELS, ROUND_16_TO_8
from data_pipelines.manifest import MANIFEST_NAME, sha256_file, write_manifest
from data_pipelines.shard_index import write_index
from data_pipelines.shard_reader import ShardReader, check_encoded_image
from data_pipelines.sources import array_source

REPO = Path(__file__).resolve().parents[1]

HAS_DALI = True
try:
    import nvidia.dali  # noqa: F401
except ImportError:
    HAS_DALI = False


def _round16(v) -> np.ndarray:
    """The documented conversion, computed independently in floating point."""
    return np.floor(np.asarray(v, np.float64) * 255.0 / 65535.0 + 0.5).astype(np.uint8)


def _png16(array: np.ndarray) -> bytes:
    """16-bit grayscale / RGB / RGBA PNG (Pillow cannot write 16-bit colour), rows Sub-filtered as encoders do."""
    h, w = array.shape[:2]
    channels = 1 if array.ndim == 2 else array.shape[2]
    color_type = {1: 0, 3: 2, 4: 6}[channels]
    bpp = 2 * channels
    rows = []
    for y in range(h):
        raw = np.frombuffer(array[y].astype(">u2").tobytes(), np.uint8).astype(np.int16)
        filtered = raw.copy()
        filtered[bpp:] = (raw[bpp:] - raw[:-bpp]) % 256
        rows.append(b"\x01" + filtered.astype(np.uint8).tobytes())
    return _png_file(w, h, 16, color_type, zlib.compress(b"".join(rows)))


def _png_file(w: int, h: int, depth: int, color_type: int, idat: bytes) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color_type, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _constant_png(w: int, h: int, value: int = 128) -> bytes:
    """A valid 8-bit grayscale PNG of w x h, compressed row block by row block (a 13000 x 12000 one is ~170 KB)."""
    rows_per_block = max(1, min(h, 4_000_000 // (w + 1)))
    compressor = zlib.compressobj(9)
    block = (b"\x00" + bytes([value]) * w) * rows_per_block
    parts = [compressor.compress(block) for _ in range(h // rows_per_block)]
    parts.append(compressor.compress((b"\x00" + bytes([value]) * w) * (h % rows_per_block)))
    parts.append(compressor.flush())
    return _png_file(w, h, 8, 0, b"".join(parts))


def _stored(directory: Path) -> list[np.ndarray]:
    reader = ShardReader(directory, verify="sha256")
    out = []
    for i in range(reader.num_samples):
        data, _ = reader.read_image(i)
        image = Image.open(io.BytesIO(data))
        assert image.mode in ("L", "RGB")  # shards hold 8 bits per channel
        out.append(np.asarray(image))
    return out


@pytest.fixture
def loads(monkeypatch) -> list[tuple[int, int]]:
    """Sizes of every image whose pixels Pillow decodes in this process (ImageFile.load), to prove that oversize
    images are refused from their header."""
    seen: list[tuple[int, int]] = []
    original = ImageFile.ImageFile.load

    def spy(self):
        if self.tile:  # pixels still to be decoded
            seen.append(self.size)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return seen


def test_16bit_grayscale_is_reduced_by_bit_depth_not_content(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    full = np.array([[0, 200], [65535, 32768]], np.uint16)
    dark = np.array([[0, 200], [255, 100]], np.uint16)  # a 16-bit image that happens to use only low values
    pgm = np.array([[0, 386], [65535, 40000]], np.uint16)
    eight = np.array([[0, 200], [255, 17]], np.uint8)
    Image.fromarray(full).save(src / "a_full.png")
    Image.fromarray(dark).save(src / "b_dark.png")
    Image.fromarray(pgm).save(src / "c_16bit.pgm")  # Pillow reads 16-bit PGM as mode "I"
    Image.fromarray(eight).save(src / "d_8bit.png")
    assert Image.open(src / "a_full.png").mode == "I;16" and Image.open(src / "c_16bit.pgm").mode == "I"
    manifest = build_dataset(PrepareConfig(source=str(src), out=str(tmp_path / "out"), crop="none"), progress=False)

    stored = _stored(tmp_path / "out")
    np.testing.assert_array_equal(stored[0], [[0, 1], [255, 128]])
    np.testing.assert_array_equal(stored[1], [[0, 1], [1, 0]])  # not [[0, 200], [255, 100]]: no per-image scaling
    np.testing.assert_array_equal(stored[2], [[0, 2], [255, 156]])
    np.testing.assert_array_equal(stored[3], eight)  # 8-bit input untouched
    for array, got in zip((full, dark, pgm), stored):
        np.testing.assert_array_equal(got, _round16(array))
    assert manifest.channels == 1
    assert manifest.source_bit_depth == 16 and manifest.bit_depth_conversion == ROUND_16_TO_8
    raw = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    assert raw["source"]["bit_depth"] == 16 and raw["source"]["bit_depth_counts"] == {"16": 3, "8": 1}
    assert raw["source"]["bit_depth_conversion"] == "16-bit: round(v * 255 / 65535)"


def test_16bit_colour_png_and_uint16_arrays_are_rounded(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 65536, (6, 6, 3)).astype(np.uint16)
    rgb[0, 0] = [200, 386, 32768]  # Pillow alone keeps the high byte: 0, 1, 128; rounding gives 1, 2, 128
    rgba = np.concatenate([rgb[::-1], np.full((6, 6, 1), 65535, np.uint16)], -1)
    src = tmp_path / "src"
    src.mkdir()
    (src / "rgb16.png").write_bytes(_png16(rgb))
    (src / "rgba16.png").write_bytes(_png16(rgba))
    manifest = build_dataset(PrepareConfig(source=str(src), out=str(tmp_path / "png")), progress=False)
    stored = _stored(tmp_path / "png")
    np.testing.assert_array_equal(stored[0], _round16(rgb))
    np.testing.assert_array_equal(stored[1], _round16(rgb[::-1]))  # alpha dropped, as for 8-bit RGBA
    assert stored[0][0, 0].tolist() == [1, 2, 128]
    assert manifest.channels == 3 and manifest.source_bit_depth == 16
    assert manifest.bit_depth_conversion == ROUND_16_TO_8

    gray = rng.integers(0, 65536, (5, 4, 4)).astype(np.uint16)
    gray[0, 0, :3] = [200, 65535, 32768]
    np.save(tmp_path / "gray.npy", gray)
    np.savez(tmp_path / "rgb.npz", images=np.stack([rgb, rgb[::-1]]), labels=np.array([3, 4]))
    m_gray = build_dataset(PrepareConfig(source=str(tmp_path / "gray.npy"), out=str(tmp_path / "g")), progress=False)
    m_rgb = build_dataset(PrepareConfig(source=str(tmp_path / "rgb.npz"), out=str(tmp_path / "c")), progress=False)
    for got, want in zip(_stored(tmp_path / "g"), gray):
        np.testing.assert_array_equal(got, _round16(want))
    assert _stored(tmp_path / "g")[0][0, :3].tolist() == [1, 255, 128]
    for got, want in zip(_stored(tmp_path / "c"), (rgb, rgb[::-1])):
        np.testing.assert_array_equal(got, _round16(want))
    for m in (m_gray, m_rgb):
        assert m.skipped_inputs == [] and m.source_bit_depth == 16 and m.bit_depth_conversion == ROUND_16_TO_8


def _small_images(src: Path, count: int = 3, side: int = 60) -> list[np.ndarray]:
    from skimage.data import astronaut

    photo = astronaut()
    arrays = [np.ascontiguousarray(photo[i * side : (i + 1) * side, 100 : 100 + side]) for i in range(count)]
    src.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(src / f"img{i}.png")
    return arrays


def test_oversize_source_image_is_skipped_and_counted_without_decoding(tmp_path, loads):
    src = tmp_path / "src"
    arrays = _small_images(src)  # 60 x 60 = 3,600 pixels each
    (src / "img1_big.png").write_bytes(_constant_png(200, 200))  # 40,000 pixels, sorts between img1 and img2
    cfg = PrepareConfig(source=str(src), out=str(tmp_path / "out"), max_image_pixels=10_000, max_bad_fraction=0.3)
    pillow_limit = Image.MAX_IMAGE_PIXELS
    manifest = build_dataset(cfg, progress=False)

    assert manifest.num_samples == 3 and manifest.skipped_too_large == 1
    [skip] = manifest.skipped_inputs
    assert skip["origin"].endswith("img1_big.png") and skip["reason"] == "too_large"
    assert skip["error"].startswith("ImageTooLargeError: 200x200 = 40,000 pixels")
    assert (200, 200) not in loads  # refused from the header: its pixels were never decoded
    for got, want in zip(_stored(tmp_path / "out"), arrays):
        np.testing.assert_array_equal(got, want)  # the other images come through unchanged
    assert load_manifest(tmp_path / "out").preprocessing["max_image_pixels"] == 10_000
    assert Image.MAX_IMAGE_PIXELS == pillow_limit  # Pillow's process-wide setting is left alone

    # counted against max_bad_fraction exactly like an undecodable input
    strict = PrepareConfig(source=str(src), out=str(tmp_path / "strict"), max_image_pixels=10_000)
    with pytest.raises(DataCorruptionError, match="img1_big.png: ImageTooLargeError"):
        build_dataset(strict, progress=False)
    # 0 and None disable the limit
    for limit in (0, None):
        m = build_dataset(PrepareConfig(source=str(src), out=str(tmp_path / f"all-{limit}"), size=32,
                                        max_image_pixels=limit), progress=False)
        assert m.num_samples == 4 and m.skipped_inputs == []


def test_default_limit_refuses_a_156_megapixel_png_from_its_header(tmp_path, loads):
    src = tmp_path / "src"
    arrays = _small_images(src, count=2)
    big = _constant_png(13000, 12000)
    assert len(big) < 400_000  # a small file that would decode to 156 MB
    (src / "img0_bomb.png").write_bytes(big)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # Pillow's own notice on opening the header
        manifest = build_dataset(PrepareConfig(source=str(src), out=str(tmp_path / "out"), max_bad_fraction=0.4),
                                 progress=False)
    assert PrepareConfig().max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS == 8192 * 8192
    assert manifest.num_samples == 2 and manifest.skipped_too_large == 1
    assert "13000x12000" in manifest.skipped_inputs[0]["error"]
    assert (13000, 12000) not in loads
    for got, want in zip(_stored(tmp_path / "out"), arrays):
        np.testing.assert_array_equal(got, want)


def test_array_source_refuses_oversize_from_the_shape(tmp_path):
    np.save(tmp_path / "big.npy", np.zeros((2, 200, 200), np.uint8))
    source = array_source(tmp_path / "big.npy", max_pixels=10_000)
    with pytest.raises(ImageTooLargeError, match="200x200"):
        source.items[0].load()
    assert array_source(tmp_path / "big.npy", max_pixels=0).items[0].load().size == (200, 200)


def _replace_png(directory: Path, index: int, png: bytes) -> None:
    """Put `png` in place of sample `index` of a built dataset, keeping its index files and manifest consistent."""
    manifest = load_manifest(directory)
    [shard] = manifest.shards
    tar_path = directory / shard.tar
    with tarfile.open(tar_path) as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar.getmembers()]
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in members:
            if info.name == f"{index:09d}.png":
                data = png
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    write_index(tar_path, directory / shard.index)
    shard.bytes, shard.sha256 = tar_path.stat().st_size, sha256_file(tar_path)
    shard.index_sha256 = sha256_file(directory / shard.index)
    write_manifest(directory, manifest)


@pytest.fixture
def shard_with_oversize(tmp_path) -> tuple[Path, int]:
    src = tmp_path / "src"
    _small_images(src, count=6, side=40)
    out = tmp_path / "shards"
    build_dataset(PrepareConfig(source=str(src), out=str(out)), progress=False)
    _replace_png(out, 3, _constant_png(200, 200))
    assert Image.open(io.BytesIO(ShardReader(out, verify="sha256").read_image(3)[0])).size == (200, 200)
    return out, 3


def _indices(tensors) -> list[int]:
    """Concatenated delivered indices of a list of batches' index tensors."""
    return [int(i) for t in tensors for i in t.tolist()]


def _loader(path: Path, backend: str = "torch", **kw):
    ds_fields = {k: kw.pop(k) for k in list(kw) if k in DatasetConfig.__dataclass_fields__}
    ds = DatasetConfig(name="test", path=str(path), **{"max_bad_fraction": 0.2, **ds_fields})
    lc = LoaderConfig(backend=backend, **{"num_workers": 0, "batch_size": 6, "shuffle": False, **kw})
    return build_loader(ds, lc, rank=0, world_size=1, seed=0)


@pytest.mark.parametrize("backend,workers", [
    ("torch", 0), ("torch", 1),
    pytest.param("dali", 0, marks=pytest.mark.skipif(not HAS_DALI, reason="nvidia-dali not installed")),
])
def test_loader_skips_and_counts_oversize_sample(shard_with_oversize, caplog, loads, backend, workers):
    path, big = shard_with_oversize
    loader = _loader(path, backend=backend, num_workers=workers, max_image_pixels=10_000, dali_device="cpu")
    with caplog.at_level(logging.WARNING):
        batches = list(loader.epoch(0))
    indices = _indices([b["index"] for b in batches])
    assert big not in indices and sorted(set(indices)) == [0, 1, 2, 4, 5]  # every other image comes through
    assert indices[big] == big + 1  # replaced by the next good sample, batch shape kept
    assert all(b["x"].shape[-2:] == (40, 40) for b in batches)
    assert loader.stats.bad_samples == 1 and loader.metrics()["data/bad_samples"] == 1.0
    assert any(f"bad sample {big}" in r.message and "ImageTooLargeError" in r.message for r in caplog.records)
    assert (200, 200) not in loads  # never decoded (the spy sees this process: workers=0 and the DALI host check)


def test_loader_limit_off_delivers_the_image(shard_with_oversize):
    path, big = shard_with_oversize
    for limit in (0, None):
        loader = _loader(path, max_image_pixels=limit, resolution=16)
        indices = _indices([b["index"] for b in loader.epoch(0)])
        assert indices == list(range(6)) and loader.stats.bad_samples == 0


def test_host_check_refuses_oversize_png_and_jpeg():
    png = _constant_png(200, 200)
    buf = io.BytesIO()
    Image.new("RGB", (200, 200), (10, 20, 30)).save(buf, format="JPEG")
    for data in (png, buf.getvalue()):
        with pytest.raises(ImageTooLargeError, match="200x200"):
            check_encoded_image(data, max_pixels=10_000)
        assert check_encoded_image(data, max_pixels=0) is data
        assert check_encoded_image(data) is data  # default limit


def test_manifest_without_the_new_keys_still_works(tmp_path):
    src = tmp_path / "src"
    _small_images(src, count=2, side=20)
    cfg = PrepareConfig(source=str(src), out=str(tmp_path / "out"))
    build_dataset(cfg, progress=False)
    path = tmp_path / "out" / MANIFEST_NAME
    raw = json.loads(path.read_text())
    for key in ("bit_depth", "bit_depth_counts", "bit_depth_conversion"):
        raw["source"].pop(key)
    raw["preprocessing"].pop("max_image_pixels")
    old = json.dumps(raw, indent=2, sort_keys=True) + "\n"  # as manifests were written before these keys
    path.write_text(old)
    manifest = load_manifest(tmp_path / "out")
    assert manifest.source_bit_depth is None and manifest.bit_depth_conversion is None
    assert manifest.skipped_too_large == 0
    assert len(list(_loader(tmp_path / "out", batch_size=2).epoch(0))) == 1
    build_dataset(cfg, progress=False)  # the same request again: recognised as built, nothing rewritten
    assert path.read_text() == old
    # on a current manifest a different limit is a different request
    build_dataset(PrepareConfig(source=str(src), out=str(tmp_path / "new")), progress=False)
    with pytest.raises(DataConfigError, match="refusing to overwrite"):
        build_dataset(PrepareConfig(source=str(src), out=str(tmp_path / "new"), max_image_pixels=1000), progress=False)


def test_max_image_pixels_config_and_command_line(tmp_path):
    with pytest.raises(DataConfigError, match="max_image_pixels"):
        PrepareConfig(source="digits", out=str(tmp_path), max_image_pixels=-1).validate()
    with pytest.raises(DataConfigError, match="dataset.max_image_pixels"):
        DatasetConfig(max_image_pixels=-1).validate()
    assert DatasetConfig().max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS
    sys.path.insert(0, str(REPO))
    from launchers.prepare_data import parse

    base = ["source=digits", f"out={tmp_path}/x"]
    assert parse(base).max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS
    assert parse(base + ["max_image_pixels=10000"]).max_image_pixels == 10_000
    assert parse(base + ["max_image_pixels=null"]).max_image_pixels is None
