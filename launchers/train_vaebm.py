"""Stage-2 VAEBM job entry point: `deepspeed launchers/train_vaebm.py [nvae=<preset>]`.

Today it builds the configured NVAE backbone (default: the `tiny` CPU preset) and prints its noise-space layout and
parameter counts per module on rank 0, then exits 0. Energy-model training with the Langevin negative phase is wired
into this same command by the stage-2 job.
"""
from __future__ import annotations

import os
import sys

import torch

from core.models import NVAE, format_summary, nvae_preset


def _overrides(argv: list[str]) -> dict[str, str]:
    """key=value arguments; the `--local_rank=N` / `--local-rank=N` that the deepspeed launcher appends is dropped."""
    out = {}
    for arg in argv:
        if arg.startswith(("--local_rank", "--local-rank")):
            continue
        key, sep, value = arg.partition("=")
        if not sep:
            raise SystemExit(f"error: expected key=value, got {arg!r}")
        out[key] = value
    return out


def main(argv: list[str]) -> int:
    args = _overrides(argv)
    unknown = set(args) - {"nvae"}
    if unknown:
        raise SystemExit(f"error: unknown option(s) {sorted(unknown)}; supported today: nvae=<preset>")
    try:
        config = nvae_preset(args.get("nvae", "tiny"))
    except KeyError as err:
        raise SystemExit(f"error: {err.args[0]}") from None
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    with torch.device("meta"):  # the papers' presets need no memory to describe
        model = NVAE(config)
    print(f"NVAE backbone {args.get('nvae', 'tiny')}: {config}")
    print(f"noise space: eps_x {model.x_shape()}, {config.num_groups} latent groups "
          f"{config.latent_shapes()[0]} ... {config.latent_shapes()[-1]}")
    print(format_summary(model))
    print("stage-2 energy training is not part of this build yet: this command describes the backbone and exits.")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
