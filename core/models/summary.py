"""Parameter counts per module: what a dry run prints and the README's preset table lists."""
from __future__ import annotations

import torch.nn as nn


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameter_summary(model: nn.Module) -> dict[str, int]:
    """Parameter count of every top-level child module, plus the total under 'total'."""
    counts = {name: count_parameters(child) for name, child in model.named_children()}
    direct = sum(p.numel() for p in model.parameters(recurse=False))
    if direct:
        counts["(own parameters)"] = direct
    counts["total"] = count_parameters(model)
    return counts


def format_summary(model: nn.Module) -> str:
    """A two-column table: module name, parameter count."""
    rows = [(name, f"{n:,}") for name, n in parameter_summary(model).items()]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {count:>14}" for name, count in rows)
