"""The balancing law on synthetic timing traces, and the scheduler's monitor on
a real cluster (reports arrive, malformed ones are dropped, settings go back)."""

import dataclasses
import math
import random

import dask
import numpy as np
import pytest

from dask_asgd.balance import Balancer, Report, fit_link, split_size
from dask_asgd.balance._law import BalancerSettings

P = 2_000_000  # parameters: a 16 MB state in float64
SPEED = 1.5e6  # samples/s of one worker

# For tests of other rules at short intervals: the refresh floor
# (asgd.balance.min-refresh-samples) would halve whole states at b=2048 first.
NO_REFRESH_FLOOR = BalancerSettings(min_refresh=1)


def drive(phases, noise=0.1, seed=0, settings=None, report_every=0.5, in_flight_limit=2):
    """Run a balancer through phases of (seconds, latency, bandwidth bytes/s).

    A send takes ``latency + bytes / bandwidth`` (times a random factor); the
    link carries ``in_flight_limit`` at a time, and what it cannot carry in a
    report's time is superseded, as in the channel. Each report also carries
    one latency probe (8 bytes), as the engine sends."""
    rnd = random.Random(seed)
    balancer = Balancer(P, 8, 256, comm_interval=32768, message_size=P, settings=settings)
    t, trace, capacity = 0.0, [], 0.0
    for seconds, latency, bandwidth in phases:
        end = t + seconds
        while t < end - 1e-9:
            t += report_every
            size = balancer.message_size * 8
            message_time = latency + size / bandwidth
            wanted = max(1, int(report_every * SPEED / balancer.comm_interval))
            # Sends finish at the link's pace, across report boundaries.
            capacity = min(capacity + in_flight_limit * report_every / message_time, wanted + in_flight_limit)
            carried = min(wanted, int(capacity))
            capacity -= carried
            sends = [(size, message_time * (1 + noise * rnd.uniform(-1, 1))) for _ in range(min(carried, 20))]
            # The engine's latency probe: one 8-byte message every report.
            sends.append((8, (latency + 8 / bandwidth) * (1 + noise * rnd.uniform(-1, 1))))
            decision = balancer.update(Report(
                elapsed=t, samples=int(report_every * SPEED), seconds=report_every, sends=sends,
                superseded=max(0, wanted - carried - in_flight_limit), in_flight=min(wanted, in_flight_limit),
                oldest_in_flight=min(message_time, report_every) if wanted > carried else 0.0,
            ))
            trace.append((t, balancer.comm_interval, balancer.message_size, decision))
    return balancer, trace


def backlogged(balancer, report):
    """The same backlog in two reports in a row, 0.25 s apart (one alone is taken
    for a stall of the machine); the second report's decision."""
    first = balancer.update(dataclasses.replace(report, elapsed=report.elapsed - 0.25))
    assert first is None or "backlog" not in first.reason
    return balancer.update(report)


def steady_link(balancer, latency, bandwidth, message_bytes, reports):
    """``reports`` reports 0.25 s apart of 10,000 samples each, every one with a
    state message of ``message_bytes`` and a probe timed by ``latency + bytes /
    bandwidth``, and no backlog."""
    for i in range(1, reports + 1):
        balancer.update(Report(elapsed=0.25 * i, samples=10_000, seconds=0.25,
                               sends=[(message_bytes, latency + message_bytes / bandwidth), (8, latency)]))


def changes_between(trace, start, stop):
    return sum(1 for t, _, _, d in trace if d is not None and start < t <= stop)


def test_interval_grows_when_bandwidth_drops_and_shrinks_when_it_recovers():
    _, trace = drive([(20, 1e-3, 12.5e6), (20, 1e-3, 0.625e6), (20, 1e-3, 12.5e6)])
    at = {round(t, 1): b for t, b, _, _ in trace}
    fast, slow, recovered = at[20.0], at[40.0], at[60.0]
    # The law scales the interval with 1/sqrt(bandwidth) once bandwidth-bound:
    # a 20x drop asks for about 4.5x (quantised to sqrt(2) steps).
    assert slow >= 2.8 * fast, (fast, slow)
    assert recovered <= slow / 2.8, (slow, recovered)


def test_reacts_within_five_seconds_of_a_drop():
    # 100 -> 5 Mbit/s: within 5 s the settings are ones the slower link can
    # carry (a longer interval, smaller slices, or both), and were not before.
    bandwidth = 0.625e6
    _, trace = drive([(20, 1e-3, 12.5e6), (20, 1e-3, bandwidth)])

    def link_busy(b, m):
        return SPEED * (1e-3 + m * 8 / bandwidth) / b

    before = [(b, m) for t, b, m, _ in trace if t == 20.0][0]
    after = [(b, m) for t, b, m, _ in trace if 20.0 < t <= 25.0]
    assert link_busy(*before) > 1.0
    assert link_busy(*after[-1]) <= 1.0, after


def test_message_size_follows_latency_over_bandwidth():
    latency_bound, _ = drive([(20, 50e-3, 1e9)])  # 16 MB in 16 ms after 50 ms latency
    bandwidth_bound, _ = drive([(20, 1e-3, 1.25e6)])  # 10 Mbit/s: payload dominates
    assert latency_bound.message_size == P
    assert bandwidth_bound.message_size < P / 16
    # The age-optimal slice, sqrt(P L B / (2 u s)), within one power-of-two step.
    b = bandwidth_bound
    optimal = math.sqrt(P * b.latency * b.bandwidth / (2 * b.settings.link_share * 8))
    assert optimal / 2 <= b.message_size <= optimal * 2


def test_message_size_is_the_split_nearest_the_optimum():
    # 64,064 parameters, 1.3 ms fixed cost, 1.78 MB/s (about 14 Mbit/s): the
    # law's optimum is sqrt(64,064 x 1.3e-3 x 1.78e6 / (2 x 0.8 x 8)) = 3,400
    # parameters. The age is as far above its minimum at k times the optimum
    # as at 1/k of it, so 4,004 (1.18x), not 2,002 (1/1.70).
    balancer = Balancer(64_064, 8, 256, comm_interval=2048, message_size=64_064)
    assert balancer.settings.link_share == 0.8
    steady_link(balancer, latency=1.3e-3, bandwidth=1.78e6, message_bytes=8 * 64_064, reports=8)
    assert balancer.message_size == 4_004


