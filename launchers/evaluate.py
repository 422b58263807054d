"""Evaluate a trained model: FID, exact 2-D likelihoods, IWAE NLL or OOD AUROC (core/evaluation/jobs.py).

    python launchers/evaluate.py metric=fid  model=models:/vaebm-digits@latest dataset=digits [fid_samples=..]
    python launchers/evaluate.py metric=ll2d dataset=gaussians25
    python launchers/evaluate.py metric=iwae model=<nvae or vaebm ref> dataset=<name or shard dir>
    python launchers/evaluate.py metric=ood  model=<vaebm ref> dataset=<in-distribution test shards>

Runs under `deepspeed`/`torchrun` too (fid/iwae/ood split the work over ranks; ll2d runs on rank 0).
"""
import sys

from core.evaluation.jobs import EvaluateConfig, describe, evaluate
from core.training.cli import run_job


def _rename_dataset_args(argv: list[str]) -> list[str]:
    """`dataset=<name|dir|.npy>` -> `dataset_ref=...`, `dataset.<field>=v` -> `data.<field>=v`: Hydra would read
    `dataset=` as a choice from the conf/dataset group, which cannot name a directory or an .npy file."""
    out = []
    for arg in argv:
        if arg.startswith("dataset="):
            arg = "dataset_ref=" + arg[len("dataset="):]
        elif arg.startswith(("dataset.", "+dataset.")):
            arg = "+data." + arg.split("dataset.", 1)[1]
        out.append(arg)
    return out


if __name__ == "__main__":
    sys.exit(run_job(EvaluateConfig, "evaluate", _rename_dataset_args(sys.argv[1:]), evaluate, describe, doc=__doc__,
                     choices={"dataset": ("dataset", "a conf/dataset name, a shard directory, or (ll2d) gaussians25 "
                                                     "| <points.npy>; read as dataset_ref")}))
