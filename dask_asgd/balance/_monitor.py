"""The scheduler's view of every training run: per-worker measurements in
rolling windows, and the balancer that turns them into settings sent back to
each worker on the channel's balance topic."""

from __future__ import annotations

import asyncio
import logging
import math
import weakref
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np
from distributed import SchedulerPlugin
from distributed.protocol import to_serialize

from .. import config
from ..engine._report import REPORT_OP
from ._law import BALANCER_SENDER, Balancer, BalancerSettings, Report, run_size_reason

logger = logging.getLogger(__name__)

MAX_RUNS = 8

# Every running Monitor in this process, for readers such as the /metrics collector.
MONITORS: weakref.WeakSet = weakref.WeakSet()


@dataclass
class WorkerTrack:
    """One worker's part of a run, as the scheduler sees it."""

    reports: deque  # recent reports (dicts), oldest first
    balancer: Balancer | None
    adjustments: deque  # (elapsed, comm_interval, message_size, reason)
    last: dict | None = None
    done: bool = False


@dataclass
class RunTrack:
    run_id: str
    mode: str
    workers: dict[str, WorkerTrack] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return bool(self.workers) and all(w.done for w in self.workers.values())


class Monitor(SchedulerPlugin):
    """Collects the training workers' reports; balances runs with ``"auto"`` knobs.

    Example::

        client.register_plugin(Monitor())          # the engine does this before a fit
        # on the scheduler:
        monitor = scheduler.plugins["dask-asgd-monitor"]
        monitor.runs[run_id].workers[address].reports[-1]["loss"]
    """

    name = "dask-asgd-monitor"
    idempotent = True

    scheduler = None
    runs: OrderedDict[str, RunTrack]
    dropped: int

    async def start(self, scheduler):
        self.scheduler = scheduler
        self.runs = OrderedDict()
        self.dropped = 0
        self._window = int(config.get("balance.window"))
        self._settings = _settings_from_config()
        self._sends: set[asyncio.Task] = set()
        scheduler.stream_handlers[REPORT_OP] = self._on_report
        MONITORS.add(self)

    async def close(self):
        MONITORS.discard(self)
        self.scheduler.stream_handlers.pop(REPORT_OP, None)

    def _on_report(self, worker=None, report=None, **_):
        # A stream handler that raises would cost the worker its connection:
        # a bad report is counted and dropped.
        try:
            self._take(worker, report)
        except Exception as exc:
            self.dropped += 1
            logger.warning("dropped a malformed dask-asgd report from %s: %r", worker, exc)

    def _take(self, worker: str, report: dict) -> None:
        run = self.runs.get(report["run_id"])
        if run is None:
            run = self.runs[report["run_id"]] = RunTrack(report["run_id"], str(report["mode"]))
            while len(self.runs) > MAX_RUNS:
                self.runs.popitem(last=False)
        track = run.workers.get(worker)
        if track is None:
            balancer = None
            if report["auto_interval"] or report["auto_size"]:
                balancer = Balancer(
                    n_params=int(report["n_params"]), itemsize=int(report["itemsize"]),
                    batch_size=int(report["batch_size"]), comm_interval=int(report["comm_interval"]),
                    message_size=int(report["message_size"]), settings=self._settings,
                    tune_interval=bool(report["auto_interval"]), tune_size=bool(report["auto_size"]),
                )
            track = run.workers[worker] = WorkerTrack(deque(maxlen=self._window), balancer, deque(maxlen=self._window))
        previous, track.last = track.last, report
        track.reports.append(report)
        track.done = bool(report["done"])
        if track.balancer is None or previous is None or track.done:
            return
        seconds = float(report["elapsed"]) - float(previous["elapsed"])

        def since_previous(name: str, default: float = math.nan) -> float:
            """An optional counter's change since the previous report (an older worker may lack it)."""
            return float(report.get(name, default)) - float(previous.get(name, default))

        # Read by the law in this update only: the others' choices as they stand now.
        track.balancer.run_size_cap = _smallest_wish(run, but=worker, default=track.balancer.n_params)
        track.balancer.run_latency = _quickest_probe(run, but=worker)
        decision = track.balancer.update(Report(
            elapsed=float(report["elapsed"]),
            samples=int(report["samples"]) - int(previous["samples"]),
            seconds=seconds,
            sends=[(int(b), float(s)) for b, s in report["sends"]],
            superseded=int(since_previous("superseded", 0)),
            in_flight=int(report.get("in_flight", 0)),
            oldest_in_flight=float(report["oldest_in_flight"]),
            messages=int(since_previous("messages_sent", 0)),
            comm_cpu=since_previous("comm_cpu_seconds"),
            busy=since_previous("busy_seconds"),
        ))
        if decision is not None:
            self._adjust(worker, track, decision)
        self._one_size(run)

    def _one_size(self, run: RunTrack) -> None:
        """Every worker of the run that balances its message size sends the
        smallest size any of them chose (see ``Balancer.follow_run``)."""
        live = {w: t for w, t in run.workers.items() if _sizes_balanced(t)}
        if not live:
            return
        size = min(t.balancer.wish for t in live.values())
        for worker, track in live.items():
            if track.balancer.message_size != size:
                decision = track.balancer.follow_run(size, float(track.last["elapsed"]), run_size_reason(size))
                if decision is not None:
                    self._adjust(worker, track, decision)

    def _adjust(self, worker: str, track: WorkerTrack, decision) -> None:
        track.adjustments.append((float(track.last["elapsed"]), decision.comm_interval, decision.message_size, decision.reason))
        task = asyncio.ensure_future(self._publish(worker, track.last["balance_topic"], decision))
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    async def _publish(self, worker: str, topic: str, decision) -> None:
        # Onto the worker's channel, balance topic: the same handler peers use.
        try:
            await self.scheduler.rpc(worker).asgd_deliver(
                topic=topic, key=0, sender=BALANCER_SENDER,
                payload=to_serialize(np.array([decision.comm_interval, decision.message_size], dtype=np.int64)),
                meta={"reason": decision.reason[:200]},
            )
        except Exception as exc:  # the worker left: nothing to adjust
            logger.info("could not send a balance setting to %s: %r", worker, exc)

    # -- views for the dashboard and metrics ----------------------------------------
    def latest(self) -> RunTrack | None:
        """The newest run."""
        return next(reversed(self.runs.values()), None) if self.runs else None

    def dask_bandwidth(self, run_id: str) -> dict[tuple[str, str], float]:
        """Dask's own measured bandwidth (bytes/s) between the run's workers, from its
        data transfers (``Scheduler.bandwidth_workers``), beside the channel's figures."""
        workers = set(self.runs[run_id].workers)
        return {pair: bw for pair, bw in self.scheduler.bandwidth_workers.items() if set(pair) <= workers}


