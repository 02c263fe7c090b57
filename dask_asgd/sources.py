"""Where a pipeline's data comes from: synthetic generators, xarray stores (zarr,
netCDF) and NumPy files, each read or built chunk by chunk on the workers."""

from __future__ import annotations

import inspect
import os
import shutil
import typing
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import dask
import dask.array as da
import numpy as np
import xarray as xr

from . import _toml, datasets
from .errors import ConfigError, DataError, MissingFileError


@dataclass
class Data:
    """Samples as dask arrays, with named feature columns, flowing from a source through preprocessing.

    ``scaling`` is ``(mean, scale)`` per column once standardized, so the saved
    model can take raw rows; ``X_test``/``y_test`` exist once the data is split.
    """

    X: da.Array
    y: da.Array | None
    features: tuple[str, ...]
    X_test: da.Array | None = None
    y_test: da.Array | None = None
    scaling: tuple[np.ndarray, np.ndarray] | None = None

    def persist(self, client) -> Data:
        """The same data, computed once and held on the workers."""
        names = ("X", "y", "X_test", "y_test")
        present = {n: getattr(self, n) for n in names if getattr(self, n) is not None}
        held = dict(zip(present, client.persist(list(present.values()))))
        return Data(**{**self.__dict__, **held})


class _Synthetic:
    """What the synthetic sources share: size checks, and data made on the workers
    by the generator each one calls in ``_make``."""

    has_targets: ClassVar[bool] = True

    def check(self, base_dir: Path) -> None:
        _check_sizes(self)

    def load(self, base_dir: Path, client) -> Data:
        self.check(base_dir)
        X, y = self._make()
        return Data(X, y, _column_names(self.n_features))


@dataclass
class Blobs(_Synthetic):
    """Gaussian blobs (``datasets.make_blobs``); y holds the true blob of each row."""

    kind: ClassVar[str] = "blobs"
    n_samples: int = 100_000
    n_features: int = 16
    centers: int = 8
    cluster_std: float = 1.0
    center_box: float = 10.0
    chunk_rows: int = 100_000
    random_state: int = 0

    def _make(self):
        return datasets.make_blobs(
            self.n_samples, self.n_features, self.centers, cluster_std=self.cluster_std,
            center_box=self.center_box, chunk_rows=self.chunk_rows, random_state=self.random_state,
        )


@dataclass
class Classification(_Synthetic):
    """Labelled Gaussian classes (``datasets.make_classification``)."""

    kind: ClassVar[str] = "classification"
    n_samples: int = 100_000
    n_features: int = 20
    n_classes: int = 2
    class_sep: float = 1.0
    n_informative: int | None = None
    chunk_rows: int = 100_000
    random_state: int = 0

    def _make(self):
        return datasets.make_classification(
            self.n_samples, self.n_features, self.n_classes, class_sep=self.class_sep,
            n_informative=self.n_informative, chunk_rows=self.chunk_rows, random_state=self.random_state,
        )


@dataclass
class Regression(_Synthetic):
    """A noisy linear target of standard normal features (``datasets.make_regression``)."""

    kind: ClassVar[str] = "regression"
    n_samples: int = 100_000
    n_features: int = 20
    noise: float = 0.1
    bias: float = 0.0
    chunk_rows: int = 100_000
    random_state: int = 0

    def _make(self):
        X, y, _ = datasets.make_regression(
            self.n_samples, self.n_features, noise=self.noise, bias=self.bias,
            chunk_rows=self.chunk_rows, random_state=self.random_state,
        )
        return X, y


# Generators ``XarrayStore.create`` can run to make a missing store.
GENERATORS = {"climate": datasets.make_climate_field}


