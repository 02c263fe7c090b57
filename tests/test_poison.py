"""Poisoned peers, on real clusters: a worker of another cluster publishes NaN, inf,
huge values, wrong shapes and dtypes, unknown keys and random states on a running
fit's topic, through its own channel, over real TCP. Validation drops and counts the
malformed messages, the update filter refuses the rest, and the fit ends as a clean
one would. No mocks: the attacker is a real worker process and its messages reach
the training workers' channel handler like any peer's."""

from __future__ import annotations

import concurrent.futures
import math
import os

import dask
import numpy as np
import pytest
from distributed import Client, LocalCluster

from dask_asgd import KMeans
from dask_asgd.channel import Channel, PayloadSpec
from dask_asgd.filter import FULL_WINDOW_SIZE, WINDOW, UpdateFilter, within_window
from dask_asgd.testing import bench_poison
from dask_asgd.testing.poison import (
    HUGE,
    MALFORMED,
    POISONS,
    Attacker,
    Target,
    find_run,
    poison_message,
)


# ----------------------------------------------------------------------------------------
# The filter against poison, without a cluster
# ----------------------------------------------------------------------------------------
def _state(rng, n):
    """A K-Means-like state (centre coordinates in [-10, 10]) and one SGD step from it."""
    before = rng.uniform(-10, 10, size=n)
    after = before + rng.normal(scale=1e-3, size=n)
    return before, after


@pytest.mark.parametrize("n", [1, 2, 16, 160, 4096])
def test_filter_refuses_huge_nan_and_random_states(n):
    rng = np.random.default_rng(n)
    before, after = _state(rng, n)
    refused = {
        "huge": np.full(n, HUGE),
        "largest float": np.full(n, np.finfo(np.float64).max),
        "-huge": np.full(n, -HUGE),
        "nan": np.where(np.arange(n) == 0, np.nan, after),
        "zeros": np.zeros(n),
        "twice the state": 2 * after,
        "the state sign-flipped": -after,
    }
    for name, received in refused.items():
        f = UpdateFilter("parzen")
        assert not f.accept(before, after, received), name
        assert (f.accepted, f.rejected) == (0, 1), name
    # A peer's state one step further the same way is merged.
    f = UpdateFilter("parzen")
    assert f.accept(before, after, after + (after - before))
    assert (f.accepted, f.rejected) == (1, 0)


@pytest.mark.parametrize("scale", [0.3, 1.0, 3.0, 10.0, 1e6])
def test_random_states_are_refused_whatever_their_scale(scale):
    rng = np.random.default_rng(7)
    for n, most in [(1, 0.02), (2, 0.01), (8, 0.0), (64, 0.0), (4096, 0.0)]:
        f = UpdateFilter("parzen")
        for _ in range(2000):
            before, after = _state(rng, n)
            f.accept(before, after, rng.normal(scale=scale, size=n))
        # Whole states never pass; a slice of one or two numbers now and then.
        assert f.accepted <= most * 2000, (n, f.accepted)
    # The paper's test alone merges about half of them.
    paper = UpdateFilter("parzen", window=math.inf)
    for _ in range(2000):
        before, after = _state(rng, 160)
        paper.accept(before, after, rng.normal(scale=scale, size=160))
    assert 600 < paper.accepted < 1400


def test_window_shrinks_for_small_slices():
    after = np.ones(FULL_WINDOW_SIZE)
    edge = WINDOW * math.sqrt(FULL_WINDOW_SIZE)  # ||after|| * WINDOW
    assert within_window(after, after + 0.99 * edge / math.sqrt(FULL_WINDOW_SIZE))
    assert not within_window(after, after + 1.01 * edge / math.sqrt(FULL_WINDOW_SIZE))
    # One number: the window is WINDOW / sqrt(FULL_WINDOW_SIZE) of its size.
    one = np.array([4.0])
    narrow = 4.0 * WINDOW / math.sqrt(FULL_WINDOW_SIZE)
    assert within_window(one, one + 0.99 * narrow) and not within_window(one, one + 1.01 * narrow)
    with pytest.raises(ValueError, match="window=0 is not valid"):
        UpdateFilter("parzen", window=0)


def test_each_poison_is_what_it_says():
    """The attacker's messages: the malformed kinds fail the run's payload checks for
    the reason their name gives; huge and random states pass them (only the filter
    can refuse those)."""
    shapes = {1: (160,), 2: (80,), 3: (80,)}
    target = Target("asgd/x/asgd", "float64", shapes, ("tcp://a:1",))
    spec = PayloadSpec("float64", shapes)
    reasons = {"nan": "NaN or inf", "inf": "NaN or inf", "wrong_shape": "shape", "wrong_dtype": "dtype",
               "unknown_key": "unknown key", "long_meta": "longer than 1024 characters"}
    rng = np.random.default_rng(0)
    for kind in POISONS:
        for _ in range(20):
            key, payload, meta = poison_message(kind, target, rng)
            problem = spec.problem(key, payload, meta)
            if kind in MALFORMED:
                assert problem is not None and reasons[kind] in problem, (kind, problem)
            else:
                assert problem is None, (kind, problem)
    assert set(MALFORMED) | {"huge", "random"} == set(POISONS)