def _sizes_balanced(track: WorkerTrack) -> bool:
    return track.balancer is not None and track.balancer.tune_size and not track.done


def _smallest_wish(run: RunTrack, but: str, default: int) -> int:
    """The smallest message size the run's other live workers chose for themselves."""
    return min((t.balancer.wish for w, t in run.workers.items() if w != but and _sizes_balanced(t)), default=default)


def _quickest_probe(run: RunTrack, but: str) -> float | None:
    """The quickest latency probe the run's other live workers timed, if any."""
    probes = [t.balancer.fixed_cost for w, t in run.workers.items()
              if w != but and t.balancer is not None and not t.done and t.balancer.fixed_cost is not None]
    return min(probes, default=None)


def live_progress(dask_scheduler) -> dict | None:
    """The newest run's progress, for ``client.run_on_scheduler``: samples so far,
    samples/s over the last two reports of each worker, mean loss, seconds trained."""
    monitor = dask_scheduler.plugins.get(Monitor.name)
    run = None if monitor is None or not getattr(monitor, "runs", None) else monitor.latest()
    if run is None or not run.workers:
        return None
    rate = 0.0
    for track in run.workers.values():
        if len(track.reports) >= 2:
            a, b = track.reports[-2], track.reports[-1]
            if b["elapsed"] > a["elapsed"]:
                rate += (b["samples"] - a["samples"]) / (b["elapsed"] - a["elapsed"])
    losses = [t.last["loss"] for t in run.workers.values() if math.isfinite(t.last["loss"])]
    return {
        "run_id": run.run_id,
        "workers": len(run.workers),
        "samples": sum(t.last["samples"] for t in run.workers.values()),
        "samples_per_second": rate,
        "loss": sum(losses) / len(losses) if losses else math.nan,
        "elapsed": max(t.last["elapsed"] for t in run.workers.values()),
        "done": run.done,
    }


def _settings_from_config() -> BalancerSettings:
    keys = {
        "cpu_share": "balance.target-cpu-share",
        "link_share": "balance.target-link-share",
        "smoothing": "balance.smoothing",
        "deadband": "balance.deadband",
        "min_change_interval": "balance.min-change-interval",
        "min_message_size": "balance.min-message-size",
        "min_refresh": "balance.min-refresh-samples",
    }
    values = {name: float(config.get(key)) for name, key in keys.items()}
    values["min_message_size"] = int(values["min_message_size"])
    values["min_refresh"] = int(values["min_refresh"])
    if not all(math.isfinite(v) and v > 0 for v in values.values()):
        raise ValueError(f"asgd.balance settings must be positive numbers, got {values}")
    return BalancerSettings(**values)
