"""Logistic regression, binary (one score column) and multinomial (one per class),
with cross-entropy loss and an L2 penalty; labels are class indices 0..K-1."""

from __future__ import annotations

from ._base import array_namespace, one_hot
from .linear import AffineModel


class LogisticModel(AffineModel):
    """Binary logistic regression when ``n_classes == 2``, softmax otherwise.

    Example::

        model = LogisticModel(n_features=4, n_classes=3, alpha=1e-4)
        params, _ = model.init_params(X, y, rng)
        params, _ = model.step(params, None, X_batch, y_batch, learning_rate=0.1)
        model.predict(params, X)          # class indices
    """

    def __init__(self, n_features: int, n_classes: int, alpha: float = 1e-4, fit_intercept: bool = True):
        self.n_classes = n_classes
        super().__init__(n_features, 1 if n_classes == 2 else n_classes, alpha, fit_intercept)

    @property
    def binary(self) -> bool:
        return self.n_outputs == 1

    def score_gradient(self, Z, y):
        xp = array_namespace(Z)
        if self.binary:
            return self._sigmoid(xp, Z) - xp.astype(y, Z.dtype)[:, None]
        return self._softmax(xp, Z) - one_hot(xp, y, self.n_classes, Z.dtype)

    def data_loss(self, Z, y):
        xp = array_namespace(Z)
        if self.binary:
            z = Z[:, 0]
            zero = xp.zeros_like(z)
            return float(xp.mean(xp.logaddexp(zero, z) - xp.astype(y, z.dtype) * z))
        log_norm = self._logsumexp(xp, Z)
        picked = xp.sum(Z * one_hot(xp, y, self.n_classes, Z.dtype), axis=1)
        return float(xp.mean(log_norm - picked))

    def predict_proba(self, params, X):
        xp = array_namespace(X)
        Z = self.scores(params, X)
        if self.binary:
            p = self._sigmoid(xp, Z)
            return xp.concat([1.0 - p, p], axis=1)
        return self._softmax(xp, Z)

    def predict(self, params, X):
        xp = array_namespace(X)
        Z = self.scores(params, X)
        if self.binary:
            return xp.astype(Z[:, 0] > 0, xp.int64)
        return xp.argmax(Z, axis=1)

    @staticmethod
    def _sigmoid(xp, Z):
        # exp(-log(1 + exp(-z))) never overflows, unlike 1 / (1 + exp(-z)).
        return xp.exp(-xp.logaddexp(xp.zeros_like(Z), -Z))

    @staticmethod
    def _logsumexp(xp, Z):
        top = xp.max(Z, axis=1)
        return top + xp.log(xp.sum(xp.exp(Z - top[:, None]), axis=1))

    def _softmax(self, xp, Z):
        return xp.exp(Z - self._logsumexp(xp, Z)[:, None])
