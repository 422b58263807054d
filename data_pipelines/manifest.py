"""`manifest.json`: what a shard directory holds, how it was made, and the checksums that prove it is unchanged.

The manifest is written last by the builder, so a directory without one is an incomplete build. `manifest_hash`
is a content address (geometry + per-shard SHA-256), independent of where or when the shards were built; it keys
caches derived from the data, such as FID reference statistics.

Compatibility: the schema stays "vaebm-shards/1". Information added later lives inside the existing dict fields
(`source`, `preprocessing`, the entries of `skipped_inputs`), so manifests written before it load here (the
accessors below return None or 0 for them) and manifests written now still load in earlier readers.
  source["bit_depth"]              highest bits per channel among the written inputs (8 for ordinary images)
  source["bit_depth_counts"]       written inputs per source bit depth, e.g. {"8": 950, "16": 50}
  source["bit_depth_conversion"]   how inputs deeper than 8 bits were reduced, e.g. "16-bit: round(v * 255 / 65535)"
  preprocessing["max_image_pixels"] the pixel limit the build applied (0 or None: none)
  skipped_inputs[i]["reason"]      "undecodable", "too_large" (over max_image_pixels) or "wrong_size" (crop)
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import ManifestError

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
FORMAT = "vaebm-shards/1"
VERIFY_MODES = ("off", "size", "sha256")


@dataclass
class ShardEntry:
    """One tar shard and its DALI index."""

    tar: str  # file name of the shard, relative to the manifest's directory
    index: str  # file name of its wds2idx index
    num_samples: int  # samples (images, or points for point sets) in this shard
    entries: int  # tar samples (== num_samples for images; point sets store chunks of points per tar sample)
    bytes: int  # size of the tar file
    sha256: str  # SHA-256 of the tar file
    index_sha256: str  # SHA-256 of the index file


@dataclass
class Manifest:
    """Contents of `manifest.json`."""

    name: str  # shard file prefix (`<name>-000000.tar`)
    kind: str  # "image" or "points"
    num_samples: int  # total samples over all shards
    image_size: list[int] | None  # [height, width] of every stored image; None for point sets
    channels: int  # stored channels: 1 (grayscale PNG/JPEG) or 3 (RGB); point dimension for point sets
    encoding: str  # "png" | "jpg" for images, "npy" for point sets
    has_labels: bool  # whether samples carry an int32 `label` component
    num_classes: int | None  # 1 + largest label, when labelled
    shards: list[ShardEntry]  # in order; global sample indices run through them in this order
    source: dict[str, Any]  # what was read (kind, path or built-in name, parameters)
    preprocessing: dict[str, Any]  # build-time geometry and encoding settings
    skipped_inputs: list[dict[str, str]] = field(default_factory=list)  # source items skipped: origin, error, reason
    format: str = FORMAT  # manifest schema version

    @property
    def source_bit_depth(self) -> int | None:
        """Highest bits per channel among the inputs; None for point sets and manifests written before it existed."""
        return self.source.get("bit_depth")

    @property
    def bit_depth_conversion(self) -> str | None:
        """How inputs deeper than 8 bits were reduced to the stored 8 bits; None if none were (or not recorded)."""
        return self.source.get("bit_depth_conversion")

    @property
    def skipped_too_large(self) -> int:
        """Inputs skipped for exceeding max_image_pixels (also listed, with the undecodable ones, in skipped_inputs)."""
        return sum(1 for s in self.skipped_inputs if s.get("reason") == "too_large")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    def content_hash(self) -> str:
        """SHA-256 over what determines the samples: geometry, encoding and every shard's checksum."""
        core = {
            "format": self.format,
            "kind": self.kind,
            "num_samples": self.num_samples,
            "image_size": self.image_size,
            "channels": self.channels,
            "encoding": self.encoding,
            "shards": [[s.tar, s.num_samples, s.sha256] for s in self.shards],
        }
        return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: str | Path, manifest: Manifest) -> Path:
    """Write atomically: a reader never sees half a manifest, and its presence marks the build complete."""
    path = Path(directory) / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(manifest.to_json())
    tmp.replace(path)
    return path


def load_manifest(directory: str | Path) -> Manifest:
    """Read and structurally check `<directory>/manifest.json`; errors name the file."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        hint = " (an interrupted build? rerun launchers/prepare_data.py)" if Path(directory).is_dir() else ""
        raise ManifestError(f"missing manifest: {path}{hint}")
    try:
        raw = json.loads(path.read_text())
        if raw.get("format") != FORMAT:
            raise ManifestError(f"{path}: unsupported format {raw.get('format')!r}, expected {FORMAT!r}")
        raw["shards"] = [ShardEntry(**s) for s in raw["shards"]]
        manifest = Manifest(**raw)
    except ManifestError:
        raise
    except (ValueError, TypeError, KeyError) as e:
        raise ManifestError(f"malformed manifest {path}: {e}") from e
    counted = sum(s.num_samples for s in manifest.shards)
    if counted != manifest.num_samples:
        raise ManifestError(f"{path}: num_samples={manifest.num_samples} but shards hold {counted}")
    return manifest


def manifest_hash(directory: str | Path) -> str:
    """Content hash of a shard directory (cache key for statistics computed from it, e.g. FID reference stats)."""
    return load_manifest(directory).content_hash()


def check_shards(directory: str | Path, manifest: Manifest, verify: str) -> dict[str, int]:
    """Compare shard files with the manifest.

    verify="off": existence only; "size": also byte sizes; "sha256": also checksums of tars and indexes.
    A missing file, a file longer than recorded, or a checksum mismatch is a ManifestError naming the file (the
    data is not what the manifest describes). A tar *shorter* than recorded is a truncated shard: that loses only
    the samples past the cut, so it is returned as {tar name: bytes present} for the reader to skip and count.
    """
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
    directory = Path(directory)
    truncated: dict[str, int] = {}
    for shard in manifest.shards:
        tar, idx = directory / shard.tar, directory / shard.index
        for p in (tar, idx):
            if not p.is_file():
                raise ManifestError(f"shard file listed in {directory / MANIFEST_NAME} is missing: {p}")
        if verify == "off":
            continue
        size = tar.stat().st_size
        if size > shard.bytes:
            raise ManifestError(f"shard {tar} has {size} bytes, manifest records {shard.bytes}: not the same data")
        if size < shard.bytes:
            truncated[shard.tar] = size
            if verify == "sha256":
                continue  # a cut shard cannot match its checksum; it is reported as truncated instead
        if verify == "sha256":
            if sha256_file(tar) != shard.sha256:
                raise ManifestError(f"SHA-256 mismatch for shard {tar}: modified since {MANIFEST_NAME} was written")
            if sha256_file(idx) != shard.index_sha256:
                raise ManifestError(f"SHA-256 mismatch for index {idx}: modified since {MANIFEST_NAME} was written")
    return truncated


def verify_dataset(directory: str | Path) -> Manifest:
    """Full check used by `prepare_data.py verify=<dir>`: every checksum, and truncation is an error here too."""
    manifest = load_manifest(directory)
    truncated = check_shards(directory, manifest, "sha256")
    if truncated:
        name, size = next(iter(truncated.items()))
        raise ManifestError(f"truncated shard {Path(directory) / name}: {size} bytes present of "
                            f"{next(s.bytes for s in manifest.shards if s.tar == name)}")
    return manifest
