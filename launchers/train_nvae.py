"""Stage 1: train the NVAE backbone (vaebm.md Sec. 3.1).

    deepspeed launchers/train_nvae.py experiment=<quickstart|cifar10|celeba64|lsun_church64|celebahq256> [key=value ...]

Also runs under `torchrun` and plain `python` (one rank). Re-running the same command with the same `run.dir`
resumes from the newest checkpoint. `dry_run=true` prints the resolved config and parameter counts.
"""
import sys

from core.training.cli import run_job
from core.training.config import Stage1Config
from core.training.stage1 import describe, train_nvae

if __name__ == "__main__":
    sys.exit(run_job(Stage1Config, "train_nvae", sys.argv[1:], train_nvae, describe))
