"""Parallel efficiency of the engine: asgd samples/s with N workers divided by
N x the same model's single-process loop in plain NumPy at the same batch size."""

from __future__ import annotations

import json
import multiprocessing
import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np
from distributed import Client, LocalCluster
from threadpoolctl import threadpool_limits

from .engine._allocator import thresholds_raised
from .estimators import KMeans, LogisticRegression
from .models import KMeansModel, LogisticModel


@dataclass
class Problem:
    name: str
    n_samples: int
    n_features: int
    n_classes: int  # clusters for K-Means, classes for logistic regression


PROBLEMS = {
    "kmeans": Problem("kmeans", 200_000, 16, 20),
    "logistic": Problem("logistic", 200_000, 32, 2),
}


def make_data(problem: Problem, seed: int = 0):
    rng = np.random.default_rng(seed)
    if problem.name == "kmeans":
        centers = rng.normal(scale=10.0, size=(problem.n_classes, problem.n_features))
        labels = rng.integers(problem.n_classes, size=problem.n_samples)
        return centers[labels] + rng.normal(size=(problem.n_samples, problem.n_features)), None
    X = rng.normal(size=(problem.n_samples, problem.n_features))
    w = rng.normal(size=problem.n_features)
    y = (X @ w + rng.normal(size=problem.n_samples) > 0).astype(np.int64)
    return X, y


def single_process_rate(problem: Problem, X, y, batch_size: int, seconds: float) -> float:
    """Samples/s of the model's own step in a bare loop: one process, one thread."""
    if problem.name == "kmeans":
        model = KMeansModel(problem.n_classes, problem.n_features)
        params, aux = model.init_params(X[:20_000], None, np.random.default_rng(0))
    else:
        model = LogisticModel(problem.n_features, problem.n_classes)
        params, aux = model.init_params(X, y, np.random.default_rng(0))
    rng = np.random.default_rng(0)
    order, pos, steps = rng.permutation(X.shape[0]), 0, 0
    with threadpool_limits(1):
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            idx = order[pos:pos + batch_size]
            pos += batch_size
            if pos + batch_size > X.shape[0]:
                order, pos = rng.permutation(X.shape[0]), 0
            params, aux = model.step(params, aux, X[idx], None if y is None else y[idx], 0.1 if y is not None else 1.0)
            steps += 1
        elapsed = time.perf_counter() - start
    return steps * batch_size / elapsed


def _bare_loop(problem: Problem, batch_size: int, seconds: float, barrier, results) -> None:
    X, y = make_data(problem)
    barrier.wait()  # all loops start together: none runs alone for part of its time
    # A LocalCluster sets the nanny's MALLOC_TRIM_THRESHOLD_ in its parent's
    # environment, so a process spawned after one starts inherits it (measured:
    # K-Means 64 x 32 at 0.56 of its speed): raise the thresholds as training workers do.
    with thresholds_raised():
        results.put(single_process_rate(problem, X, y, batch_size, seconds))


def side_by_side_rate(problem: Problem, batch_size: int, seconds: float, n: int) -> float:
    """Samples/s of ``n`` bare single-process loops run at once in ``n`` processes,
    summed: what this machine gives ``n`` copies of the loop with no Dask and no
    exchange, the ceiling of the cluster's efficiency on it."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_bare_loop, args=(problem, batch_size, seconds, barrier, results), daemon=True)
             for _ in range(n)]
    for proc in procs:
        proc.start()
    try:
        return sum(results.get(timeout=seconds + 120) for _ in procs)
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()


def asgd_rate(problem: Problem, X, y, client: Client, batch_size: int, seconds: float, mode: str = "asgd") -> float:
    """Steady-state samples/s of all workers together, read from ``history_``."""
    common = dict(mode=mode, batch_size=batch_size, max_epochs=10_000, max_time=seconds, tol=None, client=client, random_state=0)
    if problem.name == "kmeans":
        est = KMeans(problem.n_classes, **common).fit(X)
    else:
        est = LogisticRegression(**common).fit(X, y)
    h = est.history_
    rate = 0.0
    for worker in h.worker.values:
        w = h.sel(worker=worker).dropna("time", subset=["samples"])
        # From the first row with samples to the last: start-up and placement excluded.
        busy = w.where(w.samples > 0, drop=True)
        rate += float(busy.samples[-1] - busy.samples[0]) / float(busy.elapsed[-1] - busy.elapsed[0])
    return rate


def run(n_workers: int = 2, repeats: int = 3, seconds: float = 6.0, batch_size: int = 256, problems=("kmeans", "logistic")) -> list[dict]:
    results = []
    with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, Client(cluster) as client:
        for name in problems:
            problem = PROBLEMS[name]
            X, y = make_data(problem)
            rates: dict[str, list[float]] = {"single": [], "asgd": [], "simuparallel": []}
            ratios: dict[str, list[float]] = {"asgd": [], "simuparallel": []}
            ceilings: list[float] = []
            for _ in range(repeats):
                # The machine's own limit: n bare loops at once, beside one alone.
                alone = single_process_rate(problem, X, y, batch_size, seconds / 2)
                ceilings.append(side_by_side_rate(problem, batch_size, seconds / 2, n_workers) / (n_workers * alone))
                for mode in ("asgd", "simuparallel"):
                    # Side by side: the baseline just before and just after each
                    # cluster run, so a noisy neighbour hits both sides alike.
                    before = single_process_rate(problem, X, y, batch_size, seconds / 2)
                    rate = asgd_rate(problem, X, y, client, batch_size, seconds, mode=mode)
                    after = single_process_rate(problem, X, y, batch_size, seconds / 2)
                    base = (before + after) / 2
                    rates["single"].append(base)
                    rates[mode].append(rate)
                    ratios[mode].append(rate / (n_workers * base))
            results.append({
                **asdict(problem), "n_workers": n_workers, "batch_size": batch_size, "repeats": repeats,
                "single_process_samples_per_s": statistics.median(rates["single"]),
                "asgd_samples_per_s": statistics.median(rates["asgd"]),
                "efficiency_median": statistics.median(ratios["asgd"]),
                "efficiency_all": ratios["asgd"],
                "simuparallel_efficiency_median": statistics.median(ratios["simuparallel"]),
                "side_by_side_median": statistics.median(ceilings),
                "side_by_side_all": ceilings,
            })
    return results


def format_table(results: list[dict]) -> str:
    lines = [
        ("| problem | workers | batch | 1-process samples/s | asgd samples/s | asgd efficiency | "
         "simuparallel efficiency (no exchange) | bare loops side by side (no Dask) |"),
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['name']} {r['n_samples']}x{r['n_features']} | {r['n_workers']} | {r['batch_size']} | "
            f"{r['single_process_samples_per_s']:,.0f} | {r['asgd_samples_per_s']:,.0f} | "
            f"{r['efficiency_median']:.2f} | {r['simuparallel_efficiency_median']:.2f} | {r['side_by_side_median']:.2f} |"
        )
    n = results[0]["n_workers"]
    lines.append(f"\nMedians of {results[0]['repeats']} repeats; efficiency = samples/s over {n} x the single-process loop. "
                 f"Side by side: {n} bare loops in {n} processes at once, over {n} x one alone (the machine's ceiling).")
    return "\n".join(lines)


def main(args) -> int:
    results = run(n_workers=args.workers, repeats=args.repeats, seconds=args.seconds, batch_size=args.batch_size)
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0
