"""DeepSpeed engine construction from the typed config. DeepSpeed wraps the trained network only.

Every DeepSpeed setting whose default changed between releases is written out explicitly, so a version bump cannot
silently change training (gradient clipping's default became 1.0 in 0.19.3).
"""
from __future__ import annotations

import math
import pickle
from typing import Any

import torch

from core.optim.config import OptimConfig
from core.training.config import BatchPlan, EngineConfig


def deepspeed_config(engine: EngineConfig, plan: BatchPlan) -> dict[str, Any]:
    """The DeepSpeed JSON config (as a dict): `plan.micro` images per rank per pass, `plan.accumulation` passes per
    optimizer step (DeepSpeed checks train_batch_size = micro x accumulation x ranks)."""
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": plan.micro,
        "train_batch_size": plan.global_batch,
        "gradient_accumulation_steps": plan.accumulation,
        "gradient_clipping": float(engine.gradient_clipping),
        "steps_per_print": 2**62,  # our loop reports; keep DeepSpeed's own step printing off
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,  # a torch optimizer is passed in on purpose
        "zero_optimization": {"stage": engine.zero_stage},
        "bf16": {"enabled": engine.precision == "bf16"},
        "fp16": {"enabled": engine.precision == "fp16", "initial_scale_power": engine.initial_loss_scale_power,
                 "loss_scale": 0, "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "checkpoint": {"tag_validation": "Warn"},
    }
    return cfg


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, lr: float, lr_min: float) -> float:
    """Learning-rate factor (relative to `lr`): linear warm-up, then cosine decay to lr_min (NVAE's schedule)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    t = min(max(step - warmup_steps, 0) / span, 1.0)
    return (lr_min + (lr - lr_min) * 0.5 * (1.0 + math.cos(math.pi * t))) / lr


def _weights_only_checkpoint_engine(config):
    """DeepSpeed's torch checkpoint engine, loading with `torch.load(weights_only=True)`: a checkpoint file that holds
    pickled code is refused (CheckpointError naming the file) instead of run. DeepSpeed's files hold tensors, plain
    containers and three small data classes of its own, which are allowed by name."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from core.training.checkpoint import CheckpointError

    allowed = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            try:
                with torch.serialization.safe_globals(allowed):
                    return torch.load(path, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError as err:
                raise CheckpointError(f"refusing to load {path}: it holds objects other than tensors and plain data "
                                      f"({str(err).splitlines()[-1].strip()[:200]})") from None

    return WeightsOnlyCheckpointEngine(config)


def build_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, optim: OptimConfig,
                 engine: EngineConfig, plan: BatchPlan, total_steps: int):
    """(engine, optimizer, scheduler) around `model` with the method's torch optimizer (a plain torch optimizer
    avoids a fused-op JIT build on CPU). Every parameter group follows the warm-up + cosine schedule (counted in
    optimizer steps of `plan.global_batch` images); a group with its own learning rate decays to the same fraction
    lr_min / lr of it."""
    import deepspeed

    warmup_steps = math.ceil(optim.warmup_nimg / plan.global_batch)
    factor = lambda step: warmup_cosine(step, total_steps, warmup_steps, optim.lr, optim.lr_min)  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [factor] * len(optimizer.param_groups))
    eng, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(engine, plan))
    eng.checkpoint_engine = _weights_only_checkpoint_engine(eng._config)  # nothing a resume reads is unpickled
    return eng, optimizer, scheduler