@pytest.mark.parametrize("interval, size", [(1024, 16_000), (1448, 32_000), (2048, 32_000), (4096, 64_000), (16384, 64_000)])
def test_slices_keep_each_parameter_merged_at_most_every_min_refresh_samples(interval, size):
    # A quick link (1 GB/s, 1.5 ms a message): by the link and the CPU, whole
    # states. But a worker averages what it receives half and half into its own
    # state, and merging every parameter every b samples pulls it back towards
    # its peer's older state faster than it moves on (unshaped, b=2048: halves
    # reached K-Means' target in 0.74 s, whole states in 1.06). The floor of
    # 4096 samples between two merges of a parameter asks for P * b / 4096
    # parameters, the split nearest in log scale: 1448 samples take halves.
    balancer = Balancer(64_000, 8, 256, comm_interval=interval, message_size=8_000, tune_interval=False)
    assert balancer.settings.min_refresh == 4096
    steady_link(balancer, latency=1.5e-3, bandwidth=1e9, message_bytes=8 * 8_000, reports=8)
    assert balancer.message_size == size
    # Without the floor the same link takes whole states at every interval.
    free = Balancer(64_000, 8, 256, comm_interval=interval, message_size=8_000, tune_interval=False,
                    settings=NO_REFRESH_FLOOR)
    steady_link(free, latency=1.5e-3, bandwidth=1e9, message_bytes=8 * 8_000, reports=8)
    assert free.message_size == 64_000


@pytest.mark.parametrize("bandwidth, link_only, with_cpu", [(1.0e6, 2_002, 4_004), (12.5e6, 8_008, 16_016)])
def test_messages_are_larger_when_the_cpu_not_the_link_sets_their_pace(bandwidth, link_only, with_cpu):
    # 64,064 parameters, 1.2 ms fixed cost, at 8 and 100 Mbit/s. By the link
    # alone the freshest size is sqrt(P L B / (2 u s)): 2,453 and 8,675, splits
    # 2,002 and 8,008. But a message that costs 4.8 ms of CPU (measured) goes
    # at most every 4.8 / 0.15 = 32 ms, and at that pace the link carries
    # larger ones: the optimum is where the link's pace meets the CPU's,
    # m = (u * 32 ms - L) * B / s: 3,050 and 38,125. At most twice the link's
    # own optimum (CPU_PACE_REACH: a message's CPU grows with its size on a
    # paced link): 3,050 and 17,350, splits 4,004 and 16,016.
    def settle(cpu_per_message):
        # From eighths, as an auto run starts (asgd.balance.start-message-size).
        balancer = Balancer(64_064, 8, 256, comm_interval=2048, message_size=8_008, settings=NO_REFRESH_FLOOR)
        for i in range(1, 13):
            sent = 8 * balancer.message_size
            balancer.update(Report(elapsed=0.25 * i, samples=10_000, seconds=0.25,
                                   sends=[(sent, 1.2e-3 + sent / bandwidth), (8, 1.2e-3)],
                                   messages=4, comm_cpu=4 * cpu_per_message))
        return balancer.message_size

    assert settle(1.2e-3) == link_only  # CPU per message = the latency: the link sets the pace
    assert settle(4.8e-3) == with_cpu


def test_a_probe_slower_than_a_state_message_is_not_taken_for_the_latency():
    # A run's first probe waited behind the peer's messages: 146 ms, where
    # 64 KB state messages took 6 ms (100 Mbit/s and 1.2 ms latency). A state
    # message pays the fixed cost too: the latency is at most 6 ms, and the
    # interval is what 6 ms messages allow, not 146 ms ones.
    balancer = Balancer(64_064, 8, 256, comm_interval=2048, message_size=8_008)
    decision = balancer.update(Report(elapsed=0.3, samples=20_000, seconds=0.3,
                                      sends=[(8, 0.146), (64_064, 6e-3), (64_064, 7e-3)]))
    assert balancer.latency <= 6e-3
    assert decision is not None and decision.comm_interval <= 2048, decision


def test_the_law_never_picks_slices_under_the_floor():
    # About 0.9 Mbit/s and a 1.3 ms fixed cost: the law's optimum for 64,064
    # parameters is about 1,100, clipped to the 1,024 floor. The split nearest
    # it, 64 slices of 1,001, is under the floor: the law takes 2,002.
    balancer = Balancer(64_064, 8, 256, comm_interval=65536, message_size=8_008)
    steady_link(balancer, latency=1.3e-3, bandwidth=116_000.0, message_bytes=8 * 8_008, reports=12)
    assert balancer.message_size == 2_002


def test_holds_the_targets_in_steady_state():
    balancer, _ = drive([(30, 1e-3, 12.5e6)])
    s = balancer.settings
    share_cpu = SPEED * balancer.message_cost() / balancer.comm_interval
    share_link = SPEED * balancer.message_time(balancer.message_size) / balancer.comm_interval
    # Quantisation (sqrt 2) and the dead band let each share sit within a factor 2.
    assert max(share_cpu / s.cpu_share, share_link / s.link_share) == pytest.approx(1.0, rel=1.0)
    assert share_link <= 2 * s.link_share


@pytest.mark.parametrize("bandwidth", [1e9, 12.5e6, 1.25e6])
def test_few_changes_in_steady_state_despite_noise(bandwidth):
    _, trace = drive([(60, 1e-3, bandwidth)], noise=0.3)
    assert changes_between(trace, 15, 60) <= 2, [(t, b, m) for t, b, m, d in trace if d and t > 15]


def cpu_measured(cpu_per_message, reports=24, latency=1e-3):
    """A balancer fed a fast link (64 KB messages in 1.5 ms, 1 ms probes) whose
    reports say each of their 20 messages cost ``cpu_per_message`` seconds of
    CPU. The size stays: the sends' sizes do not follow it."""
    balancer = Balancer(64_064, 8, 256, comm_interval=2048, message_size=8_008, tune_size=False)
    for i in range(1, reports + 1):
        balancer.update(Report(elapsed=0.25 * i, samples=20_000, seconds=0.25, messages=20,
                               comm_cpu=20 * cpu_per_message, sends=[(64_064, 1.5e-3), (8, latency)]))
    return balancer


