"""The model maths against closed forms, on NumPy and on array_api_strict arrays
(the latter proves the code stays in the array API, so CuPy keeps working)."""

import array_api_strict
import numpy as np
import pytest

from dask_asgd.models import KMeansModel, LinearModel, LogisticModel

NAMESPACES = [pytest.param(np, id="numpy"), pytest.param(array_api_strict, id="array_api_strict")]


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
    rng, X = _data(n=64, d=2)
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


@pytest.mark.parametrize("xp", NAMESPACES)
def test_models_train_in_any_array_namespace(xp):
    rng, X_np = _data(n=2000, d=5)
    w = rng.normal(size=5)
    X = xp.asarray(X_np)
    cases = [
        (LinearModel(5), xp.asarray(X_np @ w + 1.0), 0.05, 1e-3),
        (LogisticModel(5, 2), xp.asarray((X_np @ w > 0).astype(np.int64)), 0.5, 0.2),
        (LogisticModel(5, 3), xp.asarray(np.digitize(X_np @ w, [-1.0, 1.0]).astype(np.int64)), 0.5, 0.4),
        (KMeansModel(3, 5), None, 1.0, None),
    ]
    for model, y, lr, target in cases:
        params, aux = model.init_params(X, y, np.random.default_rng(0))
        start = model.loss(params, X, y)
        for i in range(200):
            rows = xp.asarray(np.random.default_rng(i).integers(2000, size=128))
            yb = None if y is None else xp.take(y, rows, axis=0)
            params, aux = model.step(params, aux, xp.take(X, rows, axis=0), yb, lr)
        end = model.loss(params, X, y)
        assert type(params) is type(X), "the state must stay in the input's namespace"
        assert end < start or target is None
        if target is not None:
            assert end < target, type(model).__name__
        predictions = model.predict(params, X)
        assert predictions.shape == (2000,)


def test_namespaces_agree_numerically():
    rng, X_np = _data(n=300, d=3)
    y_np = (X_np[:, 0] > 0).astype(np.int64)
    model = LogisticModel(3, 2)
    params = rng.normal(size=model.n_params)
    a, _ = model.step(params, None, X_np, y_np, 0.3)
    b, _ = model.step(array_api_strict.asarray(params), None, array_api_strict.asarray(X_np), array_api_strict.asarray(y_np), 0.3)
    np.testing.assert_allclose(a, np.asarray(b), rtol=1e-13)
