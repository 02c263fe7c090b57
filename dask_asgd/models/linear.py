"""Linear models on flat parameters: shared affine maths, and squared-loss regression.

Parameters are ``W`` (n_features x n_outputs) then the intercept ``b``
(n_outputs), flattened; the L2 penalty ``alpha/2 ||W||^2`` spares the intercept."""

from __future__ import annotations

from abc import abstractmethod

from ._base import SGDModel, array_namespace, device


class AffineModel(SGDModel):
    """Maths common to models whose scores are ``X @ W + b``; subclasses give
    the loss and its derivative with respect to the scores."""

    n_outputs: int

    def __init__(self, n_features: int, n_outputs: int = 1, alpha: float = 0.0, fit_intercept: bool = True):
        self.n_features = n_features
        self.n_outputs = n_outputs
        self.alpha = alpha
        self.fit_intercept = fit_intercept

    @property
    def n_params(self) -> int:
        return (self.n_features + 1) * self.n_outputs

    def unpack(self, params):
        xp = array_namespace(params)
        n_weights = self.n_features * self.n_outputs
        W = xp.reshape(params[:n_weights], (self.n_features, self.n_outputs))
        return W, params[n_weights:]

    def scores(self, params, X):
        W, b = self.unpack(params)
        return X @ W + b[None, :]

    def init_params(self, X, y, rng):
        xp = array_namespace(X)
        return xp.zeros((self.n_params,), dtype=X.dtype, device=device(X)), None

    def step(self, params, aux, X, y, learning_rate):
        xp = array_namespace(X)
        W, _ = self.unpack(params)
        dZ = self.score_gradient(self.scores(params, X), y)
        n = X.shape[0]
        grad_W = X.T @ dZ / n + self.alpha * W
        if self.fit_intercept:
            grad_b = xp.mean(dZ, axis=0)
        else:
            grad_b = xp.zeros((self.n_outputs,), dtype=X.dtype, device=device(X))
        grad = xp.concat([xp.reshape(grad_W, (-1,)), grad_b])
        return params - learning_rate * grad, aux

    def loss(self, params, X, y):
        xp = array_namespace(X)
        W, _ = self.unpack(params)
        penalty = 0.5 * self.alpha * float(xp.sum(W * W))
        return self.data_loss(self.scores(params, X), y) + penalty

    @abstractmethod
    def score_gradient(self, Z, y):
        """Per-row derivative of the loss with respect to the scores ``Z``."""

    @abstractmethod
    def data_loss(self, Z, y) -> float:
        """Mean loss of the scores ``Z`` against ``y``, without the penalty."""


class LinearModel(AffineModel):
    """Least squares, ``mean((X w + b - y)^2) / 2 + alpha/2 ||w||^2``.

    Example::

        model = LinearModel(n_features=3, alpha=1e-4)
        params, _ = model.init_params(X, y, rng)
        params, _ = model.step(params, None, X_batch, y_batch, learning_rate=0.05)
    """

    def __init__(self, n_features: int, alpha: float = 0.0, fit_intercept: bool = True):
        super().__init__(n_features, 1, alpha, fit_intercept)

    def score_gradient(self, Z, y):
        return Z - y[:, None]

    def data_loss(self, Z, y):
        xp = array_namespace(Z)
        r = Z[:, 0] - y
        return 0.5 * float(xp.mean(r * r))

    def predict(self, params, X):
        return self.scores(params, X)[:, 0]
