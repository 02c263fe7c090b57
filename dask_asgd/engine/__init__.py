"""The training engine: one chain of long-running tasks per worker, in one of
four modes (asgd, sync, simuparallel, sequential), independent of the model."""

from ._driver import FitResult, TrainingDiverged, fit
from ._spec import MODES, RunSpec

__all__ = ["FitResult", "MODES", "RunSpec", "TrainingDiverged", "fit"]
