"""The worker-to-worker channel on real parts: a process-based LocalCluster,
real TCP between workers, real serialization, a real SIGKILL. No mocks.

Functions that run on workers are module-level. ``client.run`` functions take
``dask_worker`` (passed by keyword, so it comes last); task functions reach the
channel through ``get_channel()``; they take the message key as ``msg_key``
because ``key=`` is ``client.submit``'s own argument (the task's key).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time

import dask
import numpy as np
import pytest
from distributed import Client, LocalCluster, get_worker
from distributed.protocol import to_serialize

from dask_asgd.channel import Channel, Mailbox, Message, PayloadSpec, get_channel

PLUGIN = Channel.name


# ----------------------------------------------------------------------------------------
# Functions that run on the workers
# ----------------------------------------------------------------------------------------
def _subscribe(topic, dtype, shapes, dask_worker):
    dask_worker.plugins[PLUGIN].subscribe(topic, PayloadSpec(dtype, shapes))


def _box_stats(topic, dask_worker):
    box = dask_worker.plugins[PLUGIN].mailboxes.get(topic)
    if box is None:
        return None
    return {"received": box.received, "overwritten": box.overwritten, "unread": len(box)}


def _take(topic, dask_worker):
    box = dask_worker.plugins[PLUGIN].mailboxes[topic]
    return [(m.sender, m.key, m.payload, m.meta) for m in box.take()]


def _link_stats(peer, dask_worker):
    link = dask_worker.plugins[PLUGIN].link(peer)
    if link is None:
        return None
    return {
        "limit": link.limit,
        "in_flight": link.in_flight,
        "waiting": link.waiting,
        "sent": link.sent,
        "failed": link.failed,
        "refused": link.refused,
        "bytes_sent": link.bytes_sent,
        "superseded": link.superseded,
        "log": list(link.log),
        "last_error": link.last_error,
    }


def _dropped(dask_worker):
    return dict(dask_worker.plugins[PLUGIN].dropped)


def _publish(topic, peer, payload, msg_key=0, meta=None):
    """Task: publish, then scribble over the caller's array (publish must have copied it)."""
    payload = np.array(payload)  # a writable array of this task's own
    get_channel().publish(topic, peer, payload, key=msg_key, meta=meta)
    payload[...] = -1.0
    return get_worker().address


def _publish_big(topic, peer, n, msg_key=0):
    get_channel().publish(topic, peer, np.ones(n), key=msg_key)


def _publish_each_acked(topic, peer, items, timeout=10.0):
    """Task: publish ``(key, value)`` items one by one, each after the previous send
    finished, so the link never coalesces them and every one reaches the peer."""
    channel = get_channel()

    def finished():
        link = channel.link(peer)
        return 0 if link is None else link.sent + link.failed + link.refused

    for key, value in items:
        before = finished()
        channel.publish(topic, peer, np.full(3, float(value)), key=key, meta={"value": value})
        deadline = time.monotonic() + timeout
        while finished() == before:
            if time.monotonic() > deadline:
                raise TimeoutError(f"send of {(key, value)} did not finish")
            time.sleep(0.002)
    return channel.link(peer).sent


def _wait_received(topic, count, timeout):
    """Task on the receiver: block in the worker thread until ``count`` messages
    arrived (written by the event loop), return the unread ones without taking them."""
    box = get_channel().mailboxes[topic]
    unread = box.wait_for(lambda _: box.received >= count, timeout)
    return box.received, [(m.key, m.meta) for m in unread]


def _start_sampler(peer, dask_worker):
    """On the event loop: look at the link to ``peer`` once per loop iteration.

    ``in_flight`` and ``waiting`` only change inside event-loop callbacks, and no send
    starts and finishes within one iteration, so these samples see every peak."""
    channel = dask_worker.plugins[PLUGIN]
    state = {"max_in_flight": 0, "max_waiting": 0, "samples": 0, "stop": False}

    async def sample():
        while not state["stop"]:
            link = channel.link(peer)
            if link is not None:
                state["max_in_flight"] = max(state["max_in_flight"], link.in_flight)
                state["max_waiting"] = max(state["max_waiting"], link.waiting)
                state["samples"] += 1
            await asyncio.sleep(0)

    state["task"] = asyncio.ensure_future(sample())
    dask_worker._channel_test_sampler = state


