"""The job behind `launchers/import_nvae.py`: an official NVAE checkpoint -> our stage-1 model directory.

    python launchers/import_nvae.py checkpoint=<path/checkpoint.pt> out=<dir> [register=<name>]

`out` gets the model directory stage 1 publishes (config.json with the typed NVAE config, the weights; plus
`source.json`: where they came from), so `train_vaebm.py backbone=<out>` uses it as it is. With `register=<name>` the
model also becomes a new version of the registered MLflow model `<name>` with the alias `candidate`, like a finished
stage 1 (then `backbone=models:/<name>@candidate`). The tracking server comes from `tracking.*` as in every job; if it
cannot take the model the directory is still written and the job says so and fails (`RegistrationError`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.tracking import Tracker, TrackingConfig, resolve_tracking_uri, write_model_dir
from core.training.config import ConfigError

log = logging.getLogger("vaebm.import_nvae")
SOURCE_FILE = "source.json"  # provenance beside the weights: checkpoint path, sha256, epoch, its args


class RegistrationError(RuntimeError):
    """The model directory is written but the tracking server did not take the model."""


@dataclass
class ImportNVAEConfig:
    checkpoint: str | None = None  # an official NVAE checkpoint.pt (NVlabs/NVAE train.py; Normal decoder)
    out: str | None = None  # the model directory to write (created; existing model files are replaced)
    register: str | None = None  # also register the model in MLflow under this name (alias `candidate`)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # MLflow, for register=
    dry_run: bool = False  # print the resolved config and exit

    def validate(self) -> None:
        if not self.checkpoint or not self.out:
            raise ConfigError("import_nvae needs checkpoint=<path/checkpoint.pt> and out=<model dir>")
        if self.register is not None and not self.register.strip():
            raise ConfigError("register= needs a model name")
        if self.register and not self.tracking.enabled:
            raise ConfigError("register= needs tracking.enabled=true")


def describe(config: ImportNVAEConfig, resolved: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(resolved, sort_keys=False)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def import_nvae(config: ImportNVAEConfig, resolved: dict[str, Any]) -> Path:
    """Convert, write `out`, optionally register; returns the model directory."""
    from core.methods.nvae import float_state, vae_bundle
    from core.models.official_nvae import nvae_from_official, read_official_checkpoint

    checkpoint = Path(config.checkpoint).expanduser().resolve()
    args, official = read_official_checkpoint(checkpoint)
    model, nvae_config = nvae_from_official(args, official)
    source = {"checkpoint": str(checkpoint), "sha256": _sha256(checkpoint), "args": args}
    bundle, weights = vae_bundle(model), float_state(model)
    out = write_model_dir(Path(config.out).expanduser(), bundle, weights,
                          {SOURCE_FILE: json.dumps(source, indent=2, default=str)})
    log.info("imported %s (%s, %d latent groups, num_nf=%d) into %s", checkpoint, args.get("dataset"),
             nvae_config.num_groups, nvae_config.num_nf, out)
    if config.register:
        _register(config, bundle, weights, source)
    return out


def _register(config: ImportNVAEConfig, bundle: dict[str, Any], weights, source: dict[str, Any]) -> None:
    from core.training.checkpoint import CANDIDATE_ALIAS

    uri = resolve_tracking_uri(config.tracking)
    with tempfile.TemporaryDirectory(prefix="import-nvae-") as tracking_dir:  # the tracker's staging area
        tracker = Tracker(config.tracking, tracking_dir, is_rank0=True)
        try:
            tracker.start(config.register, "import")
            tracker.log_params({"source": {k: v for k, v in source.items() if k != "args"}, "args": source["args"]})
            tracker.log_model(config.register, bundle, weights, alias=CANDIDATE_ALIAS)
            tracker.end("FINISHED")
            delivered = tracker.flush()
            stats = tracker.stats
        finally:
            tracker.close()
    if not delivered or stats["dropped"]:
        raise RegistrationError(
            f"the model directory {config.out} is written, but MLflow at {uri} did not take the model "
            f"{config.register!r} ({'unreachable' if not delivered else 'rejected'}); rerun with the same register= "
            "once the server answers")
    log.info("registered models:/%s@%s at %s", config.register, CANDIDATE_ALIAS, uri)
