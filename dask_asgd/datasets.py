"""Synthetic data built chunk by chunk on the workers (dask.array), never on the client:
blobs, classification, regression, and a climate-like (time, lat, lon) field."""

from __future__ import annotations

import dask.array as da
import numpy as np
import xarray as xr


def make_blobs(n_samples: int, n_features: int, centers: int, *, cluster_std: float = 1.0,
               center_box: float = 10.0, chunk_rows: int = 100_000, ordered: bool = False,
               random_state: int = 0):
    """Gaussian blobs as a dask array ``X`` and their labels ``y``.

    The centres are drawn here (small); every chunk draws its own rows from its
    own seed, so the data is the same whatever the cluster, and is made where
    the chunk lives. ``ordered``: the rows come sorted by blob, as data sorted by
    region or by time does, so chunk i of n holds only the i-th n-th of the blobs
    (and a worker holding some chunks sees only their blobs).
    """
    rng = np.random.default_rng(random_state)
    means = rng.uniform(-center_box, center_box, size=(centers, n_features))

    def labels(chunk_rng, n, where):
        if not ordered:
            return chunk_rng.integers(centers, size=n)
        index, n_chunks = where
        low, high = index * centers // n_chunks, max((index + 1) * centers // n_chunks, index * centers // n_chunks + 1)
        return chunk_rng.integers(low, high, size=n)

    def rows(chunk_rng, n, where):
        y = labels(chunk_rng, n, where)
        return means[y] + cluster_std * chunk_rng.standard_normal((n, n_features)), y

    return _chunked(rows, n_samples, n_features, chunk_rows, random_state, np.int64, labels=labels)


def make_classification(n_samples: int, n_features: int, n_classes: int = 2, *, class_sep: float = 1.0,
                        n_informative: int | None = None, chunk_rows: int = 100_000, random_state: int = 0):
    """Labelled Gaussian classes as dask arrays ``X`` (float) and ``y`` (0..n_classes-1).

    Each class is a unit Gaussian around its own mean; the means differ only in
    the first ``n_informative`` features (default: all), where they lie ``class_sep``
    apart on average, so the remaining features are pure noise.
    """
    n_informative = n_features if n_informative is None else n_informative
    if not 1 <= n_informative <= n_features:
        raise ValueError(f"n_informative={n_informative} is not valid; use 1..n_features ({n_features})")
    rng = np.random.default_rng(random_state)
    means = np.zeros((n_classes, n_features))
    means[:, :n_informative] = rng.standard_normal((n_classes, n_informative)) * class_sep

    def rows(chunk_rng, n, where):
        labels = chunk_rng.integers(n_classes, size=n)
        return means[labels] + chunk_rng.standard_normal((n, n_features)), labels

    return _chunked(rows, n_samples, n_features, chunk_rows, random_state, np.int64,
                    labels=lambda chunk_rng, n, where: chunk_rng.integers(n_classes, size=n))


def make_regression(n_samples: int, n_features: int, *, noise: float = 0.1, bias: float = 0.0,
                    chunk_rows: int = 100_000, random_state: int = 0):
    """Standard normal ``X`` and ``y = X @ coef + bias + noise`` as dask arrays, plus ``coef``.

    Returns ``(X, y, coef)``; ``coef`` (drawn here, small) is the true solution.
    """
    coef = np.random.default_rng(random_state).uniform(-5.0, 5.0, size=n_features)

    def rows(chunk_rng, n, where):
        X = chunk_rng.standard_normal((n, n_features))
        return X, X @ coef + bias + noise * chunk_rng.standard_normal(n)

    X, y = _chunked(rows, n_samples, n_features, chunk_rows, random_state, np.float64)
    return X, y, coef


