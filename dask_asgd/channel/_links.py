"""The sending side towards one peer: bounded sends in flight, a latest-wins
waiting slot per (topic, key), and a timing log for every send."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

MAX_TOPICS = 64


@dataclass
class Outgoing:
    topic: str
    key: int
    payload: Any
    meta: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return int(getattr(self.payload, "nbytes", 0))


@dataclass
class SendCounts:
    """What became of the messages sent on one topic (or in all)."""

    sent: int = 0
    failed: int = 0
    refused: int = 0
    bytes_sent: int = 0
    superseded: int = 0

    def add(self, field_name: str, amount: int = 1) -> None:
        setattr(self, field_name, getattr(self, field_name) + amount)


class PeerLink:
    """At most ``limit`` sends to one peer on the wire, and beyond the first at
    most ``max_bytes`` on it; newer messages wait, newest wins.

    Example::

        link = PeerLink("tcp://10.0.0.2:4000", send, limit=2, timeout=30, log_length=256)
        link.submit(Outgoing("updates", 0, array))   # on the event loop
        link.in_flight, link.sent, link.superseded, link.log[-1]   # (bytes, seconds)
        link.busy_seconds()   # how long anything was on the wire, in all
        link.topics["updates"].sent                                 # the same, per topic

    Counts are kept in total and per topic, so that each run sharing a
    worker's links reads its own; the timing log is the link's alone (it
    measures the network, whoever sends).
    """

    address: str
    limit: int
    in_flight: int
    sent: int
    failed: int
    refused: int
    bytes_sent: int
    superseded: int
    log: deque[tuple[int, float]]
    last_error: str | None

    def __init__(
        self,
        address: str,
        send: Callable[[str, Outgoing], Awaitable[Any]],
        limit: int,
        timeout: float,
        log_length: int,
        max_bytes: int | None = None,
    ):
        self.address = address
        self.limit = limit
        # A second large message on the wire only lengthens the first one's
        # time: it shares the link and, if the link is slow, holds it for
        # longer than its own newer replacement would wait (two whole states
        # of 512 KB took 1.2 s each at 10 Mbit/s, after the balancer had
        # already cut the size).
        self.max_bytes = max_bytes
        self.in_flight = 0
        self._bytes_on_wire = 0
        self._busy = 0.0  # seconds with a send on the wire, up to _busy_since
        self._busy_since: float | None = None
        self.sent = self.failed = self.refused = self.bytes_sent = self.superseded = 0
        self.topics: dict[str, SendCounts] = {}
        self.log = deque(maxlen=log_length)
        self.logged = 0  # sends ever logged: tells a reader which log entries are new
        self.last_error = None
        self._on_wire: dict[int, float] = {}  # id(message) -> perf_counter() at start
        self._send = send
        self._timeout = timeout
        self._waiting: dict[tuple[str, int], Outgoing] = {}
        self._tasks: set[asyncio.Task] = set()

    def submit(self, message: Outgoing) -> None:
        """Send now if the bounds allow, else wait in the (topic, key) slot."""
        if self._may_start(message):
            self._start(message)
            return
        slot = (message.topic, message.key)
        if self._waiting.pop(slot, None) is not None:
            self._count(message.topic, "superseded")
        self._waiting[slot] = message

    def _count(self, topic: str, field_name: str, amount: int = 1) -> None:
        setattr(self, field_name, getattr(self, field_name) + amount)
        counts = self.topics.get(topic)
        if counts is None:
            # Sends that finish after their topic was forgotten would bring it
            # back: keep only the newest MAX_TOPICS topics' counts.
            while len(self.topics) >= MAX_TOPICS:
                del self.topics[next(iter(self.topics))]
            counts = self.topics[topic] = SendCounts()
        counts.add(field_name, amount)

    def forget(self, topic: str) -> None:
        """Drop the per-topic counts of a finished topic. Its waiting messages
        still go out: a peer may be waiting for the last one (a sync barrier)."""
        self.topics.pop(topic, None)

    def withdraw(self, topic: str) -> int:
        """Drop ``topic``'s messages still waiting to be sent; returns how many.
        For a sender whose messages of that topic go stale at once (split
        differently from now on), which newer ones would never supersede."""
        stale = [slot for slot in self._waiting if slot[0] == topic]
        for slot in stale:
            del self._waiting[slot]
        return len(stale)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def _may_start(self, message: Outgoing) -> bool:
        if self.in_flight == 0:
            return True
        fits = self.max_bytes is None or self._bytes_on_wire + message.nbytes <= self.max_bytes
        return self.in_flight < self.limit and fits

    def busy_seconds(self) -> float:
        """Seconds, in all, during which at least one send was on the wire: over
        the sends that finished meanwhile, a message's share of the link,
        whether the sends overlapped or not (a send's own time counts the wait
        for the one beside it too)."""
        since = self._busy_since
        return self._busy + (0.0 if since is None else time.perf_counter() - since)

    def _start(self, message: Outgoing) -> None:
        if self._busy_since is None:
            self._busy_since = time.perf_counter()
        self.in_flight += 1
        self._bytes_on_wire += message.nbytes
        task = asyncio.ensure_future(self._deliver(message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def sends_since(self, logged: int) -> list[tuple[int, float]]:
        """The timed sends logged after the first ``logged`` ones (as far as the log reaches)."""
        new = min(self.logged - logged, len(self.log))
        return list(self.log)[len(self.log) - new:] if new > 0 else []

    def oldest_in_flight(self, now: float) -> float:
        """Seconds the oldest send still on the wire has been going."""
        return max((now - start for start in list(self._on_wire.values())), default=0.0)

    async def _deliver(self, message: Outgoing) -> None:
        start = time.perf_counter()
        self._on_wire[id(message)] = start
        try:
            reply = await asyncio.wait_for(self._send(self.address, message), self._timeout)
        except Exception as exc:  # noqa: BLE001 -- a peer that left or broke must not harm the sender
            self._count(message.topic, "failed")
            self.last_error = f"{type(exc).__name__}: {exc}"
        else:
            elapsed = time.perf_counter() - start
            if isinstance(reply, dict) and reply.get("status") == "ok":
                self._count(message.topic, "sent")
                self._count(message.topic, "bytes_sent", message.nbytes)
                self.log.append((message.nbytes, elapsed))
                self.logged += 1
            else:
                self._count(message.topic, "refused")
                self.last_error = str(reply)
        finally:
            self._on_wire.pop(id(message), None)
            self.in_flight -= 1
            self._bytes_on_wire -= message.nbytes
            # Oldest slot first; as many as the bounds now allow (a large send
            # that went alone may leave room for two small ones).
            while self._waiting:
                slot = next(iter(self._waiting))
                if not self._may_start(self._waiting[slot]):
                    break
                self._start(self._waiting.pop(slot))
            if self.in_flight == 0 and self._busy_since is not None:
                self._busy += time.perf_counter() - self._busy_since
                self._busy_since = None

    async def close(self) -> None:
        self._waiting.clear()
        for task in list(self._tasks):
            task.cancel()
