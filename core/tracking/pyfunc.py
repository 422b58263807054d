"""The `python_function` flavor of every published model: ``mlflow.pyfunc.load_model(uri).predict(...)`` draws
samples.

MLflow imports this module (named in the model's MLmodel) and calls `_load_pyfunc(model_dir, model_config)`; the
model is rebuilt from config.json and weights.safetensors by `core.methods.build_model`, the same typed loader the
jobs use, so nothing pickled is ever loaded. The vaebm package must be installed where the model is loaded.

``predict(model_input)``:
  input   a dict ``{"n": 16, "seed": 0}`` or a pandas DataFrame with one row per request and the columns
          n (samples, required), seed (default 0), and optionally steps (MCMC steps; 0: the backbone alone),
          temperature (prior temperature); a missing or NaN steps/temperature means "as trained".
  output  a numpy array with the requests' samples in row order: uint8 NHWC (N, H, W, C) for image models
          (what ``launchers/sample.py`` writes), float32 (N, D) for point models.
A request's samples are those ``launchers/sample.py n=<n> seed=<seed> batch_size=<batch_size>`` draws (on any
number of ranks): block b (images b*batch_size ...) comes from a generator seeded with ``derive_seed(seed, b)``, the
sampling job's rule (`core.evaluation.sampling.block_seed`). ``model_config`` at load time:
``{"device": "auto" | "cpu" | "cuda[:i]", "batch_size": 64}``.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

_FIELDS = ("n", "seed", "steps", "temperature")


def _load_pyfunc(model_dir: str, model_config: dict[str, Any] | None = None) -> "SamplerModel":
    from core.tracking.model_files import read_model_dir

    cfg = {"device": "auto", "batch_size": 64, **(model_config or {})}
    device = cfg["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    bundle, weights = read_model_dir(model_dir)
    return SamplerModel(bundle, weights, torch.device(device), int(cfg["batch_size"]))


def requests_of(model_input: Any) -> list[dict[str, Any]]:
    """The sampling requests in a pyfunc input (a dict, a list of dicts or a pandas DataFrame), validated."""
    if hasattr(model_input, "to_dict") and hasattr(model_input, "columns"):  # a pandas DataFrame
        rows = model_input.to_dict(orient="records")
    elif isinstance(model_input, dict):  # scalars (one request) or equally long columns (one request per entry)
        columns = {k: list(v) if isinstance(v, (list, tuple, np.ndarray)) else [v] for k, v in model_input.items()}
        lengths = {len(v) for v in columns.values()} - {1}
        if len(lengths) > 1:
            raise ValueError(f"input columns have different lengths: { {k: len(v) for k, v in columns.items()} }")
        count = lengths.pop() if lengths else 1
        rows = [{k: v[i if len(v) > 1 else 0] for k, v in columns.items()} for i in range(count)]
    elif isinstance(model_input, (list, tuple)):
        rows = [dict(r) for r in model_input]
    else:
        raise TypeError(f"model_input must be a dict or a DataFrame with columns {_FIELDS}, got "
                        f"{type(model_input).__name__}")
    out = []
    for row in rows:
        unknown = set(row) - set(_FIELDS)
        if unknown:
            raise ValueError(f"unknown input fields {sorted(unknown)}; known: {list(_FIELDS)}")
        if _missing(row.get("n")):
            raise ValueError("input field n (number of samples) is required")
        n, seed = int(row["n"]), int(0 if _missing(row.get("seed")) else row["seed"])
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        steps = None if _missing(row.get("steps")) else int(row["steps"])
        if steps is not None and steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        temperature = None if _missing(row.get("temperature")) else float(row["temperature"])
        out.append({"n": n, "seed": seed, "steps": steps, "temperature": temperature})
    return out


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


class SamplerModel:
    """A published model behind MLflow's pyfunc interface (see the module docstring)."""

    def __init__(self, bundle: dict[str, Any], weights: dict[str, torch.Tensor], device: torch.device,
                 batch_size: int = 64):
        from core.methods import build_model

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = build_model(bundle, weights, device)
        self.device = device
        self.batch_size = batch_size

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        """Samples for each request in `model_input`, concatenated in row order."""
        outputs = [self.sample(**r) for r in requests_of(model_input)]
        return np.concatenate(outputs) if len(outputs) > 1 else outputs[0]

    def sample(self, n: int, seed: int = 0, steps: int | None = None, temperature: float | None = None) -> np.ndarray:
        from core.methods import SampleOptions
        from core.seeding import derive_seed

        options = SampleOptions(steps=steps, temperature=temperature)
        chunks = []
        for b, start in enumerate(range(0, n, self.batch_size)):
            # the sampling job's block seeds (core.evaluation.sampling.block_seed; tracking sits below evaluation)
            gen = torch.Generator(device=self.device).manual_seed(derive_seed(seed, b))
            images = self.model.sample(min(self.batch_size, n - start), gen, options).images
            chunks.append(_to_numpy(images))
        return np.concatenate(chunks)


def _to_numpy(x: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1] (N, C, H, W) -> uint8 NHWC, rounded like the data pipeline's inverse scaling
    (`from_model_range`, what launchers/sample.py writes); points -> float32."""
    from data_pipelines.transforms import from_model_range

    if x.dim() != 4:
        return x.detach().float().cpu().numpy()
    u8 = from_model_range(x.detach().to(torch.float32).clamp(-1.0, 1.0), centered=True)
    return u8.permute(0, 2, 3, 1).contiguous().cpu().numpy()
