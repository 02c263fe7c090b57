"""The training loop on one worker: mini-batch SGD on the rows the worker holds,
exchanging state with peers every ``comm_interval`` samples, as a chain of tasks
that each run for a while and report their history rows to the client."""

from __future__ import annotations

import math
import statistics
import threading
import time
from typing import Any

import numpy as np
from array_api_compat import array_namespace, device
from distributed import get_worker

from ..balance._law import BALANCER_SENDER, BalancerSettings
from ..channel import PayloadSpec, get_channel
from ..filter import UpdateFilter
from ..models._base import host_to, to_host
from ._allocator import thresholds_raised
from ._report import Reporter
from ._spec import RunSpec

# The balancer's messages: [comm_interval, message_size], with the reason in meta.
BALANCE_SPEC = PayloadSpec("int64", {0: (2,)})
# Latency probes between peers: one number, read and dropped.
PROBE_SPEC = PayloadSpec("float64", {0: (1,)})
PROBE_PAYLOAD = np.zeros(1)
STARTING_PROBES = 4
MAX_INTERVAL = BalancerSettings().max_interval

# Runs live on the worker between the tasks of their chain. A finished run leaves
# its id behind, so a task queued after the end returns at once instead of
# starting again from scratch.
_RUNS: dict[tuple[str, str], "WorkerRun"] = {}
_FINISHED: set[tuple[str, str]] = set()


def sample_rows(X_chunks, y_chunks, positions, ids):
    """This worker's rows at ``positions`` (for the shared init and the
    evaluation rows), with ``ids``, their indices in the whole of X."""
    X, y = _concat(X_chunks), _concat(y_chunks)
    xp = array_namespace(X)
    idx = host_to(xp, positions, X)
    return xp.take(X, idx, axis=0), (None if y is None else xp.take(y, idx, axis=0)), ids


def join_samples(samples):
    """One ``(X, y)`` from the workers' samples, in the rows' order in X: the
    same rows in the same order however the rows were placed on the workers."""
    xs = [s[0] for s in samples]
    xp = array_namespace(*xs)
    order = host_to(xp, np.argsort(np.concatenate([s[2] for s in samples]), kind="stable"), xs[0])
    X = xp.take(xp.concat(xs), order, axis=0)
    y = None if samples[0][1] is None else xp.take(xp.concat([s[1] for s in samples]), order, axis=0)
    return X, y


def initial_state(model, samples, seed: int):
    """The one initial ``(params, aux)`` every worker starts from."""
    X, y = join_samples(samples)
    with thresholds_raised():  # K-Means seeding on 20,000 x 32 rows, k=64: 1.5 s instead of 2.3 s
        return model.init_params(X, y, np.random.default_rng(seed))


def best_state(model, samples, candidates):
    """The candidate initial state with the lowest loss on the samples."""
    X, y = join_samples(samples)
    with thresholds_raised():
        return min(candidates, key=lambda state: model.loss(state[0], X, y))


def train_segment(spec: RunSpec, worker_index: int, X_chunks, y_chunks, init, evaluation, previous) -> dict:
    """One link of a worker's training chain: train for ``spec.segment_seconds``.

    ``evaluation``: the ``(X, y)`` rows, sampled across all workers, that every
    worker measures its loss on. ``previous`` (the last link's result) only
    orders the chain. Returns the history rows since the last link and, once
    the run ends, the final state.
    """
    address = get_worker().address
    slot = (spec.run_id, address)
    if slot in _FINISHED:
        return {"worker": address, "rows": [], "done": True, "stale": True}
    run = _RUNS.get(slot)
    if run is None:
        run = _RUNS[slot] = WorkerRun(spec, worker_index, address, X_chunks, y_chunks, init, evaluation)
    run.spec = spec
    if sum(int(c.shape[0]) for c in X_chunks) != run.n_rows:
        run.take_rows_from(X_chunks, y_chunks)  # rows came or went with a worker
    try:
        with thresholds_raised():
            run.train(spec.segment_seconds)
    except BaseException:
        run.close()
        raise
    result: dict[str, Any] = {
        "worker": address, "rows": run.take_rows(), "adjustments": run.take_adjustments(), "done": run.done,
    }
    if spec.share_state:
        result["state"] = (to_host(run.params), None if run.aux is None else to_host(run.aux), run.samples)
    if run.done:
        # A host copy: TCP would copy a device array to the host anyway, and the
        # client needs no CUDA to read it (the estimator returns the input's type).
        result.update(params=to_host(run.params), samples=run.samples, stop_reason=run.stop_reason)
        run.close()
    return result


