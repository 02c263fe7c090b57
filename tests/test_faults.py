"""Worker loss mid-fit, for real: a worker process is killed with SIGKILL while it
trains; its nanny starts a new one. The fit must finish, train every row, and
say in ``history_`` what happened."""

import os
import signal
import threading
import time

import dask
import numpy as np
import pytest
import sklearn.cluster
from distributed import Client, LocalCluster, wait
from sklearn.datasets import make_blobs

from dask_asgd import KMeans
from dask_asgd.datasets import make_blobs as dask_blobs
from dask_asgd.engine._chains import fetch_result, worker_addresses


def _training_started(client) -> bool:
    def runs(dask_scheduler):
        monitor = dask_scheduler.plugins.get("dask-asgd-monitor")
        return 0 if monitor is None else sum(len(run.workers) for run in monitor.runs.values())
    return client.run_on_scheduler(runs) > 0


def _fit_and_kill(client, est, X, after: float):
    """Fit in a thread; SIGKILL one worker process ``after`` seconds into training.
    Returns the fitted estimator, the killed worker's address, and the fit's wall time."""
    result = {}

    def fit():
        start = time.perf_counter()
        try:
            result["est"] = est.fit(X)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            result["error"] = e
        result["seconds"] = time.perf_counter() - start

    pids = client.run(os.getpid)
    victim = sorted(pids)[-1]
    training = threading.Thread(target=fit)
    training.start()
    deadline = time.time() + 120
    while not _training_started(client) and time.time() < deadline and training.is_alive():
        time.sleep(0.1)
    time.sleep(after)
    os.kill(pids[victim], signal.SIGKILL)
    training.join(timeout=240)
    assert not training.is_alive(), "the fit did not finish after a worker was killed"
    if "error" in result:
        raise result["error"]
    return result["est"], victim, result["seconds"]


@pytest.fixture
def cluster3():
    with LocalCluster(n_workers=3, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        with Client(cluster) as client:
            yield client


def test_asgd_fit_survives_a_killed_worker_and_takes_in_its_restart(cluster3):
    X, _ = make_blobs(60_000, 8, centers=10, random_state=5)
    est = KMeans(10, random_state=0, max_epochs=100_000, max_time=10.0, tol=None, client=cluster3)
    est, victim, seconds = _fit_and_kill(cluster3, est, X, after=2.0)
    h = est.history_
    events = list(zip(h.event.values, h.event_worker.values))
    assert ("lost", victim) in events
    # Its nanny started a new worker process, which joined the fit.
    joined = [w for e, w in events if e == "joined"]
    assert joined and victim not in joined
    newcomer = h.sel(worker=joined[0]).dropna("time", subset=["samples"])
    assert float(newcomer.samples[-1]) > 0
    # The victim's columns end at its loss; every other worker ran to the time limit.
    lost_at = float(h.event_time.values[list(h.event.values).index("lost")])
    assert h.samples.sel(worker=victim).sel(time=slice(lost_at + 0.5, None)).isnull().all()
    assert h.stop_reason.sel(worker=victim) == "lost"
    assert set(h.stop_reason.drop_sel(worker=victim).values) == {"max_time"}
    assert seconds < 60
    reference = sklearn.cluster.KMeans(10, n_init=10, random_state=0).fit(X).inertia_
    assert -est.score(X) <= 1.02 * reference


def test_sync_barrier_goes_on_without_a_killed_worker(cluster3):
    # Rows of a dask array: the lost worker's chunks are computed again from
    # their graph, on the survivor that takes them over.
    X, _ = dask_blobs(60_000, 8, 10, chunk_rows=10_000, random_state=5)
    with dask.config.set({"asgd.engine.sync-timeout": 300.0}):
        est = KMeans(10, mode="sync", random_state=0, max_epochs=100_000, max_time=8.0, tol=None, client=cluster3)
        est, victim, seconds = _fit_and_kill(cluster3, est, X, after=2.0)
    h = est.history_
    assert list(h.event.values) == ["lost", "adopted"] and h.event_worker.values[0] == victim
    assert h.event_worker.values[1] != victim  # a survivor trains the lost rows, once they exist again
    # Far less than the barrier's timeout: the survivors dropped the dead peer at once.
    assert seconds < 60
    survivors = h.drop_sel(worker=victim)
    assert set(survivors.stop_reason.values) == {"max_time"}
    lost_at = float(h.event_time.values[0])
    after = survivors.samples.sel(time=slice(lost_at + 1.0, None))
    assert (after.isel(time=-1) > after.isel(time=0)).all()  # the barrier kept turning
    Xc = X.compute()
    reference = sklearn.cluster.KMeans(10, n_init=10, random_state=0).fit(Xc).inertia_
    assert -est.score(Xc) <= 1.02 * reference
    assert np.isfinite(est.cluster_centers_).all()


def test_a_result_lost_with_its_worker_does_not_hang_the_fit(cluster3):
    # The race behind a sync fit that hung in CI, made on purpose: a link finished
    # on a worker that died before the client fetched its result. The scheduler
    # asks for the result again, but only the dead worker may compute it.
    client = cluster3
    pids = client.run(os.getpid)
    victim = sorted(pids)[-1]
    future = client.submit(np.arange, 1000, workers=[victim], allow_other_workers=False, pure=False)
    wait(future)
    assert future.status == "finished"
    os.kill(pids[victim], signal.SIGKILL)
    deadline = time.time() + 30
    while victim in worker_addresses(client) and time.time() < deadline:
        time.sleep(0.1)
    assert victim not in worker_addresses(client)
    with pytest.raises(TimeoutError):
        future.result(timeout=5)  # a plain wait never ends

    def gone():
        return victim not in worker_addresses(client)

    start = time.perf_counter()
    assert fetch_result(future, gone) is None
    assert time.perf_counter() - start < 10
    # A live worker's result still comes back whole.
    survivor = sorted(worker_addresses(client))[0]
    kept = client.submit(np.arange, 1000, workers=[survivor], allow_other_workers=False, pure=False)
    np.testing.assert_array_equal(fetch_result(kept, lambda: False), np.arange(1000))
