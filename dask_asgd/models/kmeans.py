"""SGD K-Means: mini-batch centre updates with per-centre step sizes.

Each centre moves towards the mean of the batch points assigned to it by
``learning_rate * n_batch / n_seen`` (a running mean when the rate is 1, as in
Sculley's web-scale k-means and scikit-learn's MiniBatchKMeans)."""

from __future__ import annotations

import math

from ._base import (
    SGDModel,
    array_namespace,
    device,
    host_to,
    one_hot,
    squared_distances,
)


class KMeansModel(SGDModel):
    """K-Means as flat ``(n_clusters * n_features,)`` centres plus per-centre counts.

    Example::

        model = KMeansModel(n_clusters=3, n_features=2)
        params, counts = model.init_params(X_sample, None, np.random.default_rng(0))
        params, counts = model.step(params, counts, X_batch, None, learning_rate=1.0)
    """

    needs_y = False

    def __init__(self, n_clusters: int, n_features: int, n_init: int = 3, lloyd_iterations: int = 20):
        self.n_clusters = n_clusters
        self.n_features = n_features
        self.n_init = n_init
        self.lloyd_iterations = lloyd_iterations

    @property
    def n_params(self) -> int:
        return self.n_clusters * self.n_features

    def centers(self, params):
        xp = array_namespace(params)
        return xp.reshape(params, (self.n_clusters, self.n_features))

    def init_params(self, X, y, rng):
        # k-means++ seeding refined by Lloyd on the sample, best of n_init: every
        # worker starts from these same centres, so averaging states stays meaningful.
        # The counts returned stand for the sample the centres already summarise,
        # so the first batches refine the centres rather than replace them.
        xp = array_namespace(X)
        best, best_inertia, best_counts = None, math.inf, None
        for _ in range(self.n_init):
            C = self._kmeans_plus_plus(xp, X, rng)
            C, counts, inertia = self._lloyd(xp, X, C)
            if inertia < best_inertia:
                best, best_inertia, best_counts = C, inertia, counts
        return xp.reshape(best, (-1,)), best_counts

    def step(self, params, aux, X, y, learning_rate):
        xp = array_namespace(X)
        C = self.centers(params)
        labels = xp.argmin(squared_distances(xp, X, C), axis=1)
        member = one_hot(xp, labels, self.n_clusters, X.dtype)
        batch_counts = xp.sum(member, axis=0)
        sums = member.T @ X
        counts = aux + batch_counts
        safe_batch = xp.maximum(batch_counts, xp.asarray(1.0, dtype=X.dtype, device=device(X)))
        safe_counts = xp.maximum(counts, xp.asarray(1.0, dtype=X.dtype, device=device(X)))
        eta = learning_rate * batch_counts / safe_counts
        C_new = C + eta[:, None] * (sums / safe_batch[:, None] - C)
        return xp.reshape(C_new, (-1,)), counts

    def loss(self, params, X, y=None):
        xp = array_namespace(X)
        d2 = squared_distances(xp, X, self.centers(params))
        return float(xp.mean(xp.min(d2, axis=1)))

    def predict(self, params, X):
        xp = array_namespace(X)
        return xp.argmin(squared_distances(xp, X, self.centers(params)), axis=1)

    def _kmeans_plus_plus(self, xp, X, rng):
        # Greedy k-means++ (Arthur & Vassilvitskii; the variant scikit-learn uses):
        # several candidates per centre, keep the one that lowers the potential most.
        n = X.shape[0]
        n_trials = 2 + int(math.log(self.n_clusters))
        first = int(rng.integers(n))
        centers = [X[first, :]]
        closest = squared_distances(xp, X, X[first:first + 1, :])[:, 0]
        for _ in range(1, self.n_clusters):
            potential = float(xp.sum(closest))
            cumulative = xp.cumulative_sum(closest)
            targets = host_to(xp, rng.random(n_trials) * potential, X)
            candidates = xp.clip(xp.searchsorted(cumulative, xp.astype(targets, cumulative.dtype)), 0, n - 1)
            cand_d2 = squared_distances(xp, X, xp.take(X, candidates, axis=0))
            trial_closest = xp.minimum(closest[:, None], cand_d2)
            best = int(xp.argmin(xp.sum(trial_closest, axis=0)))
            centers.append(X[int(candidates[best]), :])
            closest = trial_closest[:, best]
        return xp.stack(centers)

    def _lloyd(self, xp, X, C):
        previous = None
        for _ in range(self.lloyd_iterations):
            labels = xp.argmin(squared_distances(xp, X, C), axis=1)
            if previous is not None and bool(xp.all(labels == previous)):
                break  # converged: the centres would not move again
            previous = labels
            member = one_hot(xp, labels, self.n_clusters, X.dtype)
            counts = xp.sum(member, axis=0)
            sums = member.T @ X
            safe = xp.maximum(counts, xp.asarray(1.0, dtype=X.dtype, device=device(X)))
            # An empty cluster keeps its centre rather than collapsing to zero.
            C = xp.where((counts > 0)[:, None], sums / safe[:, None], C)
        d2 = squared_distances(xp, X, C)
        labels = xp.argmin(d2, axis=1)
        counts = xp.sum(one_hot(xp, labels, self.n_clusters, X.dtype), axis=0)
        return C, counts, float(xp.sum(xp.min(d2, axis=1)))


__all__ = ["KMeansModel"]