def test_the_interval_holds_the_measured_cpu_per_message_at_its_share():
    # 80,000 samples/s; 2 ms of CPU per message at a 15% share asks for
    # 80,000 x 2e-3 / 0.15 = 1,067 samples (1024, or 1448 in the dead band);
    # 0.5 ms for a quarter of it. The probe's 1 ms is the same in both.
    costly, cheap = cpu_measured(2e-3), cpu_measured(0.5e-3)
    assert costly.settings.cpu_share == 0.15
    assert costly.message_cost() == pytest.approx(2e-3)
    assert 1024 <= costly.comm_interval <= 1448, costly.comm_interval
    assert cheap.comm_interval <= costly.comm_interval / 2.8
    assert cheap.comm_interval >= 256


def test_the_measured_cpu_counts_at_most_four_latencies():
    # An event loop busy with other work (50 ms "per message"): the law takes
    # 4 x 1 ms, 80,000 x 4e-3 / 0.15 = 2,133 samples (within a sqrt(2) step
    # and the dead band), not the 26,667 the raw figure asks for.
    busy = cpu_measured(50e-3)
    assert busy.message_cost() == pytest.approx(4e-3)
    assert 1448 <= busy.comm_interval <= 4096, busy.comm_interval


def test_the_message_time_counts_overlapping_sends_once():
    # 10 Mbit/s, 16 KB slices: 13 ms of link each. Two on the wire at a time
    # share it, so each send takes 26 ms; the link was busy 13 ms per send.
    def fed(busy):
        balancer = Balancer(64_064, 8, 256, comm_interval=1024, message_size=2_002)
        for i in range(1, 9):
            balancer.update(Report(elapsed=0.25 * i, samples=20_000, seconds=0.25, busy=busy,
                                   sends=[(16_016, 0.026)] * 4 + [(8, 1e-3)]))
        return balancer.message_time(2_002)

    assert fed(busy=4 * 0.013) == pytest.approx(0.013)
    assert fed(busy=math.nan) == pytest.approx(0.026)  # a worker that does not report it: the sends' own times


def test_nonsense_cpu_measurements_are_ignored():
    balancer = cpu_measured(2e-3, reports=4)
    before = balancer.message_cpu
    for messages, cpu in [(20, math.nan), (20, -1.0), (20, math.inf), (0, 0.5), (-3, 0.5), (math.nan, 0.5)]:
        balancer.update(Report(elapsed=1.5, samples=20_000, seconds=0.25, messages=messages, comm_cpu=cpu))
    assert balancer.message_cpu == before


def test_nonsense_measurements_are_ignored():
    balancer = Balancer(P, 8, 256, comm_interval=32768, message_size=P)
    good = Report(elapsed=0.5, samples=750_000, seconds=0.5, sends=[(8 * P, 0.02)] * 4)
    balancer.update(good)
    state = (balancer.latency, balancer.bandwidth, balancer.speed)
    nonsense = [
        Report(elapsed=1.0, samples=750_000, seconds=0.5, sends=[(8 * P, 0.0), (8 * P, -1.0), (8 * P, math.nan), (8 * P, math.inf)]),
        Report(elapsed=1.5, samples=750_000, seconds=0.0, sends=[(8 * P, 0.02)]),
        Report(elapsed=2.0, samples=750_000, seconds=-3.0, sends=[(8 * P, 0.02)]),
        Report(elapsed=2.5, samples=750_000, seconds=math.nan, sends=[(8 * P, 0.02)]),
        Report(elapsed=3.0, samples=-5, seconds=0.5, sends=[(0, 0.02), (-10, 0.02)]),
        Report(elapsed=math.nan, samples=750_000, seconds=0.5, sends=[]),
    ]
    for report in nonsense:
        balancer.update(report)
    assert (balancer.latency, balancer.bandwidth) == state[:2]
    assert balancer.speed == state[2]
    assert all(math.isfinite(v) for v in (balancer.comm_interval, balancer.message_size))


def test_backlog_doubles_the_interval_at_once():
    balancer, _ = drive([(10, 1e-3, 12.5e6)])
    before = balancer.comm_interval
    decision = backlogged(balancer, Report(elapsed=12.0, samples=750_000, seconds=0.5, superseded=3))
    assert decision is not None and decision.comm_interval >= 2 * before * 0.7
    assert "backlog: 3 message(s) superseded" in decision.reason


def test_latency_is_the_quickest_probe_when_probes_queue_on_a_busy_link():
    # 10 Mbit/s, 2 ms fixed cost; the link is busy, so most probes wait behind
    # a state message (up to 0.4 s). One probe in the window found it idle.
    bandwidth, latency, size = 1.25e6, 2e-3, 8 * 64_000
    balancer = Balancer(64_000, 8, 256, comm_interval=65536, message_size=64_000)
    for i in range(8):
        queued = 0.0 if i == 3 else 0.3 + 0.01 * i
        balancer.update(Report(elapsed=0.25 * (i + 1), samples=5_000, seconds=0.25,
                               sends=[(size, latency + size / bandwidth + queued), (8, latency + queued)]))
    assert balancer.latency == pytest.approx(latency)
    # The interval is set by the link. A queue taken for latency (0.3 s) would
    # ask for 20,000 samples/s x 0.3 s / 10% CPU share = 60,000 samples.
    assert balancer.comm_interval <= 4096 and balancer.message_size < 64_000


