"""dask-asgd: asynchronous parallel SGD on Dask distributed.

Every worker trains on the rows it holds, without barriers, and exchanges its
state with peers over a worker-to-worker channel; a Parzen-window filter merges
only the states its own step moves towards.
"""

import importlib

from . import (
    config,  # noqa: F401  (registers the asgd.* defaults in dask.config)
    dashboard,  # noqa: F401  (adds the dashboard page and /metrics series to schedulers built after this import)
)

__version__ = "0.1.0"

# Workers import this package to run the engine and the channel; the estimators
# (scikit-learn, xarray) load only when asked for, keeping worker start-up light.
_LAZY = {
    "KMeans": "estimators",
    "LinearRegression": "estimators",
    "LogisticRegression": "estimators",
    "TrainingDiverged": "engine",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["KMeans", "LinearRegression", "LogisticRegression", "TrainingDiverged", "__version__"]
