"""Loader throughput: images/s for each backend x stored size x format (photos256 crops built on first use).

    python launchers/bench_data.py                                   # quick: ~3 s per row
    python launchers/bench_data.py seconds=10 batch_size=128 workers=8 backends=[torch,dali]

The data suite of launchers/bench.py (`python launchers/bench.py suite=data data.<key>=...`) under its old keys:
every key of core/evaluation/bench/config.py DataBenchConfig may be given bare (`seconds=10`), any other bench key
as is (`out=data.json`).
"""
import dataclasses
import sys

from core.evaluation.bench import BenchConfig, DataBenchConfig, describe_bench, run_bench
from core.training.cli import run_job

_DATA_KEYS = {f.name for f in dataclasses.fields(DataBenchConfig)}


def data_overrides(argv: list[str]) -> list[str]:
    """`suite=data` plus the arguments, with bare DataBenchConfig keys moved under `data.`."""
    return ["suite=data", *(f"data.{a}" if a.split("=", 1)[0].lstrip("+~") in _DATA_KEYS else a for a in argv)]


if __name__ == "__main__":
    sys.exit(run_job(BenchConfig, "bench", data_overrides(sys.argv[1:]), run_bench, describe_bench,
                     doc=__doc__))
