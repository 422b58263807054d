"""Shard builder: source -> `<name>-%06d.tar` WebDataset shards + wds2idx index per shard + manifest.json.

Output is a pure function of the input and the config (sorted inputs, fixed tar mtime/owner, deterministic
encoders), so rebuilding gives byte-identical shards and the same `manifest_hash`. The build goes to a temporary
sibling directory and is renamed into place only when complete, so a crash never leaves a half dataset that looks
finished, and an existing different dataset is never overwritten unless asked.

Inputs that cannot be decoded, or whose header declares more than `max_image_pixels` pixels, are skipped (within
`max_bad_fraction`) and listed in the manifest's `skipped_inputs`. Inputs deeper than 8 bits per channel are
reduced by bit depth (image_prep.to_stored_8bit); the depths met and the conversion are recorded in the
manifest's `source` section.
"""
from __future__ import annotations

import io
import logging
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from .builtin_sets import BUILTIN_SETS_DEFAULT_SIZE, open_builtin
from .config import BUILTIN_SETS, PrepareConfig
from .errors import DataConfigError, DataCorruptionError, ImageTooLargeError
from .manifest import MANIFEST_NAME, Manifest, ShardEntry, load_manifest, sha256_file, write_manifest
from .shard_index import write_index
from .sources import ImageSource, PointSource, open_path_source
from .image_prep import CropError, check_pixel_limit, prepare_image, to_stored_8bit

log = logging.getLogger(__name__)

POINTS_PER_ENTRY = 4096  # point sets are stored as chunks: one tar sample per 4096 points keeps tar overhead small
LABEL_EXT = "label"  # int32 little-endian; DALI's webdataset reader returns it as an integer with dtypes=INT32
POINTS_EXT = "points.npy"
TAR_MTIME = 0.0  # fixed so identical input gives identical bytes (and an identical manifest hash)
# manifest["source"] keys observed while building rather than requested: ignored when deciding whether an existing
# dataset is the one asked for.
SOURCE_RESULT_KEYS = ("bit_depth", "bit_depth_counts", "bit_depth_conversion")
# manifest["preprocessing"] keys introduced after datasets were already built: a manifest without one was built
# before it existed and is not rebuilt merely because of its absence.
ADDED_PREPROCESSING_KEYS = ("max_image_pixels",)


def _open_source(cfg: PrepareConfig) -> ImageSource | PointSource:
    if cfg.source in BUILTIN_SETS:
        return open_builtin(cfg.source, cfg.num_samples, cfg.seed, cfg.formula)
    source = open_path_source(cfg.source, cfg.labels, cfg.max_image_pixels)
    if cfg.num_samples is not None:
        if isinstance(source, PointSource):
            source.points = source.points[: cfg.num_samples]
            source.labels = None if source.labels is None else source.labels[: cfg.num_samples]
        else:
            source.items = source.items[: cfg.num_samples]
        source.description["num_samples"] = cfg.num_samples
    return source


def _preprocessing(cfg: PrepareConfig, source: ImageSource | PointSource) -> dict:
    if isinstance(source, PointSource):
        return {"dtype": "float32", "points_per_entry": POINTS_PER_ENTRY, "samples_per_shard": cfg.samples_per_shard}
    size = cfg.size if cfg.size is not None else BUILTIN_SETS_DEFAULT_SIZE.get(cfg.source)
    return {"size": size, "crop": cfg.crop, "resize_filter": cfg.resize_filter, "format": cfg.format,
            "jpeg_quality": cfg.jpeg_quality if cfg.format == "jpg" else None,
            "samples_per_shard": cfg.samples_per_shard, "max_shard_bytes": cfg.max_shard_bytes,
            "max_image_pixels": cfg.max_image_pixels}


def _encode(image: Image.Image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, format="PNG", compress_level=6)
    else:
        image.save(buf, format="JPEG", quality=quality, subsampling=0 if quality >= 90 else 2)
    return buf.getvalue()


