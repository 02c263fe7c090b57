"""Turning the rows each worker reports into ``history_``: an xarray Dataset with
dims ``time`` (seconds since the fit started, on a regular grid) and ``worker``."""

from __future__ import annotations

import numpy as np
import xarray as xr

UNITS = {
    "elapsed": "s",
    "samples": "samples",
    "epoch": "local epochs",
    "comm_interval": "samples",
    "message_size": "parameters",
    "bytes_sent": "bytes",
    "latency": "s",
    "bandwidth": "bytes/s",
    "cpu_seconds": "s",
    "compute_cpu_seconds": "s",
    "comm_cpu_seconds": "s",
}

DESCRIPTIONS = {
    "loss": "model loss on a fixed sample of rows drawn from all the data, the same for every worker",
    "samples": "samples processed by the worker so far",
    "messages_sent": "state messages the worker published",
    "messages_delivered": "published messages that reached a peer's mailbox",
    "accepted": "received states the update filter merged",
    "rejected": "received states the update filter refused",
    "send_failed": "sends that failed or that the peer refused",
    "in_flight": "sends on the wire when the row was taken",
    "superseded": "messages replaced by a newer one before they were sent",
    "overwritten": "received messages replaced by a newer one before they were read",
    "malformed": "received messages dropped by validation",
    "latency": "median seconds per send (recent sends)",
    "bandwidth": "bytes per second of recent sends",
    "cpu_seconds": "CPU time of the worker's process since the run started, all threads",
    "compute_cpu_seconds": "CPU time the training thread spent on mini-batches",
    "comm_cpu_seconds": "CPU time spent on communicating: the worker's event loop (sends, receives, "
                        "heartbeats) and merges of received states",
}


def build_history(rows_by_worker: dict[str, list[dict]], interval: float, attrs: dict,
                  adjustments: list[dict] = (), events: list[dict] = ()) -> xr.Dataset:
    """One Dataset from each worker's rows; a value holds until the next row, or
    until the worker was lost (NaN after that).

    The balancer's adjustments, with their reasons, go along their own dim
    ``adjustment`` (time, worker, new settings, reason); workers lost and
    joining mid-fit along ``event`` (time, worker, what, detail).
    """
    workers = list(rows_by_worker)
    ticks = sorted({row["tick"] for rows in rows_by_worker.values() for row in rows})
    position = {tick: i for i, tick in enumerate(ticks)}
    names = sorted({name for rows in rows_by_worker.values() for row in rows for name in row} - {"tick"})
    data = {name: np.full((len(ticks), len(workers)), np.nan) for name in names}
    for j, worker in enumerate(workers):
        for row in rows_by_worker[worker]:
            for name in names:
                data[name][position[row["tick"]], j] = row.get(name, np.nan)
    times = np.asarray(ticks, dtype=float) * interval
    gone = np.zeros((len(ticks), len(workers)), dtype=bool)
    for event in events:
        if event["event"] == "lost" and event["worker"] in workers:
            gone[:, workers.index(event["worker"])] = times > event["elapsed"]
    variables = {}
    for name, values in data.items():
        filled = _forward_fill(values)
        filled[gone] = np.nan
        variables[name] = (("time", "worker"), filled, _attrs(name))
    adjustments = sorted(adjustments, key=lambda a: a["elapsed"])
    variables.update({
        "adjustment_time": (("adjustment",), np.array([a["elapsed"] for a in adjustments], dtype=float),
                            {"units": "s", "description": "when the worker applied a balancer setting"}),
        "adjustment_worker": (("adjustment",), np.array([a["worker"] for a in adjustments], dtype=object)),
        "adjustment_comm_interval": (("adjustment",), np.array([a["comm_interval"] for a in adjustments], dtype=np.int64),
                                     {"units": "samples"}),
        "adjustment_message_size": (("adjustment",), np.array([a["message_size"] for a in adjustments], dtype=np.int64),
                                    {"units": "parameters"}),
        "adjustment_reason": (("adjustment",), np.array([a["reason"] for a in adjustments], dtype=object)),
        "event_time": (("event",), np.array([e["elapsed"] for e in events], dtype=float),
                       {"units": "s", "description": "when the client saw a worker leave or join the fit"}),
        "event_worker": (("event",), np.array([e["worker"] for e in events], dtype=object)),
        "event": (("event",), np.array([e["event"] for e in events], dtype=object),
                  {"description": "lost: the worker left mid-fit; joined: it came in mid-fit; "
                                  "adopted: it took over a lost worker's rows, computed again"}),
        "event_detail": (("event",), np.array([e["detail"] for e in events], dtype=object)),
    })
    return xr.Dataset(
        variables,
        coords={"time": ("time", times, {"units": "s"}), "worker": workers},
        attrs=attrs,
    )


def _forward_fill(values: np.ndarray) -> np.ndarray:
    # A worker reports when it has something to say; between its rows its last
    # values still hold (xarray's ffill would need bottleneck for this).
    index = np.where(np.isnan(values), 0, np.arange(values.shape[0])[:, None])
    np.maximum.accumulate(index, axis=0, out=index)
    filled = values[index, np.arange(values.shape[1])[None, :]]
    filled[np.isnan(values) & (np.cumsum(~np.isnan(values), axis=0) == 0)] = np.nan
    return filled


def _attrs(name: str) -> dict:
    attrs = {}
    if name in UNITS:
        attrs["units"] = UNITS[name]
    if name in DESCRIPTIONS:
        attrs["description"] = DESCRIPTIONS[name]
    return attrs
