"""One job per run directory: an exclusive lock held by rank 0 for the job's life.

Two jobs on one run directory (a resubmitted Kubernetes Job while the old pod still runs) would interleave
checkpoints, config.json and model/ and register two versions. The lock is an OS file lock (`flock`) on
<run_dir>/.lock: the kernel releases it when the holder exits or dies, so a lock is never stale after a crash, and the
file names the holder (host, pid, start time) for the error message of the job that is turned away.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_FILE = ".lock"


class RunDirLocked(RuntimeError):
    """Another live job holds this run directory."""


class RunDirLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise RunDirLocked naming the holder. Never blocks."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "an unknown process"
            os.close(fd)
            raise RunDirLocked(f"run directory {self.path.parent} is in use by another job ({holder}); wait for it "
                               f"to end or choose another run.dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                 "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode())
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