class _ShardCollector:
    """ShardWriter `post` hook: index and checksum each shard as soon as it is closed."""

    def __init__(self, directory: Path, samples_per_entry: int = 1, total: int | None = None):
        self.directory = directory
        self.entries: list[ShardEntry] = []
        self.samples_per_entry = samples_per_entry
        self.total = total

    def __call__(self, tar_name: str) -> None:
        tar = Path(tar_name)
        index = tar.with_suffix(".idx")
        samples = write_index(tar, index)
        written = sum(s.num_samples for s in self.entries) if self.samples_per_entry > 1 else 0
        count = len(samples) if self.samples_per_entry == 1 else \
            min(len(samples) * self.samples_per_entry, self.total - written)
        self.entries.append(ShardEntry(tar=tar.name, index=index.name, num_samples=count, entries=len(samples),
                                       bytes=tar.stat().st_size, sha256=sha256_file(tar),
                                       index_sha256=sha256_file(index)))


def _writer(tmp: Path, name: str, cfg: PrepareConfig, collector: _ShardCollector, maxcount: int) -> wds.ShardWriter:
    return wds.ShardWriter(str(tmp / f"{name}-%06d.tar"), maxcount=maxcount, maxsize=cfg.max_shard_bytes,
                           post=collector, verbose=0, encoder=False, mtime=TAR_MTIME, user="vaebm", group="vaebm")


def _write_images(source: ImageSource, cfg: PrepareConfig, tmp: Path, name: str, progress: bool) -> dict:
    size = cfg.size if cfg.size is not None else BUILTIN_SETS_DEFAULT_SIZE.get(cfg.source)
    collector = _ShardCollector(tmp)
    skipped: list[dict[str, str]] = []
    allowed_bad = int(cfg.max_bad_fraction * len(source))
    shape, channels, labels, written = None, 1, [], 0
    depths: Counter[int] = Counter()
    conversions: set[str] = set()
    with _writer(tmp, name, cfg, collector, cfg.samples_per_shard) as sink:
        for item in tqdm(source, total=len(source), desc=f"building {name}", unit="img", disable=not progress):
            try:
                image = item.load()  # path sources refuse an oversize image from its header, before decoding it
                check_pixel_limit(image.size, cfg.max_image_pixels)  # images that sources hold in memory
                image, bits, conversion = to_stored_8bit(image)
                image = prepare_image(image, size, cfg.crop, cfg.resize_filter)
            except Exception as e:  # any decoder error, or over the pixel limit: skip, report it in the manifest
                reason = ("too_large" if isinstance(e, ImageTooLargeError) else
                          "wrong_size" if isinstance(e, CropError) else "undecodable")
                skipped.append({"origin": item.origin, "error": f"{type(e).__name__}: {e}", "reason": reason})
                log.warning("skipping %s input %s: %s", {"too_large": "oversize", "wrong_size": "wrongly sized"}.get(
                    reason, "undecodable"), item.origin, e)
                if len(skipped) > allowed_bad:
                    raise DataCorruptionError(
                        f"{len(skipped)} of {len(source)} inputs failed to decode or exceed max_image_pixels="
                        f"{cfg.max_image_pixels} (max_bad_fraction={cfg.max_bad_fraction}); first: "
                        f"{skipped[0]['origin']}: {skipped[0]['error']}") from e
                continue
            if shape is None:
                shape = image.size
            elif image.size != shape:
                raise DataConfigError(f"{item.origin} is {image.size[0]}x{image.size[1]} after preprocessing, earlier "
                                      f"images are {shape[0]}x{shape[1]}: set size=<side> to resize all images")
            channels = max(channels, 3 if image.mode == "RGB" else 1)
            sample = {"__key__": f"{written:09d}", cfg.format: _encode(image, cfg.format, cfg.jpeg_quality)}
            if item.label is not None:
                sample[LABEL_EXT] = np.int32(item.label).astype("<i4").tobytes()
                labels.append(item.label)
            sink.write(sample)
            written += 1
            depths[bits] += 1
            if conversion is not None:
                conversions.add(conversion)
    if skipped:
        too_large = sum(s["reason"] == "too_large" for s in skipped)
        log.warning("skipped %d of %d inputs (%d over max_image_pixels=%s); listed in the manifest's skipped_inputs",
                    len(skipped), len(source), too_large, cfg.max_image_pixels)
    if written == 0:
        raise DataCorruptionError(f"no decodable images in {cfg.source}")
    if labels and len(labels) != written:
        raise DataConfigError(f"{cfg.source}: some inputs have labels and some do not")
    return {"kind": "image", "num_samples": written, "image_size": [shape[1], shape[0]], "channels": channels,
            "encoding": cfg.format, "has_labels": bool(labels), "num_classes": (max(labels) + 1) if labels else None,
            "shards": collector.entries, "skipped_inputs": skipped,
            "source_result": {"bit_depth": max(depths), "bit_depth_counts": {str(b): depths[b] for b in sorted(depths)},
                              "bit_depth_conversion": "; ".join(sorted(conversions)) or None}}


