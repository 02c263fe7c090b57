"""A hostile peer for tests and measurements: a worker outside a training run that
publishes poison (NaN, inf, huge values, wrong shapes or dtypes, unknown keys, random
states) on the run's update topic, through the channel, posing as one of the run's
own workers (a compromised peer: workers take updates only from the run's peers)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np
from distributed import Client
from distributed.protocol import to_serialize

from ..channel import Channel
from ..engine._chains import worker_addresses

POISONS = ("nan", "inf", "huge", "wrong_shape", "wrong_dtype", "unknown_key", "long_meta", "random")
# Poisons that the channel's validation must drop (counted as ``malformed``); the
# others are well-formed arrays that only the update filter can refuse.
MALFORMED = ("nan", "inf", "wrong_shape", "wrong_dtype", "unknown_key", "long_meta")
HUGE = 1e300


@dataclass(frozen=True)
class Target:
    """A run's update topic and what it accepts, on the workers that train it."""

    topic: str
    dtype: str
    shapes: dict[int, tuple[int, ...]]
    workers: tuple[str, ...]


def _update_topics(dask_worker) -> dict:
    channel = dask_worker.plugins.get(Channel.name)
    if channel is None:
        return {}
    return {
        topic: (box.spec.dtype, dict(box.spec.shapes))
        for topic, box in list(channel.mailboxes.items())
        if topic.endswith("/asgd")
    }


def find_run(client: Client, timeout: float = 60.0, interval: float = 0.05, skip=()) -> Target:
    """The asgd run that every worker of ``client``'s cluster subscribed to (other than
    the topics in ``skip``), as soon as they all have.

    Looks into the workers' channels the way an attacker who knows the topic naming
    (``asgd/<run id>/asgd``) and the model's size would guess them.
    """
    deadline = time.monotonic() + timeout
    while True:
        found = client.run(_update_topics)
        common = set.intersection(*(set(t) for t in found.values())) - set(skip) if found else set()
        if common:
            topic = min(common)
            dtype, shapes = next(iter(found.values()))[topic]
            return Target(topic, dtype, shapes, tuple(sorted(found)))
        if time.monotonic() > deadline:
            raise TimeoutError(f"no asgd run appeared on the workers within {timeout} s")
        time.sleep(interval)


def poison_message(kind: str, target: Target, rng: np.random.Generator, scale: float = 1.0):
    """``(key, payload, meta)`` of one message of the given poison for ``target``.

    Keys are drawn over every slice the topic accepts, so the messages fill many
    mailbox slots at once rather than overwriting each other in one.
    """
    keys = sorted(target.shapes)
    key = keys[int(rng.integers(len(keys)))]
    shape = target.shapes[key]
    payload = rng.normal(scale=scale, size=shape).astype(target.dtype)
    if kind == "random":
        return key, payload, {}
    if kind == "huge":
        return key, np.full(shape, HUGE, dtype=target.dtype), {}
    if kind in ("nan", "inf"):
        payload.reshape(-1)[int(rng.integers(payload.size))] = np.nan if kind == "nan" else np.inf
        return key, payload, {}
    if kind == "wrong_shape":
        return key, rng.normal(size=(shape[0] + 1, *shape[1:])).astype(target.dtype), {}
    if kind == "wrong_dtype":
        other = "float32" if np.dtype(target.dtype) != np.float32 else "float64"
        return key, payload.astype(other), {}
    if kind == "unknown_key":
        return max(keys) + 1 + int(rng.integers(1000)), payload, {}
    if kind == "long_meta":
        return key, payload, {"reason": "x" * 100_000}
    raise ValueError(f"poison {kind!r} is not known; use one of {', '.join(POISONS)}")


class InsiderChannel(Channel):
    """The attacker's channel: to each target, its messages claim to come from
    another of the run's workers. The sender field is the sender's word only, so
    a compromised peer can do this; the receiver validates everything else."""

    impersonate: dict[str, str] = {}

    async def _send(self, peer: str, message):
        return await self.worker.rpc(peer).asgd_deliver(
            topic=message.topic,
            key=message.key,
            sender=self.impersonate.get(peer, self.worker.address),
            payload=to_serialize(message.payload),
            meta=message.meta,
        )


