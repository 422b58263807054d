"""Graceful preemption: SIGTERM or SIGINT, or the death of the `deepspeed` runner that started this rank, asks the job
to stop; the loop agrees on it across ranks at the next step boundary, checkpoints at the current image count and
the job exits with `EXIT_PREEMPTED`, which Kubernetes treats as retriable (only exit code 2 fails a Job at once).

Why the runner check: on one node DeepSpeed's runner does not pass SIGTERM on to its ranks, so `kill <runner>` used
to leave them training to the end on their own. A rank that sees its runner gone stops as if it had been signalled.
"""
from __future__ import annotations

import signal

import psutil

EXIT_PREEMPTED = 128 + signal.SIGTERM  # 143, what a process killed by SIGTERM reports


class Preempted(Exception):
    """Raised by the job after the preemption checkpoint is written and the tracking runs are ended as KILLED."""


class StopRequest:
    """This rank's reason to stop early, if any (installed for the job's life; the previous handlers come back).

    The reason is one of `REASONS`, so ranks can agree on it with one sum of one-hot votes (`vote`, `agreed`): every
    rank then reports a reason some rank actually saw (the first in `REASONS` order when ranks saw different ones),
    not merely that another rank was asked to stop.
    """

    RUNNER_EXITED = "the deepspeed runner exited"
    REASONS = ("SIGTERM", "SIGINT", RUNNER_EXITED)

    def __init__(self):
        self.reason: str | None = None
        self._previous: dict[int, object] = {}
        self._runner = _deepspeed_runner()

    def install(self) -> "StopRequest":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame) -> None:
        self.reason = signal.Signals(signum).name

    def requested(self) -> bool:
        if self.reason is None and self._runner is not None and not _alive(self._runner):
            self.reason = self.RUNNER_EXITED
        return self.reason is not None

    def vote(self) -> list[float]:
        """This rank's one-hot vote over `REASONS` (all zeros: no reason to stop)."""
        self.requested()
        reason = self.reason  # read once: a signal may arrive while the vote is built
        if reason is not None and reason not in self.REASONS:
            raise ValueError(f"stop reason {reason!r} is not one of {self.REASONS}")
        return [1.0 if reason == r else 0.0 for r in self.REASONS]

    @classmethod
    def agreed(cls, votes: list[float]) -> str | None:
        """The reason all ranks stop for, from the sum of their votes: of the reasons any rank saw, the first in
        `REASONS` order; None when no rank was asked."""
        return next((r for r, n in zip(cls.REASONS, votes) if n > 0), None)


def _alive(process: psutil.Process) -> bool:
    """Running and not a zombie (a killed runner stays a zombie until its own parent reaps it)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _deepspeed_runner() -> psutil.Process | None:
    """The `deepspeed` runner this rank descends from (through DeepSpeed's per-node launch process), if any."""
    try:
        for ancestor in psutil.Process().parents()[:3]:
            argv = ancestor.cmdline()
            if "deepspeed.launcher.runner" in argv or any(a == "deepspeed" or a.endswith("/deepspeed") for a in argv):
                return ancestor
    except (psutil.Error, OSError):
        pass
    return None
