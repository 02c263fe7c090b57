"""A topic's mailbox on the receiving worker: the newest message per (sender, key)
wins, as with the papers' one-sided writes into a peer's buffer."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ._spec import PayloadSpec


@dataclass
class Message:
    sender: str
    key: int
    payload: Any
    meta: dict = field(default_factory=dict)


class Mailbox:
    """Thread-safe latest-wins store written by the event loop, read by the training thread.

    Example::

        box = Mailbox(PayloadSpec("float64", {0: (10,)}))
        box.put(Message("tcp://a:1", 0, np.zeros(10)))
        box.put(Message("tcp://a:1", 0, np.ones(10)))   # replaces the unread one
        [m.payload[0] for m in box.take()]               # [1.0]; box.overwritten == 1
    """

    spec: PayloadSpec
    received: int
    overwritten: int
    malformed: int  # messages for this topic that validation dropped

    def __init__(self, spec: PayloadSpec):
        self.spec = spec
        self.received = 0
        self.overwritten = 0
        self.malformed = 0
        self._slots: dict[tuple[str, int], Message] = {}
        self._changed = threading.Condition()

    def put(self, message: Message) -> None:
        with self._changed:
            slot = (message.sender, message.key)
            if slot in self._slots:
                self.overwritten += 1
            self._slots[slot] = message
            self.received += 1
            self._changed.notify_all()

    def take(self) -> list[Message]:
        """Every unread message, oldest slot first; the mailbox is empty afterwards."""
        with self._changed:
            messages = list(self._slots.values())
            self._slots.clear()
        return messages

    def wait_for(self, ready: Callable[[list[Message]], bool], timeout: float) -> list[Message]:
        """Block until ``ready(unread)`` holds or ``timeout`` passes; returns the unread
        messages without taking them."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not ready(list(self._slots.values())):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
            return list(self._slots.values())

    def __len__(self) -> int:
        return len(self._slots)


class EarlyMessages:
    """Messages for topics this worker has not subscribed to yet, held for the
    subscriber that is about to come: a peer that starts first may send before
    this worker's task has opened its mailbox (a sync round lost that way left
    its peer waiting out the barrier's timeout). Newest per (topic, sender, key);
    at most ``limit`` messages and ``max_bytes`` of payload in all (a peer cannot
    fill memory with topics nobody reads), oldest dropped first; none for topics
    already closed.

    Example::

        early = EarlyMessages(limit=64)
        early.hold("run/1", Message("tcp://a:1", 0, np.zeros(10)))   # True: held
        early.release("run/1")                                      # [that message]
        early.close("run/1"); early.hold("run/1", ...)              # False: closed
    """

    limit: int
    evicted: int

    def __init__(self, limit: int, max_bytes: float = float("inf"), closed_memory: int = 1024):
        self.limit = limit
        self.max_bytes = max_bytes
        self.evicted = 0
        self._bytes = 0
        self._held: OrderedDict[tuple[str, str, int], Message] = OrderedDict()
        self._closed: deque[str] = deque(maxlen=closed_memory)
        self._lock = threading.Lock()

    def hold(self, topic: str, message: Message) -> bool:
        with self._lock:
            if topic in self._closed or self.limit < 1:
                return False
            size = _nbytes(message)
            if size > self.max_bytes:
                return False
            slot = (topic, message.sender, message.key)
            old = self._held.pop(slot, None)
            self._bytes += size - (0 if old is None else _nbytes(old))
            self._held[slot] = message
            while len(self._held) > self.limit or self._bytes > self.max_bytes:
                _, dropped = self._held.popitem(last=False)
                self._bytes -= _nbytes(dropped)
                self.evicted += 1
            return True

    def release(self, topic: str) -> list[Message]:
        """The held messages of ``topic``, oldest first; they are no longer held."""
        with self._lock:
            slots = [slot for slot in self._held if slot[0] == topic]
            released = [self._held.pop(slot) for slot in slots]
            self._bytes -= sum(map(_nbytes, released))
            return released

    def close(self, topic: str) -> None:
        with self._lock:
            self._closed.append(topic)
            for slot in [slot for slot in self._held if slot[0] == topic]:
                self._bytes -= _nbytes(self._held.pop(slot))

    def __len__(self) -> int:
        return len(self._held)


def _nbytes(message: Message) -> int:
    return int(getattr(message.payload, "nbytes", 0))