def _stop_sampler(dask_worker):
    state = dask_worker._channel_test_sampler
    state["stop"] = True
    return {k: state[k] for k in ("max_in_flight", "max_waiting", "samples")}


def _burst(topic, peer, n, keys, size):
    """Task: publish ``n`` large arrays as fast as possible, watching the link from
    this (non-loop) thread too. Element 0 of each array is its sequence number."""
    channel = get_channel()
    state = np.zeros(size)
    max_in_flight = 0
    for i in range(n):
        state[0] = i
        channel.publish(topic, peer, state, key=keys[i % len(keys)], meta={"i": i})
        link = channel.link(peer)
        if link is not None:
            max_in_flight = max(max_in_flight, link.in_flight)
    return max_in_flight


# Cases for the peer's handler, built on the sending worker: (message, reason fragment).
# ``payload`` arrays are wrapped in ``to_serialize`` there, as ``Channel._send`` does.
def _malformed_cases(topic, sender):
    good = np.zeros(4)
    base = {"topic": topic, "key": 0, "sender": sender, "payload": good, "meta": {}}

    def case(fragment, drop=(), **changes):
        msg = {**base, **changes}
        for field in drop:
            msg.pop(field)
        return msg, fragment

    return [
        case("dtype float32 != expected float64", payload=np.zeros(4, dtype="float32")),
        case("shape (5,) != expected (4,)", payload=np.zeros(5)),
        case("shape (4,) != expected (2, 3)", key=1),
        case("NaN or inf", payload=np.array([0.0, np.nan, 0.0, 0.0])),
        case("NaN or inf", payload=np.array([0.0, 0.0, np.inf, 0.0])),
        case("NaN or inf", payload=np.array([-np.inf, 0.0, 0.0, 0.0])),
        case("unknown key 7", key=7),
        case("unknown key '0'", key="0"),
        case("not an array", payload=[0.0, 0.0, 0.0, 0.0]),  # msgpack may hand over a tuple
        case("payload is a str, not an array", payload="0000"),
        case("payload is a NoneType, not an array", drop=("payload",)),
        case("unknown key None", drop=("key",)),
        case("sender is not an address", drop=("sender",)),
        case("sender is not an address", sender=12345),
        case("meta is not a small dict", meta=[1, 2]),
        case("meta is not a small dict", meta={f"k{i}": i for i in range(17)}),
        case("meta holds values other than numbers and strings", meta={"nested": {"a": 1}}),
    ]


async def _deliver_raw(peer, topic):
    """Async task: call the peer's ``asgd_deliver`` handler directly with bad messages."""
    worker = get_worker()
    cases = _malformed_cases(topic, worker.address)
    cases.append(({"key": 0, "sender": worker.address, "payload": np.zeros(4)}, "topic is not a string"))
    results = []
    for msg, fragment in cases:
        if isinstance(msg.get("payload"), np.ndarray):
            msg = {**msg, "payload": to_serialize(msg["payload"])}
        reply = await worker.rpc(peer).asgd_deliver(**msg)
        results.append((fragment, reply))
    return results


def _inc(x):
    return x + 1


