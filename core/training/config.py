"""Typed configuration of the training job, composed by Hydra from conf/ and validated before any rank works.

A job's schema is the job sections below (`JobConfig`: run, data, loop, engine, tracking) merged with the sections
of the chosen method (`core/methods/<name>.py`, e.g. `energy`, `sampler`, `backbone` for VAEBM), so every key keeps
its short name on the command line: `energy.arch=...`, `loop.total_nimg=...`. The method's primary config is
conf/method/<name>.yaml; its presets are conf/experiment/<name>/<preset>.yaml, short diffs over the dataclass
defaults. A misspelled key or a wrong type fails with one clear line naming the key (and the closest real keys);
a missing preset or group option lists the available ones. The schemas are closed: `+key=value` adds a key only under
a free-form `dict` field. Each field's one-line doc is the `# comment` on it in the source (`field_docs`: --help).
"""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import difflib
import functools
import inspect
import io
import os
import re
import textwrap
import tokenize
import typing
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

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
    #   (a job of a -m sweep appends --<its swept key=value,...> to either: JobConfig.run_dir)
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
    batch_size: int = 32  # images per rank per forward pass (with global_batch set: the largest pass allowed)
    global_batch: int | None = None  # images per optimizer step, all ranks (papers' numbers); None: batch_size x ranks
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
        """Deterministic from the config alone, so every rank agrees without communicating. A job of a `-m` sweep
        has its `run.dir` set to this directory + `--<swept key=value,...>` by the launcher front (cli.py), so jobs
        of one sweep never share a directory and re-running the sweep resumes each job in its own."""
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
        _require(loop.global_batch is None or loop.global_batch > 0, "loop.global_batch must be positive (or null)")
        plan = batch_plan(loop, int(os.environ.get("WORLD_SIZE", "1")))  # the launcher sets it before ranks start
        _require(e.zero_stage != 2 or plan.accumulation == 1,
                 f"engine.zero_stage=2 cannot accumulate gradients (loop.global_batch={loop.global_batch} needs "
                 f"{plan.accumulation} passes of {plan.micro} images on {plan.world_size} ranks): a skipped step "
                 f"could not discard ZeRO-2's partial gradients; use zero_stage 1, more ranks or a larger batch_size")
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


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's images are split: `micro` images per rank per forward pass, `accumulation` passes."""

    micro: int  # images per rank per forward pass (the loader's batch size)
    accumulation: int  # forward/backward passes per optimizer step (DeepSpeed's gradient_accumulation_steps)
    world_size: int  # ranks

    @property
    def global_batch(self) -> int:
        return self.micro * self.accumulation * self.world_size


