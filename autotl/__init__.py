"""autotl: turn a folder of images into a deployable classifier by searching how to transfer.

The public API is flat and lazy: ``import autotl`` does not import torch, so the torch-free
``autotl.predict`` path stays light.
"""

from __future__ import annotations

import os
import sys
import types
from importlib import import_module

# OpenMP threads that busy-wait between parallel regions starve everything else on small, shared
# CPUs (measured: a training step 1.2 s → 0.33 s on 2 busy cores). Set before torch is imported;
# a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from typing import Any

from ._version import __version__
from .errors import AutotlError

_LAZY = {
    "fit": "autotl.fit:fit",
    "FitResult": "autotl.fit:FitResult",
    "FitOptions": "autotl.options:FitOptions",
    "SearchOptions": "autotl.options:SearchOptions",
    "predict": "autotl.predict:predict",
    "Predictor": "autotl.predict:Predictor",
    "scan_dataset": "autotl.data:scan_dataset",
    "create_source_model": "autotl.models:create_source_model",
    "HUB_ZOO": "autotl.zoo:HUB_ZOO",
    "zoo_models": "autotl.zoo:zoo_models",
    "TrainConfig": "autotl.train_config:TrainConfig",
    "DevicePolicy": "autotl.device:DevicePolicy",
    "resolve_policy": "autotl.device:resolve_policy",
    "demo": "autotl.demo:demo",
    "score": "autotl.score:score",
    "score_models": "autotl.score:score_models",
    "load_datl_weights": "autotl.score:load_datl_weights",
}

__all__ = ["__version__", "AutotlError", *_LAZY]


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'autotl' has no attribute {name!r}")
    module, attr = target.split(":")
    value = getattr(import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


class _FlatAPI(types.ModuleType):
    """``fit``, ``predict``, ``demo`` and ``score`` are functions named like the modules that define
    them. Importing such a module (``import autotl.fit``, or ``demo()`` importing ``fit``) would set
    the package attribute to the module; the attribute stays the function instead. The modules
    themselves are in ``sys.modules`` (``importlib.import_module("autotl.fit")``)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}":
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _FlatAPI
