"""The client's side of a fit: put the rows on the workers, compute the shared
initial state there, keep one chain of training tasks going per worker until each
stops, and assemble the history. No model state or data passes through here
until the final (small) states come back."""

from __future__ import annotations

import copy
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr
from array_api_compat import array_namespace
from distributed import Client, wait

from .. import config
from ..balance._monitor import Monitor
from ..channel import Channel
from ..models import SGDModel
from ._chains import AllWorkersLost, ChainKeeper, SchedulerLost, worker_addresses
from ._checkpointer import Checkpointer
from ._data import Shard, place, positions_of
from ._history import build_history
from ._spec import RunSpec
from ._worker import best_state, initial_state, join_samples, sample_rows


@dataclass
class FitResult:
    params: Any
    history: xr.Dataset
    samples: int
    n_iter: int
    stop_reasons: dict[str, str]


__all__ = ["AllWorkersLost", "FitResult", "SchedulerLost", "TrainingDiverged", "fit"]

# Keys of the set-up's last tasks (each worker fetching the initial state and the
# evaluation rows): once all are in memory the clock starts. Tools that act at
# that moment (the balance benchmark shapes its links then) watch for them.
SETUP_HOLD_PREFIX = "asgd-hold-"


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or inf during training."""


def fit(
    client: Client,
    model: SGDModel,
    X,
    y,
    *,
    mode: str,
    learning_rate: float,
    batch_size: int,
    comm_interval: int,
    message_size: int,
    update_filter: str | None,
    max_epochs: int,
    max_time: float | None,
    tol: float | None,
    seed: int,
    auto_interval: bool = False,
    auto_size: bool = False,
    start_from=None,
    samples_before: int = 0,
    checkpoint_dir=None,
) -> FitResult:
    """Train ``model`` on X (and y) with the cluster behind ``client``.

    ``start_from``: an initial ``(params, aux)`` (resuming) instead of one computed
    from the data; ``checkpoint_dir``: where to write checkpoints while training.
    """
    workers = sorted(worker_addresses(client))
    if not workers:
        raise RuntimeError("the Dask cluster has no workers; start some (dask worker ADDRESS) and fit again")
    if mode == "sequential":
        workers = workers[:1]
    # The monitor's stream handler must exist before any worker reports to it.
    client.register_plugin(Monitor())
    if mode in ("asgd", "sync"):
        client.register_plugin(Channel())
    shards = place(client, X, y, workers)
    n_samples = sum(s.n_rows for s in shards)
    if start_from is None:
        init = _initial_state(client, model, shards, seed)
    else:
        (init,) = client.scatter([start_from], broadcast=True, hash=False)
    evaluation = client.submit(join_samples, _samples(client, shards, int(config.get("engine.eval-size")), seed + 7919),
                               workers=[shards[0].address], pure=False)
    # Every worker holds the initial state and the evaluation rows before the
    # clock starts: over a slow link they take seconds, and a worker that fetched
    # them in its first training task would start late (seen: after max_time).
    run_id = uuid.uuid4().hex[:12]
    wait([client.submit(_hold, init, evaluation, workers=[s.address], key=f"{SETUP_HOLD_PREFIX}{run_id}-{i}")
          for i, s in enumerate(shards)])
    spec = RunSpec(
        run_id=run_id,
        mode=mode,
        model=model,
        learning_rate=learning_rate,
        batch_size=batch_size,
        comm_interval=comm_interval,
        message_size=message_size,
        update_filter=update_filter,
        filter_window=float(config.get("filter.window")),
        max_epochs=max_epochs,
        max_time=max_time,
        tol=tol,
        n_iter_no_change=int(config.get("engine.n-iter-no-change")),
        seed=seed,
        # Time counts from here: max_time and history_ cover training, not set-up.
        t0=time.time(),
        n_samples=n_samples,
        peers=tuple(s.address for s in shards),
        history_interval=float(config.get("engine.history-interval")),
        segment_seconds=float(config.get("engine.segment-seconds")),
        sync_timeout=float(config.get("engine.sync-timeout")),
        auto_interval=auto_interval,
        auto_size=auto_size,
        report_interval=float(config.get("balance.report-interval")),
        probe_interval=float(config.get("balance.probe-interval")),
        share_state=checkpoint_dir is not None,
    )
    keeper = None
    if checkpoint_dir is not None:
        keeper = Checkpointer(
            checkpoint_dir, model=type(model).__name__, every=float(config.get("checkpoint.interval")),
            samples_before=samples_before, settings={"n_features": int(getattr(model, "n_features", 0))},
        )
    source = None if any(s.rows is None for s in shards) else (X, y)
    chains = ChainKeeper(client, spec, shards, init, evaluation, checkpointer=keeper, source=source,
                         admit_newcomers=mode in ("asgd", "simuparallel"))
    finals, rows, adjustments, events = chains.run()
    if keeper is not None:
        keeper.write()

    reasons = {w: r["stop_reason"] for w, r in finals.items()}
    diverged = [w for w, reason in reasons.items() if reason == "diverged"]
    if diverged:
        raise TrainingDiverged(
            f"training diverged on {len(diverged)} worker(s): the loss became NaN or inf; "
            f"lower learning_rate (now {learning_rate}) or standardize X"
        )
    samples = {w: r["samples"] for w, r in finals.items()}
    history = build_history(
        rows,
        spec.history_interval,
        attrs={"mode": mode, "run_id": spec.run_id, "model": type(model).__name__,
               "t0": spec.t0},  # wall-clock start of training: time 0 of history_
        adjustments=adjustments,
        events=events,
    )
    history["stop_reason"] = ("worker", [reasons.get(w, "lost") for w in rows])
    total = sum(samples.values())
    return FitResult(
        params=_average([f["params"] for f in finals.values()], list(samples.values())),
        history=history,
        samples=total,
        n_iter=max(1, round(total / n_samples)),
        stop_reasons=reasons,
    )


def _initial_state(client, model, shards: list[Shard], seed: int):
    """The shared initial state. A model that tries several seedings (K-Means'
    ``n_init``) tries them in parallel, one per worker, and the best is kept:
    on one worker they were most of a fit's set-up time (profiled in the peers
    benchmark)."""
    samples = _samples(client, shards, int(config.get("init.sample-size")), seed)
    tries = int(getattr(model, "n_init", 1))
    if tries <= 1:
        return client.submit(initial_state, model, samples, seed, workers=[shards[0].address], pure=False)
    single = copy.copy(model)
    single.n_init = 1
    candidates = [
        client.submit(initial_state, single, samples, seed + j, workers=[shards[j % len(shards)].address], pure=False)
        for j in range(tries)
    ]
    return client.submit(best_state, model, samples, candidates, workers=[shards[0].address], pure=False)


def _hold(*values) -> None:
    """A task whose only work is to bring its arguments to its worker."""


def _samples(client, shards: list[Shard], size: int, seed: int) -> list:
    """``size`` rows drawn by their index in X, wherever they are: the same seed
    picks the same rows on any cluster. (Drawn per worker from its own rows, the
    sample, and so K-Means' initial state, changed with the rows' placement:
    +0.02%, +0.30% and +1.71% over the optimum on three clusters, one seed.)
    Each worker sends only its picked rows."""
    n_samples = sum(s.n_rows for s in shards)
    chosen = np.sort(np.random.default_rng(seed).choice(n_samples, size=min(size, n_samples), replace=False))
    picks = [(s, *positions_of(s, chosen)) for s in shards]
    return [
        client.submit(sample_rows, s.X, s.y, positions, ids, workers=[s.address], pure=False)
        for s, positions, ids in picks if positions.shape[0]
    ]


def _average(states, weights):
    xp = array_namespace(*states)
    w = np.asarray(weights, dtype=float) / float(np.sum(weights))
    total = states[0] * float(w[0])
    for state, weight in zip(states[1:], w[1:]):
        total = total + state * float(weight)
    return xp.asarray(total, dtype=states[0].dtype)
