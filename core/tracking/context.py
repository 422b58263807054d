"""Where a run comes from: the tags every run gets (MLflow's own names where MLflow has one) and the run names.

    mlflow.source.git.commit   HEAD of this package's checkout (absent when it is not a git checkout)
    vaebm.git.dirty            "true" when tracked files differ from that commit
    mlflow.source.name         the launcher (relative to the checkout when inside it), else sys.argv[0]
    mlflow.source.type         JOB inside a Kubernetes pod, else LOCAL
    mlflow.user                $VAEBM_USER, else $MLFLOW_TRACKING_USERNAME, else the login name, else uid<N>
    vaebm.method / vaebm.dataset / vaebm.world_size   what the job trains, on what, on how many ranks

MLflow's fluent `mlflow.start_run` sets the first four itself; this project creates runs with an `MlflowClient` on
its sender thread, so it sets them here, and it reads the commit of the code that runs (this checkout), not of the
working directory.
"""
from __future__ import annotations

import functools
import getpass
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]  # the checkout holding core/ when installed from a clone
_GIT_TIMEOUT_S = 5.0


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True,
                             timeout=_GIT_TIMEOUT_S, check=True)
    except (OSError, subprocess.SubprocessError):  # no git, not a checkout, a hung filesystem
        return None
    return out.stdout.strip()


@functools.lru_cache(maxsize=1)
def git_tags() -> dict[str, str]:
    """The commit of this package's checkout and whether tracked files differ from it; {} when it is not one (e.g.
    installed into site-packages) or git is missing."""
    top = _git("rev-parse", "--show-toplevel")
    if not top or Path(top).resolve() != REPO_ROOT:
        return {}
    commit = _git("rev-parse", "HEAD")
    if not commit:
        return {}
    tags = {"mlflow.source.git.commit": commit}
    status = _git("status", "--porcelain", "--untracked-files=no")
    if status is not None:
        tags["vaebm.git.dirty"] = "true" if status else "false"
    branch = _git("rev-parse", "--abbrev-ref", "HEAD")
    if branch and branch != "HEAD":
        tags["mlflow.source.git.branch"] = branch
    return tags


def user() -> str:
    """Who started the run: $VAEBM_USER, $MLFLOW_TRACKING_USERNAME, the login name ($LOGNAME/$USER or the password
    database), else uid<N> (a container user without a passwd entry)."""
    for var in ("VAEBM_USER", "MLFLOW_TRACKING_USERNAME"):
        if os.environ.get(var):
            return os.environ[var]
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 -- KeyError/OSError when the uid has no passwd entry
        return f"uid{os.getuid()}" if hasattr(os, "getuid") else "unknown"


def source_name() -> str:
    main = sys.argv[0] if sys.argv and sys.argv[0] else "<console>"
    try:
        return Path(main).resolve().relative_to(REPO_ROOT).as_posix()
    except (ValueError, OSError):
        return main


def run_tags(method: str | None, dataset: str | None, world_size: int | None) -> dict[str, str]:
    """The tags of every run this process creates (see the module docstring)."""
    tags = {
        **git_tags(),
        "mlflow.source.name": source_name(),
        "mlflow.source.type": "JOB" if os.environ.get("KUBERNETES_SERVICE_HOST") else "LOCAL",
        "mlflow.user": user(),
    }
    if method:
        tags["vaebm.method"] = method
    if dataset:
        tags["vaebm.dataset"] = dataset
    if world_size is not None:
        tags["vaebm.world_size"] = str(world_size)
    return tags


def run_name(method: str | None, dataset: str | None, short_id: str, fallback: str) -> str:
    """``<method>-<dataset>-<short id>`` (`fallback` stands in for method-dataset when neither is known)."""
    stem = "-".join(p for p in (method, dataset) if p) or fallback
    return f"{stem}-{short_id}"
