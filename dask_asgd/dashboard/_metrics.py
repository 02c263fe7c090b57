"""Prometheus series ``dask_asgd_*`` on the scheduler's ``/metrics``: the newest
run of every running scheduler's monitor in this process, one series per worker."""

from __future__ import annotations

import math
from collections.abc import Iterator

import prometheus_client
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from . import _view

LABELS = ["worker", "run"]

# name (without the _total of counters), kind, help, value from (report, point)
SERIES = (
    ("loss", "gauge", "Loss of the worker's current state on a fixed sample drawn from all workers' rows", lambda r, p: p["loss"]),
    ("samples", "counter", "Samples processed by the worker in this run", lambda r, p: r.get("samples")),
    ("samples_per_second", "gauge", "Samples processed per second, between the worker's last two reports", lambda r, p: p["samples_per_second"]),
    ("comm_interval", "gauge", "Samples between two sends of the worker's state", lambda r, p: p["comm_interval"]),
    ("message_size", "gauge", "Parameters per message (the state is sent in slices when smaller than it)", lambda r, p: p["message_size"]),
    ("messages_sent", "counter", "States the worker published", lambda r, p: r.get("messages_sent")),
    ("messages_delivered", "counter", "States that reached a peer's mailbox", lambda r, p: r.get("messages_delivered")),
    ("messages_accepted", "counter", "Received states merged by the update filter", lambda r, p: r.get("accepted")),
    ("messages_rejected", "counter", "Received states refused by the update filter", lambda r, p: r.get("rejected")),
    ("accept_ratio", "gauge", "accepted / (accepted + rejected) over the run", lambda r, p: p["accept_ratio"]),
    ("bandwidth_bytes_per_second", "gauge", "Measured bandwidth of the worker's recent sends", lambda r, p: p["bandwidth"]),
    ("latency_seconds", "gauge", "Median seconds per send over the worker's recent sends", lambda r, p: p["latency"]),
    ("messages_in_flight", "gauge", "Sends of the worker on the wire now", lambda r, p: p["in_flight"]),
    ("messages_superseded", "counter", "Messages replaced by a newer one before they were sent", lambda r, p: r.get("superseded")),
    ("messages_overwritten", "counter", "Received messages replaced by a newer one before they were read", lambda r, p: r.get("overwritten")),
    ("cpu_seconds", "counter", "CPU time of the worker's process in this run", lambda r, p: r.get("cpu_seconds")),
    ("comm_cpu_seconds", "counter", "CPU time the worker spent communicating (event loop, merges) in this run",
     lambda r, p: r.get("comm_cpu_seconds")),
    ("done", "gauge", "1 once the worker has finished its part of the run", lambda r, p: bool(r.get("done"))),
)
PREFIX = "dask_asgd_"


class AsgdCollector(Collector):
    """Reads the monitors at scrape time; registered once per process.

    Example::

        prometheus_client.REGISTRY.register(AsgdCollector())
    """

    def describe(self) -> Iterator:
        # Names only, so that the registry refuses a second collector of ours.
        return iter(_families().values())

    def collect(self) -> Iterator:
        families = _families()
        dropped = 0
        for monitor in _view.monitors():
            dropped += monitor.dropped
            run = monitor.latest()
            if run is None:
                continue
            for address, track in list(run.workers.items()):
                if track.last is None:
                    continue
                point = _view.latest(track)
                labels = [address, run.run_id]
                for name, _, _, value_of in SERIES:
                    value = value_of(track.last, point)
                    if value is not None and not (isinstance(value, float) and math.isnan(value)):
                        families[name].add_metric(labels, float(value))
        families["reports_dropped"].add_metric([], dropped)
        return iter(families.values())


def _families() -> dict:
    families = {
        name: (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(PREFIX + name, help, labels=LABELS)
        for name, kind, help, _ in SERIES
    }
    families["reports_dropped"] = CounterMetricFamily(
        PREFIX + "reports_dropped", "Malformed worker reports the scheduler's monitor dropped", labels=[]
    )
    return families


_registered: AsgdCollector | None = None


def register() -> None:
    """Add the collector to prometheus_client's global registry, which ``/metrics`` serves; once."""
    global _registered
    if _registered is None:
        collector = AsgdCollector()
        prometheus_client.REGISTRY.register(collector)
        _registered = collector