def test_no_backlog_doubling_while_larger_messages_drain():
    balancer = Balancer(64_000, 8, 256, comm_interval=2048, message_size=64_000)
    size = 8 * 64_000
    # Whole states at 10 Mbit/s (0.41 s each), two in flight: the law cuts the size.
    balancer.update(Report(elapsed=0.25, samples=5_000, seconds=0.25, sends=[(8, 2e-3)], in_flight=2))
    cut = balancer.update(Report(elapsed=1.5, samples=5_000, seconds=0.25, sends=[(size, 0.41), (8, 2e-3)], in_flight=2))
    assert cut is not None and cut.message_size < 64_000
    new = 8 * cut.message_size
    # The whole states still on the wire are old now, but that is the drain of
    # the previous size: no doubling for it, not even once the first message
    # of the new size arrived beside one still going on the other connection.
    for elapsed, sends in [(1.75, []), (2.0, [(new, 0.05)]), (2.25, [(new, 0.05)])]:
        waiting = balancer.update(Report(elapsed=elapsed, samples=5_000, seconds=0.25, sends=sends, in_flight=2,
                                         oldest_in_flight=0.6))
        assert waiting is None or "backlog" not in waiting.reason
    # Drained (only the new size arrived, nothing old on the wire): a send that
    # stays out now is a backlog.
    balancer.update(Report(elapsed=2.5, samples=5_000, seconds=0.25, sends=[(new, 0.05)], in_flight=1,
                           oldest_in_flight=0.01))
    late = backlogged(balancer, Report(elapsed=3.0, samples=5_000, seconds=0.25, in_flight=2, oldest_in_flight=0.9))
    assert late is not None and "backlog" in late.reason


def test_a_drain_that_no_report_shows_over_ends_at_its_deadline():
    balancer = Balancer(64_000, 8, 256, comm_interval=2048, message_size=64_000)
    balancer.update(Report(elapsed=0.25, samples=5_000, seconds=0.25, sends=[(8, 2e-3)], in_flight=2))
    cut = balancer.update(Report(elapsed=1.5, samples=5_000, seconds=0.25, sends=[(8 * 64_000, 0.41), (8, 2e-3)],
                                 in_flight=2))
    assert cut is not None and cut.message_size < 64_000
    # Nothing arrives at all: two whole states' time and a second of slack later,
    # the send still out is a backlog.
    stuck = Report(elapsed=2.0, samples=5_000, seconds=0.25, in_flight=2, oldest_in_flight=0.5)
    assert balancer.update(stuck) is None
    late = backlogged(balancer, dataclasses.replace(stuck, elapsed=4.0, oldest_in_flight=2.5))
    assert late is not None and "backlog" in late.reason


def test_backlog_on_a_bytes_bound_link_cuts_the_size_and_caps_it_until_quiet():
    balancer = Balancer(64_000, 8, 256, comm_interval=2048, message_size=64_000, settings=NO_REFRESH_FLOOR)
    balancer.update(Report(elapsed=0.25, samples=5_000, seconds=0.25, sends=[(8, 2e-3)], in_flight=2))
    interval = balancer.comm_interval
    # Sends superseded, a whole state on the wire for 0.5 s, probes back in 2 ms:
    # bytes are the cost, so slices, at the same interval.
    cut = backlogged(balancer, Report(elapsed=1.0, samples=5_000, seconds=0.25, superseded=3, in_flight=2,
                                        oldest_in_flight=0.5))
    assert cut is not None and "bytes are the cost" in cut.reason
    # At the same interval, to what the link carries in its share of one: 0.5 x
    # (interval / 20,000 samples/s) of the 0.5 s a whole state took, or less.
    assert cut.comm_interval == interval
    carried = 64_000 * 0.5 * (interval / 20_000) / 0.5
    assert 1024 <= cut.message_size <= max(carried, 1024) * 2 and cut.message_size <= 32_000
    # Then the link looks latency-bound (payload time lost in the latency), where
    # the law alone would send whole states; the cut holds until 5 s pass quiet.
    sizes = {}
    for i in range(1, 30):
        t = 1.0 + 0.25 * i
        balancer.update(Report(elapsed=t, samples=5_000, seconds=0.25, sends=[(8 * 32_000, 2.1e-3), (8, 2e-3)]))
        sizes[round(t, 2)] = balancer.message_size
    assert max(size for t, size in sizes.items() if t < 6.0) == cut.message_size
    assert sizes[8.25] == 2 * cut.message_size  # 5 s quiet: the cap doubles


def test_backlog_cut_stops_at_the_smallest_split_over_the_floor():
    # 64,064 parameters split in 64 give 1,001 (under the 1,024 floor): a cut
    # that asks for less takes 2,002, not a doubling of the interval instead.
    balancer = Balancer(64_064, 8, 256, comm_interval=1024, message_size=8_008)
    balancer.update(Report(elapsed=0.25, samples=10_000, seconds=0.25, sends=[(8, 1.5e-3)], in_flight=2))
    interval = balancer.comm_interval
    cut = backlogged(balancer, Report(elapsed=1.0, samples=10_000, seconds=0.25, in_flight=2, oldest_in_flight=0.6))
    assert cut is not None and "bytes are the cost" in cut.reason
    assert (cut.comm_interval, cut.message_size) == (interval, 2_002)


def test_backlog_cut_takes_the_split_nearest_what_the_link_carries():
    # 10 Mbit/s, whole states of 64,064 parameters every 2048 samples at 80,000
    # samples/s, a send on the wire for 0.5 s: the link carries 64,064 x (2048 /
    # 80,000 s) / 0.5 s = 3,280 parameters in one interval. The nearest split
    # is 4,004 (the best fixed slices there), not 2,002. (The interval held:
    # the law would otherwise move it at the first report.)
    balancer = Balancer(64_064, 8, 256, comm_interval=2048, message_size=64_064, tune_interval=False,
                        settings=NO_REFRESH_FLOOR)
    balancer.update(Report(elapsed=0.25, samples=20_000, seconds=0.25, sends=[(8, 2e-3)], in_flight=2))
    cut = backlogged(balancer, Report(elapsed=1.0, samples=20_000, seconds=0.25, superseded=3, in_flight=2,
                                      oldest_in_flight=0.5))
    assert cut is not None and "bytes are the cost" in cut.reason
    assert (cut.comm_interval, cut.message_size) == (2048, 4_004)