@dataclass
class XarrayStore:
    """Variables of a zarr store or netCDF file, samples along the dim named ``sample_dim``.

    Each variable in ``variables`` must have ``sample_dim``; its other dims are
    stacked into feature columns named like ``t2m[lat=10,lon=20]``. ``target``
    names a 1-D variable along ``sample_dim``. With ``create`` (a generator name
    under ``kind`` and its arguments) a missing zarr store is first written, chunk
    by chunk, by the workers.
    """

    kind: ClassVar[str] = "xarray"
    path: str = ""
    sample_dim: str = "time"
    variables: list[str] = field(default_factory=list)
    target: str | None = None
    chunk_rows: int = 100_000
    create: dict[str, Any] | None = None

    @property
    def has_targets(self) -> bool:
        return self.target is not None

    def check(self, base_dir: Path) -> None:
        if not self.path:
            raise ConfigError("[source] path is missing; name the zarr store (.zarr) or netCDF file (.nc) to read")
        if not self.variables:
            raise ConfigError("[source] variables is empty; list the feature variables, e.g. variables = [\"t2m\"]")
        if self.chunk_rows < 1:
            raise ConfigError(f"[source] chunk_rows={self.chunk_rows} is not valid; use a positive integer")
        path = resolve(base_dir, self.path)
        if self.create is not None:
            _generator_call(self.create)
            if path.suffix != ".zarr":
                raise ConfigError(f"[source] create writes zarr stores only, but path is {self.path!r}; use a path ending in .zarr")
        if path.exists():
            self._select(self._open(path), path)
        elif self.create is None:
            raise MissingFileError(
                f"{path} does not exist; check [source] path (relative paths start at the pipeline file's folder) "
                "or add a [source.create] table to generate it"
            )

    def load(self, base_dir: Path, client) -> Data:
        self.check(base_dir)
        path = resolve(base_dir, self.path)
        if not path.exists():
            _write_zarr(_generator_call(self.create), path, client)
        return self._select(self._open(path), path)

    def _open(self, path: Path) -> xr.Dataset:
        try:
            if path.suffix == ".zarr" or (path / "zarr.json").exists() or (path / ".zgroup").exists():
                return xr.open_zarr(path, consolidated=False)
            return xr.open_dataset(path, chunks={})
        except (OSError, ValueError) as e:
            raise DataError(f"{path} cannot be opened as a zarr store or netCDF file ({e}); point [source] path at one") from e

    def _select(self, ds: xr.Dataset, path: Path) -> Data:
        if self.sample_dim not in ds.dims:
            raise DataError(
                f"sample_dim {self.sample_dim!r} is not a dim of {path}; available dims: {_listing(ds.dims)}; "
                "set [source] sample_dim to one of them"
            )
        for name in [*self.variables, *([self.target] if self.target else [])]:
            if name not in ds.data_vars:
                raise DataError(
                    f"variable {name!r} is not in {path}; available variables: {_listing(sorted(map(str, ds.data_vars)))}; "
                    "fix [source] variables or target"
                )
            if self.sample_dim not in ds[name].dims:
                raise DataError(
                    f"variable {name!r} in {path} has dims {ds[name].dims}, without sample_dim {self.sample_dim!r}; "
                    "pick variables that vary along the sample dim"
                )
        if self.target and ds[self.target].ndim != 1:
            raise DataError(f"target {self.target!r} in {path} has dims {ds[self.target].dims}; it must be 1-D along {self.sample_dim!r}")
        columns, names = [], []
        for name in self.variables:
            var = ds[name].transpose(self.sample_dim, ...)
            others = var.dims[1:]
            var = var.chunk({self.sample_dim: self.chunk_rows, **{d: -1 for d in others}})
            columns.append(var.data.reshape(var.shape[0], -1))
            names.extend(_stacked_names(var, others))
        X = da.concatenate(columns, axis=1) if len(columns) > 1 else columns[0]
        y = ds[self.target].chunk({self.sample_dim: self.chunk_rows}).data if self.target else None
        return Data(X, y, tuple(names))


@dataclass
class NumpyFile:
    """Rows of a ``.npy`` file (read by the workers through a memory map, chunk by
    chunk) or of one array in a ``.npz`` archive (read once by one worker).

    ``.npz``: X is the array ``x_key``, y the array ``y_key`` if given, feature names
    the strings in ``feature_names`` if the archive has them. ``.npy``: y comes
    from ``target_path``, another ``.npy``. Workers must see the same path.
    """

    kind: ClassVar[str] = "numpy"
    path: str = ""
    x_key: str = "X"
    y_key: str | None = None
    target_path: str | None = None
    chunk_rows: int = 100_000

    @property
    def has_targets(self) -> bool:
        return self.y_key is not None if Path(self.path).suffix == ".npz" else self.target_path is not None

    def check(self, base_dir: Path) -> None:
        self._headers(base_dir)

    def load(self, base_dir: Path, client) -> Data:
        (path, x_info), y_part = self._headers(base_dir)
        X = self._read(path, self.x_key, *x_info)
        y = None if y_part is None else self._read(y_part[0], self.y_key, *y_part[1])
        features = _column_names(x_info[0][1])
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                if "feature_names" in archive.files:
                    names = archive["feature_names"]
                    if names.shape != (x_info[0][1],):
                        raise DataError(f"{path}: feature_names has shape {names.shape} but {self.x_key} has {x_info[0][1]} columns; make them match")
                    features = tuple(str(n) for n in names)
        return Data(X, y, features)

    def _headers(self, base_dir: Path):
        if not self.path:
            raise ConfigError("[source] path is missing; name the .npy or .npz file to read")
        if self.chunk_rows < 1:
            raise ConfigError(f"[source] chunk_rows={self.chunk_rows} is not valid; use a positive integer")
        path = resolve(base_dir, self.path)
        if path.suffix not in (".npy", ".npz"):
            raise ConfigError(f"[source] path {self.path!r} is neither .npy nor .npz; use the numpy source for those, xarray for .zarr/.nc")
        x_info = _array_header(path, self.x_key)
        if len(x_info[0]) != 2:
            raise DataError(f"{path}: X has shape {x_info[0]}; it must be 2-D (samples x features)")
        y_part = None
        if path.suffix == ".npz" and self.y_key is not None:
            y_part = (path, _array_header(path, self.y_key))
        elif self.target_path is not None:
            y_path = resolve(base_dir, self.target_path)
            y_part = (y_path, _array_header(y_path, self.y_key))
        if y_part is not None and y_part[1][0] != (x_info[0][0],):
            raise DataError(f"{y_part[0]}: y has shape {y_part[1][0]} but X has {x_info[0][0]} rows; pass one target per row")
        return (path, x_info), y_part

    def _read(self, path: Path, key: str | None, shape, dtype) -> da.Array:
        row_chunks = tuple(datasets.chunk_sizes(shape[0], self.chunk_rows))
        if path.suffix == ".npz":
            whole = dask.delayed(_load_member)(str(path), key)
            return da.from_delayed(whole, shape, dtype=dtype).rechunk((row_chunks, *shape[1:]))
        index = da.from_array(np.arange(len(row_chunks)), chunks=1)
        step, file = self.chunk_rows, str(path)

        def rows(block, block_info=None):
            start = int(block[0]) * step
            return np.array(np.load(file, mmap_mode="r", allow_pickle=False)[start:start + block_info[None]["chunk-shape"][0]])

        if len(shape) == 1:
            return da.map_blocks(rows, index, chunks=(row_chunks,), dtype=dtype)
        return da.map_blocks(rows, index, chunks=(row_chunks, (shape[1],)), new_axis=1, dtype=dtype)


