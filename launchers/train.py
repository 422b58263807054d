"""Train any method on the shared job (core/methods/<name>.py, conf/method/<name>.yaml).

    deepspeed launchers/train.py method=<nvae|vaebm> experiment=<preset> [key=value ...]

Also runs under `torchrun` and plain `python` (one rank). The same command with the same `run.dir` resumes from the
newest checkpoint. `dry_run=true` prints the resolved config and the parameter counts.
"""
import sys

from core.training.cli import run_training

if __name__ == "__main__":
    sys.exit(run_training(sys.argv[1:], doc=__doc__))
