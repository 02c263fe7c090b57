"""The balancing law: from measured compute speed and send timings, the
communication interval and message size one worker should use. Pure arithmetic,
no Dask: the monitor feeds it, tests drive it with synthetic traces.

The law (our own design; the papers' is not published in usable form):

* Estimate the fixed cost of a message L (latency: round trip, both event
  loops) as the quickest one-number probe of the last 30 s (queueing behind
  state messages only ever adds to a probe's time), at most twice the quickest
  probe of the run's other workers (``run_latency``: the same round trip timed
  from the other end, and a worker that started late timed its first probes
  behind its peer's whole states). The link's bandwidth B: per report, the
  state message that waited least, its bytes over its time beyond L (at most
  half its time taken for L). Without probes, fit ``seconds = L + bytes / B``
  by least squares when message sizes vary, else take the smallest send time
  and the mean throughput. Smooth B (and a fitted L), and the compute speed v
  (samples/s), with an exponential moving average (half-life ``smoothing``).
* Message size: a worker's view of a peer's state is, on average, half a full
  refresh plus one message old. Sending slices of m parameters (itemsize s) with
  the link busy a share u, a full refresh takes ``P/m * (L + m*s/B) / u`` and a
  message ``L + m*s/B``; the age ``P*L/(2*m*u) + P*s/(2*B*u) + L + m*s/B`` is
  smallest at ``m = sqrt(P * L * B / (2 * u * s))``. But messages also cost
  CPU (c each, below), so they go at most every ``c / cpu_share`` seconds
  whatever their size; where that pace is the slower, the refresh is
  ``P/m * c / cpu_share`` and larger messages pay: the optimum moves up to
  where the two paces meet. The law takes the size of least age on a grid
  (2**(1/8) apart) with both paces. Measured on K-Means at 10 Mbit/s (c
  4-5 ms): by the link alone 2000-parameter slices, 4.5-4.6 s to target,
  where auto with 4000 took 2.8-3.1 s. But the CPU's pace takes a message's
  CPU for the same at any size, and on a paced link it grows with the size
  (100 Mbit/s: 9-10 ms for halves, 3-4 ms for 1/16); so the optimum moves up
  at most ``CPU_PACE_REACH`` (2) times the link's own. At 100 Mbit/s the
  unbounded shift took halves, where logistic regression lost 29% of its
  samples/s and took 1.3x as long to target as with 1/16 slices; now
  quarters (interleaved A/B, 6 repeats each: logistic regression 4.05 s to
  target against 5.36, 1/16 slices 4.02-4.18; K-Means 0.88 against 0.97,
  halves 0.89-0.93). Clipped to [min, whole
  state] and rounded to the nearest power-of-two split (in log scale: the age
  grows alike either side of its minimum): latency-bound links (L*B large)
  get whole states, bandwidth-bound links slices that shrink with sqrt(B).
* Refresh floor: a worker averages what it receives half and half into its
  own state, and merging every parameter too often pulls it back towards its
  peer's older state faster than it moves on. Each parameter is merged at most
  every ``min_refresh`` samples (4096): at b samples between messages, slices
  of at most P * b / 4096 parameters (the split nearest in log scale). Measured
  (balance benchmark at 1e25bed) unshaped, b=2048, both problems: halves (a refresh every 4096 samples)
  reached the target in 0.74 s (K-Means) and 3.06 s (logistic regression),
  whole states every 2048 samples in 1.06 and 3.78 s, whole states every
  16384 in 1.76 and 4.1 s. The same CPU per message either way (3.3-3.9 ms),
  the same samples/s: it is the merges. The age model above does not see it.
* One size per run: every worker of a run sends messages of the same size, the
  smallest any of them chose (the monitor passes it on as ``run_size_cap``;
  ``follow_run`` takes it at once). Measured on logistic regression, unshaped,
  b=1024 forced per worker: whole states on both workers reached loss 1.24,
  quarters on both 1.16, one worker whole and the other quarters 1.54-1.56;
  a NumPy simulation of the merge rule alone shows the same. The balancer had
  mixed them whenever two workers' estimates differed (at 100 Mbit/s: 8,008
  beside 16,016).
* Interval: every message costs its worker CPU, c seconds: the worker
  measures the CPU its event loop spends (sending, receiving) and its training
  thread spends merging, per state message sent (each worker receives about
  as many as it sends); until measured, c = L. A message also keeps the link
  busy ``t = L + m * itemsize / B``, or, for the size being sent, t as timed:
  the seconds the worker's links had a send on the wire per message that
  finished, over the last 2 s (once 4 came after any drain), which needs no
  split of the time into L and B and counts overlapping sends once (each of
  two sends side by side takes twice its share). Sending every b samples at v
  samples/s costs a share ``v * c / b`` of the time and keeps the link busy a
  share ``v * t / b``. b is the smallest interval that holds the first at
  ``cpu_share`` and the second at ``link_share``:
  ``b = v * max(c / cpu_share, t / link_share)``. Measured: keeping the link
  nearly full pays (logistic regression at 10 Mbit/s, 1/32 slices: b=1024,
  the link full, reached the target in 4.5 s, the median of 27 runs; b=2048
  in 5.3 and 6.1 s), hence 0.8. The CPU: a message of 64 KB cost 1.8 ms at
  100 Mbit/s on the emulated cluster (1.3 ms for 32 KB; loopback 1.0 ms),
  where the probe's round trip L was 0.8-1 ms: with L for c, the law sent
  every 512 samples (a third of the CPU on communicating, 35% fewer samples/s
  than at 2048) where 1024-2048 reached the target 1.3x sooner. The measure
  also holds the event loop's other work (4% of a core), so c reads high at
  long intervals (4 ms at b=4096); ``cpu_share`` is 15% of that measure (28%
  at b=512, 19% at 1024, 14% at 2048 for logistic regression's eighths at
  100 Mbit/s; 2048 reached the target soonest), and c is at most 4 L.
* Start: an auto run sends small slices (``asgd.balance.start-message-size``,
  32 KB) and reports the first two's times at once (the quicker of two waited
  least; one caught in a stall of the machine read 7.5 Mbit/s unshaped): the
  first setting comes from messages that cannot fill a slow link. 64 KB slices
  every 2048 samples did fill a 10 Mbit/s link, both ways: every send waited,
  the first bandwidth read 3.4-6.9 Mbit/s, and K-Means took 3.04 s to target
  where it takes 1.76 s from 32 KB. From whole states, as at first, a 10 Mbit/s
  link carried 0.4 s messages until the backlog rule cut them, 0.65-0.77 s in,
  and they still had to drain.
* Probing: with all sends of one size, latency and bandwidth cannot be told
  apart. When such sends take long (over ``probe_seconds``), the message size is
  halved once, and the two sizes separate them.
* Backlog: sends superseded while waiting, or older than the estimated message
  time, in two reports in a row (one can be a stall of the machine), mean the
  link is already saturated. If the quickest probe is far
  quicker than the slow sends, bytes are the cost, not messages: the message
  size falls at once, b stays, and the new size caps the law's size until
  ``relax_seconds`` pass without backlog (then the cap doubles, and so on).
  The size falls to at most half, and to the split nearest what the link
  carried in the slowest send scaled to one interval.
  Otherwise (or at the smallest size) b doubles at once, or goes to the
  law's own target where that is longer (at most 4x): small messages on a
  fast link back up when the event loop falls behind, and the CPU term says
  how far. Neither while larger
  messages sent before a cut in the message size still drain: until a report
  shows sends of the new size only and nothing on the wire for long (or a
  deadline passes); the worker withdraws the old split's messages still
  waiting. (Doubling b on a
  bandwidth-bound link first, as this law did before, spent the first 2-3 s of
  a 10 Mbit/s run at ever longer intervals of whole states, while 1/16 slices
  every 2048 samples were the best fixed setting.)
* No oscillation: b changes only when the law's target moves outside a dead
  band around the current value (``deadband``, a ratio wider than one step),
  or the link cannot carry the sends at all (a link share over one), then to
  the target quantised to powers of sqrt(2) times the batch size, at most 4x
  up at a time, and at most every ``min_change_interval`` seconds (every
  half of it on backlog).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class BalancerSettings:
    cpu_share: float = 0.15
    link_share: float = 0.8
    probe_seconds: float = 0.02
    window: int = 64
    window_seconds: float = 10.0
    smoothing: float = 1.0
    deadband: float = 1.5
    min_change_interval: float = 1.0
    min_interval: int = 256
    max_interval: int = 2**24
    min_message_size: int = 1024
    min_refresh: int = 4096
    max_levels: int = 12
    relax_seconds: float = 5.0


@dataclass
class Report:
    """What one worker measured since its previous report."""

    elapsed: float  # seconds since the run started, at the worker
    samples: int  # samples processed since the previous report
    seconds: float  # wall seconds since the previous report
    sends: list[tuple[int, float]] = field(default_factory=list)  # (bytes, seconds) delivered
    superseded: int = 0  # messages replaced while waiting to be sent
    in_flight: int = 0
    oldest_in_flight: float = 0.0  # age in seconds of the oldest send on the wire
    messages: int = 0  # state messages sent since the previous report
    comm_cpu: float = math.nan  # CPU seconds spent communicating since the previous report
    busy: float = math.nan  # seconds since the previous report with a send of the worker's on the wire


@dataclass(frozen=True)
class Decision:
    comm_interval: int
    message_size: int
    reason: str


# Sends smaller than this (latency probes) carry no information on bandwidth.
PAYLOAD_BYTES = 1024
# Sends of the current size it takes to trust their own times over latency and bandwidth.
TIMED_SENDS = 4
# A worker's latency is at most this factor over the quickest probe of any
# worker of its run (workers differ a little; queues differ a lot).
LATENCY_SPREAD = 2.0
# Seconds beyond the estimated time of the larger messages on the wire that
# a drain may last without a report showing it over.
DRAIN_SLACK = 1.0
# Reports whose busy time the message time is taken from (2 s at 4 a second).
BUSY_REPORTS = 8
# Probes are remembered this many times the sends' window.
LATENCY_MEMORY = 3
# Without backlog, b grows at most this factor per change: a blip in the
# estimates costs a step, not a run (b went from 2048 to 65536 on one).
MAX_GROWTH = 4
# The message size changes when the law's optimum is this factor off it.
SIZE_DEADBAND = 1.8
# A message's measured CPU cost is at most this factor over the latency.
MESSAGE_COST_SPREAD = 4.0
# The CPU's pace moves the message size at most this factor over the link's own optimum.
CPU_PACE_REACH = 2.0
# The sender name under which the scheduler's monitor sends each worker its settings.
BALANCER_SENDER = "scheduler"


def _valid(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _valid_sends(report: Report) -> list[tuple[int, float]]:
    """The report's sends with a positive, finite size and time."""
    return [(b, s) for b, s in report.sends if _valid(b) and _valid(s) and b > 0 and s > 0]


