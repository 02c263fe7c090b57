"""How much a hostile peer slows training: clean and attacked fits side by side on one
cluster, the attacker sending random states at a multiple of a worker's normal rate.

Run it with ``python -m dask_asgd.testing.bench_poison`` (about 2 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass

import dask
import numpy as np
from distributed import Client, LocalCluster

from ..estimators import LogisticRegression
from .poison import Attacker, find_run

# The attacker ignores the channel's politeness: many sends in flight to each target.
ATTACKER_IN_FLIGHT = 16


@dataclass
class Curve:
    """One worker's loss against its own samples, and its messages sent, over time."""

    seconds: list[float]
    samples: list[float]
    loss: list[float]
    sent: list[float]

    def samples_to(self, target: float) -> float:
        """The worker's samples when its loss first reached ``target``; inf if never."""
        return self._crossing(target, self.samples)

    def seconds_to(self, target: float) -> float:
        return self._crossing(target, self.seconds)

    def _crossing(self, target: float, axis: list[float]) -> float:
        # Between the history rows around the first crossing, linearly.
        loss = np.asarray(self.loss)
        hit = np.nonzero(loss <= target)[0]
        if not hit.size:
            return math.inf
        i = hit[0]
        if i == 0:
            return axis[0]
        share = (loss[i - 1] - target) / (loss[i - 1] - loss[i])
        return axis[i - 1] + share * (axis[i] - axis[i - 1])

    def loss_at(self, samples: float) -> float:
        return float(np.interp(samples, self.samples, self.loss))

    def sent_between(self, start: float, stop: float) -> float:
        return float(np.interp(stop, self.seconds, self.sent) - np.interp(start, self.seconds, self.sent))


@dataclass
class Run:
    attacked: bool
    curves: list[Curve]  # per worker, in the order of history_.worker
    accepted: int
    rejected: int
    malformed: int
    t0: float  # wall clock at history_ time 0
    attack: dict | None = None  # the attacker's counts

    @property
    def seconds(self) -> float:
        return max(c.seconds[-1] for c in self.curves)

    def mean_curve(self, points: int = 512) -> Curve:
        """The workers' mean loss against each worker's own samples (a worker slowed by
        the machine is compared at its own progress), with the mean seconds to them."""
        grid = np.linspace(0.0, min(c.samples[-1] for c in self.curves), points)

        def mean(name):
            return np.mean([np.interp(grid, c.samples, getattr(c, name)) for c in self.curves], axis=0).tolist()

        return Curve(mean("seconds"), grid.tolist(), mean("loss"), mean("sent"))

    def honest_rate(self) -> float:
        """Messages/s one worker sent, on average over the run."""
        return statistics.mean(c.sent[-1] for c in self.curves) / self.seconds

    def attack_factor(self) -> float:
        """Messages the attacker delivered to each worker while it ran, over the
        messages each worker sent in that time: its rate as a multiple of the normal one."""
        start = self.attack["start"] - self.t0
        stop = start + self.attack["seconds"]
        honest = statistics.mean(c.sent_between(start, stop) for c in self.curves)
        return self.attack["delivered"] / len(self.attack["targets"]) / max(honest, 1.0)


def make_problem(n_samples: int = 200_000, n_features: int = 50, n_classes: int = 4, seed: int = 0):
    """Gaussian classes whose means overlap: a loss that keeps falling for many epochs."""
    rng = np.random.default_rng(seed)
    means = rng.normal(scale=0.5, size=(n_classes, n_features))
    y = rng.integers(n_classes, size=n_samples)
    return means[y] + rng.normal(size=(n_samples, n_features)), y


def estimator(client: Client, max_epochs: int, seed: int) -> LogisticRegression:
    # Fixed exchange settings: the balancer would answer the attacker's CPU load,
    # and this measures the filter, not the balancer.
    return LogisticRegression(
        learning_rate=0.01, max_epochs=max_epochs, tol=None, comm_interval=32768, message_size=1 << 20,
        random_state=seed, client=client,
    )


def fit_once(client: Client, X, y, max_epochs: int, seed: int, attacker: Attacker | None = None,
             rate: float = 0.0, kinds=("random",)) -> Run:
    """One fit; with an attacker, poison from the moment the run's workers subscribe."""
    est = estimator(client, max_epochs, seed)
    attack = None
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fitting = pool.submit(est.fit, X, y)
        if attacker is not None:
            try:
                target = find_run(client, timeout=60)
                attacker.start(target, kinds, rate=rate, seed=seed)
            finally:
                est = fitting.result()
                attack = attacker.stop() if attacker.running else None
        else:
            est = fitting.result()
    return summarise(est.history_, attacker is not None, attack)


