"""Training methods on the shared job: the `Method` seam, typed model bundles and one module per method.

Importing this package registers every method (`method=<name>`) and every model kind (`build_model`).
"""
from core.methods.base import METHODS, BackboneConfig, Method, MethodContext, get_method, register_method
from core.methods.bundles import MODEL_KINDS, SampleOptions, Samples, TrainedModel, build_model, register
from core.methods import nvae, vaebm  # noqa: F401,E402  (registration)

__all__ = ["METHODS", "BackboneConfig", "Method", "MethodContext", "get_method", "register_method", "MODEL_KINDS",
           "SampleOptions", "Samples", "TrainedModel", "build_model", "register"]