class _Attack:
    """The publishing loop on the attacker worker's event loop."""

    def __init__(self, channel: Channel, target: Target, kinds: tuple[str, ...], rate: float, seed: int, scale: float):
        self.channel, self.target, self.kinds = channel, target, kinds
        self.period = 1.0 / rate
        self.rng = np.random.default_rng(seed)
        self.scale = scale
        self.published = 0
        self.started = time.monotonic()
        self.started_wall = time.time()
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        rounds = 0
        while True:
            # Holds the rate on average: after a late wake-up (a loaded machine), it
            # catches up, but by no more than a quarter second's worth.
            behind = (time.monotonic() - self.started) / self.period - rounds
            for _ in range(max(1, min(int(behind), int(0.25 / self.period) + 1))):
                for worker in self.target.workers:
                    kind = self.kinds[self.published % len(self.kinds)]
                    key, payload, meta = poison_message(kind, self.target, self.rng, self.scale)
                    self.channel.publish(self.target.topic, worker, payload, key=key, meta=meta)
                    self.published += 1
                rounds += 1
            await asyncio.sleep(max(0.0, self.started + rounds * self.period - time.monotonic()))

    def stop(self) -> dict:
        self.task.cancel()
        counts = self.channel.counts(self.target.topic)
        return {
            "targets": list(self.target.workers),
            "published": self.published,
            "start": self.started_wall,  # wall clock, as history_.attrs["t0"]
            "seconds": time.monotonic() - self.started,
            "delivered": counts.sent,
            "refused": counts.refused,
            "failed": counts.failed,
            "superseded": counts.superseded,
        }


async def _start(target, kinds, rate, seed, scale, pose_as_peer, dask_worker):
    if getattr(dask_worker, "_asgd_attack", None) is not None:
        dask_worker._asgd_attack.stop()
    channel = dask_worker.plugins[Channel.name]
    channel.impersonate = (
        {w: next((o for o in target.workers if o != w), w) for w in target.workers} if pose_as_peer else {}
    )
    dask_worker._asgd_attack = _Attack(channel, target, kinds, rate, seed, scale)


async def _stop(dask_worker):
    attack, dask_worker._asgd_attack = dask_worker._asgd_attack, None
    return attack.stop()


class Attacker:
    """A worker of another cluster that publishes poison to a run's workers.

    Messages go through the attacker's own channel (``Channel.publish``), so they
    reach the targets' handler exactly as a peer's do: over TCP (or TLS), to the
    same handler, validated the same way, under the name of one of the run's workers.

    Example::

        with LocalCluster(n_workers=1) as lc, Client(lc) as bad:
            attacker = Attacker(bad)
            attacker.start(find_run(client), ["random"], rate=500)   # messages/s to each target
            ...
            attacker.stop()    # {"published": ..., "delivered": ..., "refused": ...}
    """

    def __init__(self, client: Client):
        self.client = client
        self.running = False
        client.register_plugin(InsiderChannel())
        self.address = min(worker_addresses(client))

    def start(self, target: Target, kinds, rate: float, seed: int = 0, scale: float = 1.0,
              pose_as_peer: bool = True) -> None:
        """Publish ``kinds`` of poison to each of the target's workers, ``rate`` times a
        second; ``pose_as_peer=False``: under the attacker's own address."""
        kinds = tuple([kinds] if isinstance(kinds, str) else kinds)
        unknown = [k for k in kinds if k not in POISONS]
        if unknown or not kinds:
            raise ValueError(f"poisons {unknown or kinds!r} are not known; use some of {', '.join(POISONS)}")
        self.client.run(_start, target, kinds, float(rate), seed, float(scale), pose_as_peer, workers=[self.address])
        self.running = True

    def stop(self) -> dict:
        """Stop publishing; what was published, and what the attacker's channel saw of it."""
        self.running = False
        return self.client.run(_stop, workers=[self.address])[self.address]
