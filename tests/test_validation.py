"""Every bad input gets a clear error before any cluster work.

``client=NO_CLUSTER`` is an object that fails loudly if the estimator touches it:
a test that passes proves the error came before the cluster was used."""

import dask.array as da
import numpy as np
import pytest
import xarray as xr

from dask_asgd import KMeans, LinearRegression, LogisticRegression


class _NoCluster:
    def __getattr__(self, name):
        raise AssertionError(f"cluster work started (client.{name}) before the input was checked")


NO_CLUSTER = _NoCluster()
rng = np.random.default_rng(0)
X = rng.normal(size=(50, 3))
y_reg = rng.normal(size=50)
y_cls = rng.integers(2, size=50)


def _with_bad(value, row=7, col=2):
    bad = X.copy()
    bad[row, col] = value
    return bad


ESTIMATORS = [
    pytest.param(lambda **kw: KMeans(3, client=NO_CLUSTER, **kw), None, id="KMeans"),
    pytest.param(lambda **kw: LinearRegression(client=NO_CLUSTER, **kw), y_reg, id="LinearRegression"),
    pytest.param(lambda **kw: LogisticRegression(client=NO_CLUSTER, **kw), y_cls, id="LogisticRegression"),
]


@pytest.mark.parametrize("make, y", ESTIMATORS)
@pytest.mark.parametrize(
    "bad_X, message",
    [
        (_with_bad(np.nan), r"X contains 1 NaN or inf value\(s\), first at row 7, column 2; drop or impute"),
        (_with_bad(np.inf, 3, 0), r"X contains 1 NaN or inf value\(s\), first at row 3, column 0"),
        (X[:, 0], r"X must be 2-D \(samples x features\), got 1-D"),
        (X.reshape(50, 3, 1), r"X must be 2-D .* got 3-D"),
        (X.astype(str), r"X has dtype <U.*not numeric; encode it as numbers first"),
        (X.astype(complex), r"X has dtype complex128, which is not numeric"),
        (np.empty((0, 3)), r"X has 0 samples; fit needs at least one row"),
        (np.empty((5, 0)), r"X has 0 features"),
    ],
    ids=["nan", "inf", "1-d", "3-d", "strings", "complex", "no-samples", "no-features"],
)
def test_bad_X(make, y, bad_X, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make().fit(bad_X, y)


@pytest.mark.parametrize(
    "param, value, message",
    [
        ("learning_rate", 0, r"learning_rate=0 is not valid; use a positive number"),
        ("learning_rate", -0.1, r"learning_rate=-0.1 is not valid"),
        ("learning_rate", float("nan"), r"learning_rate=nan is not valid"),
        ("batch_size", 0, r"batch_size=0 is not valid; use a positive integer"),
        ("batch_size", 2.5, r"batch_size=2.5 is not valid; use a positive integer"),
        ("comm_interval", 0, r"comm_interval=0 is not valid; use a positive integer or 'auto'"),
        ("comm_interval", "fast", r"comm_interval='fast' is not valid"),
        ("message_size", -5, r"message_size=-5 is not valid; use a positive integer or 'auto'"),
        ("max_epochs", 0, r"max_epochs=0 is not valid"),
        ("max_time", -1, r"max_time=-1 is not valid; use a positive number or None"),
        ("tol", -1e-3, r"tol=-0.001 is not valid; use a number >= 0 or None"),
        ("mode", "hogwild", r"mode='hogwild' is not known; use one of 'asgd', 'sync', 'simuparallel', 'sequential'"),
        ("update_filter", "median", r"update_filter='median' is not known; use 'parzen' or None"),
    ],
)
@pytest.mark.parametrize("make, y", ESTIMATORS)
def test_bad_parameters(make, y, param, value, message):
    with pytest.raises(ValueError, match=message):
        make(**{param: value}).fit(X, y)


def test_more_clusters_than_samples():
    with pytest.raises(ValueError, match=r"n_clusters=60 is more than the 50 samples in X; ask for fewer clusters"):
        KMeans(60, client=NO_CLUSTER).fit(X)


def test_non_positive_clusters():
    with pytest.raises(ValueError, match=r"n_clusters=0 is not valid; use a positive integer"):
        KMeans(0, client=NO_CLUSTER).fit(X)


@pytest.mark.parametrize("make, y", ESTIMATORS[1:])
def test_y_length_mismatch(make, y):
    with pytest.raises(ValueError, match=r"y has 49 entries but X has 50 samples; pass one target per row of X"):
        make().fit(X, y[:49])


@pytest.mark.parametrize("make, y", ESTIMATORS[1:])
def test_y_missing(make, y):
    with pytest.raises(ValueError, match=r"y is required for this estimator"):
        make().fit(X, None)


def test_y_nan_in_regression():
    bad = y_reg.copy()
    bad[4] = np.nan
    with pytest.raises(ValueError, match=r"y contains 1 NaN or inf value\(s\), first at row 4"):
        LinearRegression(client=NO_CLUSTER).fit(X, bad)


def test_y_nan_in_classification():
    bad = y_cls.astype(float)
    bad[4] = np.nan
    with pytest.raises(ValueError, match=r"y contains NaN or inf; drop those rows"):
        LogisticRegression(client=NO_CLUSTER).fit(X, bad)


def test_single_class():
    with pytest.raises(ValueError, match=r"y holds a single class \(1\); classification needs at least two"):
        LogisticRegression(client=NO_CLUSTER).fit(X, np.ones(50, dtype=int))


def test_negative_alpha():
    with pytest.raises(ValueError, match=r"alpha=-1 is not valid; use a number >= 0"):
        LinearRegression(alpha=-1, client=NO_CLUSTER).fit(X, y_reg)


def test_wrong_sample_dim():
    Xa = xr.DataArray(X, dims=("sample", "feature"))
    with pytest.raises(ValueError, match=r"sample_dim='time' is not a dim of X \(dims: \('sample', 'feature'\)\)"):
        KMeans(3, sample_dim="time", client=NO_CLUSTER).fit(Xa)


def test_dataset_instead_of_array():
    with pytest.raises(TypeError, match=r"X is a Dataset; pass one array"):
        KMeans(3, client=NO_CLUSTER).fit(xr.Dataset({"a": (("s", "f"), X)}))


def test_dask_unknown_chunks():
    Xd = da.from_array(X, chunks=10)
    Xd = Xd[Xd[:, 0] > -10]  # boolean selection: row count unknown until computed
    with pytest.raises(ValueError, match=r"X has unknown chunk sizes; call X.compute_chunk_sizes\(\) before fit"):
        KMeans(3, client=NO_CLUSTER).fit(Xd)


def test_dask_nan_found_on_the_cluster(client):
    # A lazy array can only be checked where it lives: after it is persisted,
    # before any training starts.
    Xd = da.from_array(_with_bad(np.nan), chunks=(10, 3))
    with pytest.raises(ValueError, match=r"X contains 1 NaN or inf value\(s\) in column\(s\) \[2\]; drop or impute"):
        KMeans(3, client=client).fit(Xd)


def test_predict_wrong_feature_count(client):
    est = LinearRegression(client=client, max_epochs=1, random_state=0).fit(X, y_reg)
    with pytest.raises(ValueError, match=r"X has 2 features but LinearRegression was fitted with 3"):
        est.predict(X[:, :2])


def test_predict_before_fit():
    with pytest.raises(AttributeError, match=r"this KMeans is not fitted yet; call fit\(X\) first"):
        KMeans(3).predict(X)
