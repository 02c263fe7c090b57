"""Topic-based publish/subscribe between workers on Dask's comm layer.

A worker plugin registers an RPC handler (as distributed's P2P shuffle does);
publishers send straight to a peer's handler over the worker's connection pool,
never through the scheduler. The channel knows arrays and topics, not SGD."""

from __future__ import annotations

import logging
import operator
from collections import Counter

from array_api_compat import array_namespace
from dask.utils import parse_bytes
from distributed import WorkerPlugin, get_worker
from distributed.protocol import to_serialize

from .. import config
from ._links import Outgoing, PeerLink, SendCounts
from ._mailbox import EarlyMessages, Mailbox, Message
from ._spec import PayloadSpec

logger = logging.getLogger(__name__)

HANDLER = "asgd_deliver"


class Channel(WorkerPlugin):
    """A worker's end of the channel: its mailboxes and its links to peers.

    Example::

        client.register_plugin(Channel())            # once per cluster
        # inside a task on a worker:
        channel = get_channel()
        box = channel.subscribe("run-1/updates", PayloadSpec("float64", {0: (10,)}))
        channel.publish("run-1/updates", peer_address, state, key=0)
        messages = box.take()
    """

    name = "dask-asgd-channel"
    idempotent = True  # registering again (every fit does) keeps live mailboxes

    worker = None
    mailboxes: dict[str, Mailbox]
    links: dict[str, PeerLink]
    dropped: Counter

    def setup(self, worker):
        self.worker = worker
        self.mailboxes = {}
        self.links = {}
        self.dropped = Counter()
        self._limit = int(config.get("channel.max-in-flight-per-peer"))
        if self._limit < 1:
            raise ValueError(
                f"asgd.channel.max-in-flight-per-peer={self._limit} would never send anything; set it to 1 or more"
            )
        self._max_bytes = parse_bytes(config.get("channel.max-bytes-in-flight-per-peer"))
        self._timeout = float(config.get("channel.send-timeout"))
        self._log_length = int(config.get("channel.log-length"))
        self.early = EarlyMessages(int(config.get("channel.early-messages")),
                                   max_bytes=float(config.get("channel.early-megabytes")) * 2**20)
        worker.handlers[HANDLER] = self._on_deliver

    async def teardown(self, worker):
        worker.handlers.pop(HANDLER, None)
        for link in self.links.values():
            await link.close()

    def subscribe(self, topic: str, spec: PayloadSpec) -> Mailbox:
        """Open (or replace) the mailbox that receives ``topic`` on this worker;
        messages that came for it before are checked and put in."""
        box = self.mailboxes[topic] = Mailbox(spec)
        for message in self.early.release(topic):
            self._put(box, topic, message)
        return box

    def unsubscribe(self, topic: str) -> None:
        """Close ``topic``'s mailbox and forget its send counts."""
        self.early.close(topic)
        self.mailboxes.pop(topic, None)
        self.worker.loop.add_callback(self._forget, topic)

    def _forget(self, topic: str) -> None:
        for link in self.links.values():
            link.forget(topic)

    def withdraw(self, topic: str) -> None:
        """Drop this worker's messages on ``topic`` that still wait to be sent,
        to every peer (those on the wire go on). Safe to call from any thread;
        messages published after the call are kept."""
        self.worker.loop.add_callback(self._withdraw, topic)

    def _withdraw(self, topic: str) -> None:
        for link in self.links.values():
            link.withdraw(topic)

    def counts(self, topic: str) -> SendCounts:
        """What became of this worker's sends on ``topic``, over all peers."""
        total = SendCounts()
        for link in list(self.links.values()):
            counts = link.topics.get(topic)
            if counts is not None:
                for name in ("sent", "failed", "refused", "bytes_sent", "superseded"):
                    total.add(name, getattr(counts, name))
        return total

    def publish(self, topic: str, peer: str, payload, key: int = 0, meta: dict | None = None) -> None:
        """Queue ``payload`` for ``peer``'s mailbox of ``topic``; returns at once.

        Safe to call from any thread. The array is copied first, so the caller
        may keep changing its own.
        """
        if isinstance(key, bool):
            raise TypeError(f"key must be an integer, not {key!r}")
        xp = array_namespace(payload)
        message = Outgoing(topic, operator.index(key), xp.asarray(payload, copy=True), dict(meta or {}))
        # Links are made and used on the event loop only: no lock needed.
        self.worker.loop.add_callback(self._submit, peer, message)

    def _submit(self, peer: str, message: Outgoing) -> None:
        self._link(peer).submit(message)

    def link(self, peer: str) -> PeerLink | None:
        return self.links.get(peer)

    def _link(self, peer: str) -> PeerLink:
        link = self.links.get(peer)
        if link is None:
            link = self.links[peer] = PeerLink(peer, self._send, self._limit, self._timeout, self._log_length,
                                               max_bytes=self._max_bytes)
        return link

    async def _send(self, peer: str, message: Outgoing):
        return await self.worker.rpc(peer).asgd_deliver(
            topic=message.topic,
            key=message.key,
            sender=self.worker.address,
            payload=to_serialize(message.payload),
            meta=message.meta,
        )

    async def _on_deliver(self, **msg) -> dict:
        # Anything a peer sends lands here; a bad message is counted and refused,
        # never raised (that would cost the connection).
        try:
            topic, sender = msg.get("topic"), msg.get("sender")
            key, payload, meta = msg.get("key"), msg.get("payload"), msg.get("meta", {})
            box = self.mailboxes.get(topic) if isinstance(topic, str) else None
            reason = "topic is not a string" if not isinstance(topic, str) else (
                "sender is not an address" if not isinstance(sender, str) else None)
            if reason is not None:
                self.dropped["malformed"] += 1
                if box is not None:
                    box.malformed += 1
                return {"status": "dropped", "reason": reason}
            message = Message(sender, key, payload, meta)
            if box is None:
                if self.early.hold(topic, message):
                    return {"status": "ok"}  # checked when the subscriber comes
                self.dropped["no-subscriber"] += 1
                return {"status": "dropped", "reason": f"no subscriber for topic {topic!r}"}
            return self._put(box, topic, message)
        except Exception as exc:  # noqa: BLE001 -- raising here would cost the connection
            self.dropped["error"] += 1
            logger.warning("dropped message that broke delivery: %r", exc)
            return {"status": "dropped", "reason": repr(exc)}

    def _put(self, box: Mailbox, topic: str, message: Message) -> dict:
        reason = box.spec.problem(message.key, message.payload, message.meta)
        if reason is not None:
            self.dropped["malformed"] += 1
            box.malformed += 1
            logger.info("dropped malformed message on %r from %r: %s", topic, message.sender, reason)
            return {"status": "dropped", "reason": reason}
        box.put(message)
        return {"status": "ok"}


def get_channel() -> Channel:
    """The channel of the worker running the current task."""
    worker = get_worker()
    try:
        return worker.plugins[Channel.name]
    except KeyError:
        raise RuntimeError(
            "the dask-asgd channel is not registered on this worker; "
            "call client.register_plugin(dask_asgd.channel.Channel()) first"
        ) from None
