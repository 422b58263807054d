"""Typed configuration of the training job, composed by Hydra from conf/ and validated before any rank works.

A job's schema is the job sections below (`JobConfig`: run, data, loop, engine, tracking) merged with the sections
of the chosen method (`core/methods/<name>.py`, e.g. `energy`, `sampler`, `backbone` for VAEBM), so every key keeps
its short name on the command line: `energy.arch=...`, `loop.total_nimg=...`. The method's primary config is
conf/method/<name>.yaml; its presets are conf/experiment/<name>/<preset>.yaml, short diffs over the dataclass
defaults. A misspelled key or a wrong type fails with one clear line naming the key.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from core.evaluation.baseline import ReportConfig
from core.tracking import TrackingConfig
from data_pipelines.config import DatasetConfig, LoaderConfig

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


class ConfigError(ValueError):
    """An invalid configuration: raised before any rank starts work, printed as one line."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass
class RunConfig:
    dir: str | None = None  # everything the run writes; same command + same dir = resume. None: runs/<exp>-<method>
    seed: int = 0  # root of every random stream (per-rank, per-step seeds derive from it)
    stop_after_nimg: int | None = None  # end this invocation after this many images (checkpointed), e.g. time slices
    dist_timeout_s: float = 600.0  # collective timeout: a dead rank makes the survivors exit instead of hang


@dataclass
class EngineConfig:
    precision: str = "fp32"  # fp32 | bf16 | fp16 (DeepSpeed mixed precision of the trained network)
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0-2
    gradient_clipping: float = 0.0  # global-norm clip; 0 disables (DeepSpeed's own default changed to 1.0 in 0.19.3)
    sync_batchnorm: bool = True  # BatchNorm statistics over all ranks (GPU, world > 1), as NVAE trains
    initial_loss_scale_power: int = 16  # fp16 only: dynamic loss scale starts at 2**this


@dataclass
class LoopConfig:
    total_nimg: int = 100_000  # training length in images seen (all ranks together)
    batch_size: int = 32  # images per rank per step
    report_every_nimg: int = 2_000  # metrics to the log and MLflow
    sample_every_nimg: int = 10_000  # sample grids from fixed noise
    checkpoint_every_nimg: int = 10_000  # checkpoint interval
    keep_checkpoints: int = 3  # checkpoints kept on disk (oldest deleted)
    max_nonfinite_in_row: int = 20  # abort after this many consecutive non-finite losses (each is skipped)
    sample_count: int = 64  # images per sample grid
    sample_temperatures: list[float] = field(default_factory=lambda: [1.0, 0.7])  # one grid per temperature
    progress_bar: bool = True  # tqdm bar with rate and ETA on rank 0


@dataclass
class JobConfig:
    """The sections every method's job has; the method's own sections are merged in (see `job_schema`)."""

    method: str = "vaebm"  # training method: core/methods/<name>.py (train_vaebm.py / train_nvae.py preset it)
    experiment: str = "quickstart"  # preset name (conf/experiment/<method>/<name>.yaml); names the run directory
    dataset: DatasetConfig = field(default_factory=DatasetConfig)  # what to read
    loader: LoaderConfig = field(default_factory=LoaderConfig)  # how to read it (batch_size comes from loop)
    engine: EngineConfig = field(default_factory=EngineConfig)  # DeepSpeed around the trained network
    loop: LoopConfig = field(default_factory=LoopConfig)  # schedule, counted in images
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # MLflow
    run: RunConfig = field(default_factory=RunConfig)  # run directory, seed, time slices
    report: ReportConfig = field(default_factory=ReportConfig)  # end of training: the method against its baseline
    dry_run: bool = False  # print the resolved config and the parameter counts, then exit without training

    def run_dir(self) -> Path:
        """Deterministic from the config alone, so every rank agrees without communicating."""
        return Path(self.run.dir or f"runs/{self.experiment}-{self.method}").expanduser().resolve()

    def validate(self) -> None:
        """Job sections here, then the method's own `validate(dataset)`; ValueErrors become ConfigErrors."""
        try:
            self.dataset.validate()
            self.loader.validate()
        except ValueError as err:
            raise ConfigError(str(err)) from None
        e = self.engine
        _require(e.precision in ("fp32", "bf16", "fp16"), f"engine.precision must be fp32|bf16|fp16, got {e.precision!r}")
        _require(e.zero_stage in (0, 1, 2), f"engine.zero_stage must be 0, 1 or 2, got {e.zero_stage}")
        _require(e.gradient_clipping >= 0, "engine.gradient_clipping must be >= 0")
        loop = self.loop
        _require(loop.total_nimg > 0 and loop.batch_size > 0, "loop.total_nimg and loop.batch_size must be positive")
        for name in ("report_every_nimg", "sample_every_nimg", "checkpoint_every_nimg"):
            _require(getattr(loop, name) > 0, f"loop.{name} must be positive")
        _require(loop.keep_checkpoints >= 1, "loop.keep_checkpoints must be >= 1")
        _require(loop.max_nonfinite_in_row >= 1, "loop.max_nonfinite_in_row must be >= 1")
        _require(loop.sample_count >= 1, "loop.sample_count must be >= 1")
        _require(self.run.stop_after_nimg is None or self.run.stop_after_nimg > 0, "run.stop_after_nimg must be > 0")
        try:
            self.report.validate()
        except ValueError as err:
            raise ConfigError(str(err)) from None
        _require(self.dataset.centered, "dataset.centered must be true: the models work on x in [-1, 1]")
        try:
            type(self).method_config_class.validate(self, self.dataset)
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(str(err.args[0]) if err.args else str(err)) from None


