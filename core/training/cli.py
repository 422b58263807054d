"""What every launcher does before handing over to its job function: strip launcher arguments, compose and
validate the config (one clear line and exit code 2 on error, before any distributed work), set up logging, and
answer `dry_run=true`.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Any, Callable

from core.dist import env_rank
from core.training.config import ConfigError, compose, compose_job, strip_launcher_args

EXIT_CONFIG_ERROR = 2


def setup_logging() -> None:
    """INFO on rank 0, warnings only elsewhere, so an N-rank job prints one log."""
    level = logging.INFO if env_rank() == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s [rank{env_rank()}] %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/vaebm/torch_extensions"))


def _launch(compose_fn: Callable[[], tuple], job: Callable, describe: Callable[[Any, dict], str]) -> int:
    """Compose (exit 2 with one line on a config error), answer dry_run, or set up logging and run the job. A run
    directory that another job holds, checkpoints that all fail verification, missing or corrupt data and a model
    reference that does not exist also end with one line and exit code 2: retrying cannot help. A preempted job
    (SIGTERM/SIGINT, checkpoint written) exits with 143: retriable."""
    from core.training.checkpoint import CheckpointError
    from core.training.lock import RunDirLocked
    from core.training.preemption import EXIT_PREEMPTED, Preempted
    from core.tracking import ModelNotFoundError
    from data_pipelines.errors import DataConfigError, DataCorruptionError, ManifestError

    # Found after start, still not worth a retry: the run's MLflow runs end FAILED, one line, exit 2.
    input_errors = (RunDirLocked, CheckpointError, DataConfigError, DataCorruptionError, ManifestError,
                    ModelNotFoundError, _backbone_not_found())

    try:
        config, resolved, *rest = compose_fn()
    except ConfigError as err:
        if env_rank() == 0:
            print(f"config error: {err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if config.dry_run:
        if env_rank() == 0:
            print(describe(config, resolved))
        return 0
    setup_logging()
    try:
        job(config, resolved, *rest)
    except input_errors as err:
        if env_rank() == 0:
            print(f"error: {err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except Preempted as err:
        if env_rank() == 0:
            print(f"preempted ({err}): checkpoint written, exiting with {EXIT_PREEMPTED}", file=sys.stderr)
        return EXIT_PREEMPTED
    return 0


def _backbone_not_found() -> type:
    from core.training.job import BackboneNotFound

    return BackboneNotFound


def run_job(schema: type, config_name: str, argv: list[str], job: Callable[[Any, dict], Any],
            describe: Callable[[Any, dict], str]) -> int:
    """A single-schema job (sampling, evaluation): compose conf/<config_name>.yaml onto `schema`, run `job`."""
    return _launch(lambda: compose(schema, config_name, strip_launcher_args(argv)), job, describe)


def run_training(argv: list[str], default_method: str | None = None) -> int:
    """The training launchers: `method=<name>` (or `default_method`) selects the method and its config schema."""
    from core.training.job import describe, train

    return _launch(lambda: compose_job(strip_launcher_args(argv), default_method), train, describe)
