"""Automatic balancing against fixed settings on an emulated network: per regime
(unshaped, 100 Mbit/s, 10 Mbit/s, a drop from 100 to 5 Mbit/s mid-run), time to
a target loss and loss at the time budget for "auto" and a sweep of fixed
(interval, message size). Needs root (network namespaces, tc tbf)."""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import dask
import numpy as np

from .datasets import make_blobs
from .estimators import KMeans, LogisticRegression
from .testing.netem import EmulatedCluster

REGIMES = {
    "unshaped": [(0.0, None)],
    "100mbit": [(0.0, "100mbit")],
    "10mbit": [(0.0, "10mbit")],
    "drop-100-5": [(0.0, "100mbit"), (0.5, "5mbit")],  # (fraction of the budget, rate)
}


@dataclass(frozen=True)
class Setting:
    comm_interval: int | str
    message_size: int | str

    @property
    def name(self) -> str:
        return "auto" if self.comm_interval == "auto" else f"b={self.comm_interval},m={self.message_size}"


def settings(n_params: int, quick: bool) -> list[Setting]:
    intervals = (2048, 16384, 131072) if quick else (1024, 4096, 16384, 65536, 262144)
    sizes = (n_params, n_params // 16)
    return [Setting("auto", "auto")] + [Setting(b, m) for b in intervals for m in sizes]


def _problem(name: str, n_samples: int):
    # 64k parameters (512 KB in float64) for both: the 0.5-2 MB state.
    # Rows sorted by blob (class), so each worker holds different blobs: a
    # worker's state fits all the data (the shared evaluation rows history_'s
    # loss is measured on) only through what its peers send. With every worker
    # holding a fair sample instead, each converges alone and the network
    # hardly matters. No update filter: on such rows a worker's own step moves
    # away from its peers' states by construction, and the Parzen test rejects
    # nearly all of them (measured: 2 of 79 K-Means states, 0 of 304 logistic).
    if name == "kmeans":
        X, _ = make_blobs(n_samples, 64, 1000, chunk_rows=n_samples // 4, ordered=True, random_state=0)
        return X, None, lambda **kw: KMeans(1000, update_filter=None, **kw)
    X, y = make_blobs(n_samples, 1000, 64, cluster_std=8.0, chunk_rows=n_samples // 4, ordered=True, random_state=1)
    return X, y, lambda **kw: LogisticRegression(alpha=1e-4, learning_rate=0.05, update_filter=None, **kw)


def _run_one(cluster, client, make, X, y, setting: Setting, regime, budget: float):
    """One fit; the regime's rates are applied once training runs (set-up unshaped)."""

    def fit():
        est = make(comm_interval=setting.comm_interval, message_size=setting.message_size,
                   max_epochs=1_000_000, max_time=budget, tol=None, random_state=0, client=client)
        return (est.fit(X) if y is None else est.fit(X, y)).history_

    return run_shaped(cluster, client, fit, regime, budget)


def run_shaped(cluster, client, run, schedule, budget: float = 0.0):
    """``run()`` (a fit) in a thread, the links unshaped until its training starts,
    then at each ``(fraction of budget, rate)`` of ``schedule`` in turn; unshaped
    again afterwards. Returns what ``run()`` returns, or raises what it raised."""
    cluster.set_rate(None)
    result: dict = {}

    def target():
        try:
            result["value"] = run()
        except BaseException as e:  # noqa: BLE001 - raised again in the caller's thread
            result["error"] = e

    before = set(client.run_on_scheduler(_run_ids))
    training = threading.Thread(target=target)
    training.start()
    start = None
    while training.is_alive() and start is None:
        if set(client.run_on_scheduler(_run_ids)) - before:
            start = time.time()
        else:
            time.sleep(0.05)
    for fraction, rate in schedule if start is not None else ():
        while training.is_alive() and time.time() < start + fraction * budget:
            time.sleep(0.1)
        cluster.set_rate(rate)
    training.join()
    cluster.set_rate(None)
    if "error" in result:
        raise result["error"]
    return result["value"]


def _run_ids(dask_scheduler):
    monitor = dask_scheduler.plugins.get("dask-asgd-monitor")
    return [] if monitor is None else [r for r, run in monitor.runs.items() if run.workers]


def summarise(h, target: float) -> dict:
    """Mean loss over workers against time; time to ``target`` and final loss."""
    loss = h.loss.mean("worker")
    times = h.time.values
    reached = np.flatnonzero(loss.values <= target)
    return {
        "time_to_target_s": float(times[reached[0]]) if reached.size else math.inf,
        "final_loss": float(loss.values[-1]),
        "time": times.tolist(),
        "loss": loss.values.tolist(),
        "comm_interval": h.comm_interval.mean("worker").values.tolist(),
        "message_size": h.message_size.mean("worker").values.tolist(),
        "in_flight_max": h.in_flight.max("worker").fillna(0).values.tolist() if "in_flight" in h else [],
    }


def run(out: Path, quick: bool = False, budget: float | None = None, problems=("kmeans", "logistic"),
        regimes: tuple[str, ...] = tuple(REGIMES)) -> list[dict]:
    budget = budget or (15.0 if quick else 30.0)
    n_samples = 100_000 if quick else 200_000
    records = []
    # A small init sample: the set-up is not what is measured.
    with dask.config.set({"asgd.init.sample-size": 5000}), EmulatedCluster(n_workers=2) as cluster, cluster.client() as client:
        for problem in problems:
            X, y, make = _problem(problem, n_samples)
            X = client.persist(X)
            y = None if y is None else client.persist(y)
            n_params = 64_000
            histories = {}
            for regime_name in regimes:
                regime = REGIMES[regime_name]
                for setting in settings(n_params, quick):
                    h = _run_one(cluster, client, make, X, y, setting, regime, budget)
                    histories[regime_name, setting.name] = h
                    print(f"{problem:8s} {regime_name:10s} {setting.name:22s} final loss {float(h.loss.mean('worker')[-1]):.5g}", flush=True)
            # The target: 95% of the way from the initial loss to the best any
            # setting reached unshaped (scale-free: K-Means' inertia falls by a
            # quarter, the logistic loss by four orders of magnitude).
            unshaped = [h.loss.mean("worker") for (r, _), h in histories.items() if r == "unshaped"]
            best = min(float(loss.min()) for loss in unshaped)
            start = float(np.median([float(loss[0]) for loss in unshaped]))
            target = best + 0.05 * (start - best)
            for (regime_name, setting_name), h in histories.items():
                records.append({"problem": problem, "regime": regime_name, "setting": setting_name,
                                "target_loss": target, "budget_s": budget, **summarise(h, target)})
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(records, indent=1))
    table = format_table(records)
    (out / "results.md").write_text(table + "\n")
    plot(records, out)
    return records


def ratios(records: list[dict]) -> dict:
    """Per (problem, regime): auto's time to target over the best fixed one's, and
    how many regimes each fixed setting is within 1.15x of the best in."""
    out = {}
    for problem in sorted({r["problem"] for r in records}):
        mine = [r for r in records if r["problem"] == problem]
        regimes = sorted({r["regime"] for r in mine})
        best = {g: min(r["time_to_target_s"] for r in mine if r["regime"] == g) for g in regimes}
        auto = {g: next(r["time_to_target_s"] for r in mine if r["regime"] == g and r["setting"] == "auto") for g in regimes}
        fixed = sorted({r["setting"] for r in mine} - {"auto"})
        good_everywhere = [
            f for f in fixed
            if all(next(r["time_to_target_s"] for r in mine if r["regime"] == g and r["setting"] == f) <= 1.15 * best[g] for g in regimes)
        ]
        out[problem] = {"auto_over_best": {g: auto[g] / best[g] if best[g] > 0 else math.nan for g in regimes},
                        "fixed_within_1.15_everywhere": good_everywhere}
    return out


def format_table(records: list[dict]) -> str:
    lines = ["| problem | regime | setting | time to target (s) | loss at budget |", "|---|---|---|---|---|"]
    for r in records:
        ttt = "not reached" if math.isinf(r["time_to_target_s"]) else f"{r['time_to_target_s']:.1f}"
        lines.append(f"| {r['problem']} | {r['regime']} | {r['setting']} | {ttt} | {r['final_loss']:.5g} |")
    summary = ratios(records)
    lines.append("")
    for problem, s in summary.items():
        pretty = ", ".join(f"{g}: {v:.2f}" for g, v in s["auto_over_best"].items())
        lines.append(f"{problem}: auto / best fixed time to target: {pretty}; fixed settings within 1.15x of the best in every regime: {s['fixed_within_1.15_everywhere'] or 'none'}")
    return "\n".join(lines)


def plot(records: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for problem in sorted({r["problem"] for r in records}):
        mine = [r for r in records if r["problem"] == problem]
        regimes = list(dict.fromkeys(r["regime"] for r in mine))
        fig, axes = plt.subplots(2, len(regimes), figsize=(4.5 * len(regimes), 7), squeeze=False)
        for col, regime in enumerate(regimes):
            ax = axes[0, col]
            for r in (r for r in mine if r["regime"] == regime):
                style = dict(lw=2.5, color="black") if r["setting"] == "auto" else dict(lw=1, alpha=0.7)
                ax.plot(r["time"], r["loss"], label=r["setting"], **style)
            ax.axhline(mine[0]["target_loss"], ls=":", color="grey")
            ax.set_title(f"{problem}, {regime}")
            ax.set_xlabel("training time (s)")
            ax.set_ylabel("mean loss over workers")
            ax.set_yscale("log")
            auto = next(r for r in mine if r["regime"] == regime and r["setting"] == "auto")
            ax2 = axes[1, col]
            ax2.plot(auto["time"], auto["comm_interval"], color="tab:blue", label="comm_interval (samples)")
            ax2.set_yscale("log")
            ax2.set_xlabel("training time (s)")
            ax3 = ax2.twinx()
            ax3.plot(auto["time"], auto["message_size"], color="tab:orange", label="message_size (parameters)")
            ax3.set_yscale("log")
            ax2.set_title("auto: interval (blue), message size (orange)")
        axes[0, -1].legend(fontsize=7, loc="upper right")
        fig.tight_layout()
        fig.savefig(out / f"balance_{problem}.png", dpi=90)
        plt.close(fig)


def main(args) -> int:
    records = run(Path(args.out), quick=args.quick, budget=args.budget)
    print(format_table(records))
    return 0
