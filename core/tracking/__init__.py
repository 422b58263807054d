"""MLflow tracking for vaebm: every MLflow call of the project goes through this package, on rank 0 only.

Decision (shared/DESIGN.md): **MLflow failure costs telemetry, never the run.** `Tracker` (tracker.py) only queues
and returns; the sender (spool.py) delivers in order, rides out outages and spools the rest to disk at close.
config.py chooses the tracking URI and MLflow's HTTP settings, context.py the run names and origin tags,
system_metrics.py samples the machine, model_files.py is the model directory format (an MLflow model whose
python_function flavor is pyfunc.py), and registry.py loads models back, telling a missing model apart from an
unreachable server.
"""
from core.tracking.config import TrackingConfig, resolve_tracking_uri
from core.tracking.model_files import read_model_dir, write_model_dir
from core.tracking.registry import (ModelNotFoundError, ModelSource, TrackingUnavailableError, load_model_with_source,
                                    load_registered_model)
from core.tracking.tracker import Tracker

__all__ = [
    "ModelNotFoundError",
    "ModelSource",
    "Tracker",
    "TrackingConfig",
    "TrackingUnavailableError",
    "load_model_with_source",
    "load_registered_model",
    "read_model_dir",
    "resolve_tracking_uri",
    "write_model_dir",
]
