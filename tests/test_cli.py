"""The launcher front (core/training/cli.py) through the real launchers, run as subprocesses the way users run them:
`--help` (config groups, their options, every key with its doc), `--cfg job`, `--info`, `-m` sweeps (one composed
config and one output directory per combination), and config errors (Hydra's reason and the available options kept,
one line, exit code 2, nothing written). The launcher processes start together (a module fixture), three at a time.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), VAEBM_DATA_CACHE=str(tmp / "data-cache"))
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """name -> CompletedProcess of every launcher call below, all run from one scratch working directory."""
    tmp = tmp_path_factory.mktemp("cli")
    work = tmp / "cwd"
    work.mkdir()
    calls = {
        "vaebm_help": ["train_vaebm.py", "--help", "--local_rank=0"],
        "vaebm_cfg": ["train_vaebm.py", "--cfg", "job", "--local_rank", "1"],
        "nvae_info": ["train_nvae.py", "--info"],
        "nvae_sweep": ["train_nvae.py", "-m", "loop.batch_size=16,32", "dry_run=true", f"run.dir={tmp}/r",
                       "--local_rank=0"],
        "bad_experiment": ["train_vaebm.py", "experiment=celebahq", "--local_rank=0"],
        "bad_plus": ["train_vaebm.py", "+foo=1", "dry_run=true"],
        "prepare_sweep": ["prepare_data.py", "--multirun", "source=toy2d", f"out={tmp}/toy", "num_samples=50,60"],
        "train_help": ["train.py", "--help"],
        "sample_help": ["sample.py", "--help"],
        "evaluate_help": ["evaluate.py", "--help"],
        "import_help": ["import_nvae.py", "--help"],
        "prepare_help": ["prepare_data.py", "--help"],
    }

    def run(args):
        return subprocess.run([sys.executable, str(ROOT / "launchers" / args[0]), *args[1:]], cwd=work,
                              env=_env(tmp), capture_output=True, text=True, timeout=600)

    with ThreadPoolExecutor(3) as pool:
        results = dict(zip(calls, pool.map(run, calls.values())))
    results["tmp"], results["cwd"] = tmp, work
    return results


def _ok(proc) -> str:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _one_line_config_error(proc) -> str:
    assert proc.returncode == 2, (proc.stdout[-2000:], proc.stderr[-3000:])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("config error: "), proc.stderr
    assert not proc.stdout.strip()
    return lines[0]


def _trailing_comment(path: str, cls: str, name: str) -> str:
    """The `# comment` after field `name` of class `cls`, found by plain text search (the reference for --help)."""
    text = (ROOT / path).read_text()
    body = text[text.index(f"class {cls}"):]
    line = re.search(rf"^\s+{name}:.*$", body, re.M).group(0)
    return line.split("  # ", 1)[1].strip()


def _leaves(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        out += _leaves(v, f"{prefix}{k}.") if isinstance(v, dict) and v else [f"{prefix}{k}"]
    return out


def _help_line(text: str, key: str) -> str:
    """The line of `key` in the Keys section of --help."""
    (line,) = [ln for ln in text.split("\nKeys (", 1)[1].splitlines() if ln.strip().startswith(f"{key}:")]
    return line


# ------------------------------------------------------------------------------------------ --help, --cfg, --info
def test_help_lists_groups_options_and_every_key_with_its_doc(runs):
    text = _ok(runs["vaebm_help"])
    composed = yaml.safe_load(_ok(runs["vaebm_cfg"]))
    experiments = sorted(p.stem for p in (ROOT / "conf/experiment/vaebm").glob("*.yaml"))
    groups_section = text.split("Config groups (group=option):", 1)[1].split("\nKeys (", 1)[0]
    (groups,) = [ln for ln in groups_section.splitlines() if ln.strip().startswith("experiment: ")]
    assert all(name in groups for name in experiments) and "(now: quickstart)" in groups
    energies = sorted(p.stem for p in (ROOT / "conf/energy").glob("*.yaml"))
    assert ", ".join(energies) in text and "--cfg" in text and "--multirun" in text and "--info" in text
    # every key the composition has is listed, each with a doc
    for key in _leaves(composed):
        line = _help_line(text, key)
        assert re.search(r"  # \S", line), line
    # the docs are the fields' comments in the source, and the values the composed ones
    assert _trailing_comment("core/training/config.py", "LoopConfig", "total_nimg") in _help_line(text,
                                                                                                  "loop.total_nimg")
    step = _help_line(text, "sampler.langevin.step_size")
    assert _trailing_comment("core/sampling/langevin.py", "LangevinConfig", "step_size") in step
    assert f"= {composed['sampler']['langevin']['step_size']}" in step and "float" in step


def test_help_of_every_other_launcher(runs):
    cases = {"train_help": ("core/training/config.py", "RunConfig", "seed", "run.seed"),
             "sample_help": ("core/evaluation/sampling.py", "SampleConfig", "model", "model"),
             "evaluate_help": ("core/evaluation/jobs.py", "EvaluateConfig", "fid_samples", "fid_samples"),
             "import_help": ("core/training/import_nvae.py", "ImportNVAEConfig", "checkpoint", "checkpoint"),
             "prepare_help": ("data_pipelines/config.py", "PrepareConfig", "jpeg_quality", "jpeg_quality")}
    for run, (path, cls, name, key) in cases.items():
        text = _ok(runs[run])
        assert _trailing_comment(path, cls, name) in _help_line(text, key), run
        assert "usage:" in text and "Config groups" in text and "--cfg" in text, run
    assert "showing method=vaebm" in runs["train_help"].stdout
    datasets = ", ".join(sorted(p.stem for p in (ROOT / "conf/dataset").glob("*.yaml")))
    assert f"dataset: {datasets}" in runs["evaluate_help"].stdout


def test_cfg_job_prints_the_composed_config(runs):
    composed = yaml.safe_load(_ok(runs["vaebm_cfg"]))
    preset = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/experiment/vaebm/quickstart.yaml"))
    assert composed["method"] == "vaebm" and composed["experiment"] == "quickstart"
    for section in ("loop", "energy", "optim"):
        assert preset[section].items() <= composed[section].items(), section
    assert composed["dry_run"] is False and "hydra" not in composed


def test_info_is_hydras_with_the_config_groups(runs):
    text = _ok(runs["nvae_info"])
    for heading in ("Config search path", "Defaults Tree", "Defaults List", "Config groups"):
        assert heading in text, heading
    assert f"file://{ROOT / 'conf'}" in text and "experiment/nvae/quickstart" in text
    nvae_presets = ", ".join(sorted(p.stem for p in (ROOT / "conf/nvae").glob("*.yaml")))
    assert f"nvae: {nvae_presets}" in text


def test_nothing_is_written_into_the_working_directory(runs):
    assert sorted(p.name for p in runs["cwd"].iterdir()) == []  # no .hydra/, outputs/, multirun/, runs/, mlruns/


# ------------------------------------------------------------------------------------------ -m
def test_multirun_dry_runs_compose_one_config_per_combination_each_with_its_own_run_dir(runs):
    text, tmp = _ok(runs["nvae_sweep"]), runs["tmp"]
    jobs = re.split(r"^# multirun job \d of 2: .*$", text, flags=re.M)[1:]
    assert len(jobs) == 2
    for batch, job in zip((16, 32), jobs):
        config = yaml.safe_load(job.split("\ndata: ")[0])
        assert config["loop"]["batch_size"] == batch and config["method"] == "nvae" and config["dry_run"] is True
        assert config["run"]["dir"] == f"{tmp}/r--loop.batch_size={batch}"
    assert not list(tmp.glob("r*"))  # dry runs


def test_multirun_of_a_data_job_builds_one_dataset_per_combination(runs):
    _ok(runs["prepare_sweep"])
    tmp = runs["tmp"]
    for n in (50, 60):
        manifest = json.loads((tmp / f"toy--num_samples={n}" / "manifest.json").read_text())
        assert manifest["num_samples"] == n
    assert not (tmp / "toy").exists()


# ------------------------------------------------------------------------------------------ errors
def test_unknown_experiment_lists_the_methods_experiments(runs):
    line = _one_line_config_error(runs["bad_experiment"])
    assert "experiment=celebahq" in line and "Could not find 'experiment/vaebm/celebahq'" in line
    experiments = sorted(p.stem for p in (ROOT / "conf/experiment/vaebm").glob("*.yaml"))
    assert line.endswith(": " + ", ".join(experiments)), line


def test_a_wrong_type_names_the_key_the_value_and_the_type():
    from core.training.config import ConfigError, compose_job

    with pytest.raises(ConfigError) as err:
        compose_job(["loop.batch_size=abc"], default_method="vaebm")
    line = str(err.value)
    assert line.startswith("Error merging override loop.batch_size=abc: Value 'abc' of type 'str' could not be "
                           "converted to Integer") and line.endswith("(key loop.batch_size, expects int)")
    with pytest.raises(ConfigError, match=r"key loop.sample_temperatures\[1\], expects list\[float\]"):
        compose_job(["loop.sample_temperatures=[1.0,hot]"], default_method="vaebm")


def test_plus_keys_outside_the_schema_are_refused(runs):
    line = _one_line_config_error(runs["bad_plus"])
    assert line.startswith("config error: +foo=1: unknown key 'foo'") and "loop, tracking, run" in line  # the keys


# ------------------------------------------------------------------------------------------ in process
@pytest.mark.parametrize("override, message, suggested", [
    ("+loop.batch_sze=3", r"^\+loop.batch_sze=3: unknown key 'loop.batch_sze'", {"loop.batch_size"}),
    ("loop.batchsize=3", r"^loop.batchsize=3: .*Key 'batchsize' not in 'LoopConfig'", {"loop.batch_size"}),
    ("+batch_size=3", r"^\+batch_size=3: unknown key", {"loop.batch_size", "loader.batch_size"}),
    ("+sampler.langevin.steps=3", "unknown key", {"sampler.langevin.num_steps", "sampler.langevin.step_size"}),
])
def test_unknown_keys_name_the_closest_real_ones(override, message, suggested):
    from core.training.config import ConfigError, compose_job

    with pytest.raises(ConfigError, match=message) as err:
        compose_job([override], default_method="vaebm")
    assert suggested <= set(str(err.value).split("did you mean ", 1)[1].rstrip("?").split(" or "))


def test_an_unknown_group_option_lists_the_groups_options():
    from core.training.config import ConfigError, compose_job

    with pytest.raises(ConfigError) as err:
        compose_job(["energy=nope"], default_method="vaebm")
    energies = ", ".join(sorted(p.stem for p in (ROOT / "conf/energy").glob("*.yaml")))
    assert str(err.value).startswith("energy=nope: ") and str(err.value).endswith(f"'energy': {energies}")


def test_sweep_expansion_is_the_cartesian_product_in_command_line_order():
    from core.training.cli import _sweep

    jobs = _sweep(["a=1,2", "b=x", "c=range(0,3)", "+d=true"])
    expected = [[f"a={a}", "b=x", f"c={c}", "+d=true"] for a, c in itertools.product((1, 2), range(3))]
    assert [job.overrides for job in jobs] == expected
    assert [job.suffix for job in jobs] == [f"a={a},c={c}" for a, c in itertools.product((1, 2), range(3))]
    assert all(job.swept == {"a", "c"} for job in jobs)
    assert _sweep(["dataset.path=/d/x,/d/y"])[1].suffix == "dataset.path=_d_y"
    assert [(j.overrides, j.suffix) for j in _sweep(["a=1,2", "a=3"])] == [(["a=3"], "")]  # the last one wins


@dataclass
class _Documented:
    trailing: int = 1  # the trailing comment
    continued: list[int] = field(default_factory=lambda: [1,
                                                          2])  # a field over two lines,
    #                                                            continued below
    # the block above a field without a trailing comment
    above: str = "x"
    below: float = 0.5
    # ^ the line below
    bare: bool = True


def test_field_docs_are_read_from_the_comments_in_the_source():
    from core.training.config import field_docs

    assert field_docs(_Documented) == {"trailing": "the trailing comment",
                                       "continued": "a field over two lines, continued below",
                                       "above": "the block above a field without a trailing comment",
                                       "below": "the line below", "bare": ""}


def test_launcher_arguments_of_deepspeed_are_stripped():
    from core.training.config import strip_launcher_args

    assert strip_launcher_args(["a=1", "--local_rank=3", "--local-rank", "2", "b=2"]) == ["a=1", "b=2"]