def test_backlog_cuts_the_size_when_only_the_size_is_auto():
    # comm_interval fixed by the user, message_size "auto": a bytes-bound backlog
    # still cuts the size; the interval stays the user's.
    balancer = Balancer(64_000, 8, 256, comm_interval=2048, message_size=64_000, tune_interval=False,
                        settings=NO_REFRESH_FLOOR)
    balancer.update(Report(elapsed=0.25, samples=5_000, seconds=0.25, sends=[(8, 2e-3)], in_flight=2))
    cut = backlogged(balancer, Report(elapsed=1.0, samples=5_000, seconds=0.25, superseded=3, in_flight=2,
                                        oldest_in_flight=0.5))
    assert cut is not None and "bytes are the cost" in cut.reason
    assert cut.comm_interval == 2048 and cut.message_size < 64_000


def test_one_report_of_backlog_is_taken_for_a_stall_of_the_machine():
    # Unshaped, 1.5 ms sends every 28 ms; a stall of the machine makes one send
    # take 60 ms and supersedes a message (seen on 2 cores). Alone, that moves
    # nothing; the same in the next report too is a saturated link.
    balancer = Balancer(64_000, 8, 256, comm_interval=512, message_size=64_000)
    for i in range(1, 9):
        balancer.update(Report(elapsed=0.25 * i, samples=4_500, seconds=0.25, sends=[(8 * 64_000, 1.5e-3), (8, 1.1e-3)]))
    settings = (balancer.comm_interval, balancer.message_size)
    stall = Report(elapsed=2.25, samples=4_500, seconds=0.25, sends=[(8 * 64_000, 0.06), (8, 1.1e-3)], superseded=1)
    quiet = Report(elapsed=2.5, samples=4_500, seconds=0.25, sends=[(8 * 64_000, 1.5e-3), (8, 1.1e-3)])
    for report in (stall, quiet, dataclasses.replace(stall, elapsed=2.75)):
        decision = balancer.update(report)
        assert decision is None or "backlog" not in decision.reason
    assert (balancer.comm_interval, balancer.message_size) == settings
    saturated = balancer.update(dataclasses.replace(stall, elapsed=3.0))
    assert saturated is not None and "backlog" in saturated.reason


def test_backlog_with_slow_probes_doubles_the_interval():
    # Probes as slow as state messages: a per-message cost, not bytes; slices would not help.
    balancer = Balancer(64_000, 8, 256, comm_interval=2048, message_size=64_000)
    balancer.update(Report(elapsed=0.25, samples=5_000, seconds=0.25, sends=[(8, 0.3)], in_flight=2))
    interval = balancer.comm_interval
    # (The law halves the size to tell latency from bandwidth; the halves come as slowly.)
    half = 8 * balancer.message_size
    decision = backlogged(balancer, Report(elapsed=1.5, samples=5_000, seconds=0.25, sends=[(half, 0.31)],
                                             superseded=3, in_flight=2, oldest_in_flight=0.5))
    assert decision is not None and "backlog" in decision.reason and "bytes are the cost" not in decision.reason
    assert decision.comm_interval >= 1.9 * interval


def test_backlog_of_small_messages_takes_the_laws_interval_when_it_is_longer():
    # A 33-parameter state (264-byte messages) on a fast link, 2.2 million
    # samples/s: 250 messages a report at b=2048 cost 0.48 ms of CPU each, and
    # the event loop falls behind (messages superseded). The law asks for
    # 2.2e6 * 0.48 ms / 15% = 7,040 samples; doubling would give 4096.
    balancer = Balancer(33, 8, 256, comm_interval=2048, message_size=33)
    messages, cpu = 250, 250 * 0.48e-3
    sends = [(264, 0.8e-3)] * 20 + [(8, 0.4e-3)]
    decision = backlogged(balancer, Report(elapsed=0.75, samples=550_000, seconds=0.25, sends=sends, superseded=70,
                                             in_flight=2, messages=messages, comm_cpu=cpu))
    assert decision is not None and "backlog: 70 message(s) superseded" in decision.reason
    assert decision.comm_interval == 8192  # 7,040 to the nearest sqrt(2) step of 256
    # Never more than MAX_GROWTH (4x) at once: the law's estimate may be a blip.
    costly = Balancer(33, 8, 256, comm_interval=2048, message_size=33)
    capped = backlogged(costly, Report(elapsed=0.75, samples=550_000, seconds=0.25, sends=sends, superseded=70,
                                         in_flight=2, messages=10, comm_cpu=0.1))
    assert capped is not None and capped.comm_interval == 4 * 2048


def test_the_run_size_cap_sets_the_size_and_follow_run_takes_it_at_once():
    # A quick link: this worker alone would send whole states ...
    balancer = Balancer(64_064, 8, 256, comm_interval=2048, message_size=64_064, settings=NO_REFRESH_FLOOR)
    steady_link(balancer, latency=1.5e-3, bandwidth=1e9, message_bytes=8 * 64_064, reports=8)
    assert balancer.message_size == balancer.wish == 64_064
    # ... but another worker of the run cut to 4,004: it follows at once (0.25 s
    # after its own last change, inside min_change_interval) ...
    balancer.update(Report(elapsed=2.25, samples=10_000, seconds=0.25, sends=[(8, 1.5e-3)]))
    decision = balancer.follow_run(4_004, 2.3, "the run's size")
    assert (decision.comm_interval, decision.message_size, decision.reason) == (balancer.comm_interval, 4_004, "the run's size")
    assert balancer.wish == 64_064  # its own choice is kept, for when the cap lifts
    # ... and its own law keeps to it while the cap stands, then returns to whole
    # states when the cap lifts.
    balancer.run_size_cap = 4_004
    for i in range(1, 13):
        balancer.update(Report(elapsed=2.3 + 0.25 * i, samples=10_000, seconds=0.25,
                               sends=[(8 * 4_004, 1.5e-3 + 8 * 4_004 / 150e6), (8, 1.5e-3)]))
        assert balancer.message_size == 4_004
    balancer.run_size_cap = 64_064
    for i in range(13, 25):
        balancer.update(Report(elapsed=2.3 + 0.25 * i, samples=10_000, seconds=0.25,
                               sends=[(8 * 4_004, 1.5e-3 + 8 * 4_004 / 150e6), (8, 1.5e-3)]))
    assert balancer.message_size == 64_064


