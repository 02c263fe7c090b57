"""Automatic balancing against fixed settings on an emulated network: per regime
(unshaped, 100 Mbit/s, 10 Mbit/s, a drop from 100 to 5 Mbit/s mid-run), time to
a target loss and loss at the time budget for "auto" and a sweep of fixed
(interval, message size). Needs root (network namespaces, tc tbf)."""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import dask
import numpy as np
import psutil

from .datasets import make_blobs
from .engine._chains import TRAIN_KEY_PREFIX, AllWorkersLost
from .engine._driver import SETUP_HOLD_PREFIX
from .estimators import KMeans, LogisticRegression
from .testing.netem import EmulatedCluster

N_WORKERS = 2

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
    intervals = (2048, 16384) if quick else (1024, 4096, 16384, 65536, 262144)
    # Halves too: K-Means at 100 Mbit/s reached the target soonest with them (1.27 s, whole states 1.89).
    sizes = (n_params, n_params // 2, n_params // 16)
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
    #
    # Logistic: 64 classes whose means lie close (0.15 apart per feature, unit
    # noise), so they overlap, the loss cannot fall to zero, and training takes
    # the whole budget. With well separated classes (the first version) every
    # setting reached the target with the first state received, in 0.3-0.9 s,
    # before any balancer had a measurement: the ratios measured noise.
    # Returns (X, y, make, parameter count).
    if name == "kmeans":
        X, _ = make_blobs(n_samples, 64, 1000, chunk_rows=n_samples // 4, ordered=True, random_state=0)
        return X, None, lambda **kw: KMeans(1000, update_filter=None, **kw), 1000 * 64
    X, y = make_blobs(n_samples, 1000, 64, cluster_std=1.0, center_box=0.15, chunk_rows=n_samples // 4,
                      ordered=True, random_state=1)
    make = lambda **kw: LogisticRegression(alpha=1e-4, learning_rate=0.1, update_filter=None, **kw)  # noqa: E731
    return X, y, make, 1000 * 64 + 64


# Seconds a fit may take beyond its budget (set-up, the last segment) before it
# counts as hung: set-up takes seconds here.
FIT_SLACK_SECONDS = 300.0


class FitHung(RuntimeError):
    """A fit on the emulated cluster did not finish within its time limit."""


def _run_one(cluster, client, make, X, y, setting: Setting, regime, budget: float):
    """One fit; the regime's rates are applied once training runs (set-up unshaped)."""

    def fit():
        est = make(comm_interval=setting.comm_interval, message_size=setting.message_size,
                   max_epochs=1_000_000, max_time=budget, tol=None, random_state=0, client=client)
        return (est.fit(X) if y is None else est.fit(X, y)).history_

    return run_shaped(cluster, client, fit, regime, budget, limit=budget + FIT_SLACK_SECONDS)


def run_shaped(cluster, client, run, schedule, budget: float = 0.0, limit: float | None = None):
    """``run()`` (a fit) in a thread, the links unshaped during its set-up, then
    at each ``(fraction of budget, rate)`` of ``schedule`` in turn, counted from
    the end of the set-up; unshaped again afterwards. Returns what ``run()``
    returns, or raises what it raised; ``FitHung`` if it takes over ``limit``
    seconds (a fit whose worker left for good waits forever for its task)."""
    cluster.set_rate(None)
    result: dict = {}

    def target():
        try:
            result["value"] = run()
        except BaseException as e:  # noqa: BLE001 - raised again in the caller's thread
            result["error"] = e

    before = set(client.run_on_scheduler(_task_keys))
    # A daemon: a hung fit must not keep the process from exiting with the error.
    training = threading.Thread(target=target, daemon=True)
    started = time.time()
    deadline = math.inf if limit is None else started + limit
    training.start()
    start = None
    while training.is_alive() and start is None and time.time() < deadline:
        if client.run_on_scheduler(_await_setup, before, 1.0):
            start = time.time()
    for fraction, rate in schedule if start is not None else ():
        while training.is_alive() and time.time() < min(start + fraction * budget, deadline):
            time.sleep(0.1)
        cluster.set_rate(rate)
    training.join(None if limit is None else max(0.0, deadline - time.time()))
    cluster.set_rate(None)
    if training.is_alive():
        # Not retried: the hung fit still holds its tasks, and would train beside the next one
        # if its worker came back.
        raise FitHung(f"the fit did not finish within {limit:.0f} s (budget {budget:g} s): a worker of the "
                      f"emulated cluster probably left for good; the end of every process's log:\n{cluster.log_tails()}")
    if "error" in result:
        raise result["error"]
    return result["value"]


def _task_keys(dask_scheduler) -> list:
    return list(dask_scheduler.tasks)


async def _await_setup(before: set, seconds: float, dask_scheduler=None) -> bool:
    """On the scheduler: wait (up to ``seconds``) for the fit's set-up to end,
    which is when every worker holds the initial state and the evaluation rows
    (the engine's ``SETUP_HOLD_PREFIX`` tasks, right before the clock starts) or training
    tasks run. The set-up moves megabytes between workers (tens of seconds at
    10 Mbit/s), so it goes unshaped; the training's first messages must not:
    shaped only once the first report came (a quarter second in), they went
    out unshaped and set the balancer's first estimates of the link."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        new = [(key, ts.state) for key, ts in dask_scheduler.tasks.items() if key not in before and isinstance(key, str)]
        holds = [state for key, state in new if key.startswith(SETUP_HOLD_PREFIX)]
        if any(key.startswith(TRAIN_KEY_PREFIX) for key, _ in new) or (holds and all(s == "memory" for s in holds)):
            return True
        await asyncio.sleep(0.002)
    return False


def _trained(cluster, client, make, X, y, setting: Setting, regime, budget: float, run: str):
    """``_run_one`` with every worker training the whole fit; once more if the
    emulated cluster lost a worker (it lost both in one fit of whole states at
    5 Mbit/s, the 77th fit of that run), so one such fit does not cost the benchmark."""
    for attempt in (1, 2):
        try:
            h = _run_one(cluster, client, make, X, y, setting, regime, budget)
            _check_all_workers_trained(h, N_WORKERS, run)
            return h
        except (AllWorkersLost, WorkerLeft) as e:
            if attempt == 2:
                raise
            # Why a worker left is in its log, which goes when the cluster closes.
            print(f"{run}: {e}; starting the workers that exited, to run it once more", cluster.log_tails(),
                  sep="\n", flush=True)
            cluster.restart_exited_workers()
            client.wait_for_workers(N_WORKERS, timeout=120)


class WorkerLeft(RuntimeError):
    """A worker of the emulated cluster left during a fit."""


def _check_all_workers_trained(h, n_workers: int, run: str) -> None:
    """Every worker trained the whole fit: one that left (seen once, at 10 Mbit/s)
    hands its rows to the other, and from then on every setting trains alone and
    ties, which would make the comparison meaningless without saying so."""
    lost = [w for e, w in zip(h.event.values, h.event_worker.values) if e == "lost"] if "event" in h else []
    if h.sizes["worker"] < n_workers or lost:
        raise WorkerLeft(f"{run}: {h.sizes['worker']} of {n_workers} workers trained"
                           + (f", {', '.join(lost)} left mid-fit" if lost else "")
                           + "; the emulated cluster lost a worker, so the results would compare nothing: run again")


def time_to(times, loss, target: float) -> float:
    """When ``loss`` first reaches ``target``, interpolated linearly between
    history rows (0.1 s apart here); ``inf`` if it never does."""
    reached = np.flatnonzero(np.asarray(loss) <= target)
    if not reached.size:
        return math.inf
    i = int(reached[0])
    if i == 0:
        return float(times[0])
    t0, t1, l0, l1 = times[i - 1], times[i], loss[i - 1], loss[i]
    if not math.isfinite(l0):  # no loss on the row before (a worker's first tick): no interpolation
        return float(t1)
    return float(t0 + (t1 - t0) * (l0 - target) / (l0 - l1))


def curve(h) -> dict:
    """Mean loss over workers against time, auto's settings, and the balancer's
    adjustments with their reasons, from one fit's history."""
    adjustments = [] if "adjustment_time" not in h else [
        {"time": float(t), "worker": str(w), "comm_interval": int(b), "message_size": int(m), "reason": str(r)}
        for t, w, b, m, r in zip(h.adjustment_time.values, h.adjustment_worker.values, h.adjustment_comm_interval.values,
                                 h.adjustment_message_size.values, h.adjustment_reason.values)]
    return {
        "time": h.time.values.tolist(),
        "loss": h.loss.mean("worker").values.tolist(),
        "comm_interval": h.comm_interval.mean("worker").values.tolist(),
        "message_size": h.message_size.mean("worker").values.tolist(),
        "in_flight_max": h.in_flight.max("worker").fillna(0).values.tolist() if "in_flight" in h else [],
        "adjustments": adjustments,
        "workers": worker_summary(h),
    }


# The machine's CPU time by kind over one fit (set-up included): a repeat that
# went badly is read against it. Softirq is mostly the kernel's shaping of the
# emulated links; steal is time the hypervisor gave the cores to someone else.
MACHINE_CPU_KINDS = ("user", "system", "softirq", "steal", "idle")


def machine_cpu_since(before) -> dict[str, float]:
    """Seconds of each of ``MACHINE_CPU_KINDS`` summed over cores since ``before``
    (``psutil.cpu_times()``); kinds the platform does not have read 0."""
    after = psutil.cpu_times()
    return {kind: round(getattr(after, kind, 0.0) - getattr(before, kind, 0.0), 3) for kind in MACHINE_CPU_KINDS}


def worker_summary(h) -> list[dict]:
    """Per worker: final loss, samples/s, and the longest gap between its history
    rows. A training thread that stalls writes no rows, so a gap far over the
    history interval is a stall (a bad repeat's mean loss alone does not say
    which worker went wrong)."""
    summary = []
    for worker in h.worker.values:
        rows = h.sel(worker=worker).dropna("time", subset=["samples"])
        t, samples, loss = rows.time.values, rows.samples.values, rows.loss.values
        span = float(t[-1] - t[0]) if len(t) > 1 else 0.0
        summary.append({
            "worker": str(worker),
            "final_loss": float(loss[-1]) if len(loss) else math.nan,
            "samples_per_s": float(samples[-1] - samples[0]) / span if span > 0 else math.nan,
            "longest_row_gap_s": float(np.diff(t).max()) if len(t) > 1 else math.nan,
        })
    return summary


def summarise(curves: list[dict], target: float) -> dict:
    """Over repeats: median time to ``target`` and median loss at the budget; the
    curve kept (and plotted) is the repeat with the median time. Every repeat's
    final loss, adjustments and per-worker summary are kept too: a bad repeat is
    read from them."""
    times = [time_to(c["time"], c["loss"], target) for c in curves]
    finals = [c["loss"][-1] for c in curves]
    middle = sorted(range(len(curves)), key=lambda i: times[i])[len(curves) // 2]
    return {
        "time_to_target_s": float(np.median(times)),
        "times_to_target_s": times,
        "final_loss": float(np.median(finals)),
        "final_losses": finals,
        "repeats": len(curves),
        **curves[middle],
        "repeat_adjustments": [c["adjustments"] for c in curves],
        "repeat_workers": [c["workers"] for c in curves],
        "repeat_machine_cpu_s": [c.get("machine_cpu_s") for c in curves],
    }


def run(out: Path, quick: bool = False, budget: float | None = None, problems=("kmeans", "logistic"),
        regimes: tuple[str, ...] = tuple(REGIMES), repeats: int = 3, only: list[Setting] | None = None) -> list[dict]:
    budget = budget or (10.0 if quick else 30.0)
    n_samples = 100_000 if quick else 200_000
    records = []
    # A small init sample: the set-up is not what is measured. History rows
    # every 0.1 s: times to target differ by fractions of a second.
    # A connect timeout over Dask's 30 s: at 5 Mbit/s, behind whole states, the
    # client's connection to fetch a task's result was not made in time once
    # (SYNs dropped by the shaper), and the fit hung on the rescheduled task.
    config = {"asgd.init.sample-size": 5000, "asgd.engine.history-interval": 0.1,
              "distributed.comm.timeouts.connect": "120s"}
    with dask.config.set(config), EmulatedCluster(n_workers=N_WORKERS) as cluster, cluster.client() as client:
        for problem in problems:
            X, y, make, n_params = _problem(problem, n_samples)
            X = client.persist(X)
            y = None if y is None else client.persist(y)
            curves: dict[tuple[str, str], list[dict]] = {}
            # Repeats outermost: a slow spell of the machine hits every setting alike.
            for repeat in range(repeats):
                for regime_name in regimes:
                    for setting in only or settings(n_params, quick):
                        name = f"{problem} {regime_name} {setting.name} repeat {repeat}"
                        before = psutil.cpu_times()
                        h = _trained(cluster, client, make, X, y, setting, REGIMES[regime_name], budget, name)
                        curves.setdefault((regime_name, setting.name), []).append(
                            {**curve(h), "machine_cpu_s": machine_cpu_since(before)})
                        print(f"{problem:8s} {regime_name:10s} {setting.name:22s} repeat {repeat} "
                              f"final loss {float(h.loss.mean('worker')[-1]):.5g}", flush=True)
                # After each repeat: a later failure keeps what is done (a lost
                # worker that did not come back once cost a whole problem's 37 minutes).
                out.mkdir(parents=True, exist_ok=True)
                (out / "results.json").write_text(json.dumps(records + _records(problem, curves, budget), indent=1))
            records += _records(problem, curves, budget)
    table = format_table(records)
    (out / "results.md").write_text(table + "\n")
    plot(records, out)
    return records


def _records(problem: str, curves: dict[tuple[str, str], list[dict]], budget: float) -> list[dict]:
    target = target_loss(curves)
    return [{"problem": problem, "regime": regime_name, "setting": setting_name, "target_loss": target,
             "budget_s": budget, **summarise(cs, target)} for (regime_name, setting_name), cs in curves.items()]


def target_loss(curves: dict[tuple[str, str], list[dict]]) -> float:
    """90% of the way from the initial loss to the best any setting reached
    unshaped: scale-free (K-Means' inertia falls by a quarter, the logistic loss
    by two thirds). Best: the median over repeats of each setting's
    lowest loss, so that one lucky run does not set it."""
    unshaped = [cs for (regime, _), cs in curves.items() if regime == "unshaped"] or list(curves.values())
    best = min(float(np.median([np.nanmin(c["loss"]) for c in cs])) for cs in unshaped)
    start = float(np.nanmedian([c["loss"][0] for cs in unshaped for c in cs]))
    return best + 0.1 * (start - best)


def ratios(records: list[dict]) -> dict:
    """Per problem and regime: auto's median time to target over the best fixed
    setting's, and its loss at the budget over the best fixed one's (where no
    one reaches the target, that is what tells them apart); and the fixed
    settings within 1.15x of the best time in every regime."""
    out = {}
    for problem in sorted({r["problem"] for r in records}):
        mine = {(r["regime"], r["setting"]): r for r in records if r["problem"] == problem}
        regimes = sorted({g for g, _ in mine})
        fixed = sorted({f for _, f in mine} - {"auto"})
        if not fixed or not all((g, "auto") in mine for g in regimes):
            continue  # nothing to compare (a partial run)
        best = {g: min(mine[g, f]["time_to_target_s"] for f in fixed) for g in regimes}
        best_loss = {g: min(mine[g, f]["final_loss"] for f in fixed) for g in regimes}
        out[problem] = {
            "auto_over_best": {g: _over(mine[g, "auto"]["time_to_target_s"], best[g]) for g in regimes},
            "auto_loss_over_best": {g: _over(mine[g, "auto"]["final_loss"], best_loss[g]) for g in regimes},
            "fixed_within_1.15_everywhere": [
                f for f in fixed
                if all(math.isfinite(mine[g, f]["time_to_target_s"]) and mine[g, f]["time_to_target_s"] <= 1.15 * best[g]
                       for g in regimes)
            ],
        }
        if all(len(r.get("times_to_target_s", ())) >= 2 for r in mine.values()):
            out[problem].update(_noise(mine, regimes, fixed))
    return out


# Beside the ratios: how far the repeats let them be trusted. The best fixed
# setting's time is the least of several medians, each of a few noisy repeats,
# so it reads low (the least of six draws is not a typical one), and auto's
# ratio high, even where auto is exactly as good as that setting.
def _noise(mine: dict, regimes: list[str], fixed: list[str]) -> dict:
    """The repeats' spread (pooled standard deviation of log time to target over
    cells whose every repeat reached it); per regime, auto's median over the
    held-out best fixed setting's (chosen on the even repeats and timed on the odd
    ones, and the other way round: no repeat both picks and times it); and the
    chance that an auto exactly as good as the best fixed setting measures
    within 1.15x of the best median here, with this spread, settings and repeats."""
    logs = [np.log(r["times_to_target_s"]) for r in mine.values() if np.all(np.isfinite(r["times_to_target_s"]))]
    spread = float(np.sqrt(np.mean([np.var(x, ddof=1) for x in logs]))) if logs else math.nan
    heldout, chance = {}, {}
    for g in regimes:
        times = {f: np.asarray(mine[g, f]["times_to_target_s"]) for f in fixed}
        timed = []
        for pick, held in ((0, 1), (1, 0)):
            best = min(fixed, key=lambda f: np.median(times[f][pick::2]))
            timed += list(times[best][held::2])
        heldout[g] = _over(mine[g, "auto"]["time_to_target_s"], float(np.median(timed)))
        medians = [mine[g, f]["time_to_target_s"] for f in fixed]
        chance[g] = chance_within(medians, spread, len(mine[g, "auto"]["times_to_target_s"]))
    return {"repeat_spread": spread, "auto_over_heldout_best": heldout, "chance_within_1.15_if_equal": chance,
            "chance_within_1.15_everywhere_if_equal": float(np.prod(list(chance.values())))}


def chance_within(medians: list[float], spread: float, repeats: int, factor: float = 1.15,
                  draws: int = 4000, seed: int = 0) -> float:
    """The chance that the median of ``repeats`` runs of an auto exactly as good as
    the best of the fixed settings (true times ``medians``; ``inf`` ones never
    win) is within ``factor`` x the least of their measured medians, every run's
    time log-normal with standard deviation ``spread``. 1 without spread."""
    centres = np.asarray([m for m in medians if math.isfinite(m)])
    if not centres.size or not math.isfinite(spread):
        return math.nan
    rng = np.random.default_rng(seed)
    noise = lambda *shape: np.exp(rng.normal(0.0, spread, shape))  # noqa: E731
    fixed = np.median(centres[None, :, None] * noise(draws, centres.size, repeats), axis=2).min(axis=1)
    auto = np.median(centres.min() * noise(draws, repeats), axis=1)
    return float(np.mean(auto <= factor * fixed))


def _over(mine: float, best: float) -> float:
    """``mine / best``: 0 where only mine is finite (auto reached a target no fixed
    setting did), NaN where neither is (nothing to compare), inf where only best is."""
    if math.isfinite(best) and best > 0:
        return mine / best
    return 0.0 if math.isfinite(mine) else math.nan


def format_table(records: list[dict]) -> str:
    lines = ["| problem | regime | setting | time to target (s), median | each repeat | loss at budget, median |",
             "|---|---|---|---|---|---|"]
    for r in records:
        ttt = "not reached" if math.isinf(r["time_to_target_s"]) else f"{r['time_to_target_s']:.2f}"
        each = ", ".join("-" if math.isinf(t) else f"{t:.2f}" for t in r["times_to_target_s"])
        lines.append(f"| {r['problem']} | {r['regime']} | {r['setting']} | {ttt} | {each} | {r['final_loss']:.5g} |")
    lines.append("")
    for problem, s in ratios(records).items():
        times = ", ".join(f"{g}: {v:.2f}" for g, v in s["auto_over_best"].items())
        losses = ", ".join(f"{g}: {v:.3f}" for g, v in s["auto_loss_over_best"].items())
        lines.append(f"{problem}: auto / best fixed, time to target: {times}; loss at budget: {losses}; "
                     f"fixed settings within 1.15x of the best time in every regime: "
                     f"{s['fixed_within_1.15_everywhere'] or 'none'}")
        if "repeat_spread" in s:
            heldout = ", ".join(f"{g}: {v:.2f}" for g, v in s["auto_over_heldout_best"].items())
            chance = ", ".join(f"{g}: {v:.2f}" for g, v in s["chance_within_1.15_if_equal"].items())
            lines.append(f"{problem}: repeats' spread (sd of log time) {s['repeat_spread']:.2f}; auto / held-out best "
                         f"fixed: {heldout}; chance that an auto as good as the best fixed setting measures within "
                         f"1.15x: {chance}, in every regime: {s['chance_within_1.15_everywhere_if_equal']:.2f}")
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
            auto = next((r for r in mine if r["regime"] == regime and r["setting"] == "auto"), None)
            ax2 = axes[1, col]
            if auto is None:
                continue
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
    records = run(Path(args.out), quick=args.quick, budget=args.budget, repeats=args.repeats)
    print(format_table(records))
    return 0
