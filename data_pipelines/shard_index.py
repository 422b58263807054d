"""DALI's WebDataset index format (`wds2idx`, version v1.2), written and read here.

One index per shard: the header `v1.2 <num_samples>`, then one line per sample listing each of its files as
`<ext> <data offset> <size> <member name>`. DALI's `fn.readers.webdataset(index_paths=...)` consumes it, and the
loaders in this package use the same offsets for random access into the tar (`os.pread`), which is what lets any
rank/worker read any sample without scanning a shard. The writer uses `tarfile` offsets directly rather than DALI's
`wds2idx` tool, which shells out to GNU tar twice per shard; tests check both produce identical files.
"""
from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path

INDEX_VERSION = "v1.2"


@dataclass(frozen=True)
class IndexedSample:
    """Where one sample's files live inside its shard."""

    key: str  # the WebDataset key (member name up to the first dot of the basename)
    members: dict[str, tuple[int, int]]  # extension -> (data offset in bytes, size in bytes)

    def end(self) -> int:
        """One past the last byte this sample needs; a shard shorter than this has lost the sample."""
        return max(off + size for off, size in self.members.values())


def split_member_name(name: str) -> tuple[str, str]:
    """WebDataset convention (same as wds2idx): key = up to the first dot after the last slash, ext = the rest."""
    dot = name.find(".", name.rfind("/") + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :]


def build_index(tar_path: str | Path) -> list[IndexedSample]:
    """Group a tar's regular files into samples by consecutive key, recording data offsets and sizes."""
    samples: list[IndexedSample] = []
    with tarfile.open(tar_path, "r:") as tar:
        for member in tar:
            if not member.isreg():
                continue
            key, ext = split_member_name(member.name)
            if not key or key.endswith("/"):
                continue
            if samples and samples[-1].key == key:
                samples[-1].members[ext] = (member.offset_data, member.size)
            else:
                samples.append(IndexedSample(key, {ext: (member.offset_data, member.size)}))
    return samples


def format_index(samples: list[IndexedSample]) -> str:
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    for s in samples:
        lines.append(" ".join(f"{ext} {off} {size} {s.key}.{ext}" for ext, (off, size) in s.members.items()))
    return "\n".join(lines) + "\n"


def write_index(tar_path: str | Path, index_path: str | Path) -> list[IndexedSample]:
    """Index `tar_path` into `index_path`; returns the samples so the caller can count them."""
    samples = build_index(tar_path)
    if not samples:
        raise ValueError(f"shard has no samples: {tar_path}")
    Path(index_path).write_text(format_index(samples))
    return samples


def read_index(index_path: str | Path) -> list[IndexedSample]:
    """Parse an index file; raises ValueError naming the file on any malformed line."""
    path = Path(index_path)
    lines = path.read_text().splitlines()
    if not lines:
        raise ValueError(f"empty index file: {path}")
    header = lines[0].split()
    if len(header) != 2 or header[0] != INDEX_VERSION:
        raise ValueError(f"{path}: expected header '{INDEX_VERSION} <count>', got {lines[0]!r}")
    count = int(header[1])
    if len(lines) - 1 != count:
        raise ValueError(f"{path}: header says {count} samples, file lists {len(lines) - 1}")
    samples = []
    for lineno, line in enumerate(lines[1:], start=2):
        fields = line.split()
        if not fields or len(fields) % 4:
            raise ValueError(f"{path}:{lineno}: expected groups of '<ext> <offset> <size> <name>'")
        members = {}
        key = None
        for i in range(0, len(fields), 4):
            ext, off, size, name = fields[i : i + 4]
            members[ext] = (int(off), int(size))
            key = split_member_name(name)[0]
        samples.append(IndexedSample(key, members))
    return samples
