"""A soak: one long asgd fit on many workers, watched from the side for memory per
worker (RSS), sends in flight, waiting messages and mailbox sizes over time.

Run it with ``python -m dask_asgd.testing.soak --seconds 300 --workers 8``.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import psutil
from distributed import Client, LocalCluster

from ..channel import Channel
from ..estimators import KMeans


class _Watch:
    """On a worker's event loop, every 10 ms: the largest sends in flight and messages
    waiting per link, the oldest send, and the fullest mailbox, since the last look."""

    def __init__(self, channel: Channel):
        self.channel = channel
        self.peaks = self._empty()
        self.task = asyncio.ensure_future(self._run())

    @staticmethod
    def _empty() -> dict:
        return {"in_flight": 0, "over_limit": 0, "waiting": 0, "oldest_s": 0.0, "unread": 0, "topics": 0}

    async def _run(self) -> None:
        while True:
            now, p = time.perf_counter(), self.peaks
            for link in list(self.channel.links.values()):
                p["in_flight"] = max(p["in_flight"], link.in_flight)
                p["over_limit"] = max(p["over_limit"], link.in_flight - link.limit)
                p["waiting"] = max(p["waiting"], link.waiting)
                p["oldest_s"] = max(p["oldest_s"], link.oldest_in_flight(now))
            boxes = list(self.channel.mailboxes.values())
            p["unread"] = max([p["unread"], *map(len, boxes)])
            p["topics"] = max(p["topics"], len(boxes), *(len(link.topics) for link in self.channel.links.values()))
            await asyncio.sleep(0.01)

    def take(self) -> dict:
        peaks, self.peaks = self.peaks, self._empty()
        return peaks


async def _watch(dask_worker):
    dask_worker._asgd_soak_watch = _Watch(dask_worker.plugins[Channel.name])


async def _look(dask_worker):
    channel = dask_worker.plugins[Channel.name]
    peaks = dask_worker._asgd_soak_watch.take()
    return {
        "rss": psutil.Process().memory_info().rss,
        **peaks,
        "links": len(channel.links),
        "limit": min((link.limit for link in channel.links.values()), default=0),
        "superseded": sum(link.superseded for link in channel.links.values()),
        "overwritten": sum(box.overwritten for box in channel.mailboxes.values()),
        "dropped": sum(channel.dropped.values()),
    }


async def _unwatch(dask_worker):
    dask_worker._asgd_soak_watch.task.cancel()


@dataclass
class Soak:
    """What a soak saw: one row per look, per worker."""

    seconds: list[float] = field(default_factory=list)  # since training started
    looks: list[dict[str, dict]] = field(default_factory=list)  # worker -> _look()
    history: object = None  # the fit's history_

    def series(self, name: str) -> dict[str, list]:
        workers = sorted(self.looks[0])
        return {w: [look[w][name] for look in self.looks if w in look] for w in workers}

    def rss_growth(self, warm_up: float) -> dict[str, float]:
        """Per worker: median RSS over the last quarter of the looks after ``warm_up``
        seconds, over the median of the first quarter, minus one."""
        after = [i for i, t in enumerate(self.seconds) if t >= warm_up]
        quarter = max(1, len(after) // 4)
        first, last = after[:quarter], after[-quarter:]
        rss = self.series("rss")
        return {w: statistics.median(v[i] for i in last) / statistics.median(v[i] for i in first) - 1 for w, v in rss.items()}

    def peak(self, name: str) -> float:
        return max(max(v) for v in self.series(name).values())


def run(client: Client, seconds: float, look_every: float = 5.0, n_samples: int = 400_000, seed: int = 0) -> Soak:
    """Fit K-Means for ``seconds`` with every default (asgd, auto balancing) and look at
    every worker every ``look_every`` seconds while it trains."""
    rng = np.random.default_rng(seed)
    means = rng.uniform(-10, 10, size=(20, 16))
    X = means[rng.integers(20, size=n_samples)] + rng.normal(size=(n_samples, 16))
    est = KMeans(20, max_epochs=1_000_000, max_time=seconds, tol=None, random_state=seed, client=client)
    client.register_plugin(Channel())
    client.run(_watch)
    soak = Soak()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fitting = pool.submit(est.fit, X)
        start = None
        try:
            while not fitting.done():
                look = client.run(_look)
                if start is None and _training(client):
                    start = time.monotonic()
                if start is not None:
                    soak.seconds.append(time.monotonic() - start)
                    soak.looks.append(look)
                time.sleep(look_every if start is not None else 0.2)
        finally:
            est = fitting.result()
            client.run(_unwatch)
    soak.history = est.history_
    return soak


def _run_ids(dask_scheduler):
    from ..balance._monitor import Monitor

    monitor = dask_scheduler.plugins.get(Monitor.name)
    return [] if monitor is None else [r.run_id for r in monitor.runs.values() if not r.done]


def _training(client: Client) -> bool:
    return bool(client.run_on_scheduler(_run_ids))


def report(soak: Soak, warm_up: float) -> str:
    """Memory per worker over time, peaks of the channel's queues, what the fit did."""
    lines = ["seconds  " + " ".join(f"w{i:<6d}" for i in range(len(soak.looks[0]))) + "  (RSS, MB)"]
    rss = soak.series("rss")
    for i, t in enumerate(soak.seconds):
        lines.append(f"{t:7.0f}  " + " ".join(f"{v[i] / 2**20:7.1f}" for v in rss.values() if i < len(v)))
    growth = soak.rss_growth(warm_up)
    lines.append(f"RSS growth after {warm_up:.0f} s warm-up: " + ", ".join(f"{g:+.1%}" for g in growth.values()))
    lines.append(
        f"peaks: in flight {soak.peak('in_flight')} per link (limit {soak.peak('limit')}), "
        f"waiting {soak.peak('waiting')} per link, oldest send {soak.peak('oldest_s'):.2f} s, "
        f"unread {soak.peak('unread')} per mailbox, topics {soak.peak('topics')}"
    )
    last = soak.history.isel(time=-1)
    lines.append(
        f"fit: {int(last.samples.sum()):,} samples, {int(last.messages_sent.sum()):,} messages sent, "
        f"{int(last.messages_delivered.sum()):,} delivered, {int(last.superseded.sum()):,} superseded, "
        f"{int(last.overwritten.sum()):,} overwritten, {int(last.malformed.sum())} malformed, "
        f"final loss {float(last.loss.mean()):.4f}"
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--every", type=float, default=10.0, help="seconds between looks")
    args = parser.parse_args(argv)
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, dashboard_address=":0") as lc, Client(lc) as client:
        soak = run(client, args.seconds, args.every)
    print(report(soak, warm_up=0.2 * args.seconds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