def current_state(run_id: str, dask_worker=None):
    """This worker's current ``(params, aux)`` in run ``run_id``, as host copies
    (for a worker that joins mid-fit); ``None`` where the run is not going here."""
    for (rid, _), run in list(_RUNS.items()):
        if rid == run_id and not run.done:
            aux = run.aux
            return to_host(run.params).copy(), (None if aux is None else to_host(aux).copy())
    return None


def forget_peer(run_id: str, address: str, dask_worker=None) -> None:
    """Stop sending to, and waiting for, a peer that has left the cluster."""
    for (rid, _), run in list(_RUNS.items()):
        if rid == run_id:
            run.silent_peers.add(address)


def _concat(chunks):
    if chunks is None:
        return None
    xp = array_namespace(*chunks)
    if len(chunks) > 1:
        return xp.concat(list(chunks))
    chunk = chunks[0]
    # Deserialized buffers can be unaligned (seen: float64 at offset 44 after
    # scatter), and NumPy's row gather on them is ~700x slower: copy those.
    if isinstance(chunk, np.ndarray) and not chunk.flags.aligned:
        return xp.asarray(chunk, copy=True)
    return chunk


class WorkerRun:
    """One worker's share of a run: its rows, its state, its counters."""

    spec: RunSpec
    params: Any
    samples: int
    epoch: int
    done: bool
    stop_reason: str | None

    def __init__(self, spec: RunSpec, worker_index: int, address: str, X_chunks, y_chunks, init, evaluation):
        self.spec = spec
        self.address = address
        self.X, self.y = _concat(X_chunks), _concat(y_chunks)
        self.xp = array_namespace(self.X)
        self.n_rows = self.X.shape[0]
        params, aux = init
        # On the rows' device: a resumed state arrives as NumPy.
        self.params = self.xp.asarray(params, copy=True, device=device(self.X))
        self.aux = None if aux is None else host_to(self.xp, aux, self.X)
        self.rng = np.random.default_rng([spec.seed, worker_index])
        self.peer_rng = np.random.default_rng([spec.seed, worker_index, 1])
        self.filter = UpdateFilter(spec.update_filter, window=spec.filter_window)

        # The same rows for every worker, drawn from all of them: losses compare
        # across workers, and show how well a worker's state fits all the data
        # even when each worker holds different parts of it.
        self.X_eval, self.y_eval = evaluation

        self.samples = 0
        self.epoch = 0
        self.done = False
        self.stop_reason = None
        self.best_loss = math.inf
        self.epochs_without_gain = 0
        self.loss = self._eval_loss()
        self._order = self._shuffled()
        self._pos = 0
        self._epoch_ended = False
        self._since_exchange = 0
        self._rows: list[dict] = []
        self._next_tick = 0
        self._due = 0.0  # perf_counter() time of the next history row

        self.comm_interval = spec.comm_interval
        self.level = spec.level(spec.message_size)
        self._next_slice = 0
        self.sent = 0
        # CPU seconds of this process since the run started; those the
        # training thread spent on mini-batches; and those spent on
        # communicating: the event loop's (sends, receives, probes; heartbeats
        # too, but not Dask's profiler thread) and the training thread's on
        # exchanges (merges). The balancer holds the last near its CPU share.
        self._cpu_start = time.process_time()
        self.compute_cpu = 0.0
        self.exchange_cpu = 0.0
        self._loop_clock: tuple[int, float] | None = None  # the event loop thread's CPU clock, its reading at start
        self.round = 0
        self.silent_peers: set[str] = set()
        self._sync_latest: dict[str, Any] = {}
        self.adjustments: list[dict] = []
        self.worker = get_worker()
        self.channel = get_channel() if spec.communicates else None
        self.mailbox = self.balance_box = self.probe_box = None
        self._probe_due = 0.0
        self.probes_sent = 0
        if self.channel is not None:
            self.mailbox = self.channel.subscribe(spec.topic, PayloadSpec(
                str(self.params.dtype), spec.slice_shapes(), array_type=type(self.params), device=device(self.params),
            ))
            if spec.mode == "asgd" and (spec.auto_interval or spec.auto_size):
                self.balance_box = self.channel.subscribe(spec.balance_topic, BALANCE_SPEC)
                self.probe_box = self.channel.subscribe(spec.probe_topic, PROBE_SPEC)
        # The links outlive runs: their timing logs count for this run from here.
        self.log_start = {} if self.channel is None else {a: link.logged for a, link in self.channel.links.items()}
        self.reporter = Reporter(self)
        self.worker.loop.add_callback(self._find_loop_clock)
        self._record(force=True)

    def _find_loop_clock(self) -> None:
        """Runs on the event loop: its thread's CPU clock (Unix only; elsewhere
        ``comm_cpu_seconds`` stays NaN and the balancer counts a message's
        latency as its cost)."""
        if hasattr(time, "pthread_getcpuclockid"):
            clock = time.pthread_getcpuclockid(threading.get_ident())
            self._loop_clock = (clock, time.clock_gettime(clock))

    def take_rows_from(self, X_chunks, y_chunks) -> None:
        """Train on these rows from now on (the driver moved rows to or from this worker)."""
        self.X, self.y = _concat(X_chunks), _concat(y_chunks)
        self.n_rows = self.X.shape[0]
        self._order = self._shuffled()
        self._pos = 0

    @property
    def message_size(self) -> int:
        return math.ceil(self.spec.model.n_params / 2**self.level)

    # -- the loop ---------------------------------------------------------------------
    def train(self, seconds: float) -> None:
        deadline = time.perf_counter() + seconds
        spec = self.spec
        while not self.done and time.perf_counter() < deadline:
            started = time.thread_time()
            before = self._train_block()
            self.compute_cpu += time.thread_time() - started
            if self.done:
                break
            started = time.thread_time()
            if spec.mode == "sync" and spec.communicates:
                self._sync_exchange()
            elif spec.communicates:
                self._async_exchange(before)
            self.exchange_cpu += time.thread_time() - started
            self._check_time()
        self._record()

    def _train_block(self):
        """Mini-batches up to the next exchange point; returns the state before the last step."""
        spec, xp, X, y = self.spec, self.xp, self.X, self.y
        step, lr, size = spec.model.step, spec.learning_rate, spec.batch_size
        before = self.params
        n_steps = max(1, math.ceil((self.comm_interval - self._since_exchange) / size))
        # The hot loop: one clock read per step; history, time limits and epoch
        # ends are looked at only when due.
        for _ in range(n_steps):
            idx = self._next_batch()
            before = self.params
            Xb = xp.take(X, idx, axis=0)
            yb = None if y is None else xp.take(y, idx, axis=0)
            self.params, self.aux = step(self.params, self.aux, Xb, yb, lr)
            self.samples += size
            self._since_exchange += size
            if self._epoch_ended:
                self._epoch_ended = False
                self._end_of_epoch()
            if time.perf_counter() >= self._due:
                self._record()
                if self._check_time():
                    break
            if self.done:
                break
        return before

    def _next_batch(self):
        """Indices of the next batch: rows in a fresh random order every local
        epoch, without replacement; sets ``_epoch_ended`` when the order wraps."""
        size = self.spec.batch_size
        stop = self._pos + size
        if stop < self.n_rows:
            idx = self._order[self._pos:stop]
            self._pos = stop
        else:
            parts = []
            while size > 0:
                part = self._order[self._pos:min(self._pos + size, self.n_rows)]
                parts.append(part)
                size -= part.shape[0]
                self._pos += part.shape[0]
                if self._pos == self.n_rows:
                    self._order = self._shuffled()
                    self._pos = 0
                    self._epoch_ended = True
            idx = self.xp.concat(parts)
        return idx

    def _shuffled(self):
        # One copy to the rows' device per local epoch, not one per batch.
        return host_to(self.xp, self.rng.permutation(self.n_rows), self.X)

    def _end_of_epoch(self) -> None:
        self.epoch += 1
        self.loss = self._eval_loss()
        if not math.isfinite(self.loss):
            self._stop("diverged")
            return
        if self.spec.mode != "sync":
            if self.spec.tol is not None and self._no_gain(self.loss):
                self._stop("tol")
            elif self._epochs_done() >= self.spec.max_epochs:
                self._stop("max_epochs")

    def _epochs_done(self) -> float:
        return self.samples / self.n_rows

    def _no_gain(self, loss: float) -> bool:
        """True after ``n_iter_no_change`` epochs without a relative gain above ``tol``."""
        if loss < self.best_loss - self.spec.tol * abs(self.best_loss if math.isfinite(self.best_loss) else loss):
            self.epochs_without_gain = 0
        else:
            self.epochs_without_gain += 1
        self.best_loss = min(self.best_loss, loss)
        return self.epochs_without_gain >= self.spec.n_iter_no_change

    def _check_time(self) -> bool:
        over = self.spec.max_time is not None and time.time() - self.spec.t0 >= self.spec.max_time
        if over and self.spec.mode != "sync":
            self._stop("max_time")
        return over

    def _stop(self, reason: str) -> None:
        self.done = True
        self.stop_reason = reason
        self._record(force=True)

    # -- exchange ---------------------------------------------------------------------
    def _peers(self) -> list[str]:
        return [p for p in self.spec.peers if p != self.address and p not in self.silent_peers]

    def _async_exchange(self, before) -> None:
        """Merge what peers sent (if the filter lets it in), then send one slice to a random peer."""
        self._since_exchange = 0
        self._apply_balance()
        if self.balance_box is not None:
            # Not only at history rows: the first state messages' times go out as soon as they are known.
            self.reporter.maybe_send()
        for message in self.mailbox.take():
            if message.sender not in self.spec.peers:
                self.mailbox.malformed += 1  # well formed, but not from this run's workers
                continue
            start, stop = self.spec.bounds(message.key)
            if self.filter.accept(before[start:stop], self.params[start:stop], message.payload):
                self.params[start:stop] = (self.params[start:stop] + message.payload) / 2
        peers = self._peers()
        if not peers:
            return
        n_slices = 2**self.level
        key = n_slices + self._next_slice % n_slices
        self._next_slice += 1
        start, stop = self.spec.bounds(key)
        peer = peers[int(self.peer_rng.integers(len(peers)))]
        self.channel.publish(self.spec.topic, peer, self.params[start:stop], key=key)
        self.sent += 1

    def _apply_balance(self) -> None:
        """Take the balancer's newest setting for this worker, if one came."""
        if self.balance_box is None:
            return
        messages = [m for m in self.balance_box.take() if m.sender == BALANCER_SENDER]
        if not messages:
            return
        newest = messages[-1]
        interval, size = (int(v) for v in newest.payload)
        # Within what the balancer itself would ever choose.
        if self.spec.auto_interval and interval > 0:
            self.comm_interval = min(max(interval, self.spec.batch_size), MAX_INTERVAL)
        if self.spec.auto_size and size > 0 and self.spec.level(size) != self.level:
            self.level = self.spec.level(size)
            # Messages of the old split still waiting would go out later,
            # stale, and hold the link: at 10 Mbit/s a whole state left waiting
            # when the balancer cut the size for backlog takes it for 0.4 s.
            self.channel.withdraw(self.spec.topic)
        self.adjustments.append({
            "elapsed": time.time() - self.spec.t0,
            "comm_interval": self.comm_interval,
            "message_size": self.message_size,
            "reason": str(newest.meta.get("reason", "")),
        })

    def _probe(self) -> None:
        # A one-number message now and then: its send time is the link's fixed
        # cost alone, which large state messages cannot show apart from bandwidth.
        self.probe_box.take()
        now = time.perf_counter()
        peers = self._peers()
        if now < self._probe_due or not peers:
            return
        # The first few go at every history row: the balancer can tell latency
        # from bandwidth once it has timed a few probes and a state message.
        starting = self.probes_sent < STARTING_PROBES
        peer = peers[int(self.peer_rng.integers(len(peers)))]
        link = self.channel.link(peer)
        if starting and link is not None and link.in_flight > 0:
            # The first probes set the latency the balancer starts from: not
            # behind our own state messages (at 10 Mbit/s the first whole
            # states take 0.4 s each). Tried again at the next history row.
            return
        self.probes_sent += 1
        self._probe_due = now + (0.0 if starting else self.spec.probe_interval)
        self.channel.publish(self.spec.probe_topic, peer, PROBE_PAYLOAD, key=0)

    def _sync_exchange(self) -> None:
        """Barrier: send the whole state to every peer, wait for theirs, average."""
        spec = self.spec
        self._since_exchange = 0
        self.round += 1
        epoch_end = self.round % spec.sync_rounds_per_epoch == 0
        meta = {"round": self.round, "stop": int(self._check_time())}
        if epoch_end:
            meta["loss"] = self._eval_loss()
        for peer in self._peers():
            self.channel.publish(spec.topic, peer, self.params, key=1, meta=meta)
            self.sent += 1
        arrived = self._await_round()
        states = [self.params] + [m.payload for m in arrived]
        self.params = sum(states[1:], states[0]) / len(states)
        self.filter.accepted += len(arrived)
        # Every worker must make the same stop decision in the same round, or the
        # one that goes on waits at the next barrier for the one that stopped. A
        # peer whose newest message is from a later round (it overwrote this
        # round's, unread) has already gone on: so do we, whatever our flags say
        # (a peer that saw our stop flag would have stopped). Otherwise all
        # decide on the same messages: their own and this round's from each peer.
        if any(int(m.meta.get("round", -1)) > self.round for m in arrived):
            return
        metas = [meta] + [m.meta for m in arrived]
        if any(m.get("stop") for m in metas):
            self._stop("max_time")
        elif self.round >= spec.sync_rounds:
            self._stop("max_epochs")
        elif epoch_end and spec.tol is not None:
            losses = [m["loss"] for m in metas if "loss" in m]
            if self._no_gain(math.fsum(sorted(losses)) / len(losses)):
                self._stop("tol")

    def _await_round(self) -> list:
        # A peer may already be one round ahead and have overwritten its message
        # for this round: its newest state stands in for both. The peers are
        # looked up on every pass: one that dies is dropped while we wait.
        deadline = time.monotonic() + self.spec.sync_timeout
        while True:
            for message in self.mailbox.take():
                if message.sender in self.spec.peers:
                    self._sync_latest[message.sender] = message
                else:
                    self.mailbox.malformed += 1
            peers = self._peers()
            missing = [p for p in peers if self._round_of(p) < self.round]
            left = deadline - time.monotonic()
            if not missing or left <= 0:
                break
            self.mailbox.wait_for(lambda unread: len(unread) > 0, min(left, 0.5))
        self.silent_peers.update(missing)
        return [self._sync_latest[p] for p in peers if p not in missing]

    def _round_of(self, peer: str) -> int:
        message = self._sync_latest.get(peer)
        return -1 if message is None else int(message.meta.get("round", -1))

    # -- history ----------------------------------------------------------------------
    def _eval_loss(self) -> float:
        return self.spec.model.loss(self.params, self.X_eval, self.y_eval)

    def _record(self, force: bool = False) -> None:
        elapsed = time.time() - self.spec.t0
        tick = int(elapsed / self.spec.history_interval)
        if tick < self._next_tick and not force:
            return
        self._next_tick = tick + 1
        self._due = time.perf_counter() + (self._next_tick * self.spec.history_interval - elapsed)
        self.loss = self._eval_loss()
        if not math.isfinite(self.loss) and not self.done:
            self._stop("diverged")
            return
        row = {
            "tick": tick,
            "elapsed": elapsed,
            "samples": self.samples,
            "epoch": self._epochs_done(),
            "loss": self.loss,
            "comm_interval": self.comm_interval,
            "message_size": self.message_size,
            "messages_sent": self.sent,
            "accepted": self.filter.accepted,
            "rejected": self.filter.rejected,
            **self.cpu_seconds(),
        }
        row.update(self._channel_row())
        self._rows.append(row)
        self.reporter.maybe_send()
        if self.probe_box is not None:
            # On the clock, not at exchanges: a worker that exchanges rarely (a
            # slow link) needs its latency measured, and new settings applied, most.
            self._probe()
            self._apply_balance()

    def cpu_seconds(self) -> dict:
        loop = self._loop_clock
        comm = math.nan if loop is None else time.clock_gettime(loop[0]) - loop[1] + self.exchange_cpu
        return {"cpu_seconds": time.process_time() - self._cpu_start, "compute_cpu_seconds": self.compute_cpu,
                "comm_cpu_seconds": comm}

    def _channel_row(self) -> dict:
        if self.channel is None:
            return {}
        counts = self.channel.counts(self.spec.topic)
        links = [link for link in map(self.channel.link, self.spec.peers) if link is not None]
        timings = [t for link in links for t in link.sends_since(self.log_start.get(link.address, 0))]
        total_seconds = sum(s for _, s in timings)
        return {
            "messages_delivered": counts.sent,
            "bytes_sent": counts.bytes_sent,
            "send_failed": counts.failed + counts.refused,
            "superseded": counts.superseded,
            "in_flight": sum(link.in_flight for link in links),
            "overwritten": self.mailbox.overwritten,
            "malformed": self.mailbox.malformed,
            "latency": statistics.median(s for _, s in timings) if timings else math.nan,
            "bandwidth": sum(b for b, _ in timings) / total_seconds if total_seconds > 0 else math.nan,
        }

    def take_rows(self) -> list[dict]:
        rows, self._rows = self._rows, []
        return rows

    def take_adjustments(self) -> list[dict]:
        adjustments, self.adjustments = self.adjustments, []
        return adjustments

    def close(self) -> None:
        self.reporter.send_final()
        if self.channel is not None:
            self.channel.unsubscribe(self.spec.topic)
            self.channel.unsubscribe(self.spec.balance_topic)
            self.channel.unsubscribe(self.spec.probe_topic)
        slot = (self.spec.run_id, self.address)
        _RUNS.pop(slot, None)
        _FINISHED.add(slot)
