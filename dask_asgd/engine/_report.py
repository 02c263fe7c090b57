"""What a training worker tells the scheduler's monitor: a small dict of
measurements every ``report_interval`` seconds over the worker's stream to the
scheduler, never model data."""

from __future__ import annotations

import math
import time

import numpy as np

from ..balance._law import PAYLOAD_BYTES

REPORT_OP = "asgd-metrics"
MAX_SENDS_PER_REPORT = 64
# State messages whose times go to the monitor at once, before the first report is due.
FIRST_TIMED_STATES = 2


class Reporter:
    """Collects one run's measurements on a worker and sends them when due.

    Example::

        reporter = Reporter(run)
        reporter.maybe_send()        # from the training loop, cheap when not due
        reporter.send_final()        # when the run ends
    """

    def __init__(self, run):
        self.run = run
        self._due = 0.0
        self._seen_sends: dict[str, int] = dict(run.log_start)  # peer -> sends of its link already reported
        self._seen_transfers = 0
        self._states_reported = 0  # timed state messages the reports have carried

    def maybe_send(self) -> None:
        """Send a report if one is due, or once the first ``FIRST_TIMED_STATES``
        state messages are timed: their times are the balancer's first look at
        the link's bandwidth (at 10 Mbit/s a quarter-second wait for the next
        report let whole states fill the link first). Two, not one: the
        quicker of two is the one that waited least, and a single first send
        caught in a stall of the machine read 7.5 Mbit/s unshaped, which cut
        K-Means to 1/16 slices for a second (2.11 s to target; 0.72-1.35 s in
        the other five repeats)."""
        now = time.perf_counter()
        early = self._states_reported < FIRST_TIMED_STATES <= self._states_reported + self._states_sent()
        if now >= self._due or early:
            self._due = now + self.run.spec.report_interval
            self._send(done=False)

    def _states_sent(self) -> int:
        """Timed state messages not reported yet."""
        return sum(b >= PAYLOAD_BYTES for link in self._links()
                   for b, _ in link.sends_since(self._seen_sends.get(link.address, 0)))

    def send_final(self) -> None:
        self._send(done=True)

    def _send(self, done: bool) -> None:
        run, spec = self.run, self.run.spec
        report = {
            "run_id": spec.run_id,
            "worker": run.address,
            "mode": spec.mode,
            "elapsed": time.time() - spec.t0,
            "samples": run.samples,
            "loss": run.loss,
            "comm_interval": run.comm_interval,
            "message_size": run.message_size,
            "n_params": spec.model.n_params,
            "itemsize": int(np.dtype(str(run.params.dtype).rsplit(".", 1)[-1]).itemsize),
            "batch_size": spec.batch_size,
            "auto_interval": spec.auto_interval and spec.mode == "asgd",
            "auto_size": spec.auto_size and spec.mode == "asgd",
            "balance_topic": spec.balance_topic,
            "messages_sent": run.sent,
            "accepted": run.filter.accepted,
            "rejected": run.filter.rejected,
            **run.cpu_seconds(),
            "sends": self._new_sends(),
            "oldest_in_flight": self._oldest_in_flight(),
            "busy_seconds": sum(link.busy_seconds() for link in self._links()),
            "peers": self._per_peer(),
            "done": done,
            "stop_reason": run.stop_reason,
            **run._channel_row(),
            **self._dask_transfers(),
        }
        worker = run.worker
        worker.loop.add_callback(_to_scheduler, worker, report)

    def _links(self):
        channel = self.run.channel
        if channel is None:
            return []
        return [link for link in map(channel.link, self.run.spec.peers) if link is not None]

    def _new_sends(self) -> list[list]:
        sends = []
        for link in self._links():
            sends.extend([b, s] for b, s in link.sends_since(self._seen_sends.get(link.address, 0)))
            self._seen_sends[link.address] = link.logged
        self._states_reported += sum(b >= PAYLOAD_BYTES for b, _ in sends)
        return sends[-MAX_SENDS_PER_REPORT:]

    def _per_peer(self) -> dict[str, list[float]]:
        """Each peer's link: [median send seconds, bytes/s] over its recent sends."""
        peers = {}
        for link in self._links():
            log = link.sends_since(self.run.log_start.get(link.address, 0))
            if log:
                seconds = sorted(s for _, s in log)
                total = sum(s for _, s in log)
                peers[link.address] = [seconds[len(seconds) // 2], sum(b for b, _ in log) / total if total > 0 else math.nan]
        return peers

    def _oldest_in_flight(self) -> float:
        now = time.perf_counter()
        return max((link.oldest_in_flight(now) for link in self._links()), default=0.0)

    def _dask_transfers(self) -> dict:
        # Dask's own worker-to-worker transfers (data, not our channel): their
        # measured bandwidth, for the monitor beside the channel's figures.
        worker = self.run.worker
        total = worker.state.transfer_incoming_count_total
        log = list(worker.transfer_incoming_log)
        new = log[len(log) - min(total - self._seen_transfers, len(log)):]
        self._seen_transfers = total
        return {
            "dask_bandwidth": float(worker.bandwidth),
            "dask_transfers": len(new),
            "dask_transfer_bytes": int(sum(e.get("total", 0) for e in new)),
        }


def _to_scheduler(worker, report: dict) -> None:
    stream = getattr(worker, "batched_stream", None)
    if stream is None:
        return
    try:
        stream.send({"op": REPORT_OP, "report": report})
    except Exception:  # the scheduler went away: reports are best effort
        pass
