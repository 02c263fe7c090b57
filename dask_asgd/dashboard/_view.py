"""What the dashboard page and the Prometheus series show, read from the
scheduler's monitor: one definition of samples/s, accept ratio and labels for both."""

from __future__ import annotations

import math
from collections.abc import Iterator

from distributed import Scheduler
from distributed.core import Status

from ..balance._monitor import MONITORS, Monitor, RunTrack, WorkerTrack

# Per-report values plotted over time, in the page's order: (field, title).
SERIES = (
    ("loss", "loss"),
    ("samples_per_second", "samples/s"),
    ("comm_interval", "comm_interval (samples between sends)"),
    ("message_size", "message_size (parameters)"),
    ("accept_ratio", "accept ratio (accepted / received)"),
    ("bandwidth", "measured bandwidth (bytes/s)"),
    ("latency", "send latency, median (s)"),
    ("in_flight", "messages in flight"),
)


def monitor_of(scheduler: Scheduler) -> Monitor | None:
    """The scheduler's dask-asgd monitor once a fit has registered it, else None."""
    monitor = scheduler.plugins.get(Monitor.name)
    return monitor if isinstance(monitor, Monitor) and getattr(monitor, "runs", None) is not None else None


def monitors() -> Iterator[Monitor]:
    """The monitors of the running schedulers in this process (usually one)."""
    for monitor in list(MONITORS):
        if monitor.scheduler is not None and monitor.scheduler.status == Status.running:
            yield monitor


def worker_label(scheduler: Scheduler, address: str) -> str:
    """The worker's name where it has one of its own, else host:port."""
    state = scheduler.workers.get(address)
    name = None if state is None else state.name
    if name is not None and str(name) != address:
        return str(name)
    return address.split("://", 1)[-1]


def accept_ratio(report: dict) -> float:
    accepted, rejected = int(report.get("accepted", 0)), int(report.get("rejected", 0))
    return accepted / (accepted + rejected) if accepted + rejected else math.nan


def samples_per_second(previous: dict | None, report: dict) -> float:
    # A worker's final report follows its last periodic one within moments:
    # the rate between them is noise, not a slowdown.
    if previous is None or report.get("done"):
        return math.nan
    seconds = float(report["elapsed"]) - float(previous["elapsed"])
    if seconds <= 0:
        return math.nan
    return (int(report["samples"]) - int(previous["samples"])) / seconds


def point(previous: dict | None, report: dict) -> dict[str, float]:
    """One report as the plotted values (NaN where the run does not measure it)."""
    values = {
        "elapsed": float(report["elapsed"]),
        "samples_per_second": samples_per_second(previous, report),
        "accept_ratio": accept_ratio(report),
    }
    for field in ("loss", "comm_interval", "message_size", "bandwidth", "latency", "in_flight"):
        values[field] = _number(report.get(field))
    return values


def points_after(track: WorkerTrack, after: float) -> list[dict[str, float]]:
    """The plotted values of the track's reports newer than ``after`` (elapsed seconds)."""
    reports = list(track.reports)
    return [
        point(reports[i - 1] if i else None, report)
        for i, report in enumerate(reports)
        if float(report["elapsed"]) > after
    ]


def latest(track: WorkerTrack) -> dict[str, float]:
    """The newest report's plotted values, samples/s from the report before it."""
    reports = list(track.reports)
    if not reports:
        return {}
    return point(reports[-2] if len(reports) > 1 else None, reports[-1])


def balanced(run: RunTrack) -> bool:
    return any(track.balancer is not None for track in run.workers.values())


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan
