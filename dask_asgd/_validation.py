"""Checks on estimator parameters and inputs, made before any cluster work where
possible; every error says what is wrong and what to do about it."""

from __future__ import annotations

import math
import numbers

import dask.array as da
import numpy as np
import xarray as xr
from array_api_compat import array_namespace, is_array_api_obj

from .engine import MODES
from .filter import FILTERS
from .models._base import to_host


def check_positive(name: str, value, *, integer: bool = False, allow=(), allow_none: bool = False):
    """``value`` must be a finite number > 0 (an int if ``integer``), or one of ``allow``."""
    if (value is None and allow_none) or (isinstance(value, str) and value in allow):
        return value
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) or value <= 0:
        choices = " or ".join([repr(a) for a in allow] + (["None"] if allow_none else []))
        what = "a positive integer" if integer else "a positive number"
        raise ValueError(f"{name}={value!r} is not valid; use {what}" + (f" or {choices}" if choices else ""))
    return value


def check_common_params(est) -> None:
    if est.mode not in MODES:
        raise ValueError(f"mode={est.mode!r} is not known; use one of {', '.join(map(repr, MODES))}")
    if est.update_filter not in FILTERS:
        raise ValueError(f"update_filter={est.update_filter!r} is not known; use 'parzen' or None")
    check_positive("learning_rate", est.learning_rate)
    check_positive("batch_size", est.batch_size, integer=True)
    check_positive("max_epochs", est.max_epochs, integer=True)
    check_positive("max_time", est.max_time, allow_none=True)
    check_positive("comm_interval", est.comm_interval, integer=True, allow=("auto",))
    check_positive("message_size", est.message_size, integer=True, allow=("auto",))
    if est.tol is not None and (not isinstance(est.tol, numbers.Real) or not est.tol >= 0):
        raise ValueError(f"tol={est.tol!r} is not valid; use a number >= 0 or None")


def as_2d_samples(X, sample_dim: str | None = None, name: str = "X"):
    """X as a 2-D NumPy/CuPy/array-API or dask array with samples along axis 0.

    An ``xarray.DataArray`` gives its samples along ``sample_dim`` (default: its
    first dim); further dims are stacked into one feature axis.
    """
    if isinstance(X, xr.DataArray):
        dim = sample_dim or X.dims[0]
        if dim not in X.dims:
            raise ValueError(f"sample_dim={dim!r} is not a dim of {name} (dims: {X.dims}); pass one of them")
        X = X.transpose(dim, ...)
        if X.ndim > 2:
            X = X.stack(feature=[d for d in X.dims if d != dim])
        X = X.data
    elif isinstance(X, (xr.Dataset, dict)):
        raise TypeError(f"{name} is a {type(X).__name__}; pass one array (e.g. ds['variable'] or ds.to_dataarray())")
    elif not isinstance(X, da.Array) and not is_array_api_obj(X):
        X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"{name} must be 2-D (samples x features), got {X.ndim}-D with shape {X.shape}; reshape it")
    X = _as_float(X, name)
    if any(math.isnan(s) for s in X.shape):
        raise ValueError(f"{name} has unknown chunk sizes; call {name}.compute_chunk_sizes() before fit")
    if X.shape[0] == 0:
        raise ValueError(f"{name} has 0 samples; fit needs at least one row")
    if X.shape[1] == 0:
        raise ValueError(f"{name} has 0 features; fit needs at least one column")
    return X


def as_targets(y, n_samples: int, sample_dim: str | None = None, *, numeric: bool):
    """y as a 1-D array of ``n_samples`` entries."""
    if y is None:
        raise ValueError("y is required for this estimator; pass the targets as fit(X, y)")
    if isinstance(y, xr.DataArray):
        y = y.transpose(sample_dim or y.dims[0], ...).data if y.ndim else y.data
    elif not isinstance(y, da.Array) and not is_array_api_obj(y):
        y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(f"y must be 1-D, got shape {y.shape}; pass one target per sample")
    if y.shape[0] != n_samples:
        raise ValueError(f"y has {y.shape[0]} entries but X has {n_samples} samples; pass one target per row of X")
    return _as_float(y, "y") if numeric else y


def _as_float(a, name):
    kind = np.dtype(a.dtype).kind if isinstance(a, (np.ndarray, da.Array)) else None
    if kind is None:  # another array-API library: ask its namespace
        xp = array_namespace(a)
        if xp.isdtype(a.dtype, "real floating"):
            return a
        if xp.isdtype(a.dtype, ("integral", "bool")):
            return xp.astype(a, xp.float64)
        raise TypeError(f"{name} has dtype {a.dtype}; convert it to a real number type first")
    if kind == "f":
        return a
    if kind in "iub":
        return a.astype(np.float64)
    raise TypeError(f"{name} has dtype {a.dtype}, which is not numeric; encode it as numbers first")


def check_finite(a, name: str) -> None:
    """Raise naming where NaN or inf sit in ``a`` (computes a reduction for dask arrays)."""
    if isinstance(a, da.Array):
        bad = (~da.isfinite(a)).sum(axis=0 if a.ndim == 2 else None).compute()
        bad = np.atleast_1d(to_host(bad))  # CuPy chunks give a CuPy count
        if bad.any():
            cols = np.flatnonzero(bad)
            where = f" in column(s) {cols[:10].tolist()}" if a.ndim == 2 else ""
            raise ValueError(f"{name} contains {int(bad.sum())} NaN or inf value(s){where}; drop or impute them before fit")
        return
    xp = array_namespace(a)
    finite = xp.isfinite(a)
    if bool(xp.all(finite)):
        return
    count = int(xp.sum(xp.astype(~finite, xp.int64)))
    where = ""
    if isinstance(a, np.ndarray):  # device arrays: the count is enough, no host copy
        first = [int(i) for i in np.argwhere(~finite)[0]]
        where = f", first at row {first[0]}" + (f", column {first[1]}" if len(first) > 1 else "")
    raise ValueError(f"{name} contains {count} NaN or inf value(s){where}; drop or impute them before fit")
