"""dask-asgd: asynchronous parallel SGD on Dask distributed.

Every worker trains on the rows it holds, without barriers, and exchanges its
state with peers over a worker-to-worker channel; a Parzen-window filter merges
only the states its own step moves towards.
"""

from . import config  # noqa: F401  (registers the asgd.* defaults in dask.config)
from .engine import TrainingDiverged
from .estimators import KMeans, LinearRegression, LogisticRegression

__version__ = "0.1.0"

__all__ = ["KMeans", "LinearRegression", "LogisticRegression", "TrainingDiverged", "__version__"]
