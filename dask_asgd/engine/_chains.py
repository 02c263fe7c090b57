"""Keeping one chain of training tasks going per worker until each stops, through
workers that die and workers that join mid-fit: a lost worker's rows go to a
survivor, and a newcomer takes rows off the busiest worker and a peer's state."""

from __future__ import annotations

import dataclasses
import time
from collections import deque

from distributed import Client, Future, wait
from distributed.client import FutureCancelledError, FuturesCancelledError
from distributed.comm import CommClosedError

from ._data import Shard, merge_shards, split_shard
from ._spec import RunSpec
from ._worker import current_state, forget_peer, train_segment

# Links queued behind the running one, so a worker never idles waiting for the client.
CHAIN_DEPTH = 2
# Seconds between two looks at the scheduler's worker list.
MEMBERSHIP_POLL = 0.5
# Seconds to wait for a finished link's result before asking whether its worker is gone.
RESULT_PATIENCE = 2.0
# Keys of training segments: this prefix, the run id, the worker index, the link.
TRAIN_KEY_PREFIX = "asgd-train-"


def worker_addresses(client: Client) -> set[str]:
    """The workers the scheduler has now. Asked of the scheduler itself:
    ``Client.scheduler_info()`` returns a cache that the client's own periodic
    refresh can replace, between the fetch and the return, with one that lists
    no workers (seen under load: every worker of a fit looked lost at once).

    Raises SchedulerLost when the scheduler cannot be reached: a scheduler that
    just died shows here first, as a reset connection, before the client's own
    status changes (seen in CI). A client already reconnecting is not asked: its
    call would wait out the whole reconnect timeout."""
    if client.status not in ("running", "newly-created"):
        raise SchedulerLost(_scheduler_lost_message(client))
    try:
        return set(client.run_on_scheduler(_scheduler_workers))
    except (CommClosedError, OSError) as e:
        raise SchedulerLost(_scheduler_lost_message(client)) from e


def _scheduler_workers(dask_scheduler) -> list[str]:
    return list(dask_scheduler.workers)


def fetch_result(future: Future, gone):
    """A finished link's result, or None when its worker died holding it.

    A result lives on its worker until fetched. If the worker dies first, the
    scheduler either cancels the key or, as it was computed once, asks for it
    again; restricted to the dead worker, it never comes, and a plain
    ``future.result()`` waits forever (seen in CI: a sync fit hung). So wait a
    while at a time, and between waits ask ``gone()`` whether the worker left.
    """
    patience = RESULT_PATIENCE
    while True:
        try:
            return future.result(timeout=patience)
        except FutureCancelledError:
            if gone():
                return None
            raise
        except TimeoutError:
            if gone():
                return None
            # A live worker with a large result on a slow link: a timed-out fetch
            # starts again from nothing, so wait longer each time.
            patience *= 2


class AllWorkersLost(RuntimeError):
    """Every worker training the run has left the cluster."""


class SchedulerLost(ConnectionError):
    """The client lost its scheduler while training ran."""


def _scheduler_lost_message(client: Client) -> str:
    return (f"lost the connection to the Dask scheduler at {client.scheduler.address}; "
            "fit again once it is back (with checkpoint=DIR, resume=True goes on from the newest checkpoint)")


