"""The model directory format, written by `Tracker.log_model`, the training jobs and the NVAE import, read back by
`load_registered_model` and MLflow's own loader:

    config.json          the typed model bundle (`core.methods.bundles`)
    weights.safetensors  the flat state dict (safetensors: no pickle)
    MLmodel              an MLflow model with a `python_function` flavor (loader: core.tracking.pyfunc), so
                         ``mlflow.pyfunc.load_model(<this directory or its models:/ URI>)`` draws samples
    python_env.yaml, requirements.txt   the environment MLflow records for it (this package must be installed too)

Directories written before safetensors (``weights.pt``) still read, with ``torch.load(weights_only=True)``: reading
a model never unpickles arbitrary objects.
"""
from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Mapping

import torch

WEIGHTS_FILE = "weights.safetensors"
LEGACY_WEIGHTS_FILE = "weights.pt"  # read only: model directories written before safetensors
CONFIG_FILE = "config.json"
MLMODEL_FILE = "MLmodel"
PYFUNC_LOADER = "core.tracking.pyfunc"  # the module whose _load_pyfunc MLflow calls
_ENV_FILES = ("python_env.yaml", "requirements.txt")
_RESERVED = (CONFIG_FILE, WEIGHTS_FILE, LEGACY_WEIGHTS_FILE, MLMODEL_FILE, *_ENV_FILES)
# What the python_function flavor imports at load time (pinned to this environment's versions in requirements.txt).
_RUNTIME_PACKAGES = ("mlflow", "torch", "safetensors", "numpy", "pandas")


def write_model_dir(model_dir: str | Path, config: dict, state_dict: Mapping[str, torch.Tensor],
                    extra_files: Mapping[str, str | bytes] | None = None) -> Path:
    """Write the model directory format above (config.json + weights.safetensors + MLflow model files + extras)."""
    import safetensors.torch

    model_dir = Path(model_dir)
    for fname in extra_files or {}:
        target = (model_dir / fname).resolve()
        if model_dir.resolve() not in target.parents or fname in _RESERVED:
            raise ValueError(f"extra file name {fname!r} must be a new relative path inside the model directory")
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str))
    # Contiguous CPU clones: a snapshot training can't mutate, compact storage (views would save their whole
    # base tensor), and no shared storage (safetensors refuses tied weights).
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state_dict.items()}
    safetensors.torch.save_file(tensors, str(model_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    (model_dir / LEGACY_WEIGHTS_FILE).unlink(missing_ok=True)  # rewriting an old directory: one weights file
    for fname, content in (extra_files or {}).items():
        target = model_dir / fname
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content) if isinstance(content, bytes) else target.write_text(content)
    write_mlmodel(model_dir, config)
    return model_dir


def write_mlmodel(model_dir: str | Path, config: dict) -> None:
    """MLmodel + python_env.yaml + requirements.txt: a `python_function` flavor whose loader module is
    `core.tracking.pyfunc` (no pickled Python object in the model: the loader rebuilds the model from config.json
    and the safetensors weights)."""
    import yaml
    from mlflow.models import Model
    from mlflow.pyfunc import add_to_model

    model_dir = Path(model_dir)
    model = Model(metadata={"vaebm_kind": str(config.get("kind", "?"))})
    add_to_model(model, loader_module=PYFUNC_LOADER, python_env=_ENV_FILES[0],
                 # defaults of the pyfunc loader; override with mlflow.pyfunc.load_model(uri, model_config={...})
                 model_config={"device": "auto", "batch_size": 64})
    model.save(str(model_dir / MLMODEL_FILE))
    python = ".".join(platform.python_version_tuple()[:2])
    (model_dir / _ENV_FILES[0]).write_text(yaml.safe_dump(
        {"python": python, "build_dependencies": ["pip"], "dependencies": [f"-r {_ENV_FILES[1]}"]}, sort_keys=False))
    lines = ["# The loader module core.tracking.pyfunc comes with the vaebm package (pip install <its checkout>)."]
    for pkg in _RUNTIME_PACKAGES:
        try:
            lines.append(f"{pkg}=={metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            lines.append(pkg)
    (model_dir / _ENV_FILES[1]).write_text("\n".join(lines) + "\n")


def read_model_dir(model_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, state_dict) from a model directory; tensors are loaded without unpickling arbitrary objects."""
    model_dir = Path(model_dir)
    config = json.loads((model_dir / CONFIG_FILE).read_text())
    if (model_dir / WEIGHTS_FILE).exists():
        import safetensors.torch

        state = safetensors.torch.load_file(str(model_dir / WEIGHTS_FILE), device="cpu")
    elif (model_dir / LEGACY_WEIGHTS_FILE).exists():
        state = torch.load(model_dir / LEGACY_WEIGHTS_FILE, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"no {WEIGHTS_FILE} or {LEGACY_WEIGHTS_FILE} in {model_dir}")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{model_dir}: weights are not a flat dict of tensors")
    return config, dict(state)