def _same_request(existing: Manifest, spec: dict, name: str) -> bool:
    """Whether `existing` was built from this source with this preprocessing (then nothing is rebuilt)."""
    source = {k: v for k, v in existing.source.items() if k not in SOURCE_RESULT_KEYS}
    wanted = {k: v for k, v in spec["preprocessing"].items()
              if k in existing.preprocessing or k not in ADDED_PREPROCESSING_KEYS}
    return existing.name == name and source == spec["source"] and existing.preprocessing == wanted


def _write_points(source: PointSource, cfg: PrepareConfig, tmp: Path, name: str, progress: bool) -> dict:
    points, labels = source.points, source.labels
    if not np.isfinite(points).all():
        raise DataConfigError(f"{cfg.source}: point set contains NaN or inf")
    n = len(points)
    collector = _ShardCollector(tmp, POINTS_PER_ENTRY, n)
    entries_per_shard = max(1, cfg.samples_per_shard // POINTS_PER_ENTRY)
    with _writer(tmp, name, cfg, collector, entries_per_shard) as sink:
        for c, start in enumerate(tqdm(range(0, n, POINTS_PER_ENTRY), desc=f"building {name}", unit="chunk",
                                       disable=not progress)):
            buf = io.BytesIO()
            np.save(buf, np.ascontiguousarray(points[start : start + POINTS_PER_ENTRY], dtype="<f4"))
            sample = {"__key__": f"{c:09d}", POINTS_EXT: buf.getvalue()}
            if labels is not None:
                sample[LABEL_EXT] = np.asarray(labels[start : start + POINTS_PER_ENTRY], "<i4").tobytes()
            sink.write(sample)
    return {"kind": "points", "num_samples": n, "image_size": None, "channels": int(points.shape[1]),
            "encoding": "npy", "has_labels": labels is not None,
            "num_classes": int(labels.max()) + 1 if labels is not None else None,
            "shards": collector.entries, "skipped_inputs": []}


def build_dataset(cfg: PrepareConfig, progress: bool = True) -> Manifest:
    """Build shards for `cfg` into `cfg.out`; returns the manifest.

    If `out` already holds a dataset built from the same source with the same preprocessing, nothing is rebuilt.
    If it holds anything else, the build is refused unless `overwrite=true`.
    """
    cfg.validate()
    out = Path(cfg.out).expanduser()
    source = _open_source(cfg)
    name = cfg.name or (cfg.source if cfg.source in BUILTIN_SETS else Path(cfg.source).stem)
    spec = {"source": source.description, "preprocessing": _preprocessing(cfg, source)}
    if out.exists() and any(out.iterdir()):
        if (out / MANIFEST_NAME).is_file():
            existing = load_manifest(out)
            if _same_request(existing, spec, name):
                log.info("%s already holds this dataset (manifest hash %s); nothing to do", out, existing.content_hash())
                return existing
            what = f"a different dataset (source {existing.source})"
        else:
            what = f"files but no {MANIFEST_NAME}"
        if not cfg.overwrite:
            raise DataConfigError(f"refusing to overwrite {out}: it holds {what}; pass overwrite=true or another out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if isinstance(source, PointSource):
            fields = _write_points(source, cfg, tmp, name, progress)
        else:
            fields = _write_images(source, cfg, tmp, name, progress)
        source_result = fields.pop("source_result", {})
        manifest = Manifest(name=name, source={**spec["source"], **source_result},
                            preprocessing=spec["preprocessing"], **fields)
        write_manifest(tmp, manifest)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %d samples in %d shards to %s (manifest hash %s)", manifest.num_samples, len(manifest.shards),
             out, manifest.content_hash())
    return manifest
