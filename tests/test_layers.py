"""Layer contracts (DESIGN.md "Seams"): the import-linter contracts in pyproject.toml hold for the code base, and a
planted forbidden import breaks the contract that forbids it."""
import os
import shutil
import subprocess
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "data_pipelines", "launchers")
CONTRACTS = {c["id"]: c["name"] for c in
             tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]}
# the console script `lint-imports`, run by this interpreter (the project's environment)
LINT_IMPORTS = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"


def _lint(root: Path) -> tuple[int, str]:
    """lint-imports on the packages under `root` with `root`/pyproject.toml; (exit code, output, whitespace joined).

    The linter resolves `core` etc. from its working directory, which comes first on its path; PYTHONPATH is
    dropped so that it cannot point the packages elsewhere. No cache: a cache would be written into `root`."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", LINT_IMPORTS, "--no-cache", "--no-logo", str(root / "pyproject.toml")],
                          cwd=root, env=env, capture_output=True, text=True, timeout=120)
    return proc.returncode, " ".join((proc.stdout + proc.stderr).split())


def _planted_copy(root: Path, path: str, statement: str) -> Path:
    """A copy of the packages under `root` with `statement` appended to `path` (the planted violation)."""
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    target = root / path
    target.write_text(target.read_text() + f"\n{statement}  # planted violation\n")
    return root


@pytest.fixture(scope="module")
def lints(request, tmp_path_factory) -> dict[tuple[str, str] | None, tuple[int, str]]:
    """None -> _lint of the code base; (path, statement) -> _lint of a copy with that import planted; for the selected
    tests. Each is its own lint-imports process as before, run two at a time (one per core)."""
    keys = []
    for item in request.session.items:
        if item.module is request.module and "lints" in item.fixturenames:
            params = getattr(item, "callspec", None)
            keys.append(None if params is None else (params.params["path"], params.params["statement"]))
    roots = {key: ROOT if key is None else _planted_copy(tmp_path_factory.mktemp("planted"), *key)
             for key in dict.fromkeys(keys)}
    with ThreadPoolExecutor(2) as pool:
        return dict(zip(roots, pool.map(_lint, roots.values())))


def test_layer_contracts_hold(lints):
    code, out = lints[None]
    assert code == 0, out
    for name in CONTRACTS.values():
        assert f"{name} KEPT" in out, out
    assert f"Contracts: {len(CONTRACTS)} kept, 0 broken." in out


# (file to plant the import in, the import, the contract it breaks)
PLANTS = [
    ("core/sampling/langevin.py", "import core.dist", "lower-layers"),
    ("core/models/layers.py", "import mlflow", "lower-layers"),
    ("core/methods/__init__.py", "import core.training", "methods"),
    ("data_pipelines/manifest.py", "import core.tracking", "data-pipelines"),
    ("core/evaluation/density2d.py", "import launchers.sample", "core-not-launchers"),
]


@pytest.mark.parametrize("path,statement,contract", PLANTS, ids=[f"{c}:{p}" for p, _, c in PLANTS])
def test_a_planted_forbidden_import_breaks_its_contract(lints, path, statement, contract):
    code, out = lints[(path, statement)]
    assert code != 0, out
    assert f"{CONTRACTS[contract]} BROKEN" in out, out
    module = path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
    assert f"{module} -> {statement.split()[1]} (l." in out, out  # names the offending import and its line
    # (contracts above the planted module may break too, through the indirect import: that is intended)
