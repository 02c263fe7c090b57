"""The training engine: one chain of long-running tasks per worker, in one of
four modes (asgd, sync, simuparallel, sequential), independent of the model."""

import importlib

from ._spec import MODES, RunSpec

# Workers import this package for the training loop alone; the client-side driver
# (dask.array, xarray) loads only where a fit is started.
_DRIVER_NAMES = ("AllWorkersLost", "FitResult", "SchedulerLost", "TrainingDiverged", "fit")


def __getattr__(name):
    if name in _DRIVER_NAMES:
        return getattr(importlib.import_module("._driver", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["MODES", "AllWorkersLost", "FitResult", "RunSpec", "SchedulerLost", "TrainingDiverged", "fit"]
