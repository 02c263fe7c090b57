"""The GPU path. On CuPy (tests marked ``gpu``, skipped with the reason where CuPy
or a GPU is missing): the models, the filter, the channel and the estimators
against NumPy. On any machine: the same engine path on array_api_strict's
"device1", a stand-in for a GPU whose arrays refuse implicit NumPy conversion and
mixing with another device, as CuPy's do."""

import functools
import os
import subprocess
import sys
import time
import uuid

import array_api_strict
import dask.array as da
import numpy as np
import pytest
from array_api_compat import device
from sklearn.base import clone
from sklearn.datasets import make_blobs

from dask_asgd import (
    KMeans,
    LinearRegression,
    LogisticRegression,
    bench_gpu,
    checkpoint,
)
from dask_asgd.channel import Channel, PayloadSpec, get_channel
from dask_asgd.filter import UpdateFilter, moves_towards
from dask_asgd.models import KMeansModel, LinearModel, LogisticModel
from dask_asgd.models._base import to_host

STRICT_DEVICE = array_api_strict.Device("device1")


def _cupy_with_a_gpu():
    """CuPy, or a skip that says what is missing (a failure under
    ASGD_GPU_REQUIRED=1, as ci/gpu-check.sh sets: there a skip would hide it)."""
    missing = pytest.fail if os.environ.get("ASGD_GPU_REQUIRED") == "1" else pytest.skip
    try:
        import cupy
    except ImportError as exc:
        missing(f"CuPy is not installed ({exc}); on a machine with an NVIDIA GPU: pip install '.[gpu]'")
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except RuntimeError as exc:  # CUDARuntimeError: no driver, no device
        missing(f"CuPy is installed but finds no usable GPU: {type(exc).__name__}: {exc}")
    if count < 1:
        missing("CuPy is installed but the machine has no GPU (getDeviceCount() == 0)")
    return cupy


@pytest.fixture(scope="module")
def cp():
    return _cupy_with_a_gpu()


def _on_device(kind: str, values):
    """``values`` (NumPy) as an array of ``kind``: "cupy" or "strict" (device1)."""
    if kind == "cupy":
        import cupy

        return cupy.asarray(values)
    return array_api_strict.asarray(values, device=STRICT_DEVICE)


def _problems(n=4000, d=4):
    """Data and one estimator per model; sequential mode is bit-reproducible, so
    any namespace must give NumPy's numbers up to rounding."""
    X, labels = make_blobs(n, d, centers=3, random_state=0)
    common = {"mode": "sequential", "random_state": 0, "max_epochs": 2, "tol": None}
    return X, [
        ("kmeans", KMeans(3, **common), None, "cluster_centers_"),
        ("linear", LinearRegression(**common), X @ np.arange(1.0, d + 1) + 0.5, "coef_"),
        ("logistic", LogisticRegression(**common), labels, "coef_"),
    ]


def _check_fit_matches_numpy(client, X_in, to_y, rtol):
    """Fits each estimator on NumPy and on ``X_in(X)``, ``to_y(y)``; yields
    ``(name, fitted, reference)`` after checking the fitted attributes."""
    X, problems = _problems()
    for name, est, y, attribute in problems:
        est = clone(est).set_params(client=client)
        reference = clone(est).fit(X, y)
        fitted = est.fit(X_in(X), None if y is None else to_y(y))
        value = getattr(fitted, attribute)
        assert not isinstance(value, np.ndarray), f"{name}: {attribute} must stay in the input's array type"
        np.testing.assert_allclose(to_host(value), getattr(reference, attribute), rtol=rtol, atol=1e-9, err_msg=name)
        host = fitted.to_numpy()
        assert type(getattr(host, attribute)) is np.ndarray and getattr(fitted, attribute) is value
        if name == "logistic":
            assert not isinstance(fitted.classes_, np.ndarray)
            np.testing.assert_array_equal(host.classes_, reference.classes_)
        yield name, fitted, reference