def test_a_follower_s_own_law_moves_its_interval_at_once():
    # Told the run's size at 0.3 s, a worker still at the start's interval of 2048
    # samples sets its own interval at its next report, not a second later (its
    # law's first decision; following the run is not one).
    balancer = Balancer(64_064, 8, 256, comm_interval=2048, message_size=64_064)
    balancer.follow_run(8_008, 0.3, "the run's size")
    balancer.run_size_cap = 8_008
    latency, bandwidth = 1.3e-3, 12.5e6  # 100 Mbit/s
    decision = balancer.update(Report(elapsed=0.5, samples=10_000, seconds=0.25,
                                      sends=[(8 * 8_008, latency + 8 * 8_008 / bandwidth), (8, latency)]))
    # 40,000 samples/s x 1.3 ms / 10% per-message share: about 520 samples.
    assert decision is not None and decision.message_size == 8_008
    assert 362 <= decision.comm_interval <= 724, decision


def test_fixed_knobs_stay_fixed():
    balancer = Balancer(P, 8, 256, comm_interval=4096, message_size=P, tune_interval=False, tune_size=False)
    for i in range(20):
        balancer.update(Report(elapsed=0.5 * (i + 1), samples=750_000, seconds=0.5, sends=[(8 * P, 1.5)] * 3, superseded=2))
    assert (balancer.comm_interval, balancer.message_size) == (4096, P)


def test_fit_link_recovers_latency_and_bandwidth():
    latency, bandwidth = 2e-3, 5e6
    sends = [(b, latency + b / bandwidth) for b in (1e4, 5e4, 1e5, 4e5, 8e5)]
    fitted_latency, fitted_bandwidth = fit_link(sends)
    assert fitted_latency == pytest.approx(latency, rel=1e-6)
    assert fitted_bandwidth == pytest.approx(bandwidth, rel=1e-6)
    assert fit_link([(1e5, 0.01)] * 5)[1] is None  # one size: cannot tell


def test_split_sizes_are_power_of_two_splits():
    assert split_size(1000, 2000, 12) == 1000
    assert split_size(1000, 500, 12) == 500
    assert split_size(1000, 300, 12) == 250
    assert split_size(1000, 1, 3) == 125  # never more than 2**max_levels slices


def _monitor_state(dask_scheduler):
    monitor = dask_scheduler.plugins["dask-asgd-monitor"]
    return {
        "dropped": monitor.dropped,
        "peers": {run_id: {w: t.last.get("peers", {}) for w, t in run.workers.items()} for run_id, run in monitor.runs.items()},
        "dask_bandwidth": {run_id: monitor.dask_bandwidth(run_id) for run_id in monitor.runs},
        "runs": {run_id: {w: (len(t.reports), len(t.adjustments), t.done) for w, t in run.workers.items()}
                 for run_id, run in monitor.runs.items()},
    }


def test_monitor_collects_reports_and_balances_auto_runs(client):
    from dask_asgd import KMeans

    X = np.random.default_rng(0).normal(size=(40_000, 32))
    # 500 centres x 32 features: a 128 KB state, sent between two worker processes.
    # A starting interval far from what any link here calls for: the balancer must move it.
    start = 65536
    with dask.config.set({"asgd.balance.start-interval": start}):
        est = KMeans(500, random_state=0, max_epochs=10_000, max_time=5.0, tol=None, client=client).fit(X)
    h = est.history_
    state = client.run_on_scheduler(_monitor_state)
    run = state["runs"][h.attrs["run_id"]]
    assert set(run) == set(h.worker.values)
    for reports, adjustments, done in run.values():
        assert reports >= 5 and done  # a report every 0.25 s, and a final one
    # Per peer: a worker's link to the other, with a send time and a bandwidth
    # (a worker whose sends were all refused at the end, under load, has none).
    peers = state["peers"][h.attrs["run_id"]]
    assert any(peers.values())
    for worker, links in peers.items():
        (other,) = set(run) - {worker}
        assert set(links) <= {other}
        for seconds, bandwidth in links.values():
            assert 0 < seconds < 5 and bandwidth > 0
    assert isinstance(state["dask_bandwidth"][h.attrs["run_id"]], dict)
    # The balancer moved the interval away from the fixed default, and every
    # adjustment is in history_ with its reason.
    assert h.sizes["adjustment"] >= 1
    assert all(reason for reason in h.adjustment_reason.values)
    assert (h.comm_interval.isel(time=0) == start).all()
    assert (h.comm_interval.isel(time=-1) != start).any()
    # Auto sizes start at asgd.balance.start-message-size (4096): quarters of the 16,000.
    assert (h.message_size.isel(time=0) == 4_000).all()
    assert set(h.adjustment_worker.values) <= set(h.worker.values)
    # What the workers applied is what history_ shows at the end.
    for worker in h.worker.values:
        mine = h.adjustment_comm_interval.values[h.adjustment_worker.values == worker]
        if len(mine):
            assert float(h.comm_interval.sel(worker=worker).isel(time=-1)) == mine[-1]


def _reports(run_id, dask_scheduler=None):
    monitor = dask_scheduler.plugins["dask-asgd-monitor"]
    return {w: [(r["elapsed"], r["done"], [b for b, _ in r["sends"]]) for r in t.reports]
            for w, t in monitor.runs[run_id].workers.items()}


def test_the_first_state_messages_are_reported_at_once(client):
    """Their times are the balancer's first look at the link's bandwidth: they
    go to the monitor when the first two are known (the quicker of two waited
    least), not when the next report is due."""
    from dask_asgd import KMeans

    X = np.random.default_rng(1).normal(size=(20_000, 16))
    with dask.config.set({"asgd.balance.report-interval": 30.0}):  # no report due during the fit
        est = KMeans(50, random_state=0, max_epochs=10_000, max_time=3.0, tol=None, client=client).fit(X)
    reports = client.run_on_scheduler(_reports, est.history_.attrs["run_id"])
    assert set(reports) == set(est.history_.worker.values)
    state_bytes = 50 * 16 * 8
    for worker, mine in reports.items():
        first = next(i for i, (_, _, sends) in enumerate(mine) if state_bytes in sends)
        elapsed, done, sends = mine[first]
        assert not done and elapsed < 2.5, (worker, mine)
        assert sends.count(state_bytes) >= 2, (worker, mine)
        # One early report, not one per exchange: the start's, that one, the final.
        assert len(mine) <= 3, (worker, mine)


