"""The benchmark job behind `launchers/bench.py`: our hot loops beside the official loops' arithmetic, on one device.

    python launchers/bench.py suite=<stage1|langevin|sample|data|all> preset=<tiny|cifar10|celeba64|lsun_church64|
        celebahq256> [compile=true] [precision=bf16] [steps=..] [out=bench.json]

Prints a markdown table and writes a JSON report (`out`): per loop and path (ours, ours+compile, baseline) the
throughput, step time, peak memory, counted GFLOP per step and % of the device's peak, the speed-up over the baseline
measured in the same process, and how closely ours and the baseline agree on identical inputs. Record results in
docs/benchmarks.md.
"""
from __future__ import annotations

import datetime
import json
import platform
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from core.evaluation.bench.config import SUITES, BenchConfig, BenchPreset, DataBenchConfig
from core.evaluation.bench.suites import Bench, Row

COLUMNS = ("suite", "loop", "preset", "path", "batch", "throughput", "step ms", "peak mem", "GFLOP/step", "%peak",
           "ratio vs baseline", "agree")


def _fmt_bytes(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.0f} MiB"


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def format_table(rows: list[Row]) -> str:
    """The rows as a markdown table (the layout docs/benchmarks.md uses)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join(" --- " for _ in COLUMNS) + "|"]
    for r in rows:
        cells = [r.suite, r.loop, r.preset, r.path, str(r.batch), f"{r.throughput:,.1f} {r.unit}",
                 f"{r.step_ms:,.1f}", _fmt_bytes(r.peak_mem_bytes), _fmt(r.gflop_per_step, ",.2f"),
                 _fmt(r.pct_peak, ".2f"), _fmt(r.ratio, ".2f") + ("x" if r.ratio is not None else ""),
                 _fmt(r.agree, ".1e")]
        lines.append("| " + " | ".join(cells) + " |")
    for r in rows:
        if r.graph_breaks is not None or r.note:
            breaks = "" if r.graph_breaks is None else f"{r.graph_breaks} graph break(s) while compiling; "
            lines.append(f"- {r.suite} / {r.loop} / {r.path}: {breaks}{r.note}")
    return "\n".join(lines)


def run_bench(config: BenchConfig, resolved: dict[str, Any]) -> dict[str, Any]:
    """Measure the chosen suites, print the table, write the JSON report; returns the report."""
    import torch

    from core.evaluation.bench.measure import device_name, peak_tflops

    torch.manual_seed(config.seed)
    bench = Bench(config)
    header = (f"device: {device_name(bench.device)}   preset={config.preset} {asdict(bench.preset)}   "
              f"target={config.target}   precision={config.precision}   steps={config.steps} "
              f"(+{config.warmup} warm-up)")
    print(header, flush=True)
    rows = bench.run()
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(bench.device),
        "peak_tflops": {p: peak_tflops(bench.device, p, config.peak_tflops) for p in ("fp32", "bf16")},
        "host": {"machine": platform.machine(), "python": platform.python_version(), "torch": torch.__version__,
                 "threads": torch.get_num_threads()},
        "command": " ".join(["python", *sys.argv]),
        "preset": asdict(bench.preset),
        "config": resolved,
        "rows": [asdict(r) for r in rows],
    }
    print(format_table(rows), flush=True)
    out = Path(config.out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}", flush=True)
    return report


def describe_bench(config: BenchConfig, resolved: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump({**resolved, "resolved_preset": asdict(config.resolved_preset())}, sort_keys=False)


__all__ = ["BenchConfig", "BenchPreset", "DataBenchConfig", "SUITES", "Row", "Bench", "run_bench",
           "describe_bench", "format_table"]
