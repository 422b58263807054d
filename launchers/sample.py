"""Sample from any trained model; energy-based ones run test-time Langevin chains (vaebm.md App. E).

    python launchers/sample.py model=models:/vaebm-<dataset>@latest n=<int> out=<dir> [steps=.. step_size=..
        temperature=.. init=low_temperature format=npz seed=..]

Runs under `deepspeed`/`torchrun` too: each rank writes its share of the n samples.
"""
import sys

from core.evaluation.sampling import SampleConfig, describe_sampling, run_sampling
from core.training.cli import run_job

if __name__ == "__main__":
    sys.exit(run_job(SampleConfig, "sample", sys.argv[1:], run_sampling, describe_sampling))
