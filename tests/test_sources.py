"""Pipeline sources: synthetic generators built chunk by chunk, xarray stores (zarr,
netCDF) read by name, NumPy files; and the errors for wrong names and missing files."""

import dask.array as da
import numpy as np
import pytest
import xarray as xr

from dask_asgd import datasets
from dask_asgd.errors import ConfigError, DataError, MissingFileError
from dask_asgd.sources import Blobs, Classification, NumpyFile, Regression, XarrayStore


def test_generators_build_chunks_from_their_own_seeds(client):
    X, y = datasets.make_blobs(10_000, 3, 4, cluster_std=0.1, chunk_rows=3_000, random_state=5)
    assert X.chunks == ((3_000, 3_000, 3_000, 1_000), (3,))
    # Computed on the cluster or here, chunk by chunk: the same rows.
    Xc, yc = client.compute([X, y], sync=True)
    np.testing.assert_array_equal(Xc, X.compute(scheduler="sync"))
    # y is the blob each row was drawn from: its nearest blob mean.
    means = np.stack([Xc[yc == k].mean(axis=0) for k in range(4)])
    nearest = np.argmin(((Xc[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(nearest, yc)


def test_ordered_blobs_give_each_chunk_its_own_blobs():
    _, y = datasets.make_blobs(8_000, 2, 10, chunk_rows=2_000, ordered=True, random_state=5)
    chunks = [np.unique(part) for part in np.split(y.compute(), 4)]
    # Chunk i of 4 holds the i-th quarter of the 10 blobs, and no other.
    assert [c.tolist() for c in chunks] == [[0, 1], [2, 3, 4], [5, 6], [7, 8, 9]]
    unordered = datasets.make_blobs(8_000, 2, 10, chunk_rows=2_000, random_state=5)[1].compute()
    assert all(np.unique(part).size == 10 for part in np.split(unordered, 4))


def test_classification_separates_classes_only_in_informative_features():
    X, y = datasets.make_classification(40_000, 6, 3, n_informative=2, class_sep=2.0, chunk_rows=7_000, random_state=1)
    X, y = da.compute(X, y)
    assert set(np.unique(y)) == {0, 1, 2}
    class_means = np.stack([X[y == k].mean(axis=0) for k in range(3)])
    assert np.ptp(class_means[:, :2], axis=0).max() > 1.0
    # Noise features: class means within 5 standard errors of 0 (1/sqrt(~13,000) each).
    np.testing.assert_allclose(class_means[:, 2:], 0.0, atol=5 / np.sqrt(13_000))
    with pytest.raises(ValueError, match="n_informative=7 is not valid"):
        datasets.make_classification(10, 6, n_informative=7)


def test_regression_target_is_linear_in_x():
    X, y, coef = datasets.make_regression(20_000, 4, noise=0.1, bias=3.0, chunk_rows=6_000, random_state=2)
    X, y = da.compute(X, y)
    A = np.column_stack([X, np.ones(len(X))])
    solution = np.linalg.lstsq(A, y, rcond=None)[0]
    # Least squares on 20,000 rows with noise 0.1: standard errors ~0.001.
    np.testing.assert_allclose(solution[:4], coef, atol=0.01)
    assert solution[4] == pytest.approx(3.0, abs=0.01)


@pytest.mark.parametrize("source", [Blobs(n_samples=5_000, n_features=3, chunk_rows=2_000),
                                    Classification(n_samples=5_000, n_features=3, chunk_rows=2_000),
                                    Regression(n_samples=5_000, n_features=3, chunk_rows=2_000)])
def test_synthetic_sources_give_named_columns_and_targets(source, tmp_path, client):
    data = source.load(tmp_path, client)
    assert data.X.shape == (5_000, 3) and data.X.chunks[0] == (2_000, 2_000, 1_000)
    assert data.y.shape == (5_000,)
    assert data.features == ("x0", "x1", "x2")


def test_synthetic_source_rejects_bad_sizes(tmp_path):
    with pytest.raises(ConfigError, match=r"\[source\] n_samples=0 is not valid; use a positive integer"):
        Blobs(n_samples=0).check(tmp_path)


def _climate(tmp_path, n_time=600):
    ds = datasets.make_climate_field(n_time, 3, 4, 3, chunk_time=200, random_state=0)
    path = tmp_path / "field.zarr"
    ds.to_zarr(path, consolidated=False)
    return ds.compute(), path


def test_zarr_store_samples_along_named_dim_with_stacked_features(tmp_path, client):
    ds, _ = _climate(tmp_path)
    data = XarrayStore(path="field.zarr", sample_dim="time", variables=["t2m"], target="regime",
                       chunk_rows=250).load(tmp_path, client)
    assert data.X.chunks == ((250, 250, 100), (12,))
    np.testing.assert_array_equal(data.X.compute(), ds.t2m.values.reshape(600, 12))
    np.testing.assert_array_equal(data.y.compute(), ds.regime.values)
    lat, lon = ds.lat.values, ds.lon.values
    assert data.features[0] == f"t2m[lat={lat[0]:g},lon={lon[0]:g}]"
    assert data.features[5] == f"t2m[lat={lat[1]:g},lon={lon[1]:g}]"


def test_netcdf_file_with_dims_in_any_order_and_several_variables(tmp_path, client):
    rng = np.random.default_rng(0)
    ds = xr.Dataset(
        {
            "z500": (("level", "day"), rng.normal(size=(2, 50))),
            "sst": (("day",), rng.normal(size=50)),
            "label": (("day",), rng.integers(3, size=50)),
        },
        coords={"level": ["low", "high"]},
    )
    ds.to_netcdf(tmp_path / "obs.nc")
    data = XarrayStore(path=str(tmp_path / "obs.nc"), sample_dim="day", variables=["sst", "z500"],
                       target="label", chunk_rows=20).load(tmp_path, client)
    expected = np.column_stack([ds.sst.values, ds.z500.values.T])
    np.testing.assert_array_equal(data.X.compute(), expected)
    assert data.features == ("sst", "z500[level=low]", "z500[level=high]")
    np.testing.assert_array_equal(data.y.compute(), ds.label.values)


def test_wrong_names_list_what_is_there(tmp_path):
    _climate(tmp_path, n_time=50)
    with pytest.raises(DataError, match=r"variable 't2' is not in .*field.zarr; available variables: regime, t2m"):
        XarrayStore(path="field.zarr", variables=["t2"]).check(tmp_path)
    with pytest.raises(DataError, match=r"sample_dim 'day' is not a dim of .*; available dims: time, lat, lon"):
        XarrayStore(path="field.zarr", sample_dim="day", variables=["t2m"]).check(tmp_path)
    with pytest.raises(DataError, match=r"target 't2m' .* must be 1-D"):
        XarrayStore(path="field.zarr", variables=["t2m"], target="t2m").check(tmp_path)
    with pytest.raises(DataError, match="without sample_dim 'lat'"):
        XarrayStore(path="field.zarr", sample_dim="lat", variables=["regime"]).check(tmp_path)


def test_missing_store_is_created_once_by_the_workers(tmp_path, client):
    source = XarrayStore(path="data/climate.zarr", variables=["t2m"], target="regime", chunk_rows=100,
                         create={"kind": "climate", "n_time": 300, "n_lat": 2, "n_lon": 3, "chunk_time": 100})
    first = source.load(tmp_path, client)
    store = tmp_path / "data" / "climate.zarr"
    assert store.is_dir()
    assert [p.name for p in store.parent.iterdir()] == ["climate.zarr"]  # no partial store left
    reference = datasets.make_climate_field(300, 2, 3, chunk_time=100).t2m.values.reshape(300, 6)
    np.testing.assert_array_equal(first.X.compute(), reference)
    stamp = (store / "t2m").stat().st_mtime_ns
    source.load(tmp_path, client)
    assert (store / "t2m").stat().st_mtime_ns == stamp


def test_missing_file_and_bad_create_tables(tmp_path):
    with pytest.raises(MissingFileError, match=r"nowhere.zarr does not exist; check \[source\] path"):
        XarrayStore(path="nowhere.zarr", variables=["t2m"]).check(tmp_path)
    with pytest.raises(ConfigError, match=r"kind='weather' is not known; use one of: climate"):
        XarrayStore(path="a.zarr", variables=["t2m"], create={"kind": "weather"}).check(tmp_path)
    with pytest.raises(ConfigError, match=r"key 'n_days' is not known for kind 'climate'; valid keys: kind, n_time"):
        XarrayStore(path="a.zarr", variables=["t2m"], create={"kind": "climate", "n_days": 3}).check(tmp_path)
    with pytest.raises(ConfigError, match=r"\[source.create\] n_time = 'long' is not valid; use an integer"):
        XarrayStore(path="a.zarr", variables=["t2m"], create={"kind": "climate", "n_time": "long"}).check(tmp_path)
    with pytest.raises(ConfigError, match="create writes zarr stores only"):
        XarrayStore(path="a.nc", variables=["t2m"], create={"kind": "climate"}).check(tmp_path)
    (tmp_path / "junk.nc").write_text("not netCDF")
    with pytest.raises(DataError, match="cannot be opened as a zarr store or netCDF file"):
        XarrayStore(path="junk.nc", variables=["t2m"]).check(tmp_path)


def test_npy_rows_read_by_workers_with_separate_targets(tmp_path, client):
    X = np.random.default_rng(0).normal(size=(1_000, 3)).astype(np.float32)
    np.save(tmp_path / "X.npy", X)
    np.save(tmp_path / "y.npy", np.arange(1_000))
    data = NumpyFile(path="X.npy", target_path="y.npy", chunk_rows=300).load(tmp_path, client)
    assert data.X.chunks == ((300, 300, 300, 100), (3,)) and data.X.dtype == np.float32
    np.testing.assert_array_equal(client.compute(data.X, sync=True), X)
    np.testing.assert_array_equal(client.compute(data.y, sync=True), np.arange(1_000))


def test_npz_keys_and_feature_names(tmp_path, client):
    X = np.arange(40.0).reshape(10, 4)
    np.savez(tmp_path / "d.npz", features=X, labels=np.arange(10) % 2, feature_names=np.array(["a", "b", "c", "d"]))
    data = NumpyFile(path="d.npz", x_key="features", y_key="labels", chunk_rows=4).load(tmp_path, client)
    assert data.features == ("a", "b", "c", "d")
    np.testing.assert_array_equal(data.X.compute(), X)
    assert data.X.chunks[0] == (4, 4, 2)
    with pytest.raises(DataError, match=r"array 'X' is not in .*d.npz; available arrays: features, labels, feature_names"):
        NumpyFile(path="d.npz").check(tmp_path)


def test_numpy_files_that_do_not_fit(tmp_path):
    np.save(tmp_path / "cube.npy", np.zeros((2, 3, 4)))
    with pytest.raises(DataError, match=r"X has shape \(2, 3, 4\); it must be 2-D"):
        NumpyFile(path="cube.npy").check(tmp_path)
    np.save(tmp_path / "objects.npy", np.array([[{"a": 1}]], dtype=object))
    with pytest.raises(DataError, match="holds Python objects, which are never unpickled"):
        NumpyFile(path="objects.npy").check(tmp_path)
    np.save(tmp_path / "X.npy", np.zeros((5, 2)))
    np.save(tmp_path / "y.npy", np.zeros(4))
    with pytest.raises(DataError, match=r"y has shape \(4,\) but X has 5 rows"):
        NumpyFile(path="X.npy", target_path="y.npy").check(tmp_path)
    with pytest.raises(MissingFileError, match="absent.npy does not exist"):
        NumpyFile(path="absent.npy").check(tmp_path)
    with pytest.raises(ConfigError, match="neither .npy nor .npz"):
        NumpyFile(path="table.csv").check(tmp_path)