def _poll(probe, what, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not (value := probe()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)
    return value


# -- the channel: what workers run --------------------------------------------------------
def _subscribe(topic, n, kind, dask_worker):
    like = _on_device(kind, np.zeros(1))
    dask_worker.plugins[Channel.name].subscribe(topic, PayloadSpec("float64", {0: (n,)}, array_type=type(like), device=device(like)))


def _publish(topic, peer, kind, values):
    get_channel().publish(topic, peer, values if kind is None else _on_device(kind, values), key=0)


def _mailbox(topic, dask_worker):
    box = dask_worker.plugins[Channel.name].mailboxes[topic]
    return {"received": box.received, "malformed": box.malformed}


def _take(topic, dask_worker):
    return [(type(m.payload).__module__.split(".")[0], str(device(m.payload)), to_host(m.payload))
            for m in dask_worker.plugins[Channel.name].mailboxes[topic].take()]


def _check_channel_round_trip(client, kind, module):
    """A device array crosses the channel and arrives as one on the same kind of
    device; a NumPy payload on the same topic is dropped as malformed."""
    client.register_plugin(Channel())
    a, b = sorted(client.scheduler_info()["workers"])[:2]
    topic = f"test-gpu/{kind}/{uuid.uuid4().hex[:8]}"
    client.run(_subscribe, topic, 8, kind, workers=[b])
    values = np.arange(8.0) / 3
    client.submit(_publish, topic, b, kind, values, workers=[a], pure=False).result()
    client.submit(_publish, topic, b, None, values, workers=[a], pure=False).result()
    _poll(lambda: sum(client.run(_mailbox, topic, workers=[b])[b].values()) == 2, "both messages")
    assert client.run(_mailbox, topic, workers=[b])[b] == {"received": 1, "malformed": 1}
    [(got_module, got_device, payload)] = client.run(_take, topic, workers=[b])[b]
    assert got_module == module
    assert got_device == str(device(_on_device(kind, np.zeros(1))))
    np.testing.assert_array_equal(payload, values)


# -- on any machine: array_api_strict's device1 -------------------------------------------
@pytest.mark.timeout(240)
def test_estimators_on_a_non_numpy_device_match_numpy(client):
    X, _ = _problems()
    strict = functools.partial(_on_device, "strict")
    for name, fitted, reference in _check_fit_matches_numpy(client, strict, strict, rtol=1e-12):
        predicted = fitted.predict(strict(X))
        assert device(predicted) == STRICT_DEVICE, name
        np.testing.assert_allclose(to_host(predicted), reference.predict(X), rtol=1e-9, err_msg=name)
        # Fitted on one device, predicting on another: the fitted arrays move to X.
        assert type(fitted.predict(X)) is np.ndarray, name
        np.testing.assert_allclose(fitted.predict(X), reference.predict(X), rtol=1e-9, err_msg=name)
        np.testing.assert_allclose(to_host(reference.predict(strict(X))), reference.predict(X), rtol=1e-9, err_msg=name)
        Xd = da.from_array(X, chunks=1000)
        np.testing.assert_allclose(fitted.predict(Xd).compute(), reference.predict(X), rtol=1e-9, err_msg=name)


@pytest.mark.timeout(180)
def test_asgd_exchanges_device_states_and_checkpoints_host_copies(client, tmp_path):
    # The asgd path a CuPy run takes: slices of the device state cross the
    # channel, pass validation and the filter; checkpoints are written from host copies.
    X, _ = make_blobs(8000, 4, centers=3, random_state=1)
    est = KMeans(3, comm_interval=256, message_size=4, max_epochs=6, tol=None, random_state=0,
                 checkpoint=str(tmp_path), client=client).fit(_on_device("strict", X))
    assert device(est.cluster_centers_) == STRICT_DEVICE
    history = est.history_
    assert float(history.malformed.max()) == 0, "device payloads were dropped by validation"
    assert float((history.accepted + history.rejected).max()) > 0, "no state crossed the channel"
    saved = checkpoint.load_latest(tmp_path, model="KMeansModel", n_params=12)
    assert saved is not None and saved.params.dtype == np.float64


def test_channel_sends_arrays_of_another_device(client):
    _check_channel_round_trip(client, "strict", "array_api_strict")


def test_payload_spec_refuses_another_array_type_or_device():
    # What a worker whose state is on a device subscribes with: a payload it
    # could not compute with is dropped at the door, not in its training loop.
    state = _on_device("strict", np.zeros(3))
    spec = PayloadSpec("float64", {0: (3,)}, array_type=type(state), device=device(state))
    assert spec.problem(0, _on_device("strict", np.ones(3)), {}) is None
    assert spec.problem(0, np.ones(3), {}) == "array type numpy.ndarray != expected array_api_strict.Array"
    on_cpu = array_api_strict.asarray(np.ones(3))
    assert spec.problem(0, on_cpu, {}) == f"device {device(on_cpu)} != expected {STRICT_DEVICE}"


def test_bench_runs_without_a_gpu_and_prints_the_table():
    done = subprocess.run(
        [sys.executable, "-m", "dask_asgd.bench_gpu", "--quick", "--seconds", "0.05", "--batch-sizes", "64,256"],
        check=False, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "| problem | batch | NumPy samples/s | CuPy samples/s | CuPy / NumPy |" in done.stdout
    for case in bench_gpu.QUICK:
        for batch in (64, 256):
            assert f"| {case} | {batch} | " in done.stdout
    if bench_gpu.find_cupy()[0] is None:
        assert "CuPy unavailable: " in done.stdout and "| n/a | n/a |" in done.stdout


def test_bench_device_column_and_check_on_a_stand_in_device():
    # The path the CuPy column takes (arrays put on a device, indices copied
    # there every step, the state compared with NumPy's), on device1.
    device = bench_gpu.Device("array_api_strict", functools.partial(_on_device, "strict"))
    for case in bench_gpu.QUICK:
        rows, (difference, tolerance) = bench_gpu.measure(case, [128], 0.05, "float64", device)
        assert rows[0]["numpy"] > 0 and rows[0]["device"] > 0
        assert difference <= tolerance, case
    assert "| array_api_strict samples/s |" in bench_gpu.format_table(rows, "array_api_strict")
    with pytest.raises(ValueError, match="batch_size=30000 is more than the 20000 rows"):
        bench_gpu.measure(bench_gpu.QUICK[0], [30_000], 0.05, "float64")


# -- on a GPU -----------------------------------------------------------------------------
def _model_cases(rng, X):
    """Every model with its targets, a state and an aux to take one step from."""
    n, d = X.shape
    w = rng.normal(size=d)
    kmeans = KMeansModel(16, d)
    return [
        ("linear", LinearModel(d, alpha=0.1), X @ w + 0.5, rng.normal(size=d + 1), None),
        ("logistic-binary", LogisticModel(d, 2, alpha=0.01), (X @ w > 0).astype(np.int64), rng.normal(size=d + 1), None),
        ("logistic-multinomial", LogisticModel(d, 5, alpha=0.01), rng.integers(5, size=n), rng.normal(size=5 * (d + 1)), None),
        ("kmeans", kmeans, None, rng.normal(size=kmeans.n_params), rng.integers(1, 50, size=16).astype(float)),
    ]


@pytest.mark.gpu
def test_models_on_cupy_match_numpy(cp):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(2048, 64))
    for name, model, y, params, aux in _model_cases(rng, X):
        cy = None if y is None else cp.asarray(y)
        expected, expected_aux = model.step(params, aux, X, y, 0.3)
        got, got_aux = model.step(cp.asarray(params), None if aux is None else cp.asarray(aux), cp.asarray(X), cy, 0.3)
        assert isinstance(got, cp.ndarray), name
        np.testing.assert_allclose(got.get(), expected, rtol=1e-9, atol=1e-12, err_msg=name)
        if aux is not None:
            np.testing.assert_allclose(got_aux.get(), expected_aux, rtol=1e-12, err_msg=name)
        assert model.loss(cp.asarray(params), cp.asarray(X), cy) == pytest.approx(model.loss(params, X, y), rel=1e-9), name
        np.testing.assert_array_equal(model.predict(cp.asarray(params), cp.asarray(X)).get(), model.predict(params, X), err_msg=name)
    model = KMeansModel(16, X.shape[1])
    expected, expected_counts = model.init_params(X, None, np.random.default_rng(3))
    got, got_counts = model.init_params(cp.asarray(X), None, np.random.default_rng(3))
    np.testing.assert_allclose(got.get(), expected, rtol=1e-9)
    np.testing.assert_array_equal(got_counts.get(), expected_counts)


@pytest.mark.gpu
def test_filter_and_payload_checks_on_cupy(cp):
    rng = np.random.default_rng(1)
    for _ in range(50):
        before, after, received = rng.normal(size=(3, 100))
        assert moves_towards(*map(cp.asarray, (before, after, received))) == moves_towards(before, after, received)
    f = UpdateFilter("parzen")
    before, after = cp.asarray([10.0, 1.0]), cp.asarray([10.5, 1.0])
    assert f.accept(before, after, cp.asarray([10.8, 1.0])) and not f.accept(before, after, cp.asarray([9.8, 1.0]))
    spec = PayloadSpec("float64", {0: (3,)}, array_type=cp.ndarray, device=device(cp.zeros(1)))
    assert spec.problem(0, cp.zeros(3), {}) is None
    assert spec.problem(0, np.zeros(3), {}) == "array type numpy.ndarray != expected cupy.ndarray"
    assert "NaN or inf" in spec.problem(0, cp.asarray([0.0, cp.nan, 0.0]), {})


@pytest.mark.gpu
@pytest.mark.timeout(120)
def test_channel_sends_a_cupy_array(cp, client):
    _check_channel_round_trip(client, "cupy", "cupy")


@pytest.mark.gpu
@pytest.mark.timeout(300)
def test_estimators_on_cupy_match_numpy(cp, client, tmp_path):
    X, _ = _problems()
    for name, fitted, reference in _check_fit_matches_numpy(client, cp.asarray, cp.asarray, rtol=1e-7):
        assert isinstance(fitted.params_, cp.ndarray), name
        predicted = fitted.predict(cp.asarray(X))
        assert isinstance(predicted, cp.ndarray), name
        _check_predictions(name, predicted.get(), reference.predict(X))
    settings = {"comm_interval": 256, "max_epochs": 4, "tol": None, "random_state": 0, "client": client}
    est = KMeans(3, checkpoint=str(tmp_path), **settings).fit(cp.asarray(X))
    assert isinstance(est.cluster_centers_, cp.ndarray)
    assert float(est.history_.malformed.max()) == 0 and float((est.history_.accepted + est.history_.rejected).max()) > 0
    numpy_fit = KMeans(3, **settings).fit(X)
    assert est.score(cp.asarray(X)) == pytest.approx(numpy_fit.score(X), rel=0.02)
    # Resuming: the checkpoint (NumPy, from host copies) goes back onto the device.
    resumed = KMeans(3, checkpoint=str(tmp_path), resume=True, **settings).fit(cp.asarray(X))
    assert isinstance(resumed.cluster_centers_, cp.ndarray)
    assert resumed.score(cp.asarray(X)) == pytest.approx(numpy_fit.score(X), rel=0.02)


@pytest.mark.gpu
@pytest.mark.timeout(300)
def test_estimators_on_dask_arrays_of_cupy_chunks(cp, client):
    def cupy_chunks(a):
        return da.from_array(a, chunks=1000).map_blocks(cp.asarray)

    X, _ = _problems()
    for name, fitted, reference in _check_fit_matches_numpy(client, cupy_chunks, cupy_chunks, rtol=1e-7):
        assert isinstance(fitted.params_, cp.ndarray), name
        predicted = fitted.predict(cupy_chunks(X))
        assert isinstance(predicted, da.Array) and isinstance(predicted._meta, cp.ndarray), name
        computed = predicted.compute()
        assert isinstance(computed, cp.ndarray), name
        _check_predictions(name, computed.get(), reference.predict(X))


def _check_predictions(name, got, expected):
    # Rounding may move a point that sits on a boundary to the other side.
    if name == "linear":
        np.testing.assert_allclose(got, expected, rtol=1e-6)
    else:
        assert np.mean(got == expected) > 0.999, name
