"""Random access to samples in WebDataset shards through their wds2idx indexes, with bad-sample handling.

Why random access instead of streaming tars: exact-once coverage per epoch and exact resume need every rank and
worker to read *specific* samples in a (seed, epoch) order, with any shard count. The index gives each sample's
byte range, so a read is one `os.pread` of a few KB from a page-cached file; that is as fast as sequential
streaming on local or network file systems and needs no shuffle buffer.

Bad input: a sample that cannot be read or decoded, or whose header declares more pixels than the dataset's
`max_image_pixels` (refused before decoding), is replaced, in its batch slot, by the next good sample in
dataset order (so every batch keeps its shape and every rank its batch count), and reported back to the loader,
which counts it, logs it on rank 0 and fails once more than `max_bad_fraction` of the dataset is bad. Shards cut
short (truncated copies) lose only the samples past the cut; those are known at open time.
"""
from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np

from .errors import DataCorruptionError, ManifestError
from .image_prep import DEFAULT_MAX_IMAGE_PIXELS, open_image
from .manifest import MANIFEST_NAME, Manifest, check_shards, load_manifest
from .shard_index import read_index

log = logging.getLogger(__name__)
T = TypeVar("T")
IMAGE_EXTS = ("png", "jpg", "jpeg")
LABEL_EXT = "label"


@dataclass(frozen=True)
class BadSample:
    """One sample that could not be delivered."""

    index: int  # dataset sample index
    shard: str  # tar file name
    reason: str  # decoder or I/O error


