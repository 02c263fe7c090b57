"""The interface every SGD model implements, and array-API helpers they share.

A model's parameters are one flat 1-D vector, so the engine, the channel and the
filter can slice, send and average them without knowing which model they hold.
Nothing here imports Dask: the maths runs in the namespace of its input."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np
from array_api_compat import array_namespace, device, is_cupy_array


class SGDModel(ABC):
    """Mini-batch SGD maths of one model on flat parameter vectors.

    Example::

        model = LinearModel(n_features=3)
        params, aux = model.init_params(X_sample, y_sample, np.random.default_rng(0))
        params, aux = model.step(params, aux, X_batch, y_batch, learning_rate=0.05)
        model.loss(params, X_batch, y_batch)

    ``aux`` is state private to one worker (never exchanged), e.g. K-Means'
    per-centre counts; ``None`` for models that need none.
    """

    n_features: int
    needs_y: bool = True

    @property
    @abstractmethod
    def n_params(self) -> int:
        """Length of the flat parameter vector."""

    @abstractmethod
    def init_params(self, X, y, rng: np.random.Generator) -> tuple[Any, Any]:
        """Initial ``(params, aux)`` computed from a sample of the data."""

    @abstractmethod
    def step(self, params, aux, X, y, learning_rate: float) -> tuple[Any, Any]:
        """One mini-batch update; returns new arrays, never changes its inputs."""

    @abstractmethod
    def loss(self, params, X, y) -> float:
        """Mean loss of ``params`` on the rows of ``X`` (and ``y``)."""


def squared_distances(xp, X, C):
    """``(n, k)`` squared Euclidean distances between rows of X and rows of C."""
    x2 = xp.sum(X * X, axis=1)
    c2 = xp.sum(C * C, axis=1)
    d2 = x2[:, None] - 2.0 * (X @ C.T) + c2[None, :]
    return xp.maximum(d2, xp.asarray(0.0, dtype=d2.dtype, device=device(d2)))


def one_hot(xp, labels, n_classes: int, dtype):
    """``(n, n_classes)`` indicator matrix of integer labels (no scatter-add in the array API)."""
    classes = xp.arange(n_classes, dtype=labels.dtype, device=device(labels))
    return xp.astype(labels[:, None] == classes[None, :], dtype)


def host_to(xp, values, like):
    """A NumPy array moved into the namespace and device of ``like``."""
    return xp.asarray(values, device=device(like))


def to_host(x) -> np.ndarray:
    """A NumPy copy of an array from any namespace and device.

    Device arrays refuse ``np.asarray`` (CuPy: "Implicit conversion to a NumPy
    array is not allowed"), so each is asked explicitly: CuPy with ``.get()``,
    other libraries through DLPack."""
    if is_cupy_array(x):
        return x.get()
    if isinstance(x, np.ndarray) or not hasattr(x, "__dlpack__"):
        return np.array(x)
    return np.from_dlpack(x).copy()


__all__ = ["SGDModel", "array_namespace", "device", "host_to", "one_hot", "squared_distances", "to_host"]
