"""Build WebDataset shards + DALI indexes + manifest.json, or verify an existing shard directory.

    python launchers/prepare_data.py source=digits out=/data/digits32 size=32
    python launchers/prepare_data.py source=/data/celeba_hq out=/data/celebahq256 size=256 format=png
    python launchers/prepare_data.py verify=/data/celebahq256

Options are the fields of `data_pipelines.PrepareConfig` (defaults in conf/prepare_data.yaml). An invalid option or
value prints one `prepare_data: error: ...` line and exits 2; a failed build or verification exits 1.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from a checkout without relying on how the package was installed

from omegaconf import OmegaConf  # noqa: E402
from omegaconf.errors import OmegaConfBaseException  # noqa: E402

from data_pipelines import (DataConfigError, DataCorruptionError, ManifestError, PrepareConfig,  # noqa: E402
                            build_dataset, verify_dataset)


def parse(argv: list[str]) -> PrepareConfig:
    schema = OmegaConf.structured(PrepareConfig)
    defaults = OmegaConf.load(REPO / "conf" / "prepare_data.yaml")
    bad = [a for a in argv if "=" not in a]
    if bad:
        raise DataConfigError(f"expected key=value arguments, got {bad[0]!r}")
    cfg = OmegaConf.merge(schema, defaults, OmegaConf.from_dotlist(argv))
    prepare = OmegaConf.to_object(cfg)
    prepare.validate()
    return prepare


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = parse(argv)
    except (DataConfigError, OmegaConfBaseException, ValueError) as e:
        print(f"prepare_data: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
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
        print(f"prepare_data: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
