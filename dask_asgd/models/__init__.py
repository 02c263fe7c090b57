"""The maths of each model, in the array namespace of its input (NumPy, CuPy,
any array-API library); the engine drives them through ``SGDModel``."""

from ._base import SGDModel
from .kmeans import KMeansModel
from .linear import LinearModel
from .logistic import LogisticModel

__all__ = ["KMeansModel", "LinearModel", "LogisticModel", "SGDModel"]
