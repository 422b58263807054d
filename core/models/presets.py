"""Named config presets with field overrides: one lookup shared by the backbone and energy-network configs."""
from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def preset_with_overrides(kind: str, presets: dict[str, T], name: str, overrides: dict[str, Any]) -> T:
    """A copy of `presets[name]` with `overrides` applied; unknown names and fields are clear errors."""
    if name not in presets:
        raise KeyError(f"unknown {kind} preset {name!r}; choose one of {sorted(presets)}")
    cls = type(presets[name])
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(overrides) - fields
    if unknown:
        raise KeyError(f"unknown {cls.__name__} field(s) {sorted(unknown)}; valid: {sorted(fields)}")
    return dataclasses.replace(presets[name], **overrides)


def split_preset(kind: str, presets: dict[str, Any], values: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(`preset`, remaining overrides) of a config mapping such as conf/nvae/*.yaml."""
    values = dict(values)
    if "preset" not in values:
        raise KeyError(f"{kind} config needs a 'preset' key naming one of " + ", ".join(sorted(presets)))
    return values.pop("preset"), values