# ----------------------------------------------------------------------------------------
# Test-side helpers
# ----------------------------------------------------------------------------------------
def _until(probe, timeout=15.0, interval=0.02, what="condition"):
    """Poll ``probe()`` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {value!r}")
        time.sleep(interval)


def _on(client, address, fn, *args):
    return client.run(fn, *args, workers=[address])[address]


def _until_on(client, address, fn, *args, ready, timeout=15.0, what="condition"):
    """Poll ``fn(*args)`` on one worker until ``ready(value)`` holds; return that value."""

    last = []

    def probe():
        value = _on(client, address, fn, *args)
        last[:] = [value]
        return value if value is not None and ready(value) else None

    try:
        return _until(probe, timeout=timeout, what=what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last value on {address}: {last[0]!r}") from None


def _cluster(n_workers):
    return LocalCluster(
        n_workers=n_workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",
        scheduler_port=0,
    )


@pytest.fixture(scope="module")
def cluster():
    """Two worker processes with the channel; tests here kill no worker."""
    with _cluster(2) as lc, Client(lc) as client:
        client.wait_for_workers(2)
        client.register_plugin(Channel())
        a, b = sorted(client.scheduler_info()["workers"])
        yield client, a, b


# ----------------------------------------------------------------------------------------
# 1. Delivery end to end
# ----------------------------------------------------------------------------------------
@pytest.mark.timeout(90)
def test_delivery_end_to_end(cluster):
    client, a, b = cluster
    topic = "t1/updates"
    _on(client, b, _subscribe, topic, "float64", {0: (6,), 3: (2, 5)})
    before = _on(client, a, _link_stats, b) or {"sent": 0, "bytes_sent": 0, "log": []}

    array = np.arange(10, dtype="float64").reshape(2, 5) / 7.0
    meta = {"round": 4, "loss": 0.25, "tag": "x", "stop": False}
    fut = client.submit(_publish, topic, b, array.copy(), msg_key=3, meta=meta, workers=[a], pure=False)
    assert fut.result() == a

    _until_on(client, b, _box_stats, topic, ready=lambda s: s["received"] == 1, what="delivery")
    [(sender, key, payload, got_meta)] = _on(client, b, _take, topic)
    assert sender == a
    assert key == 3
    assert isinstance(payload, np.ndarray) and payload.dtype == np.float64
    # The publisher overwrote its array with -1 right after publish: the copy was sent.
    np.testing.assert_array_equal(payload, array)
    assert got_meta == meta
    assert _on(client, b, _take, topic) == []  # take() empties the mailbox

    after = _until_on(
        client, a, _link_stats, b,
        ready=lambda s: s["sent"] == before["sent"] + 1 and s["in_flight"] == 0,
        what="A's link to count the send",
    )
    assert after["bytes_sent"] - before["bytes_sent"] == array.nbytes
    new_log = after["log"][len(before["log"]) :]
    assert len(new_log) == 1
    nbytes, seconds = new_log[0]
    assert nbytes == array.nbytes
    assert 0 < seconds < 30
    assert after["failed"] == after["refused"] == 0
    assert after["limit"] == 2  # asgd.channel.max-in-flight-per-peer default


def _unsubscribe(topic, dask_worker):
    dask_worker.plugins[PLUGIN].unsubscribe(topic)


def _held(dask_worker):
    return len(dask_worker.plugins[PLUGIN].early)


@pytest.mark.timeout(60)
def test_messages_sent_before_the_subscriber_wait_for_it(cluster):
    # A peer that starts first may publish before this worker's task subscribes.
    client, a, b = cluster
    topic = "t8/early"
    client.submit(_publish, topic, b, np.full(3, 1.5), meta={"round": 1}, workers=[a], pure=False).result()
    _until_on(client, b, _held, ready=lambda n: n >= 1, what="the early message to be held")
    assert _on(client, b, _box_stats, topic) is None
    _on(client, b, _subscribe, topic, "float64", {0: (3,)})
    [(sender, key, payload, meta)] = _on(client, b, _take, topic)
    assert (sender, key, payload.tolist(), meta) == (a, 0, [1.5] * 3, {"round": 1})
    # Once the topic is closed, late messages are refused, not held.
    _on(client, b, _unsubscribe, topic)
    before = _on(client, b, _dropped).get("no-subscriber", 0)
    client.submit(_publish, topic, b, np.zeros(3), workers=[a], pure=False).result()
    _until_on(client, b, _dropped, ready=lambda d: d.get("no-subscriber", 0) == before + 1, what="the refusal")


def test_early_messages_are_bounded_and_newest_wins():
    from dask_asgd.channel._mailbox import EarlyMessages

    early = EarlyMessages(limit=3)
    for i in range(5):
        assert early.hold(f"t{i}", Message("w", 0, np.full(2, i)))
    assert len(early) == 3 and early.evicted == 2
    assert early.release("t0") == [] and early.release("t1") == []  # the oldest went first
    early.hold("t4", Message("w", 0, np.full(2, 9.0)))  # same (topic, sender, key): replaced
    [message] = early.release("t4")
    assert message.payload.tolist() == [9.0, 9.0]
    early.close("t3")
    assert early.release("t3") == [] and not early.hold("t3", Message("w", 0, np.zeros(2)))
    # A byte bound too: 3 x 800 bytes do not fit in 2,000.
    small = EarlyMessages(limit=100, max_bytes=2_000)
    for i in range(3):
        small.hold(f"u{i}", Message("w", 0, np.zeros(100)))
    assert len(small) == 2 and small.release("u0") == []
    assert not small.hold("huge", Message("w", 0, np.zeros(1_000)))


@pytest.mark.timeout(60)
def test_register_again_keeps_mailboxes(cluster):
    client, a, b = cluster
    topic = "t1b/kept"
    _on(client, b, _subscribe, topic, "float64", {0: (3,)})
    client.register_plugin(Channel())  # idempotent: setup must not run again
    assert _on(client, b, _box_stats, topic) == {"received": 0, "overwritten": 0, "unread": 0}
    client.submit(_publish, topic, b, np.ones(3), workers=[a], pure=False).result()
    _until_on(client, b, _box_stats, topic, ready=lambda s: s["received"] == 1, what="delivery")


# ----------------------------------------------------------------------------------------
# 2. Newest wins in the mailbox
# ----------------------------------------------------------------------------------------
@pytest.mark.timeout(90)
def test_mailbox_keeps_newest_per_key(cluster):
    client, a, b = cluster
    topic = "t2/updates"
    _on(client, b, _subscribe, topic, "float64", {0: (3,), 1: (3,)})
    items = [(0, 1), (0, 2), (1, 10), (0, 3), (1, 11), (0, 4), (0, 5)]

    # B's only thread blocks in wait_for while B's event loop writes the messages.
    waiter = client.submit(_wait_received, topic, len(items), 20.0, workers=[b], pure=False)
    sent = client.submit(_publish_each_acked, topic, b, items, workers=[a], pure=False).result()
    received, unread = waiter.result()
    assert received == len(items)
    assert sent >= len(items)
    assert sorted((k, m["value"]) for k, m in unread) == [(0, 5), (1, 11)]

    stats = _on(client, b, _box_stats, topic)
    assert stats == {"received": len(items), "overwritten": len(items) - 2, "unread": 2}
    taken = _on(client, b, _take, topic)
    assert [(s, k) for s, k, _, _ in taken] == [(a, 0), (a, 1)]  # oldest slot first
    assert [p.tolist() for _, _, p, _ in taken] == [[5.0] * 3, [11.0] * 3]
    assert [m for _, _, _, m in taken] == [{"value": 5}, {"value": 11}]
    assert _on(client, b, _box_stats, topic)["unread"] == 0


# ----------------------------------------------------------------------------------------
# 3. Bound on sends in flight
# ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def _pair(channel_config: dict):
    """(client, a, b): two workers with the channel, under these ``asgd.channel`` settings."""
    # Nanny hands the client's dask.config to the workers; an env= override would be
    # overwritten by it (the client has already loaded the asgd defaults).
    with dask.config.set({f"asgd.channel.{name}": value for name, value in channel_config.items()}):
        lc = _cluster(2)
    with lc, Client(lc) as client:
        client.wait_for_workers(2)
        client.register_plugin(Channel())
        a, b = sorted(client.scheduler_info()["workers"])
        yield client, a, b


def _pair_sending_one_at_a_time():
    return _pair({"max-in-flight-per-peer": 1})


def test_sends_in_flight_are_bounded():
    n, keys, size = 40, [0, 1], 1_000_000  # 8 MB per message
    topic = "t3/updates"
    with _pair_sending_one_at_a_time() as (client, a, b):
        _on(client, b, _subscribe, topic, "float64", {k: (size,) for k in keys})
        _on(client, a, _start_sampler, b)

        seen_by_task = client.submit(_burst, topic, b, n, keys, size, workers=[a], pure=False).result()

        def settled(s):
            done = s["sent"] + s["superseded"] + s["failed"] + s["refused"]
            return s["in_flight"] == 0 and s["waiting"] == 0 and done == n

        stats = _until_on(client, a, _link_stats, b, ready=settled, timeout=30, what="the burst to settle")
        sampled = _on(client, a, _stop_sampler)

        assert stats["limit"] == 1
        assert sampled["samples"] > 0
        assert sampled["max_in_flight"] == 1  # reached the bound, never beyond it
        assert seen_by_task <= 1
        assert sampled["max_waiting"] <= len(keys)  # nothing queued beyond one per key
        assert stats["superseded"] > 0
        assert stats["failed"] == stats["refused"] == 0
        assert stats["sent"] + stats["superseded"] == n
        assert stats["bytes_sent"] == stats["sent"] * size * 8
        assert len(stats["log"]) == stats["sent"]

        box = _until_on(
            client, b, _box_stats, topic,
            ready=lambda s: s["received"] == stats["sent"],
            what="B to receive every send",
        )
        assert box["overwritten"] == stats["sent"] - len(keys)
        # The newest message for each key is never superseded: it always arrives.
        taken = _on(client, b, _take, topic)
        last = {k: max(i for i in range(n) if keys[i % len(keys)] == k) for k in keys}
        assert {k: (m["i"], p[0]) for _, k, p, m in taken} == {k: (i, float(i)) for k, i in last.items()}


def _burst_peak(client, a, b, topic, size, n=30):
    """The most sends on the wire at once while ``a`` sends ``n`` arrays of
    ``size`` float64 to ``b`` as fast as it can, and the link's stats after."""
    _on(client, b, _subscribe, topic, "float64", {k: (size,) for k in (0, 1)})
    _on(client, a, _start_sampler, b)
    client.submit(_burst, topic, b, n, [0, 1], size, workers=[a], pure=False).result()
    stats = _until_on(client, a, _link_stats, b, ready=lambda s: s["in_flight"] == 0 and s["waiting"] == 0,
                      timeout=30, what="the burst to settle")
    return _on(client, a, _stop_sampler)["max_in_flight"], stats


