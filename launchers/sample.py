"""Sample from any trained model; energy-based ones run test-time Langevin chains (vaebm.md App. E).

    python launchers/sample.py model=models:/vaebm-<dataset>@latest n=<int> out=<dir> [steps=.. step_size=..
        temperature=.. init=low_temperature format=npz seed=.. batch_size=..]

Runs under `deepspeed`/`torchrun` too, with the same output: image i depends on (seed, batch_size, i), not on the
number of ranks. format=npz writes one samples.npz (arr_0, uint8 NHWC, index order).
"""
import sys

from core.evaluation.sampling import SampleConfig, describe_sampling, run_sampling
from core.training.cli import run_job

if __name__ == "__main__":
    sys.exit(run_job(SampleConfig, "sample", sys.argv[1:], run_sampling, describe_sampling, doc=__doc__))
