"""The model directory format: ``config.json`` + weights (+ extra files), written by `Tracker.log_model` and the
training jobs, read back by `load_registered_model`.

Weights are ``weights.safetensors`` when `safetensors` is installed, else ``weights.pt`` loaded with
``torch.load(weights_only=True)``: reading a model never unpickles arbitrary objects.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch

_WEIGHTS_SAFETENSORS = "weights.safetensors"
_WEIGHTS_TORCH = "weights.pt"
_CONFIG_FILE = "config.json"


def _safetensors():
    try:
        import safetensors.torch

        return safetensors.torch
    except ImportError:
        return None


def write_model_dir(model_dir: str | Path, config: dict, state_dict: Mapping[str, torch.Tensor],
                    extra_files: Mapping[str, str | bytes] | None = None) -> Path:
    """Write the model directory format read by `load_registered_model` (config.json + weights + extras)."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / _CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str))
    # Contiguous CPU clones: a snapshot training can't mutate, compact storage (views would save their whole
    # base tensor), and no shared storage (safetensors refuses tied weights).
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state_dict.items()}
    st = _safetensors()
    if st is not None:
        st.save_file(tensors, str(model_dir / _WEIGHTS_SAFETENSORS))
    else:
        torch.save(tensors, model_dir / _WEIGHTS_TORCH)
    for fname, content in (extra_files or {}).items():
        target = (model_dir / fname).resolve()
        if model_dir.resolve() not in target.parents or fname in (_CONFIG_FILE, _WEIGHTS_SAFETENSORS, _WEIGHTS_TORCH):
            raise ValueError(f"extra file name {fname!r} must be a new relative path inside the model directory")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content) if isinstance(content, bytes) else target.write_text(content)
    return model_dir


def read_model_dir(model_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, state_dict) from a model directory; tensors are loaded without unpickling arbitrary objects."""
    model_dir = Path(model_dir)
    config = json.loads((model_dir / _CONFIG_FILE).read_text())
    if (model_dir / _WEIGHTS_SAFETENSORS).exists():
        st = _safetensors()
        if st is None:
            raise ImportError(f"{model_dir / _WEIGHTS_SAFETENSORS} needs the `safetensors` package")
        state = st.load_file(str(model_dir / _WEIGHTS_SAFETENSORS), device="cpu")
    elif (model_dir / _WEIGHTS_TORCH).exists():
        state = torch.load(model_dir / _WEIGHTS_TORCH, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"no {_WEIGHTS_SAFETENSORS} or {_WEIGHTS_TORCH} in {model_dir}")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{model_dir}: weights are not a flat dict of tensors")
    return config, dict(state)

