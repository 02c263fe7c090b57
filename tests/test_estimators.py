"""The estimator contract: inputs (NumPy, dask.array, xarray), fitted attributes,
history_, stopping, reproducibility, scikit-learn interoperability."""

import subprocess
import sys
import textwrap

import dask
import dask.array as da
import numpy as np
import pytest
import sklearn
import sklearn.linear_model
import xarray as xr
from sklearn.datasets import make_blobs, make_classification
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from dask_asgd import KMeans, LinearRegression, LogisticRegression


@pytest.fixture(scope="module")
def small_blobs():
    X, y = make_blobs(20_000, 4, centers=5, random_state=3)
    return X, y


def test_dask_array_input_stays_on_the_cluster(client, small_blobs):
    X, _ = small_blobs
    Xd = da.from_array(X, chunks=(2_500, 4))
    est = KMeans(5, random_state=0, client=client).fit(Xd)
    reference = KMeans(5, random_state=0, client=client).fit(X)
    assert -est.score(Xd) == pytest.approx(-reference.score(X), rel=0.01)
    labels = est.predict(Xd)
    assert isinstance(labels, da.Array)
    np.testing.assert_array_equal(labels.compute(), est.predict(X))


def test_xarray_named_sample_dim_and_stacked_features(client):
    # (lat, time, lon): samples along "time", the grid stacked into features.
    rng = np.random.default_rng(0)
    regimes = rng.normal(scale=5.0, size=(3, 4, 6))
    labels = rng.integers(3, size=3000)
    field = regimes[labels] + rng.normal(size=(3000, 4, 6))
    data = xr.DataArray(
        field.transpose(1, 0, 2), dims=("lat", "time", "lon"),
        coords={"time": np.arange(3000), "lat": np.arange(4), "lon": np.arange(6)},
    )
    est = KMeans(3, sample_dim="time", random_state=0, client=client).fit(data)
    assert est.n_features_in_ == 24
    predicted = est.predict(data)
    assert isinstance(predicted, xr.DataArray) and predicted.dims == ("time",)
    np.testing.assert_array_equal(predicted["time"], data["time"])
    # Three well-separated regimes: the clustering matches them up to a relabelling.
    pairs = set(zip(labels.tolist(), predicted.values.tolist()))
    assert len(pairs) == 3


def test_xarray_dask_backed_input(client):
    X, y = make_classification(10_000, 6, random_state=0)
    Xa = xr.DataArray(X, dims=("sample", "feature")).chunk({"sample": 2_000})
    ya = xr.DataArray(y, dims=("sample",)).chunk({"sample": 2_000})
    est = LogisticRegression(random_state=0, client=client).fit(Xa, ya)
    reference = sklearn.linear_model.LogisticRegression().fit(X, y).score(X, y)
    assert est.score(Xa, ya) >= reference - 0.01


def test_dask_inputs_for_regression(client):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(20_000, 5))
    y = X @ np.arange(1.0, 6.0) - 2.0
    est = LinearRegression(random_state=0, max_epochs=50, tol=None, client=client).fit(
        da.from_array(X, chunks=4_000), da.from_array(y, chunks=4_000)
    )
    np.testing.assert_allclose(est.coef_, np.arange(1.0, 6.0), atol=0.02)
    assert est.intercept_ == pytest.approx(-2.0, abs=0.02)


def test_sequential_is_bit_reproducible(client, small_blobs):
    X, _ = small_blobs
    a = KMeans(5, mode="sequential", random_state=7, max_epochs=2, tol=None, client=client).fit(X)
    b = KMeans(5, mode="sequential", random_state=7, max_epochs=2, tol=None, client=client).fit(X)
    c = KMeans(5, mode="sequential", random_state=8, max_epochs=2, tol=None, client=client).fit(X)
    np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)
    assert not np.array_equal(a.cluster_centers_, c.cluster_centers_)


def test_sequential_reproducible_with_dask_chunks_on_two_workers(client):
    X, y = make_classification(8_000, 5, random_state=2)
    Xd, yd = da.from_array(X, chunks=1_000), da.from_array(y, chunks=1_000)
    fits = [LogisticRegression(mode="sequential", random_state=1, max_epochs=2, tol=None, client=client).fit(Xd, yd) for _ in range(2)]
    np.testing.assert_array_equal(fits[0].coef_, fits[1].coef_)


