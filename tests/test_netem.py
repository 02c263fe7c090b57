"""The network emulation harness: real dask processes in real network namespaces,
real worker-to-worker traffic through tc-shaped links, real teardown."""

import contextlib
import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import dask
import numpy as np
import pytest
from distributed import Client, wait

from dask_asgd.testing.netem import (
    EmulatedCluster,
    EmulatedNetwork,
    NetemUnavailable,
    parse_rate,
)

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 and not os.environ.get("CI"),
    reason="network emulation needs root (namespaces, bridge, tc); run as root to test it (CI does)",
)
pytestmark = pytest.mark.netem

PAYLOAD = 1_500_000  # bytes: 1.5 s at 8 Mbit/s, ~20 ms unshaped
SLOW = 8e6  # bit/s


def _transfer_seconds(client, cluster, src, dst):
    """Seconds for a task on worker ``dst`` to get ``PAYLOAD`` bytes made on ``src``."""
    a, b = cluster.worker_addresses[src], cluster.worker_addresses[dst]
    # Random bytes, so that no compression on the wire can shrink them. Only
    # importable functions: the workers cannot import this test module.
    made = client.submit(np.random.bytes, PAYLOAD, workers=[a], pure=False)
    wait(made)  # not .result(): that would pull the payload to this process
    start = time.perf_counter()
    got = client.submit(len, made, workers=[b], pure=False).result()
    elapsed = time.perf_counter() - start
    assert got == PAYLOAD
    # The bytes went straight from src to dst, through both their links.
    last = client.run(lambda dask_worker: dask_worker.transfer_incoming_log[-1], workers=[b])[b]
    assert last["who"] == a and last["total"] >= PAYLOAD
    return elapsed


def _namespaces():
    return {line.split()[0] for line in subprocess.run(["ip", "netns", "list"], check=False, capture_output=True, text=True).stdout.splitlines()}