def summarise(h, attacked: bool, attack: dict | None) -> Run:
    curves = []
    for worker in h.worker.values:
        w = h.sel(worker=worker).dropna("time", subset=["samples"])
        # Rows where the worker had not moved on repeat its last values: keep the first.
        moved = np.r_[True, np.diff(w.samples.values) > 0]
        w = w.isel(time=moved)
        curves.append(Curve(w.time.values.tolist(), w.samples.values.tolist(), w.loss.values.tolist(),
                            w.messages_sent.values.tolist()))
    last = h.isel(time=-1)
    return Run(
        attacked=attacked, curves=curves, accepted=int(last.accepted.sum()), rejected=int(last.rejected.sum()),
        malformed=int(last.malformed.sum()), t0=float(h.attrs["t0"]), attack=attack,
    )


def compare(clean: list[Run], attacked: list[Run], fraction: float = 0.2) -> dict:
    """Slowdown to a target, pair by pair (the same seed: the same rows per worker, the
    same batch order, the same loss rows), on the workers' mean loss curve.

    Each pair's target is the loss its clean fit reached at ``fraction`` of its samples
    (while the loss still falls); the slowdown is the attacked fit's samples (or
    seconds) to that target over the clean fit's. The summary holds the medians.
    """
    rows = []
    for c_run, a_run in zip(clean, attacked):
        c, a = c_run.mean_curve(), a_run.mean_curve()
        target = c.loss_at(fraction * c.samples[-1])
        rows.append({
            "target_loss": target,
            "samples_clean": c.samples_to(target),
            "samples_attacked": a.samples_to(target),
            "slowdown_samples": a.samples_to(target) / c.samples_to(target),
            "seconds_clean": c.seconds_to(target),
            "seconds_attacked": a.seconds_to(target),
            "slowdown_seconds": a.seconds_to(target) / c.seconds_to(target),
            "final_loss_clean": c.loss[-1],
            "final_loss_attacked": a.loss[-1],
            "final_loss_ratio": a.loss[-1] / c.loss[-1],
            "attack_factor": a_run.attack_factor(),
            "attack_vs_clean_rate": a_run.attack["delivered"] / a_run.attack["seconds"]
            / len(a_run.attack["targets"]) / c_run.honest_rate(),
            "rejected_clean": c_run.rejected,
            "rejected_attacked": a_run.rejected,
            "accepted_clean": c_run.accepted,
            "accepted_attacked": a_run.accepted,
        })
    summary = {name: statistics.median(r[name] for r in rows) for name in rows[0]}
    summary["all_reached_target"] = all(math.isfinite(r["samples_attacked"]) for r in rows)
    return {"summary": summary, "rows": rows}


def measure(repeats: int = 5, factor: float = 10.0, max_epochs: int = 30, n_workers: int = 2) -> dict:
    """Clean and attacked fits alternating, ``repeats`` of each, on one cluster."""
    X, y = make_problem()
    with dask.config.set({"asgd.engine.history-interval": 0.1}), LocalCluster(n_workers=n_workers, threads_per_worker=1, dashboard_address=":0") as lc, Client(lc) as client:
        with dask.config.set({"asgd.channel.max-in-flight-per-peer": ATTACKER_IN_FLIGHT}):
            hostile = LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=":0")
        with hostile, Client(hostile) as bad:
            attacker = Attacker(bad)
            clean, attacked = [], []
            for seed in range(repeats):
                clean.append(fit_once(client, X, y, max_epochs, seed))
                # Aimed above the factor: under load the attacker falls behind.
                rate = 1.5 * factor * clean[-1].honest_rate()
                attacked.append(fit_once(client, X, y, max_epochs, seed, attacker, rate))
                print(f"repeat {seed}: attack factor {attacked[-1].attack_factor():.1f}, "
                      f"rejected clean {clean[-1].rejected} attacked {attacked[-1].rejected}", flush=True)
    return {**compare(clean, attacked), "clean": [asdict(r) for r in clean], "attacked": [asdict(r) for r in attacked]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--factor", type=float, default=10.0, help="attack rate / a worker's normal send rate")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--json", help="write all runs here")
    args = parser.parse_args(argv)
    start = time.time()
    result = measure(args.repeats, args.factor, args.epochs)
    for row in result["rows"]:
        print(" ".join(f"{k}={v:.4g}" for k, v in row.items()))
    for key, value in result["summary"].items():
        print(f"{key:36s} {value:.4g}" if isinstance(value, float) else f"{key:36s} {value}")
    print(f"({time.time() - start:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
