"""The balancer on a real emulated network: workers in their own network
namespaces with tbf-limited links (dask_asgd.testing.netem). CI runs these as
root and must not skip them."""

import os
import threading
import time

import dask
import numpy as np
import pytest

from dask_asgd import KMeans
from dask_asgd.datasets import make_blobs
from dask_asgd.testing.netem import EmulatedCluster, NetemUnavailable, check_available

pytestmark = pytest.mark.netem

try:
    check_available()
    REASON = None
except NetemUnavailable as exc:
    REASON = str(exc)


def _require_netem():
    if REASON:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the network-emulation tests: {REASON}")
        pytest.skip(f"network emulation unavailable: {REASON}")


@pytest.fixture(scope="module")
def emulated():
    _require_netem()
    with EmulatedCluster(n_workers=2, rate=None) as cluster, cluster.client() as client:
        yield cluster, client


def _fit(client, seconds):
    # 500 centres x 32 features: a 128 KB state in float64. The rows are made on
    # the workers and the init sample is small: nothing large crosses a shaped link.
    X, _ = make_blobs(40_000, 32, 50, chunk_rows=10_000, random_state=0)
    with dask.config.set({"asgd.init.sample-size": 2000}):
        est = KMeans(500, random_state=0, max_epochs=100_000, max_time=seconds, tol=None, client=client)
        return est.fit(client.persist(X)).history_


def _settled_interval(h, start, stop):
    """Median over workers of each worker's median interval between two times."""
    window = h.comm_interval.sel(time=slice(start, stop))
    return float(np.nanmedian(window.median("time").values))


def test_low_rate_raises_the_interval(emulated):
    cluster, client = emulated
    cluster.set_rate(None)
    unshaped = _fit(client, 10.0)
    cluster.set_rate("1mbit")
    try:
        shaped = _fit(client, 10.0)
    finally:
        cluster.set_rate(None)
    free, slow = _settled_interval(unshaped, 5, 10), _settled_interval(shaped, 5, 10)
    assert slow >= 2 * free, (free, slow)
    # Bandwidth-bound: slices instead of the whole 16000-parameter state.
    assert float(shaped.message_size.isel(time=-1).max()) < 16_000, list(zip(shaped.adjustment_worker.values, shaped.adjustment_time.values.round(1), shaped.adjustment_message_size.values, shaped.adjustment_reason.values))
    assert shaped.sizes["adjustment"] >= 1


def test_adapts_within_five_seconds_of_a_rate_drop(emulated):
    cluster, client = emulated

    def _trained_seconds(dask_scheduler):
        # How long each run has been training, from its workers' reports. Nested,
        # so it is pickled by value: the scheduler process cannot import tests.
        monitor = dask_scheduler.plugins.get("dask-asgd-monitor")
        if monitor is None:
            return {}
        return {run_id: min(t.last["elapsed"] for t in run.workers.values())
                for run_id, run in monitor.runs.items() if run.workers}

    cluster.set_rate("100mbit")
    earlier_runs = set(client.run_on_scheduler(_trained_seconds))
    result = {}
    training = threading.Thread(target=lambda: result.setdefault("h", _fit(client, 20.0)))
    training.start()
    try:
        # Drop the rate after 8 s of training, whatever the set-up took.
        deadline = time.time() + 300
        while time.time() < deadline and training.is_alive():
            runs = client.run_on_scheduler(_trained_seconds)
            if any(elapsed >= 8.0 for run_id, elapsed in runs.items() if run_id not in earlier_runs):
                break
            time.sleep(0.2)
        dropped_at = time.time()
        cluster.set_rate("1mbit")
        training.join(timeout=300)
    finally:
        cluster.set_rate(None)
    h = result["h"]
    drop = dropped_at - h.attrs["t0"]  # the drop on history_'s time axis
    assert 6 < drop < 14, drop
    # Within 5 s of the drop every worker has adapted: the law answers a lower
    # bandwidth with a longer interval, smaller slices, or both (at least 2x) ...
    window = slice(drop, drop + 5.0)
    for worker in h.worker.values:
        mine = (h.adjustment_worker.values == worker) & (h.adjustment_time.values > drop) & (h.adjustment_time.values <= drop + 5.0)
        assert mine.any(), f"{worker} made no adjustment within 5 s of the drop"
        w = h.sel(worker=worker)
        interval_before = float(w.comm_interval.sel(time=slice(drop - 3, drop)).median())
        size_before = float(w.message_size.sel(time=slice(drop - 3, drop)).median())
        longer = float(w.comm_interval.sel(time=window).max()) >= 2 * interval_before
        smaller = float(w.message_size.sel(time=window).min()) <= size_before / 2
        assert longer or smaller, (worker, interval_before, size_before, list(h.adjustment_reason.values[mine]))
    # ... and its sends in flight are back under the bound (2 per peer).
    late = h.in_flight.sel(time=slice(drop + 5.0, None))
    assert float(late.max()) <= 2


