"""The launcher front: every launcher hands its argv here (`run_training` for the training launchers, `run_job` for
the others). It strips the `--local_rank` that deepspeed appends, answers Hydra's flags, composes and validates the
config (one clear `config error:` line and exit code 2 on a problem, before any rank works), sets up logging and runs
the job, or one job per combination of a `-m` sweep.

    launcher.py [key=value ...]                 one job (`dry_run=true`: print the resolved config, run nothing)
    launcher.py --help                          config groups with their options, every key with its doc and value
    launcher.py --cfg job|hydra|all [-p PKG] [--resolve]   the composed config (Hydra's node, or both), run nothing
    launcher.py --info [all|config|defaults|defaults-tree|plugins|searchpath]   Hydra's info + the config groups
    launcher.py -m a=1,2 b=x,y [key=value ...]  a sweep: the 4 jobs run one after another in this process

Configs are composed with Hydra's compose API (core/training/config.py): Hydra never changes the working directory and
writes no `.hydra/` outputs, so every rank of a `deepspeed` job can parse its own argv. A sweep job writes to its
launcher's output (`run.dir` for training, `out` for the others) + `--<swept key=value,...>`, so jobs never share a
directory and re-running the sweep resumes each job where it stopped. Keys are documented once, by the `# comment` on
their dataclass field; `--help` reads them from the source (config.field_docs).
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import os
import re
import sys
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

from core.dist import env_rank
from core.training.config import (ConfigError, ConfigRequest, compose_raw, compose_request, condense_message,
                                  explain_error, field_docs, hydra_session, job_request, schema_fields, strip_launcher_args, type_name,
                                  typed_config)

EXIT_CONFIG_ERROR = 2
INFO_CHOICES = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")  # Hydra's --info topics


class JobFailed(Exception):
    """A job that ends with a message and its own exit code (prepare_data: 1 when a build or verification fails)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def setup_logging() -> None:
    """INFO on rank 0, warnings only elsewhere, so an N-rank job prints one log."""
    level = logging.INFO if env_rank() == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s [rank{env_rank()}] %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/vaebm/torch_extensions"))


@dataclass(frozen=True)
class Launcher:
    """What a launcher hands the front."""

    request: Callable[[list[str]], tuple[ConfigRequest, list[str]]]  # overrides -> (composition, overrides for job)
    job: Callable[..., Any]  # job(config, resolved, *extra): the whole job
    describe: Callable[[Any, dict], str]  # dry_run=true text
    output_key: str | None  # the key naming where a job writes: a sweep job's value gets its sweep suffix
    doc: str = ""  # the launcher's docstring, first in --help
    choices: dict[str, tuple[str, str]] = field(default_factory=dict)  # --help: name -> (conf group, note)
    pass_overrides: bool = False  # job also receives the command-line overrides (training: the nested backbone)
    help_note: str = ""  # --help: a line under the usage


class _ArgumentError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one `config error:` line on rank 0 and exit 2, as for a bad override
        raise _ArgumentError(message)


