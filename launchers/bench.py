"""Benchmarks on this machine: our hot loops beside the official VAEBM/NVAE loops' arithmetic, and the data loaders.

    python launchers/bench.py suite=<stage1|langevin|sample|data|all> preset=<tiny|cifar10|celeba64|lsun_church64|
        celebahq256> [compile=true] [precision=bf16] [target=reference] [steps=5] [out=bench.json]

Every key is documented in core/evaluation/bench/config.py (BenchConfig); results go to docs/benchmarks.md.
"""
import sys

from core.evaluation.bench import BenchConfig, describe_bench, run_bench
from core.training.cli import run_job

if __name__ == "__main__":
    sys.exit(run_job(BenchConfig, "bench", sys.argv[1:], run_bench, describe_bench, doc=__doc__,
                     choices={"preset": ("bench_preset", "conf/bench_preset/<name>.yaml: the shapes it measures"),
                              "nvae_preset": ("nvae", "instead of the preset's backbone"),
                              "energy_preset": ("energy", "instead of the preset's energy network")}))