def _links():
    out = subprocess.run(["ip", "-o", "link", "show"], check=False, capture_output=True, text=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def _running(pid):
    """Alive and not a zombie (PID 1 here need not reap orphans)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _namespace_pids(namespace):
    out = subprocess.run(["ip", "netns", "pids", namespace], check=False, capture_output=True, text=True).stdout
    return {int(pid) for pid in out.split()}


@pytest.fixture(scope="module")
def emulated():
    # A setting of the caller's that its processes must see (see the test below).
    with dask.config.set({"distributed.comm.timeouts.connect": "97s"}), EmulatedCluster(n_workers=2, nthreads=1) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def emulated_client(emulated):
    with emulated.client() as client:
        yield client


@needs_root
def test_each_worker_runs_in_its_own_namespace_and_is_connected(emulated, emulated_client):
    workers = emulated_client.nthreads()
    assert workers == {address: 1 for address in emulated.worker_addresses}
    inodes = {w: st.st_ino for w, st in emulated_client.run(os.stat, "/proc/self/ns/net").items()}
    for host, address in zip(emulated.workers, emulated.worker_addresses):
        # /run/netns/<name> is a bind mount of the namespace: same inode.
        assert inodes[address] == os.stat(f"/run/netns/{host.namespace}").st_ino
    assert len(set(inodes.values())) == 2
    assert os.stat("/proc/self/ns/net").st_ino not in inodes.values()
    addrs = emulated_client.run(lambda: subprocess.run(["ip", "-o", "-4", "addr"], check=False, capture_output=True, text=True).stdout)
    for host, address in zip(emulated.workers, emulated.worker_addresses):
        others = [h.ip for h in emulated.workers if h is not host]
        assert f"inet {host.ip}/24" in addrs[address]
        assert not any(f"inet {ip}/" in addrs[address] for ip in others)


@needs_root
def test_the_processes_take_the_callers_dask_config(emulated, emulated_client):
    def connect_timeout():
        return dask.config.get("distributed.comm.timeouts.connect")

    assert set(emulated_client.run(connect_timeout).values()) == {"97s"}
    assert emulated_client.run_on_scheduler(connect_timeout) == "97s"


def test_log_tails_show_each_process_s_log(emulated):
    # What a caller prints when a worker left: the logs go when the cluster closes.
    parts = re.split(r"^--- (\S+)\.log \(end\) ---$", emulated.log_tails(), flags=re.MULTILINE)
    names, texts = parts[1::2], parts[2::2]
    assert sorted(names) == ["scheduler", "worker-0", "worker-1"]
    # Each with the end of what its process wrote (the processes log as they start).
    assert all(text.strip() for text in texts)


@needs_root
def test_a_worker_that_exited_is_started_again_at_its_address(emulated, emulated_client):
    # A worker whose scheduler connection breaks shuts down, its nanny with it;
    # SIGTERM makes the same graceful exit for real.
    before = emulated.pids["worker-1"]
    os.kill(before, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while "worker-1" not in emulated.exited() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "worker-1" in emulated.exited()
    assert emulated.restart_exited_workers() == [1]
    assert emulated.pids["worker-1"] != before and not emulated.exited()
    # At its address, which only its namespace has, and running tasks.
    assert set(emulated_client.nthreads()) == set(emulated.worker_addresses)
    assert emulated_client.submit(lambda: 1, workers=[emulated.worker_addresses[1]]).result(timeout=60) == 1
    assert emulated.restart_exited_workers() == []  # nothing to do when all run


@needs_root
def test_rate_limit_shapes_worker_to_worker_transfers(emulated, emulated_client):
    emulated.set_rate(None)
    unshaped = _transfer_seconds(emulated_client, emulated, 0, 1)
    emulated.set_rate("8mbit")
    assert [h.rate for h in emulated.workers] == [SLOW, SLOW]
    shaped = _transfer_seconds(emulated_client, emulated, 0, 1)
    ideal = PAYLOAD * 8 / SLOW
    assert 0.6 * ideal <= shaped <= 3 * ideal, (shaped, ideal)
    assert unshaped < 0.3 * ideal, (unshaped, ideal)


@needs_root
def test_set_rate_mid_run_drops_and_recovers_in_both_directions(emulated, emulated_client):
    emulated.set_rate("64mbit")
    fast = _transfer_seconds(emulated_client, emulated, 0, 1)
    emulated.set_rate("8mbit", workers=[1])
    assert [h.rate for h in emulated.workers] == [64e6, SLOW]
    # Into worker 1 passes its bridge-side shaper, out of it its namespace-side one.
    slow_in = _transfer_seconds(emulated_client, emulated, 0, 1)
    slow_out = _transfer_seconds(emulated_client, emulated, 1, 0)
    emulated.set_rate("64mbit", workers=[1])
    recovered = _transfer_seconds(emulated_client, emulated, 0, 1)
    ideal_slow = PAYLOAD * 8 / SLOW
    for slow in (slow_in, slow_out):
        assert 0.6 * ideal_slow <= slow <= 3 * ideal_slow, (slow, ideal_slow)
        assert slow > 2.5 * max(fast, recovered), (fast, slow, recovered)


@needs_root
@pytest.mark.parametrize("failure", [None, RuntimeError])
def test_teardown_leaves_nothing_behind(failure):
    cluster = EmulatedCluster(n_workers=1, rate="10mbit")
    with pytest.raises(RuntimeError) if failure else contextlib.nullcontext(), cluster:
        namespaces = {h.namespace for h in cluster.workers}
        links = {cluster.network.bridge} | {h.link for h in cluster.workers}
        pids = set(cluster.pids.values()) | set().union(*(_namespace_pids(ns) for ns in namespaces))
        assert namespaces <= _namespaces() and links <= _links()
        assert all(_running(pid) for pid in pids)
        if failure:
            raise failure("inside the with")
    assert not namespaces & _namespaces()
    assert not links & _links()
    assert not [pid for pid in pids if _running(pid)]
    cluster.close()  # idempotent: everything is gone already


@needs_root
def test_failed_namespace_creation_is_reported_and_rolled_back():
    cluster = EmulatedCluster(n_workers=2)
    taken = f"/run/netns/{cluster.workers[1].namespace}"
    os.makedirs("/run/netns", exist_ok=True)
    open(taken, "w").close()  # the second namespace's name is taken: `ip netns add` fails
    try:
        with pytest.raises(NetemUnavailable, match="cannot create a network namespace"):
            cluster.start()
    finally:
        os.unlink(taken)
    assert cluster.workers[0].namespace not in _namespaces()
    assert cluster.network.bridge not in _links()


@contextlib.contextmanager
def _command_line(n_workers, rate):
    """``python -m dask_asgd.testing.netem`` running: (process, scheduler address, namespaces)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "dask_asgd.testing.netem", "--workers", str(n_workers), "--rate", rate],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    watchdog = threading.Timer(60, proc.kill)  # a hung start must not hang the suite
    watchdog.start()
    try:
        lines = [proc.stdout.readline() for _ in range(n_workers + 2)]
        assert lines[0].startswith("scheduler  tcp://10.231."), (lines, proc.stderr.read())
        assert lines[-1].startswith("Ctrl-C")
        yield proc, lines[0].split()[1], {line.split("netns ")[1].split()[0] for line in lines[1:-1]}
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()


