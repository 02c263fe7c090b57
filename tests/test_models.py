"""The model maths against closed forms, on NumPy and on array_api_strict arrays
(the latter proves the code stays in the array API, so CuPy keeps working)."""

import array_api_strict
import numpy as np
import pytest
from array_api_compat import array_namespace, device

from dask_asgd.models import KMeansModel, LinearModel, LogisticModel
from dask_asgd.models._base import to_host

# array_api_strict's "device1" stands in for a GPU where there is none: its
# arrays refuse np.asarray and any mixing with arrays on the default device, as
# CuPy's do, so a scalar or index made without device= fails here too.
STRICT_DEVICE = array_api_strict.Device("device1")


def _on_strict_device(a):
    return array_api_strict.asarray(a, device=STRICT_DEVICE)


BACKENDS = [
    pytest.param(np.asarray, id="numpy"),
    pytest.param(array_api_strict.asarray, id="array_api_strict"),
    pytest.param(_on_strict_device, id="array_api_strict-device1"),
]


def _data(seed=0, n=500, d=4):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    return rng, X


def _numeric_gradient(model, params, X, y, eps=1e-6):
    grad = np.zeros_like(params)
    for i in range(params.shape[0]):
        up, down = params.copy(), params.copy()
        up[i] += eps
        down[i] -= eps
        grad[i] = (model.loss(up, X, y) - model.loss(down, X, y)) / (2 * eps)
    return grad


def _step_gradient(model, params, X, y):
    # step() returns params - lr * grad: read grad back with lr = 1.
    new, _ = model.step(params, None, X, y, 1.0)
    return params - np.asarray(new)


@pytest.mark.parametrize(
    "model, make_y",
    [
        (LinearModel(4, alpha=0.1), lambda rng, X: X @ rng.normal(size=4) + 0.5),
        (LogisticModel(4, 2, alpha=0.01), lambda rng, X: (X[:, 0] > 0).astype(np.int64)),
        (LogisticModel(4, 3, alpha=0.01), lambda rng, X: rng.integers(3, size=X.shape[0])),
    ],
    ids=["linear", "logistic-binary", "logistic-multinomial"],
)
def test_gradient_matches_finite_differences(model, make_y):
    rng, X = _data()
    y = make_y(rng, X)
    params = rng.normal(size=model.n_params) * 0.3
    np.testing.assert_allclose(_step_gradient(model, params, X, y), _numeric_gradient(model, params, X, y), rtol=1e-5, atol=1e-7)


def test_linear_loss_closed_form():
    rng, X = _data()
    y = rng.normal(size=X.shape[0])
    model = LinearModel(4, alpha=0.5)
    params = rng.normal(size=5)
    w, b = params[:4], params[4]
    expected = 0.5 * np.mean((X @ w + b - y) ** 2) + 0.25 * w @ w
    assert model.loss(params, X, y) == pytest.approx(expected, rel=1e-12)


def test_intercept_not_fitted_when_disabled():
    rng, X = _data()
    y = X @ np.ones(4) + 3.0
    model = LinearModel(4, fit_intercept=False)
    params, _ = model.init_params(X, y, rng)
    for _ in range(50):
        params, _ = model.step(params, None, X, y, 0.1)
    assert params[-1] == 0.0


def test_binary_logistic_is_two_class_softmax():
    # sigmoid(z) equals softmax([0, z])[1]: the binary model is the multinomial one
    # with the first class's scores pinned to zero.
    rng, X = _data()
    y = (X[:, 1] > 0).astype(np.int64)
    binary = LogisticModel(4, 2, alpha=0.0)
    params = rng.normal(size=binary.n_params)
    proba = binary.predict_proba(params, X)
    z = X @ params[:4] + params[4]
    np.testing.assert_allclose(proba[:, 1], 1 / (1 + np.exp(-z)), rtol=1e-12)
    np.testing.assert_allclose(binary.loss(params, X, y), np.mean(np.log1p(np.exp(z)) - y * z), rtol=1e-12)


def test_kmeans_step_is_running_mean():
    # With learning_rate 1 each centre becomes the mean of all points it was given.
    _, X = _data(n=64, d=2)
    model = KMeansModel(2, 2)
    C0 = np.array([[-5.0, 0.0], [5.0, 0.0]])
    counts = np.array([3.0, 5.0])
    params, new_counts = model.step(C0.ravel(), counts, X, None, 1.0)
    labels = np.argmin(((X[:, None] - C0[None]) ** 2).sum(-1), axis=1)
    for c in range(2):
        pts = X[labels == c]
        expected = (C0[c] * counts[c] + pts.sum(0)) / (counts[c] + len(pts))
        np.testing.assert_allclose(params.reshape(2, 2)[c], expected, rtol=1e-12)
        assert new_counts[c] == counts[c] + len(pts)


