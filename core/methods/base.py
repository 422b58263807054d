"""The seam every training method plugs into (DESIGN.md "Seams").

A `Method` builds the networks it trains (as one module, with parameter groups when parts need their own learning
rates), computes `loss(net, batch, nimg)`, draws the images users look at, judges health, names the state it
checkpoints and exports a typed model bundle. It never touches the loop, the engine, checkpoint files, ranks or
tracking: the job (core/training/job.py) owns those and hands the method a `MethodContext`.

Each method module registers itself with `@register_method`; its config dataclass holds only the method's own
sections (the job adds run, loop, engine, data and tracking sections around it).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable

import torch


@dataclass
class MethodContext:
    """What a method may know about the job it runs in (no process groups, no files beyond `out_dir`)."""

    device: torch.device  # where the networks and batches live
    seed: int  # root seed of the run (fixed sample noise derives from it)
    rank: int  # this process's rank (per-rank random streams only; never used for communication)
    total_nimg: int  # training length in images, all ranks together (schedules)
    sample_count: int = 64  # images per sample grid
    sample_temperatures: list[float] = field(default_factory=lambda: [1.0])  # grids drawn at these temperatures
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] = lambda t: t  # sums a tensor over ranks (identity alone)


@dataclass
class BackboneConfig:
    """Fields of a method that trains on a frozen backbone found by reference (registry alias or run directory)."""

    backbone: str = "models:/nvae-digits@latest"  # MLflow model URI or a run/model directory
    backbone_dtype: str = "fp32"  # precision of the frozen backbone: fp32 | bf16
    backbone_train_if_missing: bool = False  # train the backbone first (nested stage) when it is not registered
    backbone_method: str = "nvae"  # method that trains that backbone
    backbone_experiment: str = "quickstart"  # its experiment preset; the run's dataset and overrides apply too
    backbone_overrides: list[str] = field(default_factory=list)  # extra key=value overrides for that stage only


class Stateful(abc.ABC):
    """Anything with a state dict: what a method names for the checkpoint."""

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]: ...

    @abc.abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class StepCounter(Stateful):
    """A method's step counter (schedules, per-step random streams), checkpointed by the name the method gives it."""

    def __init__(self):
        self.value = 0

    def state_dict(self) -> dict[str, Any]:
        return {"iteration": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = int(state.get("iteration", 0))


class Method(abc.ABC):
    """One training method on the shared job. Subclasses set `name`, `config_class` and `model_prefix`."""

    name: ClassVar[str]  # `method=<name>` on the command line
    config_class: ClassVar[type]  # the method's config dataclass (its own sections only)
    model_prefix: ClassVar[str]  # registered as `<model_prefix>-<dataset>`
    needs_backbone: ClassVar[bool] = False  # the config is a BackboneConfig and the job supplies the frozen model

    def __init__(self, config: Any, ctx: MethodContext, backbone: torch.nn.Module | None = None,
                 backbone_bundle: dict[str, Any] | None = None):
        self.config = config
        self.ctx = ctx
        self.backbone = backbone
        self.backbone_bundle = backbone_bundle

    # --- what the engine trains
    @abc.abstractmethod
    def trained_module(self) -> torch.nn.Module:
        """The module whose parameters are trained (DeepSpeed wraps exactly this one)."""

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups (several learning rates inside one engine); default: one group."""
        return [{"params": [p for p in self.trained_module().parameters() if p.requires_grad]}]

    @abc.abstractmethod
    def make_optimizer(self, param_groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        """The torch optimizer over `param_groups` (DeepSpeed receives it as is)."""

    def setup(self, first_batch: dict[str, Any], fresh: bool) -> None:
        """Called once per invocation, before the engine exists, with this rank's first batch of the run's data.
        `fresh`: no checkpoint will be restored, so data-dependent initialization belongs here."""

    # --- one step
    @abc.abstractmethod
    def loss(self, net: Callable[..., torch.Tensor], batch: dict[str, Any],
             nimg: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scalar loss and detached scalar metrics. `net` runs the trained module (the engine, or the module)."""

    # --- what users look at, and health
    def visuals(self, out_dir: Path, nimg: int) -> list[Path]:
        """Rank 0: write sample grids / chain strips / plots under `out_dir`, return their paths."""
        return []

    def health(self, metrics: dict[str, float]) -> str | None:
        """A reason string when training diverges (metrics are identical on every rank), else None."""
        return None

    divergence_patience: int = 3  # failing reports in a row before the job stops naming the last healthy checkpoint

    # --- checkpointed state beyond the engine (networks and optimizer)
    def shared_state(self) -> dict[str, Stateful]:
        """Named objects whose state is identical on every rank (saved once)."""
        return {}

    def rank_state(self) -> dict[str, Stateful]:
        """Named objects whose state differs per rank (saved per rank, e.g. a replay-buffer shard)."""
        return {}

    # --- the result
    @abc.abstractmethod
    def export(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """(bundle, weights) of the trained model: a JSON-able typed description and a flat fp32 state dict."""

    @classmethod
    def describe(cls, config: Any) -> Iterable[tuple[str, torch.nn.Module]]:
        """(title, module) pairs for `dry_run=true` parameter summaries (called under the meta device)."""
        return []


METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make `method=<cls.name>` available."""
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"method {cls.name!r} registered twice")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    import core.methods  # noqa: F401  (registers every method module)

    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name]
