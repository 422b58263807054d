"""Stage 1: the NVAE backbone (vaebm.md Sec. 3.1). `launchers/train.py method=nvae`, under the name our users know.

    deepspeed launchers/train_nvae.py experiment=<quickstart|cifar10|celeba64|lsun_church64|celebahq256> [key=value ...]

Also runs under `torchrun` and plain `python` (one rank). Re-running the same command with the same `run.dir`
resumes from the newest checkpoint. `dry_run=true` prints the resolved config and parameter counts.
"""
import sys

from core.training.cli import run_training

if __name__ == "__main__":
    sys.exit(run_training(sys.argv[1:], default_method="nvae", doc=__doc__))