def job_schema(method_name: str) -> type:
    """The typed schema of `method=<name>`: JobConfig plus the method's config dataclass, as one flat dataclass."""
    from core.methods import get_method

    method = get_method(method_name)
    cls = dataclasses.make_dataclass(f"{method.__name__}JobConfig", [], bases=(method.config_class, JobConfig))
    cls.method_config_class = method.config_class
    cls.validate = JobConfig.validate  # the method config's validate(dataset) is called from there
    cls.__doc__ = f"Job config of method={method_name}: {JobConfig.__doc__}"
    return cls


def strip_launcher_args(argv: list[str]) -> list[str]:
    """Drop the `--local_rank=N` / `--local-rank N` that deepspeed and torch launchers append (Hydra rejects them)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if re.fullmatch(r"--local[_-]rank=\d+", arg):
            continue
        if arg in ("--local_rank", "--local-rank"):
            skip = True
            continue
        out.append(arg)
    return out


def _hydra_compose(schema: type, config_name: str, overrides: list[str]):
    """Hydra-compose conf/<config_name>.yaml with `overrides` onto the dataclass `schema`: (typed, resolved dict)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.errors import HydraException

    # The primary yaml lists `<name>_schema` first in its defaults: Hydra then knows every typed field, so
    # `section.field=value` works for fields no yaml mentions, and types are checked as overrides are applied.
    schema_name = f"{config_name}_schema"
    ConfigStore.instance().store(name=schema_name, node=schema)
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name=schema_name):
            raw = hydra_compose(config_name=config_name, overrides=overrides)
        merged = OmegaConf.merge(OmegaConf.structured(schema), raw)
        resolved = OmegaConf.to_container(merged, resolve=True)
        typed = OmegaConf.to_object(merged)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(str(err).splitlines()[0]) from None
    except (ValueError, TypeError) as err:  # a dataclass's own __post_init__ check
        raise ConfigError(str(err)) from None
    return typed, resolved


def split_method(overrides: list[str], default: str | None = None) -> tuple[str, list[str]]:
    """(`method=<name>` of the command line (the last one wins) or `default`, the remaining overrides)."""
    method, rest = default, []
    for o in overrides:
        if o.startswith("method="):
            method = o.split("=", 1)[1]
        else:
            rest.append(o)
    if not method:
        raise ConfigError("choose a method: method=<name>")
    return method, rest


def compose_job(overrides: list[str], default_method: str | None = None):
    """Typed, validated job config of `method=<name>` with `overrides`; returns (config, resolved dict, overrides).

    `experiment=<name>` selects conf/experiment/<method>/<name>.yaml (each method keeps its own presets, users type
    the same `experiment=`). Problems are one-line ConfigErrors.
    """
    from core.methods import METHODS, get_method

    method, rest = split_method(overrides, default_method)
    try:
        get_method(method)
    except KeyError:
        raise ConfigError(f"unknown method {method!r}; choose one of {sorted(METHODS)}") from None
    hydra_overrides = [f"experiment/{method}={o.split('=', 1)[1]}" if o.startswith("experiment=") else o
                       for o in rest]
    typed, resolved = _hydra_compose(job_schema(method), "train", [f"method={method}", *hydra_overrides])
    typed.validate()
    return typed, resolved, rest


def compose(schema: type, config_name: str, overrides: list[str]):
    """A single-schema job (sampling, evaluation, data preparation): (typed, resolved dict), validated."""
    typed, resolved = _hydra_compose(schema, config_name, overrides)
    typed.validate()
    return typed, resolved


def load_preset(group: str, name: str, schema: type, **overrides):
    """A preset of conf/<group>/<name>.yaml (a diff over `schema`'s defaults) with field overrides, as a validated
    typed object, e.g. `load_preset("nvae", "cifar10", NVAEConfig)`; unknown names and fields are KeyErrors."""
    path = CONF_DIR / group / f"{name}.yaml"
    if not path.is_file():
        raise KeyError(f"unknown {group} preset {name!r}; choose one of {preset_names(group)}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.load(path), overrides)
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise KeyError(str(err).splitlines()[0]) from None
    if hasattr(config, "validate"):
        config.validate()
    return config


def preset_names(group: str) -> list[str]:
    """The presets of conf/<group>/."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
