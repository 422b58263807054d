"""Import an official NVAE checkpoint (NVlabs/NVAE, the Gaussian-decoder models VAEBM starts from) as our stage-1
model directory (core/training/import_nvae.py, core/models/official_nvae.py).

    python launchers/import_nvae.py checkpoint=<path/checkpoint.pt> out=<model dir> [register=<name>]
    deepspeed launchers/train_vaebm.py experiment=<name> backbone=<model dir>    # or models:/<name>@candidate

Exit codes: 0 done; 2 a config error or a checkpoint that is refused (unsafe pickle, unsupported architecture);
3 the model directory is written but MLflow did not take the model (register=).
"""
import sys

from core.models.official_nvae import OfficialCheckpointError
from core.training.cli import EXIT_CONFIG_ERROR, run_job
from core.training.import_nvae import ImportNVAEConfig, RegistrationError, describe, import_nvae

EXIT_NOT_REGISTERED = 3


def main(argv: list[str]) -> int:
    try:
        return run_job(ImportNVAEConfig, "import_nvae", argv, import_nvae, describe, doc=__doc__)
    except (OfficialCheckpointError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except RegistrationError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_NOT_REGISTERED


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
