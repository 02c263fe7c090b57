"""What a pipeline leaves behind: the model as ``.npz`` (never pickle), ``history_`` as
netCDF, a PNG of training over time, and a JSON summary; plus reading the model back."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr

from .errors import DataError, MissingFileError

MODEL_FORMAT = "dask-asgd-model"
MODEL_VERSION = 1

# What each estimator's fitted state is called in the file, by TOML estimator name.
_FITTED = {
    "kmeans": ("cluster_centers_",),
    "linear_regression": ("coef_", "intercept_"),
    "logistic_regression": ("coef_", "intercept_", "classes_"),
}


@dataclass
class Outputs:
    """Which files a run writes into its output directory.

    ``dir`` (relative to the pipeline file) is where they go when the command
    line gives no ``--out``.
    """

    dir: str | None = None
    model: bool = True
    history: bool = True
    plot: bool = True
    summary: bool = True

    def write(self, out: Path, estimator_name: str, estimator, data, summary: dict) -> dict[str, str]:
        """Write the enabled files into ``out``; returns ``{what: path}``."""
        out.mkdir(parents=True, exist_ok=True)
        files = {}
        if self.model:
            files["model"] = str(save_model(out / "model.npz", estimator_name, estimator, data.features, data.scaling))
        if self.history:
            files["history"] = str(save_history(out / "history.nc", estimator.history_))
        if self.plot:
            files["plot"] = str(plot_history(out / "history.png", estimator.history_, title=summary.get("name", "")))
        if self.summary:
            files["summary"] = str(out / "summary.json")
            _atomic_write_text(out / "summary.json", json.dumps({**summary, "files": files}, indent=2, default=_json_default))
        return files


def save_model(path: Path, estimator_name: str, estimator, features, scaling=None) -> Path:
    """The fitted parameters, feature names, scaling and estimator settings as ``.npz``.

    Everything is a plain array (strings as unicode arrays), so the file loads with
    ``numpy.load(path, allow_pickle=False)``.
    """
    arrays = {
        "format": np.asarray(MODEL_FORMAT),
        "version": np.asarray(MODEL_VERSION),
        "estimator": np.asarray(estimator_name),
        "params": np.asarray(json.dumps(_plain_params(estimator), default=_json_default)),
        "features": np.asarray(list(features), dtype=str),
    }
    for name in _FITTED[estimator_name]:
        value = np.asarray(getattr(estimator, name))
        arrays[name.rstrip("_")] = value.astype(str) if value.dtype.hasobject else value
    if scaling is not None:
        arrays["scaling_mean"], arrays["scaling_scale"] = (np.asarray(a, dtype=np.float64) for a in scaling)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)
    return path


@dataclass
class SavedModel:
    """A model read back from ``model.npz``; ``predict`` takes raw rows (any scaling is applied).

    Example::

        model = load_model("out/model.npz")
        labels = model.predict(X)          # NumPy in, NumPy out
    """

    estimator: str
    arrays: dict[str, np.ndarray]
    features: tuple[str, ...]
    params: dict

    def _prepare(self, X) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != len(self.features):
            raise DataError(f"X has shape {X.shape}; the model expects (n_samples, {len(self.features)}) with features {self.features[:5]}...")
        if "scaling_mean" in self.arrays:
            X = (X - self.arrays["scaling_mean"]) / self.arrays["scaling_scale"]
        return X

    def predict(self, X) -> np.ndarray:
        X = self._prepare(X)
        a = self.arrays
        if self.estimator == "kmeans":
            C = a["cluster_centers"]
            return np.argmin((X * X).sum(1)[:, None] - 2 * X @ C.T + (C * C).sum(1)[None, :], axis=1)
        if self.estimator == "linear_regression":
            return X @ a["coef"] + a["intercept"]
        scores = X @ a["coef"].T + a["intercept"]
        index = (scores[:, 0] > 0).astype(int) if scores.shape[1] == 1 else np.argmax(scores, axis=1)
        return a["classes"][index]


def load_model(path) -> SavedModel:
    """Read a ``model.npz`` written by :func:`save_model` (no pickle is ever loaded)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path} does not exist; pass the model.npz a run wrote")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path} is not a readable model file ({e}); write it again with dask-asgd run") from e
    if str(arrays.get("format", "")) != MODEL_FORMAT or int(arrays.get("version", -1)) != MODEL_VERSION:
        raise DataError(f"{path} is not a dask-asgd model file of version {MODEL_VERSION}; write it again with dask-asgd run")
    return SavedModel(
        estimator=str(arrays.pop("estimator")),
        arrays=arrays,
        features=tuple(str(f) for f in arrays.pop("features")),
        params=json.loads(str(arrays.pop("params"))),
    )


def save_history(path: Path, history: xr.Dataset) -> Path:
    """``history_`` as netCDF; attributes that netCDF cannot hold become JSON strings."""
    history = history.copy()
    history.attrs = {k: v if isinstance(v, (str, int, float, np.number)) else json.dumps(v, default=_json_default)
                     for k, v in history.attrs.items()}
    tmp = path.with_name(f".{path.name}.tmp")
    history.to_netcdf(tmp)
    os.replace(tmp, path)
    return path


def plot_history(path: Path, history: xr.Dataset, title: str = "") -> Path:
    """A PNG with, per worker over time: the loss, ``comm_interval`` and ``message_size``."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    panels = [("loss", "loss", True), ("comm_interval", "comm_interval (samples)", False),
              ("message_size", "message_size (parameters)", False)]
    panels = [p for p in panels if p[0] in history]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.6 * len(panels)), sharex=True, squeeze=False)
    for ax, (name, label, log) in zip(axes[:, 0], panels):
        for worker in history.worker.values:
            series = history[name].sel(worker=worker)
            ax.step(history.time, series, where="post", label=str(worker))
        ax.set_ylabel(label)
        values = history[name].values[np.isfinite(history[name].values)]
        if log and values.size and values.min() > 0 and values.max() > 10 * values.min():
            ax.set_yscale("log")  # loss falls by decades early on; linear hides the later part
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize="small", title="worker")
    axes[-1, 0].set_xlabel("time since training started (s)")
    mode = history.attrs.get("mode", "")
    fig.suptitle(" ".join(filter(None, [title, f"({history.attrs.get('model', '')}, mode={mode})" if mode else ""])))
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _plain_params(estimator) -> dict:
    return {k: v for k, v in estimator.get_params(deep=False).items() if k != "client"}


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