def test_fixed_knobs_are_not_balanced(client):
    from dask_asgd import KMeans

    X = np.random.default_rng(0).normal(size=(20_000, 16))
    est = KMeans(50, random_state=0, comm_interval=4096, message_size=400, max_epochs=10_000, max_time=3.0, tol=None, client=client).fit(X)
    h = est.history_
    assert h.sizes["adjustment"] == 0
    assert set(np.unique(h.comm_interval.values[~np.isnan(h.comm_interval.values)])) == {4096}
    assert set(np.unique(h.message_size.values[~np.isnan(h.message_size.values)])) == {400}


async def _send_bad_report(dask_worker):
    dask_worker.batched_stream.send({"op": "asgd-metrics", "report": {"run_id": "x", "nonsense": True}})
    dask_worker.batched_stream.send({"op": "asgd-metrics", "report": "not even a dict"})


def test_malformed_report_is_dropped_and_the_worker_stays(client):
    import time

    from dask_asgd.balance._monitor import Monitor

    client.register_plugin(Monitor())
    workers_before = set(client.scheduler_info()["workers"])
    dropped_before = client.run_on_scheduler(_monitor_state)["dropped"]
    target = sorted(workers_before)[0]
    client.run(_send_bad_report, workers=[target])
    deadline = time.time() + 10
    while client.run_on_scheduler(_monitor_state)["dropped"] < dropped_before + 2 and time.time() < deadline:
        time.sleep(0.1)
    assert client.run_on_scheduler(_monitor_state)["dropped"] == dropped_before + 2
    assert set(client.scheduler_info()["workers"]) == workers_before
    assert client.submit(lambda: 1 + 1, workers=[target]).result() == 2


def test_every_worker_of_a_run_sends_the_smallest_size_any_chose(client):
    """Synthetic reports into the real scheduler's monitor: one worker's link is
    bytes-bound and cuts the message size; the other's is quick, and it takes the
    same size at once (mixed sizes between workers slow convergence), and keeps
    it while the first one needs it."""
    from dask_asgd.balance._monitor import Monitor

    client.register_plugin(Monitor())
    slow, quick = sorted(client.scheduler_info()["workers"])

    def feed(dask_scheduler, slow, quick):
        # Whole states at b=2048 are within the refresh floor's reach; this is about the run's one size.
        monitor = dask_scheduler.plugins["dask-asgd-monitor"]
        settings = monitor._settings
        monitor._settings = dataclasses.replace(settings, min_refresh=1)
        try:
            return _feed(monitor, slow, quick)
        finally:
            monitor._settings = settings

    def _feed(monitor, slow, quick):
        n = 64_064

        def report(t, message_size, **timings):
            return {"run_id": "one-size", "mode": "asgd", "auto_interval": True, "auto_size": True, "n_params": n,
                    "itemsize": 8, "batch_size": 256, "comm_interval": 2048, "message_size": message_size,
                    "done": False, "elapsed": t, "samples": int(40_000 * t), "loss": 1.0,
                    "balance_topic": "one-size-balance", "superseded": 0, "in_flight": 0,
                    "oldest_in_flight": 0.0, **timings}

        sizes = {}
        for i in range(1, 9):
            t = 0.25 * i
            tracks = monitor.runs["one-size"].workers if "one-size" in monitor.runs else {}
            size = {w: tracks[w].balancer.message_size if w in tracks else n for w in (slow, quick)}
            # The quick link: whole states in 5 ms, probes in 1.5 ms.
            monitor._on_report(worker=quick, report=report(t, size[quick], sends=[[8 * n, 5e-3], [8, 1.5e-3]]))
            # The slow one: probes in 2 ms, then from 0.75 s whole states queue (backlog).
            jam = {"superseded": 3, "in_flight": 2, "oldest_in_flight": 0.5} if t >= 0.75 else {}
            monitor._on_report(worker=slow, report=report(t, size[slow], sends=[[8, 2e-3]], **jam))
            sizes[t] = {w: monitor.runs["one-size"].workers[w].balancer.message_size for w in (slow, quick)}
        run = monitor.runs["one-size"]
        return sizes, {w: list(run.workers[w].adjustments) for w in (slow, quick)}

    sizes, adjustments = client.run_on_scheduler(feed, slow=slow, quick=quick)
    cut = sizes[2.0][slow]
    assert cut < 64_064, adjustments[slow]
    assert any("bytes are the cost" in reason for *_, reason in adjustments[slow])
    # From the cut on, both workers send the same size; the quick one was told why.
    first_cut = min(t for t in sizes if sizes[t][slow] < 64_064)
    assert all(sizes[t][quick] == sizes[t][slow] for t in sizes if t >= first_cut), sizes
    assert any("smallest any worker" in reason for *_, reason in adjustments[quick]), adjustments[quick]


