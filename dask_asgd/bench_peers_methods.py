"""How each method of the peers benchmark is timed: a *trace* of (wall seconds,
metric) points per run, taken in one of three ways that suit the method.

* ``engine``: dask-asgd's own modes. One fit with ``max_time`` = the budget and
  ``checkpoint=`` a temporary folder. The client writes the sample-weighted average
  of the workers' newest states (the model ``fit`` would return if training stopped
  there) every ``CHECKPOINT_EVERY`` seconds (``SLOW_CHECKPOINT_EVERY`` on a shaped
  link, which the states cross on their way to the client). A point is (when the client wrote that
  checkpoint, counted from the ``fit`` call, metric of that average on all the data),
  plus the model ``fit`` returned at the time it returned. Evaluation happens after
  the fit, so it costs the fit nothing.
* ``ladder``: estimators with an iteration budget (scikit-learn ``KMeans``,
  ``MiniBatchKMeans`` and ``LogisticRegression``; dask-ml ``KMeans``). Independent
  fits with growing ``max_iter``; a point is (wall time of that whole fit call, its
  model's metric). Each rung pays the initialisation again, as a user choosing that
  budget would.
* ``passes``: estimators trained by ``partial_fit`` passes over the data
  (scikit-learn ``SGDClassifier``, dask-ml ``Incremental``). A point is (summed wall
  time of the passes so far, metric after them); the evaluation between passes is
  not timed.

Every trace stops once the target is reached and the budget has passed, once it has
cost ``cost_cap`` seconds, or once the method has converged (more iterations would not
change it).
"""

from __future__ import annotations

import contextlib
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import dask
import numpy as np
from scipy.special import logsumexp
from threadpoolctl import threadpool_limits

from . import checkpoint
from .estimators import KMeans, LogisticRegression

# Client-side checkpoints of the engine's running average, and the training task
# length, so the client sees states 4 times a second (default: every 5 s and 1 s).
CHECKPOINT_EVERY = 0.2
SEGMENT_SECONDS = 0.25
# On a shaped link the states behind the checkpoints cross the link too: 256 KB
# five times a second is 10 Mbit/s, the whole link. Once a second it is a fifth.
SLOW_CHECKPOINT_EVERY = 1.0
SLOW_SEGMENT_SECONDS = 1.0
THIN_AFTER_TARGET = 1.0
# Threads of every single-process peer, pinned: the cluster has 2 workers x 1 thread.
PEER_THREADS = 2


@dataclass
class Trace:
    """One run of one method: ``points`` are ``(wall_s, metric)``, in the order taken."""

    points: list[tuple[float, float]] = field(default_factory=list)
    info: dict = field(default_factory=dict)


@dataclass
class Budget:
    """When a trace stops: target reached and ``seconds`` passed, or ``cost_cap`` spent."""

    target: float
    seconds: float
    cost_cap: float

    def done(self, trace: Trace, spent: float) -> bool:
        reached = any(m <= self.target for _, m in trace.points)
        last = trace.points[-1][0] if trace.points else 0.0
        return (reached and last >= self.seconds) or spent >= self.cost_cap


# -- metrics (lower is better), evaluated in the client on all the rows ------------------

def kmeans_metric(X, centers) -> float:
    """Mean squared distance of a row to its nearest centre (inertia / n_samples)."""
    C = np.asarray(centers, dtype=np.float64)
    c2 = (C * C).sum(1)
    total = 0.0
    with threadpool_limits(PEER_THREADS):
        for start in range(0, X.shape[0], 65_536):
            block = X[start:start + 65_536]
            d2 = (block * block).sum(1)[:, None] - 2.0 * (block @ C.T) + c2[None, :]
            total += float(np.maximum(d2.min(1), 0.0).sum())
    return total / X.shape[0]


def logistic_metric(X, y, coef, intercept, alpha: float) -> float:
    """Logistic objective: mean cross-entropy + ``alpha/2 ||coef||^2`` (the
    intercept unpenalised), as dask-asgd, ``SGDClassifier`` and ``LogisticRegression``
    with ``C = 1/(alpha n)`` all minimise it. Binary for one row of ``coef``
    (classes 0 and 1); multinomial (softmax over the rows, one per class) for more."""
    W = np.atleast_2d(np.asarray(coef, dtype=np.float64))
    b = np.asarray(intercept, dtype=np.float64).reshape(-1)
    penalty = 0.5 * alpha * float(np.sum(W * W))
    with threadpool_limits(PEER_THREADS):
        if W.shape[0] == 1:
            z = X @ W[0] + b[0]
            return float(np.mean(np.logaddexp(0.0, z) - y * z) + penalty)
        Z = X @ W.T + b
        return float(np.mean(logsumexp(Z, axis=1) - Z[np.arange(len(y)), np.asarray(y, dtype=np.int64)]) + penalty)