class Balancer:
    """Chooses ``comm_interval`` and ``message_size`` for one worker.

    Example::

        balancer = Balancer(n_params=2_000_000, itemsize=8, batch_size=256,
                            comm_interval=32768, message_size=2_000_000)
        decision = balancer.update(Report(elapsed=3.0, samples=400_000, seconds=0.5,
                                          sends=[(16_000_000, 1.3)]))
        if decision:
            decision.comm_interval, decision.message_size, decision.reason
    """

    settings: BalancerSettings
    comm_interval: int
    message_size: int
    latency: float | None
    bandwidth: float | None
    speed: float | None
    changes: int

    def __init__(self, n_params: int, itemsize: int, batch_size: int, comm_interval: int, message_size: int,
                 settings: BalancerSettings | None = None, tune_interval: bool = True, tune_size: bool = True):
        self.settings = settings or BalancerSettings()
        self.n_params = n_params
        self.itemsize = itemsize
        self.batch_size = batch_size
        self.comm_interval = comm_interval
        self.message_size = message_size
        self.tune_interval = tune_interval
        self.tune_size = tune_size
        self.latency = self.bandwidth = self.speed = None
        self.message_cpu: float | None = None  # CPU seconds per state message sent, as measured
        self.changes = 0
        self._last_change = -math.inf
        self._sends: deque[tuple[float, int, float]] = deque(maxlen=self.settings.window)
        # Per report: (elapsed, bytes of its state messages or 0 if none finished, busy seconds, messages)
        self._busy: deque[tuple[float, int, float, int]] = deque(maxlen=BUSY_REPORTS)
        self._small: deque[tuple[float, float]] = deque(maxlen=LATENCY_MEMORY * self.settings.window)  # (elapsed, seconds) of probes
        self.fixed_cost: float | None = None
        self._identified = False  # latency told apart from bandwidth (two sizes seen)
        self._slowest = 0.0  # longest a send took or has been going, in the last report
        # After a cut in the message size, larger messages still on the wire:
        # the new size's bytes until a report shows only sends of it (or the
        # deadline passes); no backlog rule, no timing of the new size till then.
        self._drain_bytes: int | None = None
        self._draining_until = -math.inf
        self._drained_at = -math.inf
        self._now = -math.inf  # elapsed time of the report being taken
        self._in_flight = 0
        self._size_cap = n_params  # lowered by backlog on a bytes-bound link; relaxes in quiet
        # One message size for the whole run: this worker's own choice (``wish``)
        # and the smallest the run's other workers chose (``run_size_cap``, set by
        # the monitor). The worker sends the smaller of the two.
        self.wish = message_size
        self.run_size_cap = n_params
        # The quickest probe of the run's other workers (set by the monitor).
        self.run_latency: float | None = None
        self._quiet_since = 0.0  # elapsed time of the last backlog, or of the last relaxation
        self._backlog_reports = 0  # reports in a row that showed backlog

    # -- estimation ------------------------------------------------------------------------
    def _smooth(self, old: float | None, new: float, seconds: float) -> float:
        if old is None:
            return new
        weight = 1.0 - 0.5 ** (seconds / self.settings.smoothing)
        return old + weight * (new - old)

    def _observe(self, report: Report, sends: list[tuple[int, float]]) -> None:
        seconds = report.seconds if _valid(report.seconds) and report.seconds > 0 else None
        if seconds is None:
            return
        if _valid(report.samples) and report.samples >= 0:
            self.speed = self._smooth(self.speed, report.samples / seconds, seconds)
        if _valid(report.messages) and report.messages > 0 and _valid(report.comm_cpu) and report.comm_cpu >= 0:
            self.message_cpu = self._smooth(self.message_cpu, report.comm_cpu / report.messages, seconds)
        now = report.elapsed if _valid(report.elapsed) else 0.0
        self._sends.extend((now, b, s) for b, s in sends)
        self._observe_busy(now, sends, report.busy)
        while self._sends and self._sends[0][0] < now - self.settings.window_seconds:
            self._sends.popleft()
        # A message's fixed cost, without waiting in a queue on the link: the
        # quickest probe of the window (a queue only ever adds to it).
        self._small.extend((now, s) for b, s in sends if b < PAYLOAD_BYTES)
        # A longer memory than for sends: the fixed cost hardly changes, and on
        # a busy link few probes find it idle (at 10 Mbit/s, probes queued
        # behind state messages read 17-50 ms for a 1 ms cost, and the
        # per-message cost rule set b to 65536).
        while self._small and self._small[0][0] < now - LATENCY_MEMORY * self.settings.window_seconds:
            self._small.popleft()
        self.fixed_cost = min(s for _, s in self._small) if self._small else None
        if self.fixed_cost is not None and self.run_latency is not None:
            # A probe and its reply cross both directions of the path, the
            # peers' probes too, and queue behind whichever state messages go
            # then: a worker that started later than its peer timed its first
            # probes behind the peer's whole states (50 ms for 1 ms).
            self.fixed_cost = min(self.fixed_cost, LATENCY_SPREAD * self.run_latency)
        payload_times = [s for _, b, s in self._sends if b >= PAYLOAD_BYTES]
        if self.fixed_cost is not None and payload_times:
            # Nor longer than a state message took: it paid the same fixed
            # cost, and its bytes besides. A run's first probes may have no
            # peer's to compare with: one read 146 ms for 1 ms where 64 KB
            # messages took 6 ms (logistic regression, 100 Mbit/s), and the
            # first setting was whole states every 8192 samples.
            self.fixed_cost = min(self.fixed_cost, min(payload_times))
        if not sends:
            return
        if self.fixed_cost is not None:
            self._observe_with_probes(sends, seconds)
            return
        if not self._identified:
            latency, bandwidth = fit_link([(b, s) for _, b, s in self._sends])
            if bandwidth is None:
                self.latency = latency  # a guess until two sizes tell them apart
                return
            self._identified = True
            self.latency, self.bandwidth = latency, bandwidth
            return
        # Latency known: this report's sends alone tell the bandwidth now, so a
        # change shows within a report or two, not after the whole window.
        latency, bandwidth = fit_link(sends) if len(sends) >= 4 else (None, None)
        if bandwidth is not None:
            self.latency = self._smooth(self.latency, latency, seconds)
            self.bandwidth = self._smooth(self.bandwidth, bandwidth, seconds)
            return
        self._observe_payload(sends, seconds)

    def _observe_busy(self, now: float, sends: list[tuple[int, float]], busy: float) -> None:
        """A report's busy time with the state messages that finished in it,
        if they were all of one size (or none finished)."""
        if not _valid(busy) or busy < 0:
            return
        payload = [b for b, _ in sends if b >= PAYLOAD_BYTES]
        if payload and max(payload) > 1.1 * min(payload):
            self._busy.clear()  # mixed sizes: the busy time is not one size's
            return
        self._busy.append((now, payload[0] if payload else 0, busy, len(payload)))

    def _observe_with_probes(self, sends: list[tuple[int, float]], seconds: float) -> None:
        """Latency: the quickest probe. A fit of time on size would not do on a
        busy link: probes queue behind state messages there, the fit's intercept
        takes the queue for latency and its slope flattens (seen at 10 Mbit/s:
        35-90 ms "latency" for a 2 ms fixed cost, and no slope at all)."""
        self.latency = self.fixed_cost
        if not self._identified:
            # The first state message with a probe tells them apart; use all the window has.
            sends = [(b, s) for _, b, s in self._sends]
        if self._observe_payload(sends, seconds):
            self._identified = True

    def _observe_payload(self, sends: list[tuple[int, float]], seconds: float) -> bool:
        """Bandwidth from the sends that carry a state, the latency known; False if none did."""
        carrying = [(b, s) for b, s in sends if b >= PAYLOAD_BYTES]
        if not carrying:
            return False  # probes alone say nothing of bandwidth: keep what we know
        # Payload time lost in the latency's noise: the link is latency-bound.
        if min(s for _, s in carrying) - self.latency < 0.2 * self.latency:
            self.bandwidth = None
            return True
        # The send that waited least: queueing only slows a send. At most half
        # a send's time is taken for latency: a latency read from probes that
        # queued too left 16 KB sends at 10 Mbit/s 1 ms of payload, and the
        # estimate at 2,000 Mbit/s.
        rate = max(b / max(s - self.latency, s / 2) for b, s in carrying)
        self.bandwidth = self._smooth(self.bandwidth, rate, seconds)
        return True

    # -- the law ---------------------------------------------------------------------------
    def message_time(self, message_size: int) -> float:
        """Seconds one message keeps the link busy: as timed, for the size being
        sent now, else from latency and bandwidth."""
        timed = self._timed(message_size)
        if timed is not None:
            return timed
        latency = self.latency or 0.0
        payload = 0.0 if not self.bandwidth else message_size * self.itemsize / self.bandwidth
        return latency + payload

    def _timed(self, message_size: int) -> float | None:
        """The link's time per message of this size: the seconds its links were
        busy over the messages that finished, in the last 2 s of reports since
        it is sent alone (larger ones drained), once 4 finished. A send's own
        time will not do on a loaded link: two on the wire share it, each takes
        twice its share, and the law set b twice too long (logistic regression
        at 10 Mbit/s: 2896-5792 for 2002-parameter slices, where 1024-2048 is
        best). Without busy times (an older worker), the quickest of the
        recent sends of this size. Measured directly, a send's
        time needs no split into latency and bandwidth: the split errs where
        probes wait behind state messages (a probe at 13 ms against 1 ms made
        16 KB sends at 10 Mbit/s read as 877 Mbit/s, and the interval fell
        to a third of what the link carries). The quickest: sends that overlap
        another one wait for it, so a typical send's time grows as the link
        fills, and with it the interval the law asks for; b swung between
        1024 and 2048 every second at 10 Mbit/s with the lower quartile."""
        if message_size != self.message_size or self._drain_bytes is not None:
            return None
        nbytes = message_size * self.itemsize
        busy = [(s, n) for t, b, s, n in self._busy if t > self._drained_at and (n == 0 or abs(b - nbytes) <= 0.1 * nbytes)]
        if sum(n for _, n in busy) >= TIMED_SENDS:
            # The link's time per message, whether sends overlapped or not.
            return sum(s for s, _ in busy) / sum(n for _, n in busy)
        times = [s for t, b, s in self._sends if t > self._drained_at and abs(b - nbytes) <= 0.1 * nbytes]
        recent = times[-4 * TIMED_SENDS:]  # the newest: a drop in bandwidth shows within a few sends
        return min(recent) if len(recent) >= TIMED_SENDS else None

    def _one_size(self) -> bool:
        sizes = [b for _, b, _ in self._sends]
        return not sizes or max(sizes) < 2 * min(sizes)

    def _draining(self) -> bool:
        return self._drain_bytes is not None and self._now < self._draining_until

    def _watch_drain(self, sends: list[tuple[int, float]], oldest_in_flight: float) -> None:
        """The drain is over once a report's sends are all of the new size (the
        larger ones went first) and nothing on the wire has been going much
        longer than they took (a larger one may still be going on the other
        connection: b doubled at 10 Mbit/s for a whole state 1.4 s on the
        wire), or at its deadline."""
        if self._drain_bytes is None:
            return
        new = [s for b, s in sends if PAYLOAD_BYTES <= b <= 1.1 * self._drain_bytes]
        larger = [b for b, _ in sends if b > 1.1 * self._drain_bytes]
        quiet = bool(new) and not larger and oldest_in_flight <= 4 * max(new) + 0.05
        if quiet or self._now >= self._draining_until:
            self._drain_bytes = None
            self._drained_at = self._now

    def _unresolved(self) -> bool:
        """Sends are slow (finished or still going), and one size cannot say why."""
        return not self._identified and max(self.latency or 0.0, self._slowest) > self.settings.probe_seconds

    def own_message_size(self) -> int:
        """The size this worker's own measurements ask for."""
        if not self.tune_size or self.latency is None:
            return self.message_size
        return min(self._law_message_size(), self._size_cap, self._refresh_cap())

    def _refresh_cap(self) -> int:
        """The largest split that merges each parameter at most every
        ``min_refresh`` samples at the current interval (a worker averages a
        received slice half and half into its own): merging too often pulls a
        worker back towards its peers' older states faster than it moves on.
        The split nearest in log scale, not the next under: 1448 samples with
        a 4096 floor take halves, not quarters (1.01: intervals are whole
        samples, 1448 for 1024 x sqrt(2))."""
        return self._nearest_split(1.01 * self.n_params * self.comm_interval / self.settings.min_refresh)

    def follow_run(self, message_size: int, elapsed: float, why: str) -> Decision | None:
        """Take the run's message size at once (no wait for ``min_change_interval``):
        mixed sizes between workers slow convergence (see the module's docstring)."""
        if not self.tune_size:
            return None
        # Not this worker's own decision: its law may still move the interval at
        # once (measured: a follower kept the start's 2048 samples with the new
        # slices for a second, and K-Means at 100 Mbit/s took 2.6-4.9 s to target
        # against 1.6-1.9 s).
        last_change = self._last_change
        decision = self._change(self.comm_interval, message_size, elapsed, why)
        self._last_change = last_change
        return decision

    def _law_message_size(self) -> int:
        if not self.bandwidth:
            # Not while larger messages drain: their time is not this size's
            # (a follower of a backlog cut halved the cut size again at once).
            if self._unresolved() and self.message_size > self.settings.min_message_size and not self._draining():
                # Slow sends of one size: is it latency or bandwidth? Half the size tells.
                return self._split(self.message_size / 2)
            return self.message_size if not self._identified else self.n_params
        wanted = self._freshest_size()
        # Splits are a factor 2 apart: keep the current one while the optimum
        # stays within SIZE_DEADBAND of it, so noise flips nothing (the optimum
        # must move 27% past the midpoint to the next split, L*B 61%). Wider
        # (2.1) held 16,016 at 100 Mbit/s for 2.6 s where the optimum was 7,900:
        # chosen at the start from a probe that had queued (4.5 ms for 1 ms).
        band = SIZE_DEADBAND
        if self.message_size / band <= wanted <= self.message_size * band:
            return self.message_size
        # The age is a/m + c*m, as far above its minimum at k times the optimum
        # as at 1/k of it: the nearest split in log scale, not the next under.
        return self._nearest_split(wanted)

    def _freshest_size(self) -> float:
        """The message size (parameters) that keeps a worker's view of its
        peers' states youngest: half a full refresh plus one message old (see
        the module's docstring), messages as often as both the link and the
        CPU allow. Searched on a grid 2**(1/8) apart from the floor to the
        whole state."""
        s = self.settings
        # Messages go at most every c / cpu_share seconds whatever their size
        # (with a fixed interval, every interval), and at most as often as the
        # link carries them at its share.
        if self.tune_interval:
            floor = self.message_cost() / s.cpu_share
        else:
            floor = self.comm_interval / self.speed if self.speed else 0.0

        def age(m: float, floor: float = floor) -> float:
            message = self.latency + m * self.itemsize / self.bandwidth
            return self.n_params / m * max(floor, message / s.link_share) / 2 + message

        smallest = min(s.min_message_size, self.n_params)
        steps = math.ceil(8 * math.log2(self.n_params / smallest))
        grid = [self.n_params * 2 ** (-k / 8) for k in range(steps + 1)]
        # The CPU's pace moves the optimum up from the link's own, but only so
        # far: a message's CPU grows with its size on a paced link (the module's docstring).
        reach = CPU_PACE_REACH * min(grid, key=lambda m: age(m, 0.0))
        return min((m for m in grid if m <= reach), key=age)

    def target_interval(self, message_size: int) -> float | None:
        """The interval the law asks for, before quantisation; none while the
        latency is only a guess from slow sends of one size (backlog and probes
        move things then, a step at a time)."""
        if self.speed is None or self.latency is None:
            return None
        if self._unresolved():
            return None
        s = self.settings
        return self.speed * max(self.message_cost() / s.cpu_share, self.message_time(message_size) / s.link_share)

    def message_cost(self) -> float:
        """CPU seconds a state message costs its worker, as measured; the
        latency (a probe's round trip, mostly event-loop work) until measured.
        The measure holds the event loop's other work too (heartbeats,
        reports: 4% of a core on the emulated cluster), a share that does not
        fall with fewer messages; so at most ``MESSAGE_COST_SPREAD`` times the
        latency, lest an event loop busy with other things stop the exchanges.
        (A paced link does cost more: at 100 Mbit/s, 256 KB halves every 2048
        samples cost 9-10 ms of CPU each, 0.19 of a core against 0.10
        unshaped. Capped at 4 times the message's time on the link instead,
        the first quarter-second's 12-19 ms counted, b went to 2896-4096 and
        the size to whole states, and K-Means at 100 Mbit/s took 1.71 s to
        target where fixed halves every 2048 samples took 1.15.)"""
        if self.message_cpu is None:
            return self.latency
        return min(self.message_cpu, MESSAGE_COST_SPREAD * self.latency)

    def _quantise(self, interval: float) -> int:
        s = self.settings
        interval = min(max(interval, s.min_interval, self.batch_size), s.max_interval)
        steps = round(2 * math.log2(interval / self.batch_size))
        return int(min(max(self.batch_size * 2 ** (steps / 2), s.min_interval, self.batch_size), s.max_interval))

    def update(self, report: Report) -> Decision | None:
        """Take one report; return a new setting, with its reason, or ``None``."""
        sends = _valid_sends(report)
        self._observe(report, sends)
        done = [s for _, s in report.sends if _valid(s) and s > 0]
        going = report.oldest_in_flight if _valid(report.oldest_in_flight) else 0.0
        self._slowest = max(done + [going, 0.0])
        if self.latency is None and _valid(report.oldest_in_flight) and report.oldest_in_flight > 0:
            # Nothing finished yet, but a send has been going this long: a floor
            # for the message time, enough to start probing.
            self.latency = report.oldest_in_flight
        now = report.elapsed if _valid(report.elapsed) else None
        if now is None:
            return None
        self._now = now
        self._watch_drain(sends, report.oldest_in_flight if _valid(report.oldest_in_flight) else 0.0)
        if self._size_cap < self.n_params and now - self._quiet_since >= self.settings.relax_seconds:
            self._size_cap = split_size(self.n_params, 2 * self._size_cap, self.settings.max_levels)
            self._quiet_since = now
        # The size to send: this worker's own, or a smaller one another worker of the run chose.
        own = self.own_message_size()
        size = min(own, self.run_size_cap) if self.tune_size else own
        backlogged = not self._draining() and (report.superseded > 0 or (
            self.latency is not None and report.in_flight > 0
            and _valid(report.oldest_in_flight) and report.oldest_in_flight > 4 * self.message_time(self.message_size) + 0.05
        ))
        # One report of backlog can be a stall of the machine, not the link: on
        # 2 shared cores a 60 ms send unshaped (1.5 ms usual) superseded one
        # message, the law cut K-Means to 1/8 slices, and 1 run in 3 went badly.
        # A saturated link is backlogged in the next report too.
        self._backlog_reports = self._backlog_reports + 1 if backlogged else 0
        backlog = self._backlog_reports >= 2
        self._in_flight = report.in_flight if _valid(report.in_flight) else 0
        if backlogged and not backlog:
            return None  # wait for the next report: a stall's timings say nothing of the link either
        if backlog and (self.tune_interval or self.tune_size):
            if now - self._last_change < self.settings.min_change_interval / 2:
                return None
            self._quiet_since = now
            self._backlog_reports = 0  # the next step needs backlog in two fresh reports
            why = (f"backlog: {report.superseded} message(s) superseded before sending"
                   if report.superseded else f"backlog: a send in flight for {report.oldest_in_flight:.2f} s")
            smaller = min(size, self._backlog_size())
            self.wish = own
            if self._bytes_bound() and self.tune_size and smaller < self.message_size:
                self._size_cap = self.wish = smaller
                return self._change(self.comm_interval, smaller, now,
                                    f"{why}; probes take {self.fixed_cost * 1e3:.1f} ms and sends up to "
                                    f"{self._slowest:.2f} s, so bytes are the cost: {smaller}-parameter slices")
            if self.tune_interval:
                return self._change(self._backlog_interval(size), size, now, why)
        if now - self._last_change < self.settings.min_change_interval:
            return None
        self.wish = own
        wanted = self.target_interval(size) if self.tune_interval else self.comm_interval
        if wanted is None:
            if size == self.message_size:
                return None
            if size < own:
                return self._change(self.comm_interval, size, now, run_size_reason(size))
            return self._change(self.comm_interval, size, now,
                                f"probing: sends of one size take up to {self._slowest:.2f} s; trying {size}-parameter "
                                "slices to tell latency from bandwidth")
        # The dead band (wider than one sqrt(2) step) is applied before
        # quantising: noise around a step boundary moves nothing.
        outside = max(wanted / self.comm_interval, self.comm_interval / wanted) > self.settings.deadband
        # Except where the link cannot carry the sends at all: a link share
        # over one is backlog building, whatever the dead band allows.
        overfull = wanted > self.comm_interval and self.speed * self.message_time(size) > self.comm_interval
        if not (outside or overfull) and size == self.message_size:
            return None
        interval = self.comm_interval
        if outside or overfull:
            interval = self._quantise(min(wanted, MAX_GROWTH * self.comm_interval))
        if overfull:
            interval = max(interval, self._quantise(self.comm_interval * math.sqrt(2)))
        bandwidth = f"{self.bandwidth * 8 / 1e6:.1f} Mbit/s" if self.bandwidth else "not limiting"
        why = (f"latency {self.latency * 1e3:.2f} ms, bandwidth {bandwidth}, {self.speed:,.0f} samples/s: "
               f"messages {self.message_cost() * 1e3:.2f} ms of CPU each, {100 * self.speed * self.message_cost() / interval:.0f}% of the time, "
               f"link busy {100 * self.speed * self.message_time(size) / interval:.0f}%")
        if size < own:
            why += f"; {run_size_reason(size)}"
        return self._change(interval, size, now, why)

    def _backlog_interval(self, size: int) -> int:
        """Twice the interval, or the law's own target if that is longer (at
        most ``MAX_GROWTH`` times): a backlog of small messages on a fast link
        is the event loop falling behind, which the CPU term already measures.
        Measured (logistic regression, 33 parameters, 2 workers unshaped): from
        the start's 2048 samples the law asked for 5,500-7,000 at 2.2 million
        samples/s, doubling took b to 4096 at 0.5 s and 8192 at 1.0 s, the
        event loop took 37-48% of a core till then, and 1 s of a 4 s fit ran
        at 60% of its later speed. (The whole fit gained little: 0.68 to 0.69
        of its speed with no state messages, 5 interleaved repeats.)"""
        doubled = self._quantise(self.comm_interval * 2)
        wanted = self.target_interval(size)
        if wanted is None:
            return doubled
        return max(doubled, self._quantise(min(wanted, MAX_GROWTH * self.comm_interval)))

    def _backlog_size(self) -> int:
        """At most half the message size; less, to the split nearest what the
        link carried in the slowest send scaled to one interval. Not to the
        link's share of one interval: the slowest send waited in a queue too,
        so the rate it shows errs low already (with the share as well, 10
        Mbit/s got 1/32 slices where 1/16 were the best fixed setting, and the
        cap held them there for the whole run)."""
        wanted = self.message_size / 2
        if self.speed and self._slowest > 0:
            room = self.comm_interval / self.speed
            wanted = min(wanted, self.message_size * room / self._slowest)
        # The split nearest the wanted size (within sqrt(2)), not the next one
        # under it: 10 Mbit/s took 2,002 for a wanted 3,280, where the law's own
        # optimum was about 3,400 and 4,004 the best fixed slices.
        return self._nearest_split(wanted)

    def _nearest_split(self, wanted: float) -> int:
        """The split nearest ``wanted`` in log scale (within sqrt(2) either side), not the next under."""
        return self._split(wanted * math.sqrt(2))

    def _split(self, wanted: float) -> int:
        """``split_size`` of the state, never under the smallest split over the floor."""
        return max(split_size(self.n_params, wanted, self.settings.max_levels), self._smallest_split())

    def _smallest_split(self) -> int:
        """The smallest slice of a power-of-two split at or over ``min_message_size``
        (the whole state if that is smaller): splits round, and 64,064 parameters
        in 64 give 1,001, under a 1,024 floor."""
        s = self.settings
        smallest = split_size(self.n_params, s.min_message_size, s.max_levels)
        if smallest < s.min_message_size:
            smallest *= 2
        return min(smallest, self.n_params)

    def _bytes_bound(self) -> bool:
        """The quickest probe is far quicker than the slowest send: the link's
        time goes on bytes, not on a per-message cost."""
        return self.fixed_cost is not None and self._slowest > 4 * self.fixed_cost

    def _change(self, interval: int, size: int, now: float, why: str) -> Decision | None:
        if interval == self.comm_interval and size == self.message_size:
            return None
        if size > self.message_size:
            self._drain_bytes = None
            self._drained_at = now
        elif size < self.message_size:
            # Smaller messages from now on, but the larger ones already on the
            # wire still have to drain: their wait says nothing of the new size.
            # Without this, b doubled to 16384 at 10 Mbit/s while whole states
            # drained, after the law had already picked 4000-parameter slices.
            # Before a bandwidth estimate, the slowest send so far stands in for
            # the time of one of the larger messages.
            # (An estimate of the drain's time ended it too early: a second
            # backlog cut halved the size again at 10 Mbit/s. Now the deadline
            # only guards against a report that never comes.)
            per_message = max(self.message_time(self.message_size), self._slowest)
            self._drain_bytes = size * self.itemsize
            self._draining_until = now + max(self._in_flight, 2) * per_message + DRAIN_SLACK
        self.comm_interval, self.message_size = interval, size
        self._last_change = now
        self.changes += 1
        return Decision(interval, size, why)