def test_balance_benchmark_summary_arithmetic():
    from dask_asgd.bench_balance import ratios, summarise, time_to

    # Linear interpolation between history rows; inf when never reached.
    assert time_to([0.0, 0.1, 0.2], [10.0, 6.0, 2.0], 4.0) == pytest.approx(0.15)
    assert time_to([0.0, 0.1], [10.0, 6.0], 1.0) == float("inf")
    assert time_to([0.5, 0.6], [3.0, 2.0], 4.0) == 0.5
    curves = [{"time": [0.0, 1.0], "loss": [10.0, v], "adjustments": [{"reason": f"r{v}"}], "workers": [{"final_loss": v}]}
              for v in (1.0, 5.0, 3.0)]
    s = summarise(curves, 4.0)
    assert s["repeats"] == 3 and s["final_loss"] == 3.0
    # Every repeat's final loss and adjustments are kept, in repeat order.
    assert s["final_losses"] == [1.0, 5.0, 3.0]
    assert [a[0]["reason"] for a in s["repeat_adjustments"]] == ["r1.0", "r5.0", "r3.0"]
    assert [w[0]["final_loss"] for w in s["repeat_workers"]] == [1.0, 5.0, 3.0]
    assert s["time_to_target_s"] == pytest.approx(0.857142857)  # the median of 2/3, 6/7 and inf
    assert s["loss"] == [10.0, 3.0]  # the median repeat's curve is kept
    records = [{"problem": "p", "regime": g, "setting": f, "time_to_target_s": t, "final_loss": l}
               for g, f, t, l in [("a", "auto", 1.1, 1.0), ("a", "x", 1.0, 1.0), ("a", "y", 3.0, 2.0),
                                  ("b", "auto", 2.0, 1.0), ("b", "x", float("inf"), 4.0), ("b", "y", 2.2, 1.2)]]
    r = ratios(records)["p"]
    assert r["auto_over_best"] == pytest.approx({"a": 1.1, "b": 2.0 / 2.2})
    assert r["auto_loss_over_best"] == pytest.approx({"a": 1.0, "b": 1.0 / 1.2})
    assert r["fixed_within_1.15_everywhere"] == []  # x never reaches it in b; y is 3x the best in a
    # A regime no fixed setting reaches the target in: auto's ratio is 0 if it
    # does, NaN if it does not either; no fixed setting counts as "within 1.15x".
    inf = float("inf")
    lone = [{"problem": "q", "regime": "a", "setting": f, "time_to_target_s": t, "final_loss": 1.0}
            for f, t in [("auto", 2.0), ("x", inf)]]
    assert ratios(lone)["q"]["auto_over_best"] == {"a": 0.0}
    assert ratios(lone)["q"]["fixed_within_1.15_everywhere"] == []
    lone[0]["time_to_target_s"] = inf
    assert math.isnan(ratios(lone)["q"]["auto_over_best"]["a"])


def test_balance_benchmark_noise_statistics():
    from dask_asgd.bench_balance import chance_within, ratios

    # Without spread, an auto as good as the best is always within 1.15x; with
    # spread it is not, less so with more settings to take the least of, more so
    # with more repeats; a setting that never reaches the target cannot win.
    assert chance_within([1.0, 1.1, 2.0], 0.0, 3) == 1.0
    one, six = chance_within([1.0], 0.34, 3), chance_within([1.0, 1.0, 1.0, 1.0, 1.0, 1.0], 0.34, 3)
    assert 0.6 < one < 0.75 and six < one - 0.2
    assert chance_within([1.0, 1.0, 1.0, 1.0, 1.0, 1.0], 0.34, 9) > six + 0.05
    assert chance_within([1.0, float("inf")], 0.34, 3) == one
    assert math.isnan(chance_within([float("inf")], 0.34, 3))
    # Held out: x is best on the even repeats (0 and 2) and y on the odd one;
    # each is timed on the repeats that did not pick it: y's even ones, x's odd one.
    times = {"auto": [2.0, 2.0, 2.0], "x": [1.0, 4.0, 1.0], "y": [3.0, 1.0, 3.0]}
    records = [{"problem": "p", "regime": "a", "setting": f, "times_to_target_s": t,
                "time_to_target_s": sorted(t)[1], "final_loss": 1.0} for f, t in times.items()]
    r = ratios(records)["p"]
    assert r["auto_over_best"]["a"] == 2.0  # over x's median, 1.0
    assert r["auto_over_heldout_best"]["a"] == pytest.approx(2.0 / 3.0)  # over the median of 4, 3, 3
    # Spread: the pooled sample standard deviation of log times over the three settings.
    logs = [np.log(t) for t in times.values()]
    assert r["repeat_spread"] == pytest.approx(np.sqrt(np.mean([np.var(x, ddof=1) for x in logs])))
    assert r["chance_within_1.15_if_equal"]["a"] == chance_within([1.0, 3.0], r["repeat_spread"], 3)
    assert r["chance_within_1.15_everywhere_if_equal"] == r["chance_within_1.15_if_equal"]["a"]


def test_balance_benchmark_worker_summary_shows_a_stalled_worker():
    # History rows every 0.1 s; worker b writes none from 0.3 s to 1.5 s (its
    # training thread stalled) and ends behind.
    import xarray as xr

    from dask_asgd.bench_balance import worker_summary

    times = np.round(np.arange(1, 21) * 0.1, 1)
    samples = np.vstack([np.arange(1, 21) * 1000.0, np.arange(1, 21) * 1000.0]).T
    loss = np.vstack([np.linspace(4, 1, 20), np.linspace(4, 2, 20)]).T
    stalled = (times > 0.3) & (times < 1.5)
    samples[stalled, 1] = loss[stalled, 1] = np.nan
    h = xr.Dataset({"samples": (("time", "worker"), samples), "loss": (("time", "worker"), loss)},
                   coords={"time": times, "worker": ["a", "b"]})
    a, b = worker_summary(h)
    assert (a["worker"], b["worker"]) == ("a", "b")
    assert a["longest_row_gap_s"] == pytest.approx(0.1) and b["longest_row_gap_s"] == pytest.approx(1.2)
    assert a["final_loss"] == pytest.approx(1.0) and b["final_loss"] == pytest.approx(2.0)
    assert a["samples_per_s"] == pytest.approx(19_000 / 1.9)


def test_balance_benchmark_refuses_a_fit_that_lost_a_worker():
    # A worker that leaves hands its rows to the other, and every later setting
    # then trains alone and ties (seen once at 10 Mbit/s): the run must say so.
    import xarray as xr

    from dask_asgd.bench_balance import _check_all_workers_trained

    def history(workers, events=()):
        h = xr.Dataset({"loss": (("time", "worker"), np.zeros((3, len(workers))))},
                       coords={"time": [0.1, 0.2, 0.3], "worker": list(workers)})
        if events:
            h["event"] = ("event", [e for e, _ in events])
            h["event_worker"] = ("event", [w for _, w in events])
        return h

    _check_all_workers_trained(history(["a", "b"]), 2, "run")
    with pytest.raises(RuntimeError, match="1 of 2 workers trained"):
        _check_all_workers_trained(history(["a"]), 2, "run")
    with pytest.raises(RuntimeError, match="b left mid-fit"):
        _check_all_workers_trained(history(["a", "b"], [("lost", "b"), ("joined", "c")]), 2, "run")
