"""Training methods on the shared job: the `Method` seam, typed model bundles and one module per method.

Importing this package registers every method (`method=<name>`) and every model kind (`build_model`): each module of
this package that is not part of the seam itself (base, bundles, potentials) is a method module and is imported here.
"""
import importlib
import pkgutil

from core.methods.base import METHODS, BackboneConfig, Method, MethodContext, get_method, register_method
from core.methods.bundles import MODEL_KINDS, SampleOptions, Samples, TrainedModel, build_model, register

_SEAM_MODULES = {"base", "bundles", "potentials"}
for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name not in _SEAM_MODULES and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["METHODS", "BackboneConfig", "Method", "MethodContext", "get_method", "register_method", "MODEL_KINDS",
           "SampleOptions", "Samples", "TrainedModel", "build_model", "register"]