def make_climate_field(n_time: int = 20_000, n_lat: int = 16, n_lon: int = 32, n_regimes: int = 4, *,
                       noise: float = 1.0, chunk_time: int = 2_000, random_state: int = 0) -> xr.Dataset:
    """A climate-like dataset on a (time, lat, lon) grid whose days fall into weather regimes.

    ``t2m`` (K) is a climatology that falls from the equator to the poles, plus
    the smooth large-scale anomaly pattern of the day's regime, plus noise;
    ``regime`` holds the true regime of every time step. Time steps are built
    chunk by chunk on the workers; the patterns (regimes x lat x lon) are small
    and drawn here.
    """
    rng = np.random.default_rng(random_state)
    lat = np.linspace(-80.0, 80.0, n_lat)
    lon = np.linspace(0.0, 360.0, n_lon, endpoint=False)
    lat_r, lon_r = np.deg2rad(lat)[:, None], np.deg2rad(lon)[None, :]
    climatology = np.broadcast_to(288.0 - 40.0 * np.sin(lat_r) ** 2, (n_lat, n_lon))
    # Each regime: a few low wavenumbers with random amplitudes and phases.
    patterns = np.zeros((n_regimes, n_lat, n_lon))
    for r in range(n_regimes):
        for wave in range(1, 4):
            amplitude, phase = rng.normal(scale=3.0 / wave), rng.uniform(0, 2 * np.pi)
            patterns[r] += amplitude * np.cos(wave * lon_r + phase) * np.cos(lat_r) ** wave

    def rows(chunk_rng, n, where):
        labels = chunk_rng.integers(n_regimes, size=n)
        field = climatology + patterns[labels] + noise * chunk_rng.standard_normal((n, n_lat, n_lon))
        return field, labels

    field, regime = _chunked(rows, n_time, (n_lat, n_lon), chunk_time, random_state, np.int64,
                             labels=lambda chunk_rng, n, where: chunk_rng.integers(n_regimes, size=n))
    return xr.Dataset(
        {
            "t2m": (("time", "lat", "lon"), field, {"units": "K", "long_name": "2 m air temperature"}),
            "regime": ("time", regime, {"long_name": "true weather regime"}),
        },
        coords={
            "time": ("time", np.datetime64("2000-01-01", "D") + np.arange(n_time).astype("timedelta64[D]")),
            "lat": ("lat", lat, {"units": "degrees_north"}),
            "lon": ("lon", lon, {"units": "degrees_east"}),
        },
        attrs={"title": "synthetic climate-like field with weather regimes (dask_asgd.datasets)"},
    )


def _chunked(rows, n_samples: int, features, chunk_rows: int, random_state: int, y_dtype, labels=None):
    """``X`` and ``y`` as dask arrays whose every chunk ``rows(rng, n)`` makes from its own seed.

    ``rows(rng, n, where)`` returns ``(X_chunk, y_chunk)``, ``where`` being the
    chunk's ``(index, number of chunks)``; X and y of a chunk come from the same
    seed, so they match. ``labels(rng, n, where)``, where given, is ``rows``'
    first draw: y's chunks then skip drawing X.
    """
    features = (features,) if isinstance(features, int) else tuple(features)
    row_chunks = tuple(chunk_sizes(n_samples, chunk_rows))
    seeds = da.from_array(np.arange(len(row_chunks)) + random_state * 1_000_003, chunks=1)

    def part(index):
        def block(seed_block, block_info=None):
            n = block_info[None]["chunk-shape"][0]
            return rows(np.random.default_rng(int(seed_block[0])), n, _where(block_info))[index]
        return block

    X = da.map_blocks(part(0), seeds, chunks=(row_chunks, *((f,) for f in features)),
                      new_axis=list(range(1, 1 + len(features))), dtype=np.float64)
    if labels is None:
        y_block = part(1)
    else:
        def y_block(seed_block, block_info=None):
            return labels(np.random.default_rng(int(seed_block[0])), block_info[None]["chunk-shape"][0], _where(block_info))
    y = da.map_blocks(y_block, seeds, chunks=(row_chunks,), dtype=y_dtype)
    return X, y


def _where(block_info) -> tuple[int, int]:
    info = block_info[None]
    return info["chunk-location"][0], info["num-chunks"][0]


def chunk_sizes(n: int, size: int) -> list[int]:
    """Row counts of chunks of at most ``size`` rows covering ``n`` rows."""
    return [min(size, n - start) for start in range(0, n, size)]