SOURCES = {cls.kind: cls for cls in (Blobs, Classification, Regression, XarrayStore, NumpyFile)}


def resolve(base_dir: Path, path: str) -> Path:
    """``path`` as written, or under ``base_dir`` when relative."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path(base_dir) / p


def _check_sizes(source) -> None:
    for name in ("n_samples", "n_features", "chunk_rows"):
        value = getattr(source, name)
        if value < 1:
            raise ConfigError(f"[source] {name}={value} is not valid; use a positive integer")


def _column_names(n: int) -> tuple[str, ...]:
    return tuple(f"x{i}" for i in range(n))


def _stacked_names(var: xr.DataArray, dims) -> list[str]:
    if not dims:
        return [str(var.name)]
    values = [var[d].values if d in var.coords else np.arange(var.sizes[d]) for d in dims]
    return [
        f"{var.name}[" + ",".join(f"{d}={values[k][i]:g}" if np.issubdtype(values[k].dtype, np.number) else f"{d}={values[k][i]}"
                                  for k, (d, i) in enumerate(zip(dims, index))) + "]"
        for index in np.ndindex(*(var.sizes[d] for d in dims))
    ]


def _listing(names) -> str:
    names = [str(n) for n in names]
    return ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")


def _generator_call(create: dict[str, Any]):
    """A function that builds the dataset ``create`` describes (checked here, run later)."""
    spec = dict(create)
    kind = spec.pop("kind", None)
    if kind not in GENERATORS:
        raise ConfigError(f"[source.create] kind={kind!r} is not known; use one of: {', '.join(GENERATORS)}")
    generator = GENERATORS[kind]
    valid = list(inspect.signature(generator).parameters)
    unknown = sorted(set(spec) - set(valid))
    if unknown:
        raise ConfigError(f"[source.create] key {unknown[0]!r} is not known for kind {kind!r}; valid keys: kind, {', '.join(valid)}")
    hints = typing.get_type_hints(generator)
    for key, value in spec.items():
        if not _toml.matches(value, hints[key]):
            raise ConfigError(f"[source.create] {key} = {value!r} is not valid; use {_toml.describe(hints[key])}")
    return lambda: generator(**spec)


def _write_zarr(make, path: Path, client) -> None:
    # The workers write the chunks into a temporary store that is renamed once
    # complete, so an interrupted run never leaves a half-written store behind.
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        client.compute(make().to_zarr(partial, mode="w-", compute=False, consolidated=False)).result()
        os.replace(partial, path)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _array_header(path: Path, key: str | None):
    """``(shape, dtype)`` of a ``.npy`` file or of ``key`` in a ``.npz``, read from the header only."""
    if not path.is_file():
        raise MissingFileError(f"{path} does not exist; check [source] path (relative paths start at the pipeline file's folder)")
    try:
        if path.suffix == ".npz":
            with zipfile.ZipFile(path) as archive:
                members = [n[:-4] for n in archive.namelist() if n.endswith(".npy")]
                if key not in members:
                    raise DataError(f"array {key!r} is not in {path}; available arrays: {_listing(members)}; fix [source] x_key or y_key")
                with archive.open(key + ".npy") as f:
                    return _read_header(f, path)
        with open(path, "rb") as f:
            return _read_header(f, path)
    except (ValueError, zipfile.BadZipFile, EOFError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path} is not a readable NumPy file ({e}); write it with numpy.save or numpy.savez") from e


def _read_header(f, path: Path):
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(f)
    if dtype.hasobject:
        raise DataError(f"{path} holds Python objects, which are never unpickled; save numbers instead")
    return shape, dtype


def _load_member(path: str, key: str) -> np.ndarray:
    with np.load(path, allow_pickle=False) as archive:
        return archive[key]
