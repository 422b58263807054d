"""Typed configuration of the training jobs, composed by Hydra from conf/ and validated before any rank works.

Every job's config is a dataclass tree; yaml files and `key=value` overrides are merged onto it with OmegaConf, so a
misspelled key or a wrong type fails with one clear line naming the key.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from core.models.energy import EnergyNetConfig
from core.models.nvae_config import NVAEConfig, nvae_config_from_dict
from core.objectives.elbo import ELBOConfig
from core.sampling.langevin import LangevinConfig
from core.sampling.replay_buffer import ReplayBufferConfig
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
    dir: str | None = None  # everything the run writes; same command + same dir = resume. None: runs/<experiment>
    seed: int = 0  # root of every random stream (per-rank, per-step seeds derive from it)
    stop_after_nimg: int | None = None  # end this invocation after this many images (checkpointed), e.g. time slices
    dist_timeout_s: float = 600.0  # collective timeout: a dead rank makes the survivors exit instead of hang


@dataclass
class OptimConfig:
    lr: float = 1e-2  # peak learning rate (Adamax, as NVAE)
    lr_min: float = 1e-4  # cosine schedule floor
    warmup_nimg: int = 0  # linear learning-rate warm-up length in images
    weight_decay: float = 3e-4  # Adamax weight decay
    eps: float = 1e-3  # Adamax epsilon (NVAE's 1e-3 keeps early steps tame)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # Adamax betas


@dataclass
class EngineConfig:
    precision: str = "fp32"  # fp32 | bf16 | fp16 (DeepSpeed mixed precision of the trained network)
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0-2
    gradient_clipping: float = 0.0  # global-norm clip; 0 disables (DeepSpeed's own default changed to 1.0 in 0.19.3)
    sync_batchnorm: bool = True  # BatchNorm statistics over all ranks, as NVAE trains
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
class Stage1Config:
    experiment: str = "quickstart"  # preset name (conf/experiment/<name>.yaml); names the run directory
    nvae: dict[str, Any] = field(default_factory=lambda: {"preset": "tiny"})  # preset + NVAEConfig overrides
    objective: ELBOConfig = field(default_factory=ELBOConfig)  # KL warm-up/balancing, regularization
    dataset: DatasetConfig = field(default_factory=DatasetConfig)  # what to read
    loader: LoaderConfig = field(default_factory=LoaderConfig)  # how to read it (batch_size is set from loop)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    dry_run: bool = False  # print the resolved config and a model summary, then exit without training

    def nvae_config(self) -> NVAEConfig:
        return nvae_config_from_dict(self.nvae)

    def run_dir(self) -> Path:
        """Deterministic from the config alone, so every rank agrees without communicating."""
        return Path(self.run.dir or f"runs/{self.experiment}").expanduser().resolve()

    def validate(self) -> None:
        try:
            nvae = self.nvae_config()
        except (KeyError, ValueError, TypeError) as err:
            raise ConfigError(f"nvae: {err.args[0] if err.args else err}") from None
        try:
            self.dataset.validate()
            self.loader.validate()
        except ValueError as err:
            raise ConfigError(str(err)) from None
        _require(self.engine.precision in ("fp32", "bf16", "fp16"),
                 f"engine.precision must be fp32|bf16|fp16, got {self.engine.precision!r}")
        _require(self.engine.zero_stage in (0, 1, 2), f"engine.zero_stage must be 0, 1 or 2, got {self.engine.zero_stage}")
        _require(self.engine.gradient_clipping >= 0, "engine.gradient_clipping must be >= 0")
        loop = self.loop
        _require(loop.total_nimg > 0 and loop.batch_size > 0, "loop.total_nimg and loop.batch_size must be positive")
        for name in ("report_every_nimg", "sample_every_nimg", "checkpoint_every_nimg"):
            _require(getattr(loop, name) > 0, f"loop.{name} must be positive")
        _require(loop.keep_checkpoints >= 1, "loop.keep_checkpoints must be >= 1")
        _require(loop.max_nonfinite_in_row >= 1, "loop.max_nonfinite_in_row must be >= 1")
        _require(self.optim.lr > 0 and 0 <= self.optim.lr_min <= self.optim.lr, "need 0 <= optim.lr_min <= optim.lr")
        _require(len(self.optim.betas) == 2, "optim.betas needs two values")
        _require(self.run.stop_after_nimg is None or self.run.stop_after_nimg > 0, "run.stop_after_nimg must be > 0")
        _require(self.dataset.resolution in (None, nvae.image_size),
                 f"dataset.resolution={self.dataset.resolution} but the NVAE image_size is {nvae.image_size}")
        _require(self.dataset.channels == nvae.in_channels,
                 f"dataset.channels={self.dataset.channels} but the NVAE expects in_channels={nvae.in_channels}")
        _require(self.dataset.num_bits == nvae.num_x_bits,
                 f"dataset.num_bits={self.dataset.num_bits} but the NVAE preset trains on {nvae.num_x_bits}-bit inputs")
        _require(self.dataset.centered, "dataset.centered must be true: the NVAE models x in [-1, 1]")


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


def compose(schema: type, config_name: str, overrides: list[str], experiment_group: str = "experiment"):
    """Hydra-compose conf/<config_name>.yaml with `overrides`, merge onto the dataclass `schema`, validate.

    `experiment=<name>` selects from `experiment_group` (each job keeps its presets in its own group, users type
    the same `experiment=`). Returns (typed config object, resolved plain dict); problems are one-line ConfigErrors.
    """
    overrides = [f"{experiment_group}={o.split('=', 1)[1]}" if o.startswith("experiment=") else o for o in overrides]
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.errors import HydraException

    # The primary yaml lists `<config_name>_schema` first in its defaults: Hydra then knows every typed field, so
    # `section.field=value` works for fields no yaml mentions, and types are checked as overrides are applied.
    ConfigStore.instance().store(name=f"{config_name}_schema", node=schema)
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name=config_name):
            raw = hydra_compose(config_name=config_name, overrides=overrides)
        merged = OmegaConf.merge(OmegaConf.structured(schema), raw)
        resolved = OmegaConf.to_container(merged, resolve=True)
        typed = OmegaConf.to_object(merged)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(str(err).splitlines()[0]) from None
    typed.validate()
    return typed, resolved


def asdict(config) -> dict[str, Any]:
    return dataclasses.asdict(config)


# ----------------------------------------------------------------------------------------------------- stage 2
@dataclass
class EBMOptimConfig(OptimConfig):
    lr: float = 4e-5  # constant learning rate of Table 8
    lr_min: float = 4e-5  # equal to lr: VAEBM trains with a constant rate
    betas: list[float] = field(default_factory=lambda: [0.99, 0.999])  # Adam betas (vaebm.md App. E)
    eps: float = 1e-8  # Adam epsilon
    weight_decay: float = 3e-5  # Adam weight decay (vaebm.md App. E)
    clip_std: float = 3.0  # clamp each gradient element to clip_std * sqrt(v_hat) (+ clip_slack)
    clip_slack: float = 0.1  # additive slack of the official implementation; 0 for the bare formula


@dataclass
class SamplerConfig:
    langevin: LangevinConfig = field(default_factory=LangevinConfig)  # training chains (Table 8: steps, step size)
    target: str = "exact"  # exact: E(T(eps)) + |eps|^2/2 (vaebm.md Eq. 9) | reference: the official code's target
    use_mean: bool = False  # negatives from the decoder mean mu(z) instead of a decoder sample
    temperature: float = 1.0  # prior temperature inside T_z
    test_steps: int = 16  # chain length for sample grids and the sampling job (16/20/24 in App. E)
    persistent: bool = False  # eps_z chains start from the replay buffer with probability p (Table 8 "Persistent")


@dataclass
class EBMObjectiveConfig:
    alpha_s: float = 0.2  # spectral regularization coefficient (0.2 in App. E; 0.3 for CelebA-HQ-256)
    max_energy_gap: float = 1e4  # |E(x+) - E(x-)| above this at a report counts as divergence
    divergence_patience: int = 3  # consecutive divergent reports before training stops


@dataclass
class Stage2Config:
    experiment: str = "quickstart"  # preset name (conf/experiment_vaebm/<name>.yaml); names the run directory
    backbone: str = "models:/nvae-digits@latest"  # MLflow model URI or a run/model directory
    backbone_dtype: str = "fp32"  # precision of the frozen backbone: fp32 | bf16
    backbone_train_if_missing: bool = False  # train the backbone first (nested stage) when it is not found
    backbone_experiment: str = "quickstart"  # train_nvae experiment used for that nested stage
    energy: EnergyNetConfig = field(default_factory=EnergyNetConfig)  # energy network (Table 7)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)  # Langevin negative phase
    buffer: ReplayBufferConfig = field(default_factory=ReplayBufferConfig)  # used when sampler.persistent
    objective: EBMObjectiveConfig = field(default_factory=EBMObjectiveConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    optim: EBMOptimConfig = field(default_factory=EBMOptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    dry_run: bool = False  # print the resolved config and the energy network summary, then exit

    def run_dir(self) -> Path:
        return Path(self.run.dir or f"runs/{self.experiment}-vaebm").expanduser().resolve()

    def validate(self) -> None:
        try:
            self.dataset.validate()
            self.loader.validate()
        except ValueError as err:
            raise ConfigError(str(err)) from None
        _require(self.backbone_dtype in ("fp32", "bf16"), "backbone_dtype must be fp32 or bf16")
        _require(self.sampler.target in ("exact", "reference"),
                 f"sampler.target must be exact or reference, got {self.sampler.target!r}")
        _require(self.sampler.langevin.num_steps >= 1 and self.sampler.langevin.step_size > 0,
                 "sampler.langevin needs num_steps >= 1 and step_size > 0")
        _require(self.sampler.test_steps >= 1, "sampler.test_steps must be >= 1")
        _require(self.buffer.device in ("cpu", "cuda"), "buffer.device must be cpu or cuda")
        _require(self.objective.alpha_s >= 0, "objective.alpha_s must be >= 0")
        _require(self.engine.precision in ("fp32", "bf16", "fp16"), "engine.precision must be fp32|bf16|fp16")
        _require(self.engine.zero_stage in (0, 1, 2), "engine.zero_stage must be 0, 1 or 2")
        _require(self.loop.total_nimg > 0 and self.loop.batch_size > 0, "loop.total_nimg and batch_size must be > 0")
        _require(self.optim.clip_std > 0 and self.optim.clip_slack >= 0, "optim.clip_std > 0, clip_slack >= 0")
        _require(self.dataset.centered, "dataset.centered must be true: the backbones model x in [-1, 1]")
        try:
            self.energy.validate()
        except (ValueError, KeyError) as err:
            raise ConfigError(f"energy: {err}") from None


# ----------------------------------------------------------------------------------------------------- sampling
@dataclass
class SampleConfig:
    model: str = "models:/vaebm-digits@latest"  # MLflow model URI, run directory or model directory of a VAEBM
    n: int = 64  # samples in total (all ranks together)
    out: str = "samples"  # output directory
    format: str = "png"  # png: one file per image | npz: one uint8 array per rank (samples-rank<r>.npz)
    batch_size: int = 64  # chains per rank at a time
    seed: int = 0  # samples are a function of (seed, rank, batch index)
    steps: int | None = None  # Langevin steps; None: the model's test-time length (16/20/24 in App. E)
    step_size: float | None = None  # None: the training step size (App. E uses it at test time too)
    temperature: float | None = None  # prior temperature; None: as trained
    init: str = "normal"  # normal: eps ~ N(0, I) | low_temperature: encoded low-temperature VAE samples (App. E)
    init_temperature: float = 0.7  # temperature of those VAE samples
    bn_iterations: int = 20  # BN re-estimation passes for low_temperature init
    grid: bool = True  # also write grid.png (first 64 samples) and chains.png (a chain strip) on rank 0
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # only for resolving models:/ URIs
    dist_timeout_s: float = 600.0  # collective timeout
    dry_run: bool = False  # print the resolved config and exit

    def validate(self) -> None:
        _require(self.n > 0 and self.batch_size > 0, "n and batch_size must be positive")
        _require(self.format in ("png", "npz"), f"format must be png or npz, got {self.format!r}")
        _require(self.init in ("normal", "low_temperature"), f"init must be normal or low_temperature")
        _require(self.steps is None or self.steps >= 1, "steps must be >= 1")
        _require(self.step_size is None or self.step_size > 0, "step_size must be > 0")
