"""Stage 2: train the VAEBM energy network with a Langevin negative phase in the NVAE's noise space (vaebm.md Sec. 3).

    deepspeed launchers/train_vaebm.py                              # quickstart: digits, trains its backbone first
    deepspeed launchers/train_vaebm.py experiment=<cifar10|cifar10_persistent|celeba64|lsun_church64|celebahq256> \
        [backbone=models:/nvae-<dataset>@latest | backbone=<run dir>] [key=value ...]

Same command + same `run.dir` resumes. `dry_run=true` prints the resolved config and the energy network summary.
"""
import sys

from core.training.cli import run_job
from core.training.config import Stage2Config
from core.training.stage2 import describe, train_vaebm

if __name__ == "__main__":
    sys.exit(run_job(Stage2Config, "train_vaebm", sys.argv[1:], train_vaebm, describe,
                     experiment_group="vaebm_experiment"))
