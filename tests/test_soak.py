"""Bounded resources under oversubscription: 8 worker processes on the machine's cores
(2 on the development machine), one long asgd fit with every default, watched from
the side. Memory per worker is stable after warm-up, sends in flight stay within the
channel's bound, nothing queues up, and training goes on to the end.

The default run soaks for 60 s; the full 5-minute soak is marked ``slow``:
``python -m pytest -m slow tests/test_soak.py -s`` (it prints its figures)."""

from __future__ import annotations

import numpy as np
import pytest
from distributed import Client, LocalCluster

from dask_asgd import config
from dask_asgd.channel._links import MAX_TOPICS
from dask_asgd.testing import soak

N_WORKERS = 8


@pytest.fixture(scope="module")
def cluster():
    lc = LocalCluster(n_workers=N_WORKERS, threads_per_worker=1, processes=True, dashboard_address=":0")
    with lc, Client(lc) as client:
        client.wait_for_workers(N_WORKERS)
        yield client


def _check(result: soak.Soak, seconds: float, warm_up: float) -> None:
    print()
    print(soak.report(result, warm_up))
    assert result.seconds[-1] >= 0.8 * seconds and len(result.seconds) >= 8, result.seconds

    # Memory: no worker grows by 10% or more after warm-up.
    growth = result.rss_growth(warm_up)
    assert len(growth) == N_WORKERS
    assert all(g < 0.10 for g in growth.values()), growth

    # Sends in flight never beyond the bound, on any link, at any time (looked at every 10 ms).
    limit = int(config.get("channel.max-in-flight-per-peer"))
    assert result.peak("limit") == limit
    assert result.peak("over_limit") <= 0
    assert 1 <= result.peak("in_flight") <= limit
    # No backlog: at most one waiting message per slot (the whole state, and a probe),
    # no send older than a few seconds, mailboxes at most one message per peer, and
    # the per-topic counts of a link bounded.
    assert result.peak("waiting") <= 2
    assert result.peak("oldest_s") < 5.0
    assert result.peak("unread") <= N_WORKERS - 1
    assert result.peak("topics") <= min(3, MAX_TOPICS)
    # A backlog would show as states superseded while waiting, more and more of them.
    superseded = [sum(look[w]["superseded"] for w in look) for look in result.looks]
    half = len(superseded) // 2
    assert superseded[-1] - superseded[half] <= max(10, 2 * (superseded[half] - superseded[0])), superseded

    # Every worker trained to the end, exchanging all along.
    h = result.history
    last = h.isel(time=-1)
    assert (h.stop_reason == "max_time").all()
    assert int(last.malformed.sum()) == 0
    quarter = h.time[-1] * 0.75
    late = h.sel(time=slice(float(quarter), None))
    for worker in h.worker.values:
        samples = late.samples.sel(worker=worker).dropna("time").values
        sent = late.messages_sent.sel(worker=worker).dropna("time").values
        assert samples[-1] > samples[0] and sent[-1] > sent[0], worker
    assert np.isfinite(last.loss).all()


@pytest.mark.timeout(240)
def test_soak_one_minute(cluster):
    result = soak.run(cluster, seconds=60, look_every=5)
    _check(result, 60, warm_up=15)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_soak_five_minutes(cluster):
    result = soak.run(cluster, seconds=300, look_every=10)
    _check(result, 300, warm_up=60)
