"""Engine behaviour on a real cluster: no barrier in asgd mode, the filter at work."""

import os
import signal
import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest
import sklearn.linear_model
from distributed import Client, LocalCluster
from sklearn.datasets import make_classification

from dask_asgd import KMeans, LogisticRegression


@contextmanager
def one_slow_worker(client, running=1 / 3, period=0.03):
    """Make worker 1 really slow: stop and continue its process so that it runs
    ``running`` of each ``period`` (what cpulimit does). Unlike CPU hogs on a
    pinned core, this holds whatever else loads the machine."""
    pids = client.run(os.getpid)
    fast, slow = sorted(pids)
    done = threading.Event()

    def duty_cycle():
        while not done.is_set():
            os.kill(pids[slow], signal.SIGSTOP)
            time.sleep(period * (1 - running))
            os.kill(pids[slow], signal.SIGCONT)
            time.sleep(period * running)

    limiter = threading.Thread(target=duty_cycle, daemon=True)
    limiter.start()
    try:
        yield fast, slow
    finally:
        done.set()
        limiter.join()
        os.kill(pids[slow], signal.SIGCONT)


def test_asgd_has_no_barrier_sync_has_one(client):
    X = np.random.default_rng(0).normal(size=(40_000, 8))
    common = dict(random_state=0, max_epochs=100_000, max_time=6.0, tol=None, comm_interval=4096, client=client)
    with one_slow_worker(client) as (fast, slow):
        asgd = KMeans(4, mode="asgd", **common).fit(X).history_
        sync = KMeans(4, mode="sync", **common).fit(X).history_

    a_fast, a_slow = (asgd.samples.sel(worker=w).dropna("time") for w in (fast, slow))
    # The fast worker keeps going at its own pace: its count rises through the
    # whole run and ends well ahead of the slow one.
    assert (np.diff(a_fast.values[len(a_fast) // 2:]) > 0).all()
    assert float(a_fast[-1]) > 1.8 * float(a_slow[-1]), (float(a_fast[-1]), float(a_slow[-1]))
    # Under sync both wait for each other at every barrier: equal counts.
    s_fast, s_slow = (float(sync.samples.sel(worker=w).dropna("time")[-1]) for w in (fast, slow))
    assert abs(s_fast - s_slow) <= 4096, (s_fast, s_slow)


def test_parzen_filter_accepts_and_rejects_on_a_cluster(client):
    X, y = make_classification(40_000, 20, n_informative=10, random_state=0)
    # Trained by time, not epochs: five epochs take each worker ~30 ms, and under
    # load the two might then not overlap at all.
    est = LogisticRegression(random_state=0, comm_interval=1024, max_epochs=10_000, max_time=2.0, tol=None, client=client).fit(X, y)
    last = est.history_.isel(time=-1)
    assert int(last.accepted.sum()) > 0 and int(last.rejected.sum()) > 0
    # Every received state was judged exactly once by the filter.
    assert int((last.accepted + last.rejected).sum()) <= int(last.messages_delivered.sum())


def test_no_filter_accepts_everything(client):
    X, y = make_classification(40_000, 20, n_informative=10, random_state=0)
    est = LogisticRegression(random_state=0, comm_interval=1024, max_epochs=10_000, max_time=2.0, tol=None,
                             update_filter=None, client=client).fit(X, y)
    last = est.history_.isel(time=-1)
    assert int(last.accepted.sum()) > 0 and int(last.rejected.sum()) == 0


def test_cpu_spent_communicating_is_measured_and_grows_with_messages(client):
    # The balancer holds the CPU share spent communicating near its target:
    # the share must be there, within the process's CPU, and fall when
    # messages are 64 times rarer (over the fit's second half: its start,
    # connections and first tasks, costs the event loop alike either way).
    X, y = make_classification(40_000, 20, n_informative=10, random_state=0)
    shares = {}
    for interval in (256, 16384):
        est = LogisticRegression(random_state=0, comm_interval=interval, max_epochs=10_000, max_time=3.0, tol=None,
                                 client=client).fit(X, y)
        h = est.history_.dropna("time")
        cpu, compute, comm = (h[name].values for name in ("cpu_seconds", "compute_cpu_seconds", "comm_cpu_seconds"))
        assert (compute[-1] > 0).all() and (comm[-1] > 0).all(), (compute[-1], comm[-1])
        # clock granularity (the thread clocks tick in ms or finer) on top
        assert (compute + comm <= cpu * 1.02 + 0.02).all(), (cpu[-1], compute[-1], comm[-1])
        half = len(cpu) // 2
        shares[interval] = float(((comm[-1] - comm[half]) / (cpu[-1] - cpu[half])).mean())
    # Measured 0.61 against 0.24 (the event loop's other work on this
    # cluster is the larger part at 16384).
    assert shares[256] > 1.5 * shares[16384], shares


def test_message_slices_cover_the_state(client):
    # 10 centres x 8 features = 80 parameters; at most 32 a message: the state
    # goes in 2**2 = 4 equal slices of 20, round-robin.
    X = np.random.default_rng(1).normal(size=(20_000, 8))
    est = KMeans(10, random_state=0, message_size=32, comm_interval=512, max_epochs=10_000, max_time=2.0, tol=None,
                 client=client).fit(X)
    last = est.history_.isel(time=-1)
    assert (last.message_size == 20).all()
    np.testing.assert_array_equal(last.bytes_sent.values, last.messages_delivered.values * 20 * 8)
    assert int((last.accepted + last.rejected).sum()) > 0


def test_worker_joining_mid_fit_takes_part_from_a_peers_state():
    # A worker that joins while a fit runs gets the channel (worker plugins reach
    # late joiners), rows off the busiest worker and that worker's current state.
    import threading

    from distributed import Client, LocalCluster

    X, y = make_classification(40_000, 10, random_state=0)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        with Client(cluster) as client:
            result = {}

            def fit():
                result["est"] = LogisticRegression(random_state=0, max_epochs=100_000, max_time=8.0, tol=None, client=client).fit(X, y)

            training = threading.Thread(target=fit)
            training.start()
            before = set(client.scheduler_info()["workers"])
            cluster.scale(3)
            client.wait_for_workers(3, timeout=60)
            training.join(timeout=120)
            newcomer = (set(client.scheduler_info()["workers"]) - before).pop()
            has_channel = client.run(lambda dask_worker: "dask-asgd-channel" in dask_worker.plugins, workers=[newcomer])
    est = result["est"]
    h = est.history_
    assert has_channel == {newcomer: True}
    assert set(h.stop_reason.values) == {"max_time"}
    assert list(h.event.values) == ["joined"] and h.event_worker.values[0] == newcomer
    mine = h.sel(worker=newcomer).dropna("time", subset=["loss"])
    assert float(mine.samples[-1]) > 0
    # It started from a peer's trained state, not from the initial one.
    first_loss = float(h.loss.isel(time=0).max())
    assert float(mine.loss[0]) < first_loss, (float(mine.loss[0]), first_loss)
    reference = sklearn.linear_model.LogisticRegression().fit(X, y).score(X, y)
    assert est.score(X, y) >= reference - 0.01


def test_sync_workers_stop_in_the_same_round(client):
    # A peer one round ahead overwrites its previous message before it is read;
    # its stop flag used to end the lagging worker a round early, and the other
    # then waited out the barrier's timeout (30 s) for a message that never came.
    X, y = make_classification(100_000, 16, random_state=0)
    for seed in range(5):
        start = time.perf_counter()
        h = LogisticRegression(mode="sync", max_time=1.0, tol=None, max_epochs=1000, random_state=seed,
                               client=client).fit(X, y).history_
        assert time.perf_counter() - start < 20
        assert set(h.stop_reason.values) == {"max_time"}
        sent = h.messages_sent.isel(time=-1).values
        assert sent[0] == sent[1] > 0, sent  # the same number of rounds on both


def test_initial_state_does_not_depend_on_where_the_rows_are(client):
    # One seed picks the same sample rows, in the same order, on any placement.
    # When each worker drew from its own rows, one seed gave K-Means initial
    # states +0.02%, +0.30% and +1.71% over the optimum on three clusters.
    from dask_asgd.datasets import make_blobs
    from dask_asgd.engine._chains import worker_addresses
    from dask_asgd.engine._data import place
    from dask_asgd.engine._driver import _initial_state
    from dask_asgd.models.kmeans import KMeansModel

    X = make_blobs(30_000, 4, 20, chunk_rows=5_000, random_state=0)[0]
    workers = sorted(worker_addresses(client))
    model = KMeansModel(n_clusters=20, n_features=4)
    placements = [(X, workers), (X, workers[::-1]), (X, workers[:1]), (X.compute(), workers), (X.compute(), workers[1:])]
    states = []
    for data, on in placements:
        shards = place(client, data, None, on)
        states.append(client.gather(_initial_state(client, model, shards, seed=3))[0])
    for state in states[1:]:
        np.testing.assert_array_equal(state, states[0])
    # And another seed picks other rows.
    shards = place(client, X, None, workers)
    other = client.gather(_initial_state(client, model, shards, seed=4))[0]
    assert not np.array_equal(other, states[0])


def test_training_keeps_the_allocator_from_mapping_memory_every_step():
    """Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, which also
    fixes glibc's mmap threshold at 128 KiB: a step's temporaries of that size or
    more are then mapped and unmapped, page by page, every step (K-Means with 64
    centres x 32 features ran at 0.44 instead of 1.2 million samples/s). While a
    worker trains, the thresholds are raised; afterwards they are the worker's own."""
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's allocator thresholds: Linux only")

    def page_faults_per_step(raised: bool) -> float:
        import contextlib
        import resource

        from dask_asgd.engine._allocator import thresholds_raised

        with thresholds_raised() if raised else contextlib.nullcontext():
            np.ones(20_000)
            before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
            for _ in range(200):
                temporary = np.ones(20_000)  # 160 KB, like a step's distance matrix
                del temporary
            return (resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before) / 200

    # A fresh worker: after a fit, the freed temporaries sit in the allocator's free
    # lists and serve such requests without new pages, raised or not.
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        assert set(client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_")).values()) == {"65536"}
        faults = [client.submit(page_faults_per_step, raised, pure=False).result() for raised in (False, True, False)]
    assert faults[0] >= 20, faults  # 160 KB is 40 pages, mapped anew every step
    assert faults[1] < 2, faults
    assert faults[2] >= 20, faults  # the worker's own thresholds are back