class ShardReader:
    """Reads sample bytes by global index. Picklable: file handles are reopened lazily in each worker process."""

    def __init__(self, directory: str | Path, verify: str = "size", max_bad_fraction: float = 0.01,
                 log_problems: bool = True):
        self.directory = Path(directory)
        self.manifest: Manifest = load_manifest(self.directory)
        truncated = check_shards(self.directory, self.manifest, verify)
        self.max_bad_fraction = max_bad_fraction
        self.num_samples = self.manifest.num_samples
        # Per tar sample: shard id, byte range covering all its members, and each member's (offset, size).
        shard_ids, starts, ends, members = [], [], [], []
        for sid, shard in enumerate(self.manifest.shards):
            index_path = self.directory / shard.index
            try:
                samples = read_index(index_path)
            except ValueError as e:
                raise ManifestError(str(e)) from e
            if len(samples) != shard.entries:
                raise ManifestError(f"{index_path} lists {len(samples)} samples, {self.directory / MANIFEST_NAME} "
                                    f"records {shard.entries} for {shard.tar}")
            for s in samples:
                shard_ids.append(sid)
                starts.append(min(off for off, _ in s.members.values()))
                ends.append(s.end())
                members.append(s.members)
        self.shard_ids = np.asarray(shard_ids, dtype=np.int32)
        self.starts = np.asarray(starts, dtype=np.int64)
        self.ends = np.asarray(ends, dtype=np.int64)
        self.members = members
        self.image_ext = self._image_ext()
        # Samples beyond the end of a truncated shard are lost; known now, skipped and counted when reached.
        self.lost: set[int] = set()
        for sid, shard in enumerate(self.manifest.shards):
            if shard.tar in truncated:
                mine = np.nonzero((self.shard_ids == sid) & (self.ends > truncated[shard.tar]))[0]
                self.lost.update(int(i) for i in mine)
                if log_problems:
                    log.warning("shard %s is truncated (%d of %d bytes): %d samples lost and will be skipped",
                                self.directory / shard.tar, truncated[shard.tar], shard.bytes, len(mine))
        self.check_bad_fraction(self.lost)
        self._fds: dict[int, int] = {}
        self._pid = -1

    def _image_ext(self) -> str | None:
        if self.manifest.kind != "image":
            return None
        return next((e for e in IMAGE_EXTS if e in self.members[0]), None) if self.members else None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fds"], state["_pid"] = {}, -1
        return state

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        if getattr(self, "_pid", -1) == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = {}

    def _fd(self, shard_id: int) -> int:
        if self._pid != os.getpid():  # forked into a worker: descriptors are not ours to share
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(shard_id)
        if fd is None:
            fd = os.open(self.directory / self.manifest.shards[shard_id].tar, os.O_RDONLY)
            self._fds[shard_id] = fd
        return fd

    def shard_name(self, entry: int) -> str:
        return self.manifest.shards[int(self.shard_ids[entry])].tar

    def read_entry(self, entry: int) -> dict[str, bytes]:
        """All members of tar sample `entry`, read with a single pread of their covering byte range."""
        if entry in self.lost:
            raise OSError("sample lies past the end of a truncated shard")
        start, end = int(self.starts[entry]), int(self.ends[entry])
        blob = os.pread(self._fd(int(self.shard_ids[entry])), end - start, start)
        if len(blob) != end - start:
            raise OSError(f"short read ({len(blob)} of {end - start} bytes): shard truncated")
        return {ext: blob[off - start : off - start + size] for ext, (off, size) in self.members[entry].items()}

    def read_image(self, index: int) -> tuple[bytes, int]:
        """(encoded image bytes, label or -1) of image sample `index`."""
        parts = self.read_entry(index)
        if self.image_ext not in parts:
            raise OSError(f"sample has no .{self.image_ext} member")
        label = parts.get(LABEL_EXT)
        return parts[self.image_ext], (int(np.frombuffer(label, "<i4")[0]) if label is not None else -1)

    def read_points(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Whole point set in memory (point sets are small); lost chunks are an error here, not a skip."""
        chunks, labels = [], []
        for entry in range(len(self.members)):
            try:
                parts = self.read_entry(entry)
                chunks.append(np.load(io.BytesIO(parts["points.npy"])))
                if LABEL_EXT in parts:
                    labels.append(np.frombuffer(parts[LABEL_EXT], "<i4"))
            except Exception as e:
                raise DataCorruptionError(f"point chunk {entry} of {self.directory / self.shard_name(entry)} "
                                          f"unreadable: {e}") from e
        points = np.concatenate(chunks).astype(np.float32)
        if len(points) != self.num_samples:
            raise ManifestError(f"{self.directory / MANIFEST_NAME} records {self.num_samples} points, shards hold "
                                f"{len(points)}")
        return points, (np.concatenate(labels).astype(np.int64) if labels else None)

    def check_bad_fraction(self, bad: set[int]) -> None:
        limit = self.max_bad_fraction * self.num_samples
        if len(bad) > limit:
            raise DataCorruptionError(
                f"{len(bad)} of {self.num_samples} samples in {self.directory} are undecodable, over "
                f"max_image_pixels, or lost to truncated shards, more than max_bad_fraction={self.max_bad_fraction}; "
                f"run `python launchers/prepare_data.py verify={self.directory}` and rebuild the dataset")

    def fetch(self, index: int, decode: Callable[[bytes], T]) -> tuple[T, int, int, list[BadSample]]:
        """Decode sample `index`, or the next good one in dataset order if it is bad.

        Returns (decoded, label, index actually used, bad samples met on the way).
        """
        bad: list[BadSample] = []
        limit = int(self.max_bad_fraction * self.num_samples) + 1
        i = index
        for _ in range(limit + 1):
            try:
                data, label = self.read_image(i)
                return decode(data), label, i, bad
            except Exception as e:  # every decoder/I-O failure means the same: skip and count
                bad.append(BadSample(i, self.shard_name(i), f"{type(e).__name__}: {e}"))
                i = (i + 1) % self.num_samples
        raise DataCorruptionError(f"{len(bad)} consecutive bad samples from index {index} in {self.directory} "
                                  f"(max_bad_fraction={self.max_bad_fraction}); first: {bad[0].shard}: {bad[0].reason}")


def check_encoded_image(data: bytes, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> bytes:
    """Cheap structural check for pipelines that decode elsewhere (DALI): PNG chunk CRCs and IEND, JPEG SOI/EOI,
    and the pixel limit from the header (0 or None: no limit), so an oversize image never reaches the decoder.

    Catches truncation and bit rot in PNG shards without a full decode on the host.
    """
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        open_image(data, max_pixels).verify()  # walks every chunk, checking CRCs up to IEND
        return data
    if data[:2] == b"\xff\xd8":
        if data.rstrip(b"\x00")[-2:] != b"\xff\xd9":
            raise ValueError("JPEG without end-of-image marker (truncated)")
        open_image(data, max_pixels)  # parses the markers up to the frame header only
        return data
    raise ValueError("neither PNG nor JPEG data")