def test_kmeans_init_finds_separated_blobs():
    rng = np.random.default_rng(0)
    means = np.array([[0, 0], [20, 0], [0, 20], [20, 20]], dtype=float)
    X = means[rng.integers(4, size=2000)] + rng.normal(size=(2000, 2))
    model = KMeansModel(4, 2)
    params, counts = model.init_params(X, None, rng)
    C = params.reshape(4, 2)
    # Every true mean has a centre within 0.2 of it.
    assert np.max(np.min(np.linalg.norm(C[:, None] - means[None], axis=-1), axis=0)) < 0.2
    assert counts.sum() == 2000


@pytest.mark.parametrize("to_backend", BACKENDS)
def test_models_train_in_any_array_namespace(to_backend):
    rng, X_np = _data(n=2000, d=5)
    w = rng.normal(size=5)
    X = to_backend(X_np)
    xp = array_namespace(X)
    cases = [
        (LinearModel(5), to_backend(X_np @ w + 1.0), 0.05, 1e-3),
        (LogisticModel(5, 2), to_backend((X_np @ w > 0).astype(np.int64)), 0.5, 0.2),
        (LogisticModel(5, 3), to_backend(np.digitize(X_np @ w, [-1.0, 1.0]).astype(np.int64)), 0.5, 0.4),
        (KMeansModel(3, 5), None, 1.0, None),
    ]
    for model, y, lr, target in cases:
        params, aux = model.init_params(X, y, np.random.default_rng(0))
        start = model.loss(params, X, y)
        for i in range(200):
            rows = to_backend(np.random.default_rng(i).integers(2000, size=128))
            yb = None if y is None else xp.take(y, rows, axis=0)
            params, aux = model.step(params, aux, xp.take(X, rows, axis=0), yb, lr)
        end = model.loss(params, X, y)
        assert type(params) is type(X), "the state must stay in the input's namespace"
        assert device(params) == device(X), "the state must stay on the input's device"
        assert aux is None or device(aux) == device(X)
        assert end < start or target is None
        if target is not None:
            assert end < target, type(model).__name__
        predictions = model.predict(params, X)
        assert predictions.shape == (2000,) and device(predictions) == device(X)
        if isinstance(model, LogisticModel):
            proba = model.predict_proba(params, X)
            assert proba.shape == (2000, model.n_classes) and device(proba) == device(X)


def _agreement_cases(rng, X):
    """Every model with data, a state and an aux to take one step from."""
    n, d = X.shape
    w = rng.normal(size=d)
    kmeans = KMeansModel(4, d)
    return [
        ("linear", LinearModel(d, alpha=0.1), X @ w + 0.5, rng.normal(size=d + 1), None),
        ("logistic-binary", LogisticModel(d, 2, alpha=0.01), (X @ w > 0).astype(np.int64), rng.normal(size=d + 1), None),
        ("logistic-multinomial", LogisticModel(d, 3, alpha=0.01), rng.integers(3, size=n), rng.normal(size=3 * (d + 1)), None),
        ("kmeans", kmeans, None, rng.normal(size=kmeans.n_params), rng.integers(1, 20, size=4).astype(float)),
    ]


@pytest.mark.parametrize("to_backend", BACKENDS)
def test_namespaces_agree_numerically(to_backend):
    # step, loss, predict and (K-Means) the init give NumPy's numbers in any namespace.
    rng, X_np = _data(n=300, d=3)
    X = to_backend(X_np)
    for name, model, y_np, params_np, aux_np in _agreement_cases(rng, X_np):
        y = None if y_np is None else to_backend(y_np)
        aux = None if aux_np is None else to_backend(aux_np)
        expected, expected_aux = model.step(params_np, aux_np, X_np, y_np, 0.3)
        got, got_aux = model.step(to_backend(params_np), aux, X, y, 0.3)
        np.testing.assert_allclose(to_host(got), expected, rtol=1e-12, err_msg=name)
        if aux_np is not None:
            np.testing.assert_allclose(to_host(got_aux), expected_aux, rtol=1e-12, err_msg=name)
        assert model.loss(to_backend(params_np), X, y) == pytest.approx(model.loss(params_np, X_np, y_np), rel=1e-12), name
        np.testing.assert_array_equal(to_host(model.predict(to_backend(params_np), X)), model.predict(params_np, X_np), err_msg=name)
    model = KMeansModel(4, 3)
    expected, expected_counts = model.init_params(X_np, None, np.random.default_rng(5))
    got, got_counts = model.init_params(X, None, np.random.default_rng(5))
    np.testing.assert_allclose(to_host(got), expected, rtol=1e-10)
    np.testing.assert_array_equal(to_host(got_counts), expected_counts)


@pytest.mark.parametrize("to_backend", BACKENDS)
def test_to_host_copies_from_any_namespace_and_device(to_backend):
    values = np.arange(6.0).reshape(2, 3)
    a = to_backend(values)
    host = to_host(a)
    assert type(host) is np.ndarray
    np.testing.assert_array_equal(host, values)
    host[0, 0] = -1.0  # a copy: the source is untouched
    assert to_host(a)[0, 0] == 0.0
