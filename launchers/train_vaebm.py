r"""VAEBM: the energy network with a Langevin negative phase in the backbone's noise space (vaebm.md Sec. 3).
`launchers/train.py method=vaebm`, under the name our users know.

    deepspeed launchers/train_vaebm.py                              # quickstart: digits, trains its backbone first
    deepspeed launchers/train_vaebm.py experiment=<cifar10|cifar10_persistent|celeba64|lsun_church64|celebahq256> \
        [backbone=models:/nvae-<dataset>@latest | backbone=<run dir>] [key=value ...]

Same command + same `run.dir` resumes. `dry_run=true` prints the resolved config and the energy network summary.
"""
import sys

from core.training.cli import run_training

if __name__ == "__main__":
    sys.exit(run_training(sys.argv[1:], default_method="vaebm", doc=__doc__))