def _children(pid):
    children = set()
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    children.add(int(entry))
        except FileNotFoundError:
            pass
    return children


@needs_root
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_command_line_cluster_serves_until_stopped_then_tears_down(stop):
    with _command_line(2, "10mbit") as (proc, address, namespaces):
        with Client(address, timeout=10) as client:
            assert len(client.nthreads()) == 2
        assert namespaces <= _namespaces()
        proc.send_signal(stop)
        code = proc.wait(timeout=30)
    # Ctrl-C is a clean stop; SIGTERM tears down, then dies of the signal as usual.
    assert code == (0 if stop == signal.SIGINT else -signal.SIGTERM), proc.stderr.read()
    assert not namespaces & _namespaces()


@needs_root
def test_a_killed_run_takes_its_processes_along_and_the_next_start_sweeps_its_network():
    with _command_line(1, "10mbit") as (proc, _, namespaces):
        pids = _children(proc.pid) | set().union(*(_namespace_pids(ns) for ns in namespaces))
        assert len(pids) >= 2  # the scheduler, the worker (and its nanny)
        workdirs = glob.glob(os.path.join(tempfile.gettempdir(), f"dask-asgd-netem-asgd-{proc.pid}-*"))
        assert workdirs
        proc.kill()  # SIGKILL: no handler runs
        proc.wait()
    deadline = time.monotonic() + 30
    while [pid for pid in pids if _running(pid)] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in pids if _running(pid)]
    assert namespaces <= _namespaces()  # left behind, until...
    with EmulatedNetwork(1):
        assert not namespaces & _namespaces()
        assert not any(os.path.exists(path) for path in workdirs)


def test_not_root_is_reported_before_anything_is_created(monkeypatch):
    cluster = EmulatedCluster(n_workers=1)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(NetemUnavailable, match="needs root") as error:
        cluster.start()
    assert "sudo" in str(error.value)
    monkeypatch.undo()
    if shutil.which("ip"):
        assert cluster.workers[0].namespace not in _namespaces()


def test_missing_tools_are_reported(monkeypatch, tmp_path):
    monkeypatch.setattr(os, "geteuid", lambda: 0)  # past the root check, wherever this runs
    monkeypatch.setenv("PATH", str(tmp_path))  # a real PATH without iproute2
    with pytest.raises(NetemUnavailable, match="needs ip and tc from iproute2") as error:
        EmulatedCluster(n_workers=1).start()
    assert "apt-get install iproute2" in str(error.value)


def test_rates_are_read_in_tc_notation():
    assert parse_rate("10mbit") == 10e6
    assert parse_rate("1.5Gbit") == 1.5e9
    assert parse_rate("1mbps") == 8e6  # bytes/s, as in tc
    assert parse_rate(2_000_000) == 2e6
    assert parse_rate(None) is None
    for bad in ("10", "fast", "10 mbits", 0, -1):
        with pytest.raises(ValueError):
            parse_rate(bad)
    with pytest.raises(ValueError, match="not understood"):
        EmulatedCluster(n_workers=1, rate="10megabit")