# -- dask-asgd: one fit, checkpoints as the trace ---------------------------------------

def engine_trace(make: Callable, X, y, metric_of_params: Callable, metric_of_estimator: Callable,
                 budget: Budget, seed: int, slow_link: bool = False) -> Trace:
    """One dask-asgd fit of ``budget.seconds`` of training; see the module docstring.
    ``slow_link``: checkpoints once a second, not five times (they cross the link)."""
    with tempfile.TemporaryDirectory(prefix="dask-asgd-bench-") as folder, dask.config.set({
        "asgd.checkpoint.interval": SLOW_CHECKPOINT_EVERY if slow_link else CHECKPOINT_EVERY,
        "asgd.checkpoint.keep": 1_000_000,
        "asgd.engine.segment-seconds": SLOW_SEGMENT_SECONDS if slow_link else SEGMENT_SECONDS,
    }):
        est = make(max_time=budget.seconds, max_epochs=1_000_000, tol=None, random_state=seed, checkpoint=folder)
        start = time.time()
        est.fit(X) if y is None else est.fit(X, y)
        end = time.time()
        saved = [checkpoint.load(path) for path in checkpoint.list_checkpoints(folder)]
    trace = Trace()
    for cp in sorted(saved, key=lambda c: c.created):
        wall = cp.created - start
        # Every checkpoint until the target is reached; past it, one a second is enough
        # for the curve and the metric at the budget, and evaluation is not free.
        if trace.points and trace.points[-1][1] <= budget.target and wall < trace.points[-1][0] + THIN_AFTER_TARGET:
            continue
        trace.points.append((wall, metric_of_params(est, cp.params)))
    trace.points.append((end - start, metric_of_estimator(est)))
    h = est.history_
    t0 = float(h.attrs["t0"])
    trained = float(h.elapsed.max()) if "elapsed" in h else float(h.time[-1])
    samples = float(h.samples.isel(time=-1).sum())
    trace.info = {
        "setup_s": t0 - start,                      # placement + shared initial state
        "train_s": trained,
        "teardown_s": end - t0 - trained,           # last states back, history built
        "samples": samples,
        "samples_per_s": samples / trained if trained > 0 else None,
        "train_offset_s": t0 - start,               # wall_s - train_offset_s = seconds of training
        "stop_reasons": sorted({str(r) for r in h.stop_reason.values}),
    }
    return trace


def kmeans_engine(mode: str, k: int, client):
    def make(**kw):
        return KMeans(k, mode=mode, client=client, **kw)

    def of_params(est, params):
        return est.model_.centers(np.asarray(params))

    return make, of_params


def logistic_engine(mode: str, alpha: float, client):
    def make(**kw):
        return LogisticRegression(alpha=alpha, mode=mode, client=client, **kw)

    def of_params(est, params):
        W, b = est.model_.unpack(np.asarray(params))
        return W.T, b

    return make, of_params


# -- peers: ladders of iteration budgets, and partial_fit passes -----------------------

def ladder_trace(fit: Callable[[int], object], rungs, metric: Callable, converged: Callable,
                 budget: Budget, threads: int | None = PEER_THREADS) -> Trace:
    """Independent fits ``fit(rung)`` for growing rungs; a point per fit (its wall time)."""
    trace = Trace(info={"rungs": []})
    spent = 0.0
    for rung in rungs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ConvergenceWarning is the point of a short rung
            with _threads(threads):
                start = time.perf_counter()
                est = fit(rung)
                wall = time.perf_counter() - start
        spent += wall
        trace.points.append((wall, metric(est)))
        trace.info["rungs"].append(rung)
        if budget.done(trace, spent) or converged(est, rung):
            break
    return trace


def passes_trace(new: Callable[[], object], one_pass: Callable[[object], None], metric: Callable,
                 budget: Budget, max_passes: int = 1000, threads: int | None = PEER_THREADS) -> Trace:
    """``one_pass(est)`` repeated; a point after each, at the summed wall time of the passes."""
    est = new()
    trace = Trace(info={"passes": 0})
    elapsed = 0.0
    for _ in range(max_passes):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with _threads(threads):
                start = time.perf_counter()
                one_pass(est)
                elapsed += time.perf_counter() - start
        trace.points.append((elapsed, metric(est)))
        trace.info["passes"] += 1
        if budget.done(trace, elapsed):
            break
    return trace


def doubling(first: int = 1, factor: int = 2, last: int = 4096):
    rung = first
    while rung <= last:
        yield rung
        rung *= factor


def _threads(n: int | None):
    # dask-ml computes on the cluster: its client-side thread count is not pinned.
    return threadpool_limits(n) if n else contextlib.nullcontext()