@pytest.mark.timeout(120)
def test_a_large_send_goes_alone_small_ones_two_at_a_time():
    # 1 MiB beyond the first send: 2 MB messages go one at a time, 8 KB ones two.
    with _pair({"max-in-flight-per-peer": 2, "max-bytes-in-flight-per-peer": "1 MiB"}) as (client, a, b):
        large, large_stats = _burst_peak(client, a, b, "t3c/large", 250_000)
        small, _ = _burst_peak(client, a, b, "t3c/small", 1_000)
        busy = _on(client, a, _busy_seconds, b)
    assert (large, small) == (1, 2)
    assert large_stats["sent"] > 0 and large_stats["failed"] == 0
    # The link was busy at least as long as its sends took one after another
    # (they went one at a time), and no longer than the run of the test.
    large_times = [s for nbytes, s in large_stats["log"] if nbytes == 8 * 250_000]
    assert sum(large_times) * 0.99 <= busy < 120, (sum(large_times), busy)


def _busy_seconds(peer, dask_worker):
    return dask_worker.plugins[PLUGIN].link(peer).busy_seconds()


def _publish_then_withdraw(topic, peer, size):
    """Task: one large message on the wire, three more waiting behind it, those
    three withdrawn, then one more."""
    channel = get_channel()
    channel.publish(topic, peer, np.zeros(size), key=0)
    for key in (1, 2, 3):
        channel.publish(topic, peer, np.full(size // 1000, float(key)), key=key)
    channel.withdraw(topic)
    channel.publish(topic, peer, np.full(size // 1000, 4.0), key=4)


def test_withdrawn_messages_are_not_sent():
    topic, size = "t3b/updates", 4_000_000  # 32 MB: on the wire while the rest queue
    with _pair_sending_one_at_a_time() as (client, a, b):
        _on(client, b, _subscribe, topic, "float64", {0: (size,), **{k: (size // 1000,) for k in (1, 2, 3, 4)}})
        client.submit(_publish_then_withdraw, topic, b, size, workers=[a], pure=False).result()
        stats = _until_on(client, a, _link_stats, b, ready=lambda s: s["in_flight"] == 0 and s["sent"] >= 2,
                          timeout=30, what="the sends to settle")
        assert stats["waiting"] == 0 and stats["superseded"] == 0 and stats["failed"] == 0
        assert stats["sent"] == 2  # the first (already on the wire) and the one published after
        assert sorted(k for _, k, _, _ in _on(client, b, _take, topic)) == [0, 4]


# ----------------------------------------------------------------------------------------
# 4. Malformed payloads are dropped and counted; the worker stays healthy
# ----------------------------------------------------------------------------------------
@pytest.mark.timeout(90)
def test_malformed_messages_dropped_and_counted(cluster):
    client, a, b = cluster
    topic = "t4/updates"
    _on(client, b, _subscribe, topic, "float64", {0: (4,), 1: (2, 3)})
    pid_b = _on(client, b, os.getpid)
    dropped_before = _on(client, b, _dropped)

    results = client.submit(_deliver_raw, b, topic, workers=[a], pure=False).result()
    n_malformed = len(results)
    for fragment, reply in results:
        assert isinstance(reply, dict), (fragment, reply)
        assert reply["status"] == "dropped", (fragment, reply)
        assert fragment in reply["reason"], (fragment, reply)

    dropped = _on(client, b, _dropped)
    assert dropped.get("malformed", 0) - dropped_before.get("malformed", 0) == n_malformed
    assert dropped.get("error", 0) == 0
    assert _on(client, b, _box_stats, topic) == {"received": 0, "overwritten": 0, "unread": 0}

    # A malformed publish through the channel itself is refused, not sent.
    before = _on(client, a, _link_stats, b) or {"sent": 0, "refused": 0}
    client.submit(_publish, topic, b, np.zeros(5), workers=[a], pure=False).result()
    refused = _until_on(
        client, a, _link_stats, b, ready=lambda s: s["refused"] == before["refused"] + 1, what="the refusal"
    )
    assert "shape (5,) != expected (4,)" in refused["last_error"]
    assert refused["sent"] == before["sent"]

    # B is the same healthy process: known to the scheduler, runs tasks, still receives.
    assert b in client.scheduler_info()["workers"]
    assert _on(client, b, os.getpid) == pid_b
    assert client.submit(_inc, 1, workers=[b], pure=False).result() == 2
    client.submit(_publish, topic, b, np.full(4, 2.5), workers=[a], pure=False).result()
    _until_on(client, b, _box_stats, topic, ready=lambda s: s["received"] == 1, what="a valid delivery")
    [(sender, key, payload, _)] = _on(client, b, _take, topic)
    assert (sender, key, payload.tolist()) == (a, 0, [2.5] * 4)


# ----------------------------------------------------------------------------------------
# 5. A peer killed mid-send
# ----------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_peer_killed_mid_send_leaves_sender_healthy():
    topic = "t5/updates"
    n_big = 8_000_000  # 64 MB: far more than the loopback socket buffers hold
    with _cluster(3) as lc, Client(lc) as client:
        client.wait_for_workers(3)
        client.register_plugin(Channel())
        a, b, c = sorted(client.scheduler_info()["workers"])
        spec_shapes = {0: (n_big,), 1: (4,)}
        for peer in (b, c):
            _on(client, peer, _subscribe, topic, "float64", spec_shapes)
        pid_a, pid_b = _on(client, a, os.getpid), _on(client, b, os.getpid)

        # Open A's pooled connection to B with a small message.
        client.submit(_publish, topic, b, np.zeros(4), msg_key=1, workers=[a], pure=False).result()
        _until_on(client, a, _link_stats, b, ready=lambda s: s["sent"] == 1, what="the warm-up send")

        # Freeze B so the 64 MB write stalls on a full socket, then kill B for real.
        os.kill(pid_b, signal.SIGSTOP)
        try:
            client.submit(_publish_big, topic, b, n_big, workers=[a], pure=False).result()
            _until_on(client, a, _link_stats, b, ready=lambda s: s["in_flight"] == 1, what="the big send")
            time.sleep(0.3)
            mid = _on(client, a, _link_stats, b)
            assert (mid["in_flight"], mid["sent"], mid["failed"]) == (1, 1, 0)  # still on the wire
        finally:
            os.kill(pid_b, signal.SIGKILL)

        failed = _until_on(
            client, a, _link_stats, b,
            ready=lambda s: s["failed"] >= 1 and s["in_flight"] == 0,
            timeout=30,
            what="A's link to record the failed send",
        )
        assert failed["sent"] == 1
        assert failed["last_error"]

        # A is the same process, known to the scheduler, runs tasks, and still delivers.
        assert a in client.scheduler_info()["workers"]
        assert _on(client, a, os.getpid) == pid_a
        assert client.submit(_inc, 41, workers=[a], pure=False).result() == 42
        client.submit(_publish, topic, c, np.full(4, 7.0), msg_key=1, workers=[a], pure=False).result()
        _until_on(client, c, _box_stats, topic, ready=lambda s: s["received"] == 1, what="delivery to C")
        [(sender, key, payload, _)] = _on(client, c, _take, topic)
        assert (sender, key, payload.tolist()) == (a, 1, [7.0] * 4)
        to_c = _until_on(client, a, _link_stats, c, ready=lambda s: s["sent"] == 1, what="A's link to C")
        assert to_c["failed"] == 0


# ----------------------------------------------------------------------------------------
# 6. PayloadSpec
# ----------------------------------------------------------------------------------------
SPEC = PayloadSpec("float64", {0: (4,), 1: (2, 3)})


def test_payload_spec_accepts_good_payloads():
    assert SPEC.problem(0, np.zeros(4), {}) is None
    assert SPEC.problem(1, np.ones((2, 3)), {"round": 3, "loss": 0.5, "tag": "x", "stop": True}) is None
    assert SPEC.problem(0, np.zeros(4), {f"k{i}": i for i in range(16)}) is None
    assert PayloadSpec("float64", {0: (2,)}, finite=False).problem(0, np.array([np.nan, np.inf]), {}) is None
    assert PayloadSpec("int32", {0: (3,)}).problem(0, np.arange(3, dtype="int32"), {}) is None


def test_payload_spec_with_other_array_namespaces():
    # What the engine does: the spec's dtype is str() of its own arrays' dtype.
    import array_api_strict as xp

    spec = PayloadSpec(str(xp.float64), {0: (4,)})
    assert spec.problem(0, xp.zeros(4, dtype=xp.float64), {}) is None
    assert "NaN or inf" in spec.problem(0, xp.asarray([0.0, float("nan"), 0.0, 0.0]), {})
    assert "shape (5,) != expected (4,)" in spec.problem(0, xp.zeros(5, dtype=xp.float64), {})
    assert "dtype" in spec.problem(0, xp.zeros(4, dtype=xp.float32), {})


def test_payload_spec_dtype_name_is_namespace_neutral():
    # "float64" names the float64 of whatever namespace the payload comes from.
    import array_api_strict as xp

    assert SPEC.problem(0, xp.zeros(4, dtype=xp.float64), {}) is None
    assert "dtype" in SPEC.problem(0, xp.zeros(4, dtype=xp.float32), {})
    assert SPEC.problem(True, np.zeros(4), {}) == "unknown key True"


@pytest.mark.parametrize(
    "key, payload, meta, fragment",
    [
        (7, np.zeros(4), {}, "unknown key 7"),
        ("0", np.zeros(4), {}, "unknown key '0'"),
        (None, np.zeros(4), {}, "unknown key None"),
        (0.0, np.zeros(4), {}, "unknown key 0.0"),
        (0, [0.0] * 4, {}, "payload is a list, not an array"),
        (0, None, {}, "payload is a NoneType, not an array"),
        (0, 1.5, {}, "payload is a float, not an array"),
        (0, np.zeros(4, dtype="float32"), {}, "dtype float32 != expected float64"),
        (0, np.zeros(4, dtype="int64"), {}, "dtype int64 != expected float64"),
        (0, np.zeros(5), {}, "shape (5,) != expected (4,) for key 0"),
        (1, np.zeros(6), {}, "shape (6,) != expected (2, 3) for key 1"),
        (0, np.zeros((4, 1)), {}, "shape (4, 1) != expected (4,) for key 0"),
        (0, np.zeros(4), None, "meta is not a small dict"),
        (0, np.zeros(4), [("a", 1)], "meta is not a small dict"),
        (0, np.zeros(4), {f"k{i}": i for i in range(17)}, "meta is not a small dict"),
        (0, np.zeros(4), {"a": [1]}, "meta holds values other than numbers and strings"),
        (0, np.zeros(4), {"a": None}, "meta holds values other than numbers and strings"),
        (0, np.zeros(4), {1: 1}, "meta holds values other than numbers and strings"),
        (0, np.array([0.0, np.nan, 0.0, 0.0]), {}, "payload holds NaN or inf"),
        (0, np.array([0.0, np.inf, 0.0, 0.0]), {}, "payload holds NaN or inf"),
        (0, np.array([0.0, -np.inf, 0.0, 0.0]), {}, "payload holds NaN or inf"),
    ],
)
def test_payload_spec_names_each_problem(key, payload, meta, fragment):
    problem = SPEC.problem(key, payload, meta)
    assert problem is not None
    assert fragment in problem


# ----------------------------------------------------------------------------------------
# 7. Mailbox
# ----------------------------------------------------------------------------------------
def _message(sender, key, value):
    return Message(sender, key, np.full(2, float(value)), {"v": value})


def test_mailbox_latest_wins_per_sender_and_key():
    box = Mailbox(PayloadSpec("float64", {0: (2,), 1: (2,)}))
    for sender, key, value in [("a", 0, 1), ("a", 0, 2), ("b", 0, 3), ("a", 1, 4), ("a", 0, 5)]:
        box.put(_message(sender, key, value))
    assert (box.received, box.overwritten, len(box)) == (5, 2, 3)
    assert [(m.sender, m.key, m.meta["v"]) for m in box.take()] == [("a", 0, 5), ("b", 0, 3), ("a", 1, 4)]
    assert len(box) == 0 and box.take() == []
    box.put(_message("a", 0, 6))  # the slot was read: nothing is overwritten
    assert (box.received, box.overwritten) == (6, 2)


@pytest.mark.timeout(30)
def test_mailbox_wait_for_returns_when_ready():
    box = Mailbox(PayloadSpec("float64", {0: (2,)}))

    def writer():
        for value in range(3):
            time.sleep(0.05)
            box.put(_message(f"w{value}", 0, value))

    thread = threading.Thread(target=writer)
    start = time.monotonic()
    thread.start()
    unread = box.wait_for(lambda msgs: len(msgs) >= 3, timeout=10.0)
    elapsed = time.monotonic() - start
    thread.join()
    assert [m.meta["v"] for m in unread] == [0, 1, 2]
    assert 0.1 <= elapsed < 5.0
    assert len(box) == 3  # wait_for does not take

    start = time.monotonic()
    assert len(box.wait_for(lambda msgs: len(msgs) >= 3, timeout=10.0)) == 3  # already true
    assert time.monotonic() - start < 0.5


@pytest.mark.timeout(30)
def test_mailbox_wait_for_times_out():
    box = Mailbox(PayloadSpec("float64", {0: (2,)}))
    box.put(_message("a", 0, 1))
    start = time.monotonic()
    unread = box.wait_for(lambda msgs: len(msgs) >= 2, timeout=0.3)
    elapsed = time.monotonic() - start
    assert 0.3 <= elapsed < 3.0
    assert [m.meta["v"] for m in unread] == [1]

    # A put that does not satisfy the predicate wakes the waiter, which keeps waiting.
    timer = threading.Timer(0.1, box.put, args=(_message("a", 0, 2),))
    timer.start()
    start = time.monotonic()
    unread = box.wait_for(lambda msgs: any(m.meta["v"] == 99 for m in msgs), timeout=0.4)
    elapsed = time.monotonic() - start
    timer.join()
    assert 0.4 <= elapsed < 3.0
    assert [m.meta["v"] for m in unread] == [2]