# ----------------------------------------------------------------------------------------
# On real clusters
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clusters():
    """Two training workers, and one hostile worker in a cluster of its own that
    keeps up to ``bench_poison.ATTACKER_IN_FLIGHT`` sends in flight per target."""
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as lc, Client(lc) as client:
        with dask.config.set({"asgd.channel.max-in-flight-per-peer": bench_poison.ATTACKER_IN_FLIGHT}):
            hostile = LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0")
        with hostile, Client(hostile) as bad:
            client.wait_for_workers(2)
            yield client, Attacker(bad)


def _dropped(dask_worker):
    channel = dask_worker.plugins.get(Channel.name)
    return {} if channel is None else dict(channel.dropped)


def _blobs(n=200_000, d=16, k=10, seed=0):
    rng = np.random.default_rng(seed)
    means = rng.uniform(-10, 10, size=(k, d))
    return means[rng.integers(k, size=n)] + rng.normal(size=(n, d))


@pytest.mark.timeout(180)
def test_every_poison_is_dropped_or_refused_and_the_fit_stays_clean(clusters):
    client, attacker = clusters
    X = _blobs()
    common = {"max_epochs": 16, "tol": None, "comm_interval": 16384, "message_size": 1 << 20, "random_state": 0, "client": client}
    clean = KMeans(10, **common).fit(X)
    pids = client.run(os.getpid)
    dropped_before = client.run(_dropped)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fitting = pool.submit(KMeans(10, **common).fit, X)
        try:
            attacker.start(find_run(client, timeout=60), POISONS, rate=300.0)
        finally:
            attacked = fitting.result()
            stats = attacker.stop()

    h, h0 = attacked.history_, clean.history_
    last, last0 = h.isel(time=-1), h0.isel(time=-1)
    assert stats["published"] >= 300, stats  # the attack ran for a second or more
    assert (h.stop_reason == "max_epochs").all()

    # Malformed messages: dropped by validation, counted in history_ and by the channel.
    dropped = {w: d.get("malformed", 0) - dropped_before[w].get("malformed", 0) for w, d in client.run(_dropped).items()}
    malformed = int(last.malformed.sum())
    assert malformed > 0
    assert malformed <= sum(dropped.values()) <= stats["refused"]
    assert int(last0.malformed.sum()) == 0

    # Huge values and random states pass validation: the filter refuses them.
    judged_poison = stats["delivered"] - int(last.overwritten.sum())
    assert int(last.rejected.sum()) - int(last0.rejected.sum()) >= 0.5 * judged_poison, (stats, int(last.rejected.sum()))

    # The fit ends where a clean one does, on the same worker processes.
    assert attacked.score(X) == pytest.approx(clean.score(X), rel=2e-3)
    matched = np.linalg.norm(attacked.cluster_centers_[:, None] - clean.cluster_centers_[None], axis=2).min(axis=1)
    assert matched.max() < 0.1, matched
    assert client.run(os.getpid) == pids


@pytest.mark.timeout(240)
def test_random_states_at_ten_times_the_rate_do_not_slow_convergence(clusters):
    """Clean and attacked fits with the same seed (the same rows, batch order and loss
    rows), side by side; the attacker delivers random states at ten times or more the
    rate at which the workers send their own. The attacked fits reach the clean fits'
    target and end at their loss. (With the Parzen test alone they reach neither: the
    final loss is ten times the clean one.) The slowdown to the target is measured over
    more repeats by ``python -m dask_asgd.testing.bench_poison``; two pairs on a shared
    machine vary too much to hold it to 20% here, so it is held to 50%."""
    client, attacker = clusters
    X, y = bench_poison.make_problem()
    clean, attacked = [], []
    for seed in range(2):
        with dask.config.set({"asgd.engine.history-interval": 0.1}):
            clean.append(bench_poison.fit_once(client, X, y, 10, seed))
            rate = 15 * clean[-1].honest_rate()
            attacked.append(bench_poison.fit_once(client, X, y, 10, seed, attacker, rate))
    result = bench_poison.compare(clean, attacked)
    summary, rows = result["summary"], result["rows"]

    assert all(a.attack_factor() >= 10 for a in attacked), [a.attack_factor() for a in attacked]
    assert all(a.rejected > 10 * max(c.rejected, 10) for c, a in zip(clean, attacked))
    assert summary["all_reached_target"], rows
    assert max(r["final_loss_ratio"] for r in rows) <= 1.05, rows
    assert summary["slowdown_samples"] <= 1.5, rows


@pytest.mark.timeout(120)
def test_updates_from_outside_the_run_are_dropped(clusters):
    # Well-formed random states under the attacker's own address: the workers take
    # updates only from the run's peers, so none of them even reaches the filter.
    client, attacker = clusters
    X = _blobs(100_000)
    dropped_before = client.run(_dropped)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fitting = pool.submit(KMeans(10, max_epochs=6, tol=None, comm_interval=16384, message_size=1 << 20,
                                     random_state=0, client=client).fit, X)
        try:
            attacker.start(find_run(client, timeout=60), ["random"], rate=100.0, pose_as_peer=False)
        finally:
            h = fitting.result().history_
            stats = attacker.stop()
    assert stats["delivered"] > 0, stats
    assert int(h.malformed.isel(time=-1).sum()) > 0  # dropped by the workers, as not from a peer
    after = client.run(_dropped)
    assert all(after[w].get("malformed", 0) == dropped_before[w].get("malformed", 0) for w in after)  # not by the channel
