"""Build WebDataset shards + DALI indexes + manifest.json, or verify an existing shard directory.

    python launchers/prepare_data.py source=digits out=/data/digits32 size=32
    python launchers/prepare_data.py source=/data/celeba_hq out=/data/celebahq256 size=256 format=png
    python launchers/prepare_data.py verify=/data/celebahq256
    python launchers/prepare_data.py -m source=digits out=/data/digits size=16,32   # out=/data/digits--size=16, ...

Options are the fields of `data_pipelines.PrepareConfig` (conf/prepare_data.yaml; `--help` lists them). An invalid
option or value prints one `config error: ...` line and exits 2; a failed build or verification exits 1.
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from a checkout without relying on how the package was installed

from core.training.cli import JobFailed, run_job  # noqa: E402
from core.training.config import compose, strip_launcher_args  # noqa: E402
from data_pipelines import (DataConfigError, DataCorruptionError, ManifestError, PrepareConfig,  # noqa: E402
                            build_dataset, verify_dataset)

EXIT_FAILED = 1


def parse(argv: list[str]) -> PrepareConfig:
    """The validated PrepareConfig of a command line (a ConfigError names what is wrong)."""
    return compose(PrepareConfig, "prepare_data", strip_launcher_args(argv))[0]


def prepare(cfg: PrepareConfig, resolved: dict) -> None:
    """Verify `cfg.verify`, or build `cfg.out` from `cfg.source`; a failure is a JobFailed with exit code 1."""
    try:
        if cfg.verify is not None:
            manifest = verify_dataset(cfg.verify)
            print(f"OK {cfg.verify}: {manifest.num_samples} samples in {len(manifest.shards)} shards, all SHA-256 "
                  f"match; manifest hash {manifest.content_hash()}")
        else:
            manifest = build_dataset(cfg)
            print(f"OK {cfg.out}: {manifest.num_samples} samples in {len(manifest.shards)} shards; "
                  f"manifest hash {manifest.content_hash()}")
    except (DataConfigError, ManifestError, DataCorruptionError, ValueError, ImportError) as e:
        raise JobFailed(str(e), EXIT_FAILED) from None


def describe(cfg: PrepareConfig, resolved: dict) -> str:
    import yaml

    return yaml.safe_dump(resolved, sort_keys=False)


if __name__ == "__main__":
    sys.exit(run_job(PrepareConfig, "prepare_data", sys.argv[1:], prepare, describe, doc=__doc__))