def batch_plan(loop: LoopConfig, world_size: int) -> BatchPlan:
    """The split of `loop.global_batch` over `world_size` ranks with micro-batches of at most `loop.batch_size`:
    the fewest accumulation passes whose micro-batch divides the global batch exactly. Without `global_batch`, one
    pass of `batch_size` per rank (the global batch then grows with the rank count). Raises ConfigError when the
    global batch cannot be split evenly over the ranks."""
    if loop.global_batch is None:
        return BatchPlan(loop.batch_size, 1, world_size)
    if loop.global_batch % world_size:
        raise ConfigError(f"loop.global_batch={loop.global_batch} is not divisible by the {world_size} ranks")
    per_rank = loop.global_batch // world_size
    for accumulation in range(-(-per_rank // loop.batch_size), per_rank + 1):
        if per_rank % accumulation == 0:
            return BatchPlan(per_rank // accumulation, accumulation, world_size)
    raise AssertionError("unreachable: accumulation = per_rank always divides")


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


@dataclass(frozen=True)
class ConfigRequest:
    """One Hydra composition: conf/<config_name>.yaml (whose defaults list starts with `<config_name>_schema`) onto
    the dataclass `schema`, with `overrides` in Hydra's spelling. Training jobs set `method`: their command-line
    `experiment=<name>` is Hydra's `experiment/<method>=<name>` (each method keeps its own presets)."""

    schema: type  # the typed config every composed key must fit
    config_name: str  # conf/<config_name>.yaml
    overrides: tuple[str, ...] = ()  # Hydra overrides
    method: str | None = None  # training jobs: the method whose presets `experiment=` selects

    def group_name(self, group: str) -> str:
        """The command-line name of a Hydra config group (`experiment/<method>` is typed `experiment`)."""
        return "experiment" if self.method and group == f"experiment/{self.method}" else group


@contextlib.contextmanager
def hydra_session(request: ConfigRequest):
    """Hydra's compose API on conf/ with `request.schema` registered as `<config_name>_schema`; yields Hydra's
    application object (its config loader lists groups, `show_info` answers --info). The compose API neither
    changes the working directory nor writes `.hydra/` outputs, so every rank may call it."""
    from hydra import initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra

    # The primary yaml lists `<name>_schema` first in its defaults: Hydra then knows every typed field, so
    # `section.field=value` works for fields no yaml mentions, and types are checked as overrides are applied.
    ConfigStore.instance().store(name=f"{request.config_name}_schema", node=request.schema)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name=request.config_name):
        yield GlobalHydra.instance().hydra


def compose_raw(request: ConfigRequest, with_hydra: bool = False) -> DictConfig:
    """Hydra's composition of `request` (with the `hydra` node if `with_hydra`), every key checked against the
    schema: a key it does not have (a typo, `+foo=1`) is refused with the closest keys it does have."""
    from hydra import compose as hydra_compose
    from hydra.errors import HydraException

    try:
        with hydra_session(request):
            cfg = hydra_compose(config_name=request.config_name, overrides=list(request.overrides),
                                return_hydra_config=with_hydra)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(explain_error(err, request)) from None
    data = OmegaConf.to_container(cfg, resolve=False)
    data.pop("hydra", None)
    unknown = unknown_keys(data, request.schema)
    if unknown:
        raise ConfigError("; ".join(_unknown_key_message(key, request) for key in unknown))
    return cfg


def typed_config(request: ConfigRequest, raw: DictConfig):
    """(typed object of `request.schema`, resolved dict) of a composed config; not yet `validate()`d."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(request.schema), raw)
        resolved = OmegaConf.to_container(merged, resolve=True)
        typed = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(_omegaconf_reason(err, request.schema)) from None
    except (ValueError, TypeError) as err:  # a dataclass's own __post_init__ check
        raise ConfigError(str(err)) from None
    return typed, resolved


def compose_request(request: ConfigRequest):
    """(typed, resolved dict) of `request`, validated; every problem is one ConfigError."""
    typed, resolved = typed_config(request, compose_raw(request))
    try:
        if hasattr(typed, "validate"):
            typed.validate()
    except ConfigError:
        raise
    except ValueError as err:  # e.g. DataConfigError from a data section's own check
        raise ConfigError(str(err)) from None
    return typed, resolved


# ------------------------------------------------------------------------------------------ errors users read
def explain_error(err: Exception, request: ConfigRequest) -> str:
    """One line that keeps Hydra's reason: the missing option with the list of available ones (in the command
    line's spelling: `experiment=` lists the presets of the chosen method), the key and the type a value failed,
    the closest keys to an unknown one. Hydra's config search path (always conf/) is left out."""
    from hydra.errors import MissingConfigException

    if isinstance(err, MissingConfigException) and err.options is not None and err.missing_cfg_file:
        group, _, name = err.missing_cfg_file.rpartition("/")
        shown = request.group_name(group)
        what = (f"experiments of method={request.method} (conf/{group}/)" if shown != group
                else f"options of config group '{group}'")
        return f"{shown}={name}: {str(err).splitlines()[0]}; available {what}: {', '.join(sorted(err.options))}"
    cause = err.__cause__
    head = condense_message(str(err))
    if isinstance(cause, OmegaConfBaseException):
        key = getattr(cause, "full_key", None)
        if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and key:
            return _unknown_key_message(key, request, reason=f"{head}: {str(cause).splitlines()[0]}")
        return f"{head}: {_omegaconf_reason(cause, request.schema)}"
    return head


def condense_message(text: str) -> str:
    """Hydra's multi-line message as one line: sentences joined by '; ', indented option lists by ', '."""
    out: list[str] = []
    listing = False
    for line in text.splitlines():
        if line.startswith("Config search path"):
            break
        if not line.strip() or line.startswith("To append to your config use +"):  # schemas are closed: see below
            continue
        if line[:1] in ("\t", " ") and out:
            out[-1] += (", " if listing else " ") + line.strip()
            listing = True
        else:
            out.append(line.strip().rstrip("."))
            listing = False
    return "; ".join(out)


def _omegaconf_reason(err: OmegaConfBaseException, schema: type) -> str:
    """OmegaConf's first line, plus the key it failed on and the type the schema gives that key."""
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    key = getattr(err, "full_key", None)
    if not key:
        return reason
    kind = field_type_name(schema, re.sub(r"\[\d+\]$", "", key))
    return f"{reason} (key {key}" + (f", expects {kind})" if kind else ")")


def _unknown_key_message(key: str, request: ConfigRequest, reason: str | None = None) -> str:
    """`reason` (default: the schema has no such key), the override that brought the key, its closest real keys."""
    spelled = [o for o in request.overrides if o.lstrip("+~").split("=", 1)[0] == key]
    keys = schema_keys(request.schema)
    prefix, _, leaf = key.rpartition(".")
    siblings = [k for k in keys if k.rpartition(".")[0] == prefix]
    leaves = {k.rpartition(".")[2] for k in keys}
    close = [f"{prefix}.{m}" if prefix else m
             for m in difflib.get_close_matches(leaf, [k.rpartition(".")[2] for k in siblings], n=3, cutoff=0.6)]
    near = difflib.get_close_matches(leaf, leaves, n=3, cutoff=0.8)  # the key in another section (moved, misplaced)
    close += [k for k in keys if k.rpartition(".")[2] in near and k not in close][:5]
    hint = (f"did you mean {' or '.join(close[:5])}?" if close
            else f"the keys of {prefix or 'the config'} are {', '.join(k.rpartition('.')[2] for k in siblings)}")
    reason = reason or f"unknown key {key!r}: the typed config has no such key"
    if spelled and spelled[0].startswith("+"):
        reason += " (`+key=value` adds keys only under free-form dict sections)"
    return f"{spelled[0] + ': ' if spelled else ''}{reason}; {hint}"


# ------------------------------------------------------------------------------------------ schema introspection
def _dataclass_in(annotation) -> type | None:
    """The dataclass an annotation names (`X`, `X | None`, `Optional[X]`), else None."""
    if dataclasses.is_dataclass(annotation):
        return annotation
    for arg in typing.get_args(annotation):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, object]:
    return typing.get_type_hints(cls)


def schema_fields(schema: type, prefix: str = ""):
    """(dotted key, annotation, owning dataclass, field name, nested dataclass or None) for every key of `schema`,
    depth first; nested dataclass sections come before their keys."""
    hints = _hints(schema)
    for f in dataclasses.fields(schema):
        key, annotation = f"{prefix}{f.name}", hints[f.name]
        nested = _dataclass_in(annotation)
        yield key, annotation, schema, f.name, nested
        if nested is not None:
            yield from schema_fields(nested, key + ".")


def schema_keys(schema: type) -> list[str]:
    """Every dotted key of `schema` (sections included)."""
    return [key for key, *_ in schema_fields(schema)]


def type_name(annotation) -> str:
    """`int`, `str | None`, `list[float]`, `LoopConfig` as a user reads them."""
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    return re.sub(r"\b(typing|builtins|[a-z_0-9]+(\.[a-z_0-9]+)+)\.", "", str(annotation)).replace("NoneType", "None")


def field_type_name(schema: type, key: str) -> str | None:
    """The type the schema gives dotted `key`, or None for a key it does not type (e.g. under a dict)."""
    for k, annotation, *_ in schema_fields(schema):
        if k == key:
            return type_name(annotation)
    return None


def unknown_keys(data: dict, schema: type, prefix: str = "") -> list[str]:
    """Dotted keys of the composed `data` that `schema` does not define; free-form `dict` fields take any key."""
    hints = _hints(schema)
    names = {f.name for f in dataclasses.fields(schema)}
    out = []
    for key, value in data.items():
        if key not in names:
            out.append(f"{prefix}{key}")
            continue
        nested = _dataclass_in(hints[key])
        if nested is not None and isinstance(value, dict):
            out += unknown_keys(value, nested, f"{prefix}{key}.")
    return out


class _Comment(typing.NamedTuple):
    col: int  # column of the '#'
    text: str  # without '#' and surrounding blanks
    alone: bool  # nothing else on its line
    indented: bool  # its text is indented (`#   text`): a continuation line


@functools.lru_cache(maxsize=None)
def _own_field_docs(cls: type) -> dict[str, str]:
    """The one-line docs of the fields `cls` itself declares, read from its source: the trailing `# comment` of a
    field, continued by the comment-only lines under it that are indented deeper than the field or whose text is
    (`#        more`); else a `# ^ comment` on the line below; else the comment block right above the field."""
    try:
        lines, _ = inspect.getsourcelines(cls)
    except (OSError, TypeError):  # a class built at run time (job_schema) has no source: its bases have
        return {}
    source = textwrap.dedent("".join(lines))
    comments: dict[int, _Comment] = {}
    code_rows: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            indented = re.match(r"#\s{2,}\S", tok.string) is not None
            comments[tok.start[0]] = _Comment(tok.start[1], tok.string.lstrip("#").strip(),
                                              tok.start[0] not in code_rows, indented)
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_rows.update(range(tok.start[0], tok.end[0] + 1))
    docs = {}
    (node,) = ast.parse(source).body
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        col, below = stmt.col_offset, comments.get(stmt.end_lineno + 1)
        parts = [comments[row].text for row in range(stmt.lineno, stmt.end_lineno + 1)
                 if row in comments and not comments[row].alone]
        if parts:
            row = stmt.end_lineno + 1
            while row in comments and comments[row].alone and (comments[row].col > col or comments[row].indented):
                parts.append(comments[row].text)
                row += 1
        elif below is not None and below.alone and below.text.startswith("^"):
            parts.append(below.text.lstrip("^ "))
        else:
            row = stmt.lineno - 1
            while row in comments and comments[row].alone and comments[row].col == col and \
                    not comments[row].indented and not comments[row].text.startswith("^"):
                parts.insert(0, comments[row].text)
                row -= 1
        docs[stmt.target.id] = " ".join(p for p in parts if p)
    return docs


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> one-line doc for every field of dataclass `cls`, its bases' included (job schemas are built
    from JobConfig and the method's config). The docs are the `# comments` on the fields in the source, the one
    place they are written."""
    docs: dict[str, str] = {}
    for base in reversed(cls.__mro__):
        if dataclasses.is_dataclass(base):
            docs.update({k: v for k, v in _own_field_docs(base).items() if v or k not in docs})
    return docs


# ------------------------------------------------------------------------------------------ the launchers' configs
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


def job_request(overrides: list[str], default_method: str | None = None) -> tuple[ConfigRequest, list[str]]:
    """The composition of a training job and the overrides it was asked with (without `method=`)."""
    from core.methods import METHODS, get_method

    try:
        method, rest = split_method(overrides, default_method)
    except ConfigError as err:
        raise ConfigError(f"{err} (one of {', '.join(sorted(METHODS))})") from None
    try:
        get_method(method)
    except KeyError:
        raise ConfigError(f"method={method}: unknown method {method!r}; available methods: "
                          f"{', '.join(sorted(METHODS))}") from None
    hydra_overrides = [f"experiment/{method}={o.split('=', 1)[1]}" if o.startswith("experiment=") else o
                       for o in rest]
    return ConfigRequest(job_schema(method), "train", (f"method={method}", *hydra_overrides), method), rest


def compose_job(overrides: list[str], default_method: str | None = None):
    """Typed, validated job config of `method=<name>` with `overrides`; returns (config, resolved dict, overrides).

    `experiment=<name>` selects conf/experiment/<method>/<name>.yaml (each method keeps its own presets, users type
    the same `experiment=`). Problems are one-line ConfigErrors.
    """
    request, rest = job_request(overrides, default_method)
    typed, resolved = compose_request(request)
    return typed, resolved, rest


def compose(schema: type, config_name: str, overrides: list[str]):
    """A single-schema job (sampling, evaluation, data preparation): (typed, resolved dict), validated."""
    return compose_request(ConfigRequest(schema, config_name, tuple(overrides)))


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