class ChainKeeper:
    """Runs a fit's training chains; ``run()`` returns when every live worker is done.

    Example::

        keeper = ChainKeeper(client, spec, shards, init, evaluation)
        finals, rows, adjustments, events = keeper.run()
    """

    spec: RunSpec
    shards: list[Shard]
    chains: list[deque]
    alive: list[bool]
    finished: list[bool]
    events: list[dict]

    def __init__(self, client: Client, spec: RunSpec, shards: list[Shard], init, evaluation,
                 checkpointer=None, source=None, admit_newcomers: bool = True):
        self.client = client
        self.source = source  # the client's (X, y) when it holds the data, to send rows again
        self.spec = spec
        self.shards = list(shards)
        self.inits = [init] * len(shards)
        self.evaluation = evaluation
        self.checkpointer = checkpointer
        self.admit_newcomers = admit_newcomers
        self.chains = [deque() for _ in shards]
        self.alive = [True] * len(shards)
        self.finished = [False] * len(shards)
        self.links_made = [0] * len(shards)
        self.owner: dict[str, tuple[int, int]] = {}  # key: (chain, link)
        self.finals: dict[str, dict] = {}
        self.rows: dict[str, list[dict]] = {s.address: [] for s in shards}
        self.adjustments: list[dict] = []
        self.events: list[dict] = []
        self.orphans: list[Shard] = []  # a lost worker's dask chunks, being computed again
        # Workers that came while the fit was setting up count as newcomers too.
        self.known_workers = {s.address for s in shards}

    # -- the loop ---------------------------------------------------------------------
    def run(self):
        for i in range(len(self.shards)):
            for _ in range(CHAIN_DEPTH):
                self._extend(i)
        try:
            while any(a and not f for a, f in zip(self.alive, self.finished)):
                pending = [f for chain in self.chains for f in chain]
                try:
                    wait(pending, timeout=MEMBERSHIP_POLL, return_when="FIRST_COMPLETED")
                except (TimeoutError, FuturesCancelledError):
                    pass  # nothing finished yet; or links were cancelled: _take says why
                done = [f for f in pending if f.done()]
                # In chain order: a link's result may come in the same batch as the next one's.
                for future in sorted(done, key=lambda f: self.owner.get(f.key, (-1, -1))):
                    self._take(future)
                self._check_membership()
                self._adopt_orphans()
        except CommClosedError as e:
            # The client's connection to the scheduler closed under one of the
            # loop's calls (seen in CI: a result's gather, the worker poll): the
            # scheduler is gone, and the links' futures with it.
            raise SchedulerLost(_scheduler_lost_message(self.client)) from e
        except BaseException:
            self.client.cancel([f for chain in self.chains for f in chain])
            raise
        return self.finals, self.rows, self.adjustments, self.events

    def _extend(self, i: int) -> None:
        shard = self.shards[i]
        previous = self.chains[i][-1] if self.chains[i] else None
        future = self.client.submit(
            train_segment, self.spec, i, shard.X, shard.y, self.inits[i], self.evaluation, previous,
            key=f"{TRAIN_KEY_PREFIX}{self.spec.run_id}-{i}-{self.links_made[i]}",
            workers=[shard.address], allow_other_workers=False, pure=False,
        )
        self.owner[future.key] = (i, self.links_made[i])
        self.links_made[i] += 1
        self.chains[i].append(future)

    def _take(self, future: Future) -> None:
        i, _ = self.owner.pop(future.key, (None, None))
        if i is None or not self.alive[i] or self.finished[i]:
            return
        if future.cancelled():
            if self.client.status != "running":
                raise SchedulerLost(_scheduler_lost_message(self.client))
            if self._gone(i):
                return  # its worker died: _check_membership hands its rows on
            raise RuntimeError(f"the training task {future.key} was cancelled on a live worker, "
                               f"{self.shards[i].address} (by another client?); fit again")
        result = fetch_result(future, lambda: self._gone(i))
        if result is None:
            return  # lost with its worker: _check_membership hands its rows on
        self.chains[i].popleft()
        address = self.shards[i].address
        self.rows[address].extend(result["rows"])
        if self.checkpointer is not None and "state" in result:
            self.checkpointer.offer(address, result["state"])
        self.adjustments.extend({"worker": address, **a} for a in result.get("adjustments", ()))
        if result["done"]:
            if not result.get("stale"):
                self.finals[address] = result
            self.finished[i] = True
            for queued in self.chains[i]:
                queued.cancel()
            self.chains[i].clear()
        else:
            self._extend(i)

    # -- membership -------------------------------------------------------------------
    def _workers(self) -> set[str]:
        return worker_addresses(self.client)

    def _gone(self, i: int) -> bool:
        """Whether chain ``i``'s worker has left; asked twice, a poll apart, as the
        scheduler may cancel a dead worker's tasks just before it drops the worker."""
        for attempt in range(2):
            if self.shards[i].address not in self._workers():
                return True
            if attempt == 0:
                time.sleep(MEMBERSHIP_POLL)
        return False

    def _check_membership(self) -> None:
        workers = self._workers()
        for i, shard in enumerate(self.shards):
            if self.alive[i] and shard.address not in workers:
                self._lose(i)
        newcomers = sorted(workers - self.known_workers)
        self.known_workers |= workers
        if self.admit_newcomers:
            for address in newcomers:
                self._admit(address)

    def _elapsed(self) -> float:
        return time.time() - self.spec.t0

    def _live(self) -> list[int]:
        return [i for i, a in enumerate(self.alive) if a and not self.finished[i]]

    def _set_peers(self) -> None:
        # Queued links carry the old spec; links from here on the new peers.
        peers = tuple(self.shards[i].address for i, a in enumerate(self.alive) if a)
        self.spec = dataclasses.replace(self.spec, peers=peers)

    def _lose(self, i: int) -> None:
        """A worker left: stop its chain, tell its peers, give its rows to a survivor."""
        lost = self.shards[i]
        self.alive[i] = False
        self.client.cancel(list(self.chains[i]))
        self.chains[i].clear()
        survivors = self._live()
        if not survivors:
            raise AllWorkersLost(
                f"every worker training run {self.spec.run_id} left the cluster (the last: {lost.address}); "
                "check the workers' logs (memory limits, OOM killer) and fit again"
            )
        self._set_peers()
        peers = [self.shards[j].address for j in survivors]
        # At once, not with the next task: a sync barrier may be waiting for it.
        self.client.run(forget_peer, self.spec.run_id, lost.address, workers=peers)
        self.events.append({"elapsed": self._elapsed(), "worker": lost.address, "event": "lost",
                            "detail": f"its {lost.n_rows} rows go to the survivor with the fewest"})
        if lost.rows is not None and self.source is not None:
            self._give_rows(lost, survivors)
        else:
            # Chunks of a dask array: the scheduler computes them again. They go to
            # a survivor once they exist: a survivor whose next task waited for them
            # could hold up a sync barrier whose other workers are needed to compute them.
            self.orphans.append(lost)

    def _adopt_orphans(self) -> None:
        for lost in list(self.orphans):
            futures = lost.X + (lost.y or [])
            failed = [f for f in futures if f.status in ("error", "cancelled")]
            if failed:
                raise RuntimeError(f"the rows of lost worker {lost.address} could not be computed again "
                                   f"({failed[0].key}: {failed[0].status}); fit again")
            survivors = self._live()
            if not survivors or any(f.status != "finished" for f in futures):
                continue
            self.orphans.remove(lost)
            heir = self._give_rows(lost, survivors)
            self.events.append({"elapsed": self._elapsed(), "worker": heir, "event": "adopted",
                                "detail": f"the {lost.n_rows} rows of {lost.address}, computed again"})

    def _give_rows(self, lost: Shard, survivors: list[int]) -> str:
        """``lost``'s rows to the survivor with the fewest; returns its address."""
        heir = min(survivors, key=lambda j: self.shards[j].n_rows)
        self.shards[heir] = merge_shards(self.client, self.shards[heir], lost, self.source)
        return self.shards[heir].address

    def _admit(self, address: str) -> None:
        """A worker joined: it takes rows off the busiest worker and starts from that worker's state."""
        live = self._live()
        if not live:
            return
        donor = max(live, key=lambda j: self.shards[j].n_rows)
        source = self.shards[donor]
        state = self.client.run(current_state, self.spec.run_id, workers=[source.address]).get(source.address)
        if state is None:
            return  # the donor's run has just ended: nothing left to share
        kept, given = split_shard(self.client, source, address, self.source)
        if given is None:
            return
        self.shards[donor] = kept
        self.shards.append(given)
        (init,) = self.client.scatter([state], workers=[address], hash=False)
        self.inits.append(init)
        self.chains.append(deque())
        self.alive.append(True)
        self.finished.append(False)
        self.links_made.append(0)
        self.rows[address] = []
        self._set_peers()
        self.events.append({"elapsed": self._elapsed(), "worker": address, "event": "joined",
                            "detail": f"{given.n_rows} rows from {source.address}, its state"})
        for _ in range(CHAIN_DEPTH):
            self._extend(len(self.shards) - 1)