def run_size_reason(message_size: int) -> str:
    return (f"{message_size}-parameter messages, the smallest any worker of the run chose "
            "(mixed sizes between workers slow convergence)")


def fit_link(sends: list[tuple[int, float]]) -> tuple[float, float | None]:
    """``(latency, bandwidth)`` from ``(bytes, seconds)`` sends; bandwidth ``None``
    when the sends cannot show a cost per byte (one size, or none measurable)."""
    sizes = [b for b, _ in sends]
    times = [s for _, s in sends]
    if max(sizes) >= 2 * min(sizes) and len(sends) >= 4:
        # Least squares on seconds = L + bytes / B, where sizes vary enough.
        n = len(sends)
        mean_b, mean_s = sum(sizes) / n, sum(times) / n
        var = sum((b - mean_b) ** 2 for b in sizes)
        slope = sum((b - mean_b) * (s - mean_s) for b, s in sends) / var
        intercept = mean_s - slope * mean_b
        if slope > 0:
            return max(intercept, min(times) * 0.05), 1.0 / slope
        return sorted(times)[len(times) // 2], None
    return min(times), None


def split_size(n_params: int, wanted: float, max_levels: int) -> int:
    """The slice size of the coarsest power-of-two split of ``n_params`` whose slices
    are at most about ``wanted`` (slices round up: 64,064 in 64 are 1,001 each)."""
    level = level_for(n_params, wanted, max_levels)
    return math.ceil(n_params / 2**level)


def level_for(n_params: int, message_size: float, max_levels: int) -> int:
    """Split level L: the state goes in 2**L slices of at most ``message_size``."""
    if message_size >= n_params:
        return 0
    return min(max_levels, max(0, math.ceil(math.log2(n_params / message_size))), int(math.log2(max(n_params, 1))))