def test_history_is_a_time_by_worker_dataset(client, small_blobs):
    X, _ = small_blobs
    est = KMeans(5, random_state=0, max_epochs=20, tol=None, comm_interval=1024, client=client).fit(X)
    h = est.history_
    assert isinstance(h, xr.Dataset)
    assert h.loss.dims == ("time", "worker") and h.sizes["worker"] == 2
    for name in ["loss", "samples", "comm_interval", "message_size", "messages_sent", "accepted", "rejected",
                 "bytes_sent", "bandwidth", "latency", "in_flight", "overwritten", "malformed"]:
        assert name in h, name
    samples = h.samples.fillna(0).values
    assert (np.diff(samples, axis=0) >= 0).all(), "samples processed only grow"
    # Each worker trained 20 local epochs over its half of the rows.
    np.testing.assert_allclose(h.samples.isel(time=-1), 20 * 10_000, rtol=0.03)
    last = h.isel(time=-1)
    assert (last.messages_delivered > 0).all()
    # Whole states (5 centres x 4 features x 8 bytes) go out; a publish is
    # delivered, superseded by a newer one while waiting, or still on the wire.
    np.testing.assert_array_equal(last.bytes_sent, last.messages_delivered * 5 * 4 * 8)
    assert (last.messages_sent >= last.messages_delivered + last.superseded).all()
    assert (last.message_size == 20).all() and (last.comm_interval == 1024).all()
    assert list(h.stop_reason.values) == ["max_epochs", "max_epochs"]
    assert est.n_iter_ == 20


def test_max_time_stops_training(client, small_blobs):
    X, _ = small_blobs
    est = KMeans(5, random_state=0, max_epochs=100_000, max_time=3.0, tol=None, client=client).fit(X)
    assert set(est.history_.stop_reason.values) == {"max_time"}
    assert float(est.history_.elapsed.max()) < 3.0 + 1.5


def test_tol_stops_before_max_epochs(client, small_blobs):
    X, _ = small_blobs
    est = KMeans(5, random_state=0, max_epochs=500, tol=1e-3, client=client).fit(X)
    assert set(est.history_.stop_reason.values) == {"tol"}
    assert est.n_iter_ < 500


def test_diverging_learning_rate_is_reported(client):
    from dask_asgd import TrainingDiverged

    rng = np.random.default_rng(0)
    X = rng.normal(scale=100.0, size=(5_000, 3))
    with pytest.raises(TrainingDiverged, match=r"loss became NaN or inf; lower learning_rate \(now 10.0\) or standardize X"):
        LinearRegression(learning_rate=10.0, random_state=0, client=client).fit(X, X.sum(1))


def test_get_set_params_clone_and_pipeline(client):
    est = LogisticRegression(alpha=1e-3, mode="sync", comm_interval=2048, client=client)
    params = est.get_params()
    assert params["alpha"] == 1e-3 and params["mode"] == "sync" and params["comm_interval"] == 2048
    clone = sklearn.clone(est)
    assert clone is not est and clone.get_params() == params
    est.set_params(mode="asgd", batch_size=128)
    assert est.mode == "asgd" and est.batch_size == 128
    with pytest.raises(ValueError, match=r"Invalid parameter 'speed' for estimator LogisticRegression"):
        est.set_params(speed=3)
    X, y = make_classification(5_000, 8, random_state=0)
    pipe = make_pipeline(StandardScaler(), LogisticRegression(random_state=0, client=client)).fit(X, y)
    reference = make_pipeline(StandardScaler(), sklearn.linear_model.LogisticRegression()).fit(X, y)
    assert pipe.score(X, y) >= reference.score(X, y) - 0.01
    assert "alpha=0.001" in repr(est)


def test_embedded_cluster_when_no_client():
    # In a fresh process: no current client, so fit starts a LocalCluster and closes it.
    code = textwrap.dedent("""
        import numpy as np, distributed
        from dask_asgd import KMeans
        if __name__ == "__main__":
            X = np.random.default_rng(0).normal(size=(2000, 3))
            est = KMeans(3, random_state=0, max_epochs=2).fit(X)
            assert est.history_.sizes["worker"] >= 1
            try:
                distributed.get_client()
                raise SystemExit("a client was left behind")
            except ValueError:
                print("ok", est.history_.sizes["worker"])
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("ok")


def test_kmeans_seedings_auto_tries_ten_for_up_to_100_clusters():
    # The training steps do not move a centre to another blob, so the initial
    # state sets the final quality: the best of 3 seedings missed a 1% target on
    # 64 blobs, the best of 10 reached it (peers benchmark). Thousands of
    # clusters take one seeding, as each costs minutes there.
    assert KMeans(64)._make_model(8).n_init == 10
    assert KMeans(512)._make_model(8).n_init == 1
    with dask.config.set({"asgd.init.n-init": 4}):
        assert KMeans(64)._make_model(8).n_init == 4
