"""Checkpoint write time of each paper preset: what a graceful preemption must fit into the grace period.

    python launchers/bench_checkpoint.py [dir=/path/on/the/run/volume] [presets=tiny,cifar10,...]

For every NVAE preset (stage 1: weights + Adamax state) and VAEBM energy preset (stage 2: weights + Adam state) it
writes what one rank's checkpoint holds (ZeRO 0: the model states file) with torch.save, then the manifest
(SHA-256 of every byte), to `dir`, and prints a table with a suggested terminationGracePeriodSeconds
(3 x measured + 30 s for the final step and shutdown). Run it on the volume your run directories live on.
"""
from __future__ import annotations

import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch


def _optimizer_state(params: list[torch.Tensor], optimizer: type) -> dict:
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = optimizer(params)
    opt.step()  # creates the moment buffers a real checkpoint carries
    return opt.state_dict()


def main(argv: list[str]) -> int:
    from core.methods.nvae import NVAE
    from core.models.energy import EnergyNet, EnergyNetConfig
    from core.models.nvae_config import NVAEConfig
    from core.training.checkpoint import write_manifest
    from core.training.config import load_preset, preset_names

    args = dict(a.split("=", 1) for a in argv)
    root = Path(args.get("dir") or tempfile.mkdtemp(prefix="vaebm-ckpt-bench-"))
    jobs = [("nvae", name) for name in preset_names("nvae")] + [("energy", n) for n in preset_names("energy")]
    if "presets" in args:
        keep = set(args["presets"].split(","))
        jobs = [j for j in jobs if j[1] in keep]
    rows = ["| stage | preset | parameters | bytes | torch.save s | manifest s | suggested grace s |",
            "|---|---|---:|---:|---:|---:|---:|"]
    for group, name in jobs:
        if group == "nvae":
            module, optimizer = NVAE(load_preset("nvae", name, NVAEConfig)), torch.optim.Adamax
        else:
            module, optimizer = EnergyNet(load_preset("energy", name, EnergyNetConfig)), torch.optim.Adam
        params = [p for p in module.parameters()]
        state = {"module": module.state_dict(), "optimizer": _optimizer_state(params, optimizer)}
        out = root / f"{group}-{name}"
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        torch.save(state, out / "mp_rank_00_model_states.pt")
        t1 = time.perf_counter()
        write_manifest(out)
        t2 = time.perf_counter()
        size = (out / "mp_rank_00_model_states.pt").stat().st_size
        grace = math.ceil(3 * (t2 - t0) + 30)
        rows.append(f"| {'1 (NVAE)' if group == 'nvae' else '2 (energy)'} | {name} | "
                    f"{sum(p.numel() for p in params):,} | {size:,} | {t1 - t0:.2f} | {t2 - t1:.2f} | {grace} |")
        shutil.rmtree(out)
        del module, state, params
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