def _flags(prog: str) -> _Parser:
    p = _Parser(prog=prog, add_help=False, allow_abbrev=False,
                usage=f"{prog} [--help] [--cfg {{job,hydra,all}} [-p PACKAGE] [--resolve]] [--info [TOPIC]] "
                      "[-m] [key=value ...]")
    p.add_argument("-h", "--help", action="store_true", help="this text: config groups, every key with its doc")
    p.add_argument("-c", "--cfg", choices=["job", "hydra", "all"],
                   help="print the composed config (job), Hydra's own node (hydra) or both, and exit")
    p.add_argument("-p", "--package", help="with --cfg: print only this part of the config, e.g. loop")
    p.add_argument("--resolve", action="store_true", help="with --cfg: resolve ${...} interpolations")
    p.add_argument("-i", "--info", nargs="?", const="all", choices=INFO_CHOICES,
                   help="Hydra's info (search path, defaults tree and list, config), then the config groups")
    p.add_argument("-m", "--multirun", action="store_true",
                   help="sweep: a=1,2 b=x,y runs one job per combination, one after another, each in its own "
                        "output directory (<run.dir or out>--<swept key=value,...>)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="Hydra overrides: key=value, group=option, ~key; +key=value only under free-form dict keys")
    return p


def main(argv: list[str], launcher: Launcher) -> int:
    """Everything a launcher does: flags, composition, validation, then the job(s). Returns the exit code."""
    argv = strip_launcher_args(argv)
    prog = sys.argv[0] if sys.argv and sys.argv[0] else "launcher"
    parser = _flags(prog)
    rank0 = env_rank() == 0
    try:
        args = parser.parse_intermixed_args(argv)
        if args.package and not args.cfg:
            raise _ArgumentError("-p/--package goes with --cfg")
    except _ArgumentError as err:
        return _config_error(f"{err} (usage: {parser.usage})", rank0)
    try:
        sweep = _sweep(args.overrides) if args.multirun else [SweepJob(list(args.overrides), "")]
        if args.help:  # with -m: the first job's values
            if rank0:
                print(help_text(launcher, sweep[0].overrides, parser))
            return 0
        if args.info:
            if rank0:
                show_info(launcher, sweep[0].overrides, args.info)
            return 0
        if args.cfg:
            if rank0:
                for n, job in enumerate(sweep):
                    if args.multirun:
                        print(f"# job {n}: {' '.join(job.overrides)}")
                    print(config_text(launcher, job.overrides, args.cfg, args.package, args.resolve))
            return 0
        jobs = _compose_all(launcher, sweep, args.multirun)
    except ConfigError as err:
        return _config_error(str(err), rank0)
    return _run_all(launcher, jobs, args.multirun)


def _config_error(message: str, rank0: bool) -> int:
    if rank0:
        print(f"config error: {message}", file=sys.stderr)
    return EXIT_CONFIG_ERROR


# ------------------------------------------------------------------------------------------ sweeps
class SweepJob(typing.NamedTuple):
    overrides: list[str]  # this job's command line
    suffix: str  # its swept values as a directory name: `a=1,b=x` ('' outside a sweep)
    swept: frozenset[str] = frozenset()  # the keys the sweep varies


def _sweep(overrides: list[str]) -> list[SweepJob]:
    """Expand Hydra's sweep syntax (`a=1,2`, `range(...)`, `choice(...)`, `glob(...)`) as Hydra's basic sweeper does:
    the cartesian product in command-line order (a key given twice: the last wins). One (overrides, suffix) per job;
    the suffix names the job's swept values (`a=1,b=x`) and becomes part of its output directory."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    choices: dict[str, list[str]] = {}  # key -> its overrides, one per value
    swept: set[str] = set()
    try:
        for o in OverridesParser.create().parse_overrides(overrides):
            key = o.get_key_element()
            choices.pop(key, None)
            swept.discard(key)
            if o.is_sweep_override():
                choices[key] = [f"{key}={v}" for v in o.sweep_string_iterator()]
                swept.add(key)
            else:
                choices[key] = [o.input_line]
    except HydraException as err:
        raise ConfigError(condense_message(str(err))) from None
    out = []
    for combo in itertools.product(*choices.values()):
        suffix = ",".join(o for o, key in zip(combo, choices) if key in swept)
        out.append(SweepJob(list(combo), _safe_name(suffix), frozenset(k.lstrip("+~") for k in swept)))
    return out


def _safe_name(suffix: str) -> str:
    """A directory-name version of `suffix` ('/' and other odd characters become '_'; long ones end in a hash)."""
    name = re.sub(r"[^A-Za-z0-9._,=+@-]", "_", suffix)
    if len(name) > 120:
        name = name[:100] + "-" + hashlib.sha1(suffix.encode()).hexdigest()[:10]
    return name


def _place_sweep_job(launcher: Launcher, config: Any, resolved: dict, job: SweepJob) -> str | None:
    """Point a sweep job at `<output>--<suffix>` (unless the output key is swept itself); training's default
    `runs/<exp>-<method>` counts as its output. Returns where the job writes (None: nowhere of its own)."""
    if not launcher.output_key:
        return None
    *parents, leaf = launcher.output_key.split(".")
    node, sub = config, resolved
    for p in parents:
        node, sub = getattr(node, p, None), sub.get(p, {})
    base = getattr(node, leaf, None)
    if base is None and hasattr(config, "run_dir"):
        base = str(config.run_dir())
    if base is None:
        return None
    if job.suffix and launcher.output_key not in job.swept:
        base = f"{str(base).rstrip('/')}--{job.suffix}"
        setattr(node, leaf, base)
        sub[leaf] = base
    return str(config.run_dir()) if hasattr(config, "run_dir") else os.path.abspath(os.path.expanduser(base))


@dataclass
class _Job:
    overrides: list[str]  # this job's command line (a sweep's combination)
    config: Any  # typed, validated
    resolved: dict  # resolved dict (logged as parameters, printed by dry runs)
    extra: tuple  # further arguments of launcher.job


def _compose_all(launcher: Launcher, sweep: list[SweepJob], multirun: bool) -> list[_Job]:
    """Every job's config, composed and validated before the first one starts; sweep jobs get their own outputs."""
    jobs, outputs = [], {}
    for n, sweep_job in enumerate(sweep):
        overrides = sweep_job.overrides
        try:
            request, rest = launcher.request(overrides)
            config, resolved = compose_request(request)
        except ConfigError as err:
            raise ConfigError(f"job {n} ({' '.join(overrides)}): {err}" if multirun else str(err)) from None
        if multirun:
            out = _place_sweep_job(launcher, config, resolved, sweep_job)
            if out is not None and out in outputs:
                raise ConfigError(f"jobs {outputs[out]} and {n} of the sweep would both write {out}: give each "
                                  f"job its own {launcher.output_key}")
            outputs[out] = n
        jobs.append(_Job(overrides, config, resolved, (rest,) if launcher.pass_overrides else ()))
    return jobs


# ------------------------------------------------------------------------------------------ running
def _run_all(launcher: Launcher, jobs: list[_Job], multirun: bool) -> int:
    """Run (or describe) the jobs one after another; the first failing job ends the sweep with its exit code."""
    rank0 = env_rank() == 0
    for n, job in enumerate(jobs):
        if multirun and rank0:
            print(f"# multirun job {n} of {len(jobs)}: {' '.join(job.overrides)}", flush=True)
        code = _run_one(launcher, job)
        if code:
            if multirun and rank0 and n + 1 < len(jobs):
                print(f"multirun: job {n} failed (exit {code}); jobs {n + 1}..{len(jobs) - 1} not run",
                      file=sys.stderr)
            return code
    return 0


def _run_one(launcher: Launcher, job: _Job) -> int:
    """Answer dry_run, or set up logging and run the job. A run directory that another job holds, checkpoints that
    all fail verification, missing or corrupt data and a model reference that does not exist also end with one
    line and exit code 2: retrying cannot help. A preempted job (SIGTERM/SIGINT, checkpoint written) exits with
    143: retriable."""
    from core.training.checkpoint import CheckpointError
    from core.training.lock import RunDirLocked
    from core.training.preemption import EXIT_PREEMPTED, Preempted
    from core.tracking import ModelNotFoundError
    from data_pipelines.errors import DataConfigError, DataCorruptionError, ManifestError

    # Found after start, still not worth a retry: the run's MLflow runs end FAILED, one line, exit 2.
    input_errors = (RunDirLocked, CheckpointError, DataConfigError, DataCorruptionError, ManifestError,
                    ModelNotFoundError, ConfigError, _backbone_not_found())
    rank0 = env_rank() == 0
    if getattr(job.config, "dry_run", False):
        try:  # a dry run checks the data too (DataConfigError when it does not fit the model)
            text = launcher.describe(job.config, job.resolved)
        except input_errors as err:
            if rank0:
                print(f"error: {err}", file=sys.stderr)
            return EXIT_CONFIG_ERROR
        if rank0:
            print(text, flush=True)
        return 0
    setup_logging()
    try:
        launcher.job(job.config, job.resolved, *job.extra)
    except JobFailed as err:
        if rank0:
            print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except input_errors as err:
        if rank0:
            print(f"error: {err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except Preempted as err:
        if rank0:
            print(f"preempted ({err}): checkpoint written, exiting with {EXIT_PREEMPTED}", file=sys.stderr)
        return EXIT_PREEMPTED
    return 0


def _backbone_not_found() -> type:
    from core.training.job import BackboneNotFound

    return BackboneNotFound


# ------------------------------------------------------------------------------------------ --cfg, --info, --help
def config_text(launcher: Launcher, overrides: list[str], which: str, package: str | None, resolve: bool) -> str:
    """Hydra's `--cfg`: the composed job config (`job`), Hydra's own node (`hydra`) or both (`all`) as YAML."""
    from omegaconf import OmegaConf

    request, _ = launcher.request(overrides)
    cfg = compose_raw(request, with_hydra=which != "job")
    if which == "hydra":
        cfg = cfg.hydra
    elif which == "job":
        typed_config(request, cfg)  # the same type checks a run makes
    if package:
        node = OmegaConf.select(cfg, package)
        if node is None:
            raise ConfigError(f"--package {package}: no such key in the composed config")
        return f"# @package {package}\n" + (OmegaConf.to_yaml(node, resolve=resolve) if OmegaConf.is_config(node)
                                             else f"{node}\n")
    return OmegaConf.to_yaml(cfg, resolve=resolve)


def show_info(launcher: Launcher, overrides: list[str], topic: str) -> None:
    """Hydra's own `--info` (search path, defaults tree, defaults list, config, plugins), then the config groups."""
    from hydra.errors import HydraException

    request, _ = launcher.request(overrides)
    compose_raw(request)  # a bad override is a config error here too, with the same message
    try:
        with hydra_session(request) as hydra:
            hydra.show_info(topic, request.config_name, list(request.overrides))
    except HydraException as err:
        raise ConfigError(explain_error(err, request)) from None
    finally:
        logging.getLogger().handlers.clear()  # show_info logs to stdout; nothing else should, afterwards
    sys.stdout.flush()
    print("\nConfig groups (group=option):")
    print("\n".join(_group_lines(launcher, request)) or "  (none)")


def _group_lines(launcher: Launcher, request: ConfigRequest) -> list[str]:
    """`  group: a, b, c (now: b)` for each Hydra config group this composition uses, in the command line's
    spelling, plus the launcher's own group-named choices."""
    from hydra.types import RunMode

    with hydra_session(request) as hydra:
        loader = hydra.config_loader
        defaults = loader.compute_defaults_list(config_name=request.config_name, overrides=list(request.overrides),
                                                run_mode=RunMode.RUN)
        chosen: dict[str, str] = {}
        for d in defaults.defaults:
            group, _, name = (d.config_path or "").rpartition("/")
            if group and not group.startswith("hydra"):
                chosen.setdefault(group, name)
        lines = []
        for group, name in sorted(chosen.items(), key=lambda kv: request.group_name(kv[0])):
            where = f"  (conf/{group}/)" if request.group_name(group) != group else ""
            lines.append(f"  {request.group_name(group)}: {', '.join(sorted(loader.get_group_options(group)))}"
                         f"  (now: {name}){where}")
        for shown, (group, note) in launcher.choices.items():
            lines.append(f"  {shown}: {', '.join(sorted(loader.get_group_options(group)))}  ({note})")
    return lines


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value if value else "''"
    return json.dumps(value)


def key_lines(schema: type, values: dict) -> list[str]:
    """One line per key: `key: type = value  # doc`, sections as headers, indented by depth; the docs are the
    `# comments` on the dataclass fields (config.field_docs)."""
    rows = []
    for key, annotation, owner, name, nested in schema_fields(schema):
        depth = key.count(".")
        doc = field_docs(owner).get(name, "")
        if nested is not None:
            rows.append(("  " * depth + f"{key}:", doc))
            continue
        value = values
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        rows.append(("  " * depth + f"{key}: {type_name(annotation)} = {_show(value)}", doc))
    width = min(56, max(len(r[0]) for r in rows))
    return [f"  {left:<{width}}  # {doc}" if doc else f"  {left}" for left, doc in rows]


def help_text(launcher: Launcher, overrides: list[str], parser: argparse.ArgumentParser) -> str:
    """--help: the launcher's doc, the flags, the config groups and their options, every key with its doc and the
    value this command line gives it."""
    request, _ = launcher.request(overrides)
    raw = compose_raw(request)
    _, resolved = typed_config(request, raw)
    flags = parser.format_help().split("\n", 1)[1].strip("\n")
    parts = [launcher.doc.strip(), "", parser.format_usage().strip()]
    if launcher.help_note:
        parts.append(launcher.help_note)
    parts += ["", flags, "", "Config groups (group=option):", *(_group_lines(launcher, request) or ["  (none)"]),
              "", f"Keys (key=value; the values this command line composes; conf/{request.config_name}.yaml):",
              *key_lines(request.schema, resolved)]
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------ the launchers
def run_job(schema: type, config_name: str, argv: list[str], job: Callable[[Any, dict], Any],
            describe: Callable[[Any, dict], str], output_key: str | None = "out", doc: str = "",
            choices: dict[str, tuple[str, str]] | None = None) -> int:
    """A single-schema job (sampling, evaluation, import, data preparation): conf/<config_name>.yaml onto `schema`.
    `output_key` is where a job writes (a sweep job's value gets its suffix); `choices` lists, in --help, command-line
    choices whose options are a conf group's (evaluate's `dataset=`: name -> (group, note))."""
    launcher = Launcher(lambda o: (ConfigRequest(schema, config_name, tuple(o)), o), job, describe, output_key,
                        doc or (schema.__doc__ or ""), dict(choices or {}))
    return main(argv, launcher)


def run_training(argv: list[str], default_method: str | None = None, doc: str = "") -> int:
    """The training launchers: `method=<name>` (or `default_method`) selects the method and its config schema.
    `--help`, `--cfg` and `--info` without a method show method=vaebm (conf/train.yaml's default)."""
    from core.training.job import describe, train

    flags = {"-h", "--help", "-c", "--cfg", "-i", "--info"}
    inspect_only = any(a.split("=", 1)[0] in flags for a in argv)
    method = default_method or ("vaebm" if inspect_only else None)
    note = ("" if default_method or any(a.startswith("method=") for a in argv)
            else "method: none given, showing method=vaebm; add method=<name> for another")
    launcher = Launcher(lambda o: job_request(o, method), train, describe, "run.dir", doc, {},
                        pass_overrides=True, help_note=note)
    return main(argv, launcher)