def test_the_benchmark_shapes_the_links_before_the_first_state_message(emulated):
    """``bench_balance.run_shaped``: set-up unshaped (it moves megabytes), the
    training shaped from its first state message on."""
    from dask_asgd.bench_balance import run_shaped

    cluster, client = emulated

    def first_state_sends(run_id, dask_scheduler=None):
        # Nested: pickled by value (the scheduler process cannot import tests).
        tracks = dask_scheduler.plugins["dask-asgd-monitor"].runs[run_id].workers
        return {w: next((s for r in t.reports for b, s in r["sends"] if b >= 1024), None) for w, t in tracks.items()}

    X = client.persist(make_blobs(40_000, 32, 50, chunk_rows=10_000, random_state=0)[0])

    def fit():
        with dask.config.set({"asgd.init.sample-size": 2000}):
            est = KMeans(500, random_state=0, comm_interval=2048, message_size=16_000, max_epochs=100_000,
                         max_time=2.0, tol=None, client=client)
            return est.fit(X).history_

    h = run_shaped(cluster, client, fit, [(0.0, "10mbit")], budget=2.0)
    firsts = client.run_on_scheduler(first_state_sends, h.attrs["run_id"])
    assert set(firsts) == set(h.worker.values)
    # A whole 128 KB state takes 0.1 s at 10 Mbit/s (a millisecond or two unshaped).
    for seconds in firsts.values():
        assert seconds is not None and seconds > 0.05, firsts


def test_a_fit_past_its_time_limit_is_reported_not_waited_for(emulated):
    """A fit whose worker left for good waits forever for its task (seen once
    across the drop to 5 Mbit/s): the benchmark stops with the processes' logs."""
    from dask_asgd.bench_balance import FitHung, run_shaped

    cluster, client = emulated
    release = threading.Event()
    started = time.time()
    try:
        with pytest.raises(FitHung, match=r"did not finish within 2 s(.|\n)*worker-0\.log"):
            run_shaped(cluster, client, lambda: release.wait(60), [(0.0, "10mbit")], budget=1.0, limit=2.0)
    finally:
        release.set()
    assert time.time() - started < 10
    assert all(host.rate is None for host in cluster.network.hosts)  # unshaped again


def test_a_fit_a_worker_left_runs_once_more_once_the_worker_is_back(emulated, capsys):
    """The benchmark's retry: a worker that exits mid-fit is started again and the
    fit runs once more, so one lost worker does not cost the benchmark."""
    import signal

    from dask_asgd import bench_balance

    cluster, client = emulated
    X = client.persist(make_blobs(40_000, 32, 50, chunk_rows=10_000, random_state=0)[0])
    make = lambda **kw: KMeans(500, update_filter=None, **kw)

    def training(dask_scheduler=None):
        monitor = dask_scheduler.plugins.get("dask-asgd-monitor")
        return 0 if monitor is None else len(monitor.runs)

    runs_before = client.run_on_scheduler(training)
    killer_done = threading.Event()

    def end_worker_1_once_training():
        try:
            deadline = time.time() + 120
            while client.run_on_scheduler(training) == runs_before and time.time() < deadline:
                time.sleep(0.1)
            time.sleep(1.0)  # well into training
            os.kill(cluster.pids["worker-1"], signal.SIGTERM)
        finally:
            killer_done.set()

    threading.Thread(target=end_worker_1_once_training, daemon=True).start()
    with dask.config.set({"asgd.init.sample-size": 2000}):
        h = bench_balance._trained(cluster, client, make, X, None, bench_balance.Setting(2048, 16_000),
                                   [(0.0, None)], 4.0, "retry test")
    assert killer_done.wait(5)
    assert "starting the workers that exited, to run it once more" in capsys.readouterr().out
    assert h.sizes["worker"] == 2  # both trained the whole fit (_trained checks no worker left)
    assert set(client.nthreads()) == set(cluster.worker_addresses)


def test_balance_benchmark_plumbing(tmp_path):
    """A tiny `dask-asgd bench balance`: it completes and writes what the README
    says (JSON records with medians over repeats, a markdown table, the plots)."""
    import json

    from dask_asgd import bench_balance

    _require_netem()
    only = [bench_balance.Setting("auto", "auto"), bench_balance.Setting(2048, 64_064)]
    records = bench_balance.run(tmp_path, quick=True, budget=1.5, problems=("logistic",),
                                regimes=("unshaped", "10mbit"), repeats=2, only=only)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(records))
    assert {(r["regime"], r["setting"]) for r in saved} == {
        (g, s.name) for g in ("unshaped", "10mbit") for s in only}
    for r in saved:
        assert r["repeats"] == 2 and len(r["times_to_target_s"]) == 2
        assert r["time_to_target_s"] == float(np.median(r["times_to_target_s"]))
        assert r["budget_s"] == 1.5 and np.isfinite(r["final_loss"])
        assert len(r["time"]) == len(r["loss"]) == len(r["comm_interval"]) >= 2  # a curve (rows every 0.1 s; fewer under load)
        # The machine's CPU over each fit: it trained for 1.5 s, so user time was spent.
        for cpu in r["repeat_machine_cpu_s"]:
            assert set(cpu) == set(bench_balance.MACHINE_CPU_KINDS) and cpu["user"] > 0.5
            assert all(v >= 0 for v in cpu.values())
    # The target lies between the best loss reached unshaped and the start.
    target = saved[0]["target_loss"]
    assert min(min(r["loss"]) for r in saved) < target < max(r["loss"][0] for r in saved)
    table = (tmp_path / "results.md").read_text()
    assert "| logistic | 10mbit | auto |" in table and "auto / best fixed" in table
    assert "auto / held-out best fixed" in table  # two repeats: the noise statistics too
    assert (tmp_path / "balance_logistic.png").stat().st_size > 10_000
