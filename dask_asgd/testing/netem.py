"""Emulated multi-host Dask clusters on one Linux machine (root only): every worker
in its own network namespace on a bridge, its link rate-limited with ``tc ... tbf``."""

from __future__ import annotations

import argparse
import atexit
import ctypes
import fcntl
import glob
import ipaddress
import itertools
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Self

import dask.config
from distributed import Client

__all__ = [
    "EmulatedCluster",
    "EmulatedNetwork",
    "Host",
    "NetemUnavailable",
    "check_available",
    "format_rate",
    "parse_rate",
]

logger = logging.getLogger(__name__)

# Emulations take one /24 each out of this private range; the bridge is .1, hosts .2 up.
ADDRESS_RANGE = ipaddress.ip_network("10.231.0.0/16")
# Every worker has a namespace of its own, so a fixed port cannot collide, and
# worker addresses are known before the workers start.
WORKER_PORT = 8788
# Held while a /24 is picked and put on a bridge, so concurrent runs pick different ones.
_LOCK_FILE = os.path.join(tempfile.gettempdir(), "dask-asgd-netem.lock")

# Names carry the creating pid (to sweep what a SIGKILLed run left) and a per-process
# counter. Link names: "asg" + pid (<= 6 hex) + "g" + counter + "w" + host <= 15 chars.
_NAMESPACE = re.compile(r"^asgd-(\d+)-\d+-w\d+$")
_WORKDIR = re.compile(r"^dask-asgd-netem-asgd-(\d+)-\d+-[a-z0-9_]{8}$")  # mkdtemp(prefix=...)
_LINK = re.compile(r"^asg([0-9a-f]+)g[0-9a-f]{1,2}(?:w[0-9a-f]{1,2})?$")
_instances = itertools.count()

_RATE_UNITS = {
    "bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12,
    "bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9, "tbps": 8e12,
}  # fmt: skip
_RATE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]+)\s*$", re.IGNORECASE)


class NetemUnavailable(RuntimeError):
    """This machine or process cannot build an emulated network; the message says why
    and what to do."""


class _CommandFailed(RuntimeError):
    pass


def parse_rate(rate: str | float | None) -> float | None:
    """A link rate in bits per second, from tc's notation or a number of bits per second.

    ``"10mbit"`` and ``"1.5gbit"`` are bits per second (powers of 1000), ``"500kbps"``
    is kilobytes per second, as in ``tc``; ``None`` means unshaped.
    """
    if rate is None:
        return None
    if isinstance(rate, (int, float)) and not isinstance(rate, bool):
        bits = float(rate)
    else:
        match = _RATE.match(str(rate))
        unit = match.group(2).lower() if match else None
        if unit not in _RATE_UNITS:
            raise ValueError(
                f"rate {rate!r} not understood; use tc's notation ('100mbit', '500kbit', "
                f"'1gbit' in bits/s; '1mbps' in bytes/s), a number of bits/s, or None for unshaped"
            )
        bits = float(match.group(1)) * _RATE_UNITS[unit]
    # tc counts whole bytes per second.
    if not math.isfinite(bits) or bits < 8:
        raise ValueError(f"rate {rate!r} must be at least 8bit (1 byte/s), or None for unshaped")
    return bits


def format_rate(bits: float | None) -> str:
    """``8000000.0`` -> ``"8 Mbit/s"``; ``None`` -> ``"unshaped"``."""
    if bits is None:
        return "unshaped"
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if bits >= scale:
            return f"{bits / scale:g} {prefix}bit/s"
    return f"{bits:g} bit/s"


def check_available() -> None:
    """Raise :class:`NetemUnavailable` unless this process can build an emulated network:
    it must be root, with ``ip`` and ``tc`` (iproute2) on PATH."""
    if os.geteuid() != 0:
        raise NetemUnavailable(
            "network emulation needs root: creating network namespaces, a bridge, veth pairs "
            "and tc qdiscs requires CAP_SYS_ADMIN and CAP_NET_ADMIN. Run as root (e.g. "
            "`sudo python -m pytest -m netem`, or `sudo ci/netem-cluster.sh`)"
        )
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise NetemUnavailable(
            f"network emulation needs {' and '.join(missing)} from iproute2 on PATH "
            f"(PATH={os.environ.get('PATH', '')}); install iproute2 (Debian/Ubuntu: "
            f"`apt-get install iproute2`) or add /usr/sbin to PATH"
        )


def _run(*argv: str, check: bool = True) -> str:
    proc = subprocess.run(argv, check=False, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise _CommandFailed(f"`{' '.join(argv)}` failed: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_namespace_processes(namespace: str) -> None:
    for pid in _run("ip", "netns", "pids", namespace, check=False).split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def _sweep_stale() -> None:
    """Delete the namespaces, links and work directories left by emulations whose
    process died without tearing down (SIGKILL cannot be caught)."""
    for path in glob.glob(os.path.join(tempfile.gettempdir(), "dask-asgd-netem-*")):
        match = _WORKDIR.match(os.path.basename(path))
        if match and not _alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)
    for line in _run("ip", "netns", "list", check=False).splitlines():
        name = line.split()[0] if line.split() else ""
        match = _NAMESPACE.match(name)
        if match and not _alive(int(match.group(1))):
            _kill_namespace_processes(name)
            _run("ip", "netns", "del", name, check=False)
    for line in _run("ip", "-o", "link", "show", check=False).splitlines():
        # "12: asg1f2g0w1@if11: <...>"
        name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        match = _LINK.match(name)
        if match and not _alive(int(match.group(1), 16)):
            _run("ip", "link", "del", name, check=False)


@dataclass
class Host:
    """One emulated host: a network namespace attached to the bridge by a veth pair."""

    index: int
    namespace: str
    ip: str
    link: str  # the veth end outside the namespace (a bridge port); inside it is "eth0"
    rate: float | None = None  # bits/s, each direction; None: unshaped


class EmulatedNetwork:
    """A bridge on this machine and ``n_hosts`` network namespaces attached to it, each
    link shaped by ``tc tbf`` in both directions.

    Example::

        with EmulatedNetwork(2, rate="10mbit") as net:
            net.gateway                       # "10.231.0.1": this machine, on the bridge
            net.hosts[1].namespace, net.hosts[1].ip   # "asgd-4711-0-w1", "10.231.0.3"
            subprocess.run(net.exec_argv(1, ["ip", "addr"]))
            net.set_rate("1mbit", hosts=[1])  # at once, in both directions

    A packet from host 0 to host 1 passes two shapers: host 0's egress (inside its
    namespace) and host 1's ingress (the egress of the bridge port towards it).
    Traffic between a host and this machine passes one.
    """

    n_hosts: int
    burst: int | None  # bytes; None: chosen from the rate
    latency: float  # seconds a packet may wait in a shaper's queue
    name: str  # "asgd-<pid>-<counter>", the prefix of its namespaces
    subnet: ipaddress.IPv4Network | None
    gateway: str | None
    bridge: str
    hosts: list[Host]

    def __init__(
        self,
        n_hosts: int,
        rate: str | float | None = None,
        *,
        burst: int | None = None,
        latency: float = 0.05,
        subnet: str | None = None,
    ):
        if not 1 <= n_hosts <= 253:
            raise ValueError(f"n_hosts={n_hosts}: one /24 holds 1 to 253 hosts")
        self.n_hosts = n_hosts
        self._rate = parse_rate(rate)
        self.burst = burst
        self.latency = latency
        self._requested_subnet = ipaddress.ip_network(subnet) if subnet else None
        if self._requested_subnet is not None and self._requested_subnet.num_addresses < n_hosts + 3:
            raise ValueError(f"subnet {subnet} is too small for {n_hosts} hosts and a gateway")
        self.subnet = None
        self.gateway = None
        pid, counter = os.getpid(), next(_instances) % 256
        self.name = f"asgd-{pid}-{counter}"
        self.bridge = f"asg{pid:x}g{counter:x}"
        self.hosts = [Host(k, f"{self.name}-w{k}", "", f"{self.bridge}w{k:x}") for k in range(n_hosts)]
        self._created: list[tuple[str, str]] = []  # ("netns" | "link", name), in creation order

    def start(self) -> Self:
        check_available()
        _reaper.add(self)
        try:
            _sweep_stale()
            self._create_namespaces()
            self._create_bridge()
            for host in self.hosts:
                self._attach(host)
            self.set_rate(self._rate)
        except _CommandFailed as e:
            self.close()
            raise NetemUnavailable(f"{e}. {self._hint(str(e))}") from None
        except BaseException:
            self.close()
            raise
        return self

    def set_rate(self, rate: str | float | None, hosts: Iterable[int] | None = None) -> None:
        """Shape the links of ``hosts`` (indices; default all) to ``rate`` in both
        directions, replacing the current shaping; ``None`` removes it."""
        bits = parse_rate(rate)
        if not self._created:
            raise RuntimeError("the emulated network is not running: start it (or enter its `with`) first")
        chosen = self.hosts if hosts is None else [self.hosts[k] for k in hosts]
        for host in chosen:
            # Outside the namespace the bridge port's egress is the host's ingress.
            for prefix, device in ((("tc",), host.link), (("tc", "-n", host.namespace), "eth0")):
                if bits is None:
                    _run(*prefix, "qdisc", "del", "dev", device, "root", check=False)
                else:
                    _run(*prefix, "qdisc", "replace", "dev", device, *self._tbf(bits))
            host.rate = bits

    def exec_argv(self, index: int, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside host ``index``'s namespace."""
        return ["ip", "netns", "exec", self.hosts[index].namespace, *argv]

    def close(self) -> None:
        """Kill what runs in the namespaces, delete them, the veths and the bridge.
        Idempotent; never raises for what is already gone."""
        for kind, name in self._created:
            if kind == "netns":
                _kill_namespace_processes(name)
        # Links first: a namespace is freed asynchronously by the kernel, deleting
        # its veth explicitly makes the links disappear before close returns.
        for kind, name in reversed(self._created):
            if kind == "link":
                _run("ip", "link", "del", name, check=False)
        for kind, name in reversed(self._created):
            if kind == "netns":
                _run("ip", "netns", "del", name, check=False)
        self._created.clear()
        # Last, so that a teardown interrupted (a second Ctrl-C) is finished at exit.
        _reaper.discard(self)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _tbf(self, bits: float) -> list[str]:
        # The bucket must hold a full frame, and at high rates about 1 ms of tokens or
        # the shaper falls behind its own timer (measured: 16 KiB caps "1gbit" at
        # ~0.6 Gbit/s, 125 kB reaches it); a bigger bucket lets short transfers
        # through unshaped (16 KiB at 100 kbit/s: 25 kB arrive 2.5x too fast).
        burst = self.burst if self.burst is not None else max(4096, round(bits / 8 * 1e-3))
        return ["root", "tbf", "rate", f"{round(bits)}bit", "burst", str(burst), "latency", f"{self.latency * 1e3:g}ms"]

    def _create_namespaces(self) -> None:
        for host in self.hosts:
            try:
                _run("ip", "netns", "add", host.namespace)
            except _CommandFailed as e:
                raise NetemUnavailable(
                    f"cannot create a network namespace: {e}. Network emulation needs a Linux "
                    f"kernel with network namespaces (CONFIG_NET_NS) and, in a container, "
                    f"CAP_SYS_ADMIN and CAP_NET_ADMIN (e.g. `docker run --privileged`)"
                ) from None
            self._created.append(("netns", host.namespace))

    def _create_bridge(self) -> None:
        with open(_LOCK_FILE, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.subnet = self._pick_subnet()
            addresses = self.subnet.hosts()
            self.gateway = str(next(addresses))
            for host in self.hosts:
                host.ip = str(next(addresses))
            _run("ip", "link", "add", self.bridge, "type", "bridge")
            self._created.append(("link", self.bridge))
            _run("ip", "addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.bridge)
            _run("ip", "link", "set", self.bridge, "up")

    def _pick_subnet(self) -> ipaddress.IPv4Network:
        used = [
            ipaddress.ip_interface(m.group(1)).network
            for m in re.finditer(r"inet (\S+)", _run("ip", "-o", "-4", "addr", "show"))
        ]
        if self._requested_subnet is not None:
            clash = [n for n in used if n.overlaps(self._requested_subnet)]
            if clash:
                raise ValueError(f"subnet {self._requested_subnet} overlaps {clash[0]}, already on this machine")
            return self._requested_subnet
        for candidate in ADDRESS_RANGE.subnets(new_prefix=24):
            if not any(candidate.overlaps(n) for n in used):
                return candidate
        raise NetemUnavailable(f"no free /24 left in {ADDRESS_RANGE}; pass subnet= explicitly")

    def _attach(self, host: Host) -> None:
        # The peer is created inside the namespace directly, so it can be called eth0.
        _run("ip", "link", "add", host.link, "type", "veth", "peer", "name", "eth0", "netns", host.namespace)
        self._created.append(("link", host.link))
        _run("ip", "link", "set", host.link, "master", self.bridge, "up")
        _run("ip", "-n", host.namespace, "addr", "add", f"{host.ip}/{self.subnet.prefixlen}", "dev", "eth0")
        _run("ip", "-n", host.namespace, "link", "set", "eth0", "up")
        _run("ip", "-n", host.namespace, "link", "set", "lo", "up")

    @staticmethod
    def _hint(error: str) -> str:
        if " tbf " in error:
            return "Rate limiting needs the kernel's tbf qdisc (sch_tbf; `modprobe sch_tbf`)"
        if "veth" in error:
            return "Emulated hosts need the kernel's veth driver (`modprobe veth`)"
        if "bridge" in error:
            return "Emulated hosts need the kernel's bridge driver (`modprobe bridge`)"
        return "Check that this process may configure network interfaces (root, CAP_NET_ADMIN)"


class EmulatedCluster:
    """A real ``dask scheduler`` and ``n_workers`` ``dask worker`` processes, each worker
    in its own network namespace with a rate-limited link.

    Example::

        with EmulatedCluster(n_workers=2, rate="10mbit") as cluster:
            with cluster.client() as client:
                ...                                    # worker-to-worker data at 10 Mbit/s
                cluster.set_rate("2mbit", workers=[1])  # mid-run, both directions of worker 1
                cluster.set_rate(None)                  # unshaped

    The scheduler runs on this machine and listens on the bridge, so a client here
    reaches it (and the workers) directly. Everything is torn down on leaving the
    ``with``, whether by success, exception or Ctrl-C, and on SIGTERM, SIGHUP or
    interpreter exit while it runs.
    """

    n_workers: int
    nthreads: int
    nanny: bool
    dashboard: bool
    timeout: float  # seconds for the scheduler and all workers to come up
    grace: float  # seconds processes get to exit on SIGTERM before SIGKILL
    scheduler_options: list[str]
    worker_options: list[str]
    network: EmulatedNetwork
    scheduler_address: str | None
    dashboard_link: str | None

    def __init__(
        self,
        n_workers: int = 2,
        rate: str | float | None = None,
        *,
        nthreads: int = 1,
        nanny: bool = True,
        dashboard: bool = False,
        burst: int | None = None,
        latency: float = 0.05,
        subnet: str | None = None,
        timeout: float = 60.0,
        grace: float = 3.0,
        scheduler_options: Sequence[str] = (),
        worker_options: Sequence[str] = (),
    ):
        self.n_workers = n_workers
        self.nthreads = nthreads
        self.nanny = nanny
        self.dashboard = dashboard
        self.timeout = timeout
        self.grace = grace
        self.scheduler_options = list(scheduler_options)
        self.worker_options = list(worker_options)
        self.network = EmulatedNetwork(n_workers, rate, burst=burst, latency=latency, subnet=subnet)
        self.scheduler_address = None
        self.dashboard_link = None
        self._processes: dict[str, subprocess.Popen] = {}
        self._workdir: str | None = None

    @property
    def workers(self) -> list[Host]:
        """The emulated host of each worker, by index: namespace, IP, current rate."""
        return self.network.hosts

    @property
    def worker_addresses(self) -> list[str]:
        """Each worker's Dask address, by index (as in ``client.submit(..., workers=[...])``)."""
        return [f"tcp://{host.ip}:{WORKER_PORT}" for host in self.network.hosts]

    def set_rate(self, rate: str | float | None, workers: Iterable[int] | None = None) -> None:
        """Shape the links of ``workers`` (indices; default all) to ``rate`` in both
        directions, at once and mid-run; ``None`` removes the limit."""
        self.network.set_rate(rate, workers)

    def client(self, **kwargs) -> Client:
        """A ``distributed.Client`` connected to this cluster; close it (or use ``with``)."""
        return Client(self.scheduler_address, **kwargs)

    @property
    def pids(self) -> dict[str, int]:
        """The process id of each process started, by name ("scheduler", "worker-0", ...)."""
        return {name: proc.pid for name, proc in self._processes.items()}

    def exited(self) -> dict[str, int]:
        """The processes that have ended, by name ("scheduler", "worker-0", ...), with their exit code."""
        return {name: proc.returncode for name, proc in self._processes.items() if proc.poll() is not None}

    def start(self) -> Self:
        check_available()
        _reaper.add(self)  # before the network, so it is closed first and kills its processes
        try:
            self.network.start()
            self._workdir = tempfile.mkdtemp(prefix=f"dask-asgd-netem-{self.network.name}-")
            self._start_scheduler()
            self._start_workers()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Stop the processes, then tear down the network. Idempotent; never raises
        for what is already gone."""
        self._stop_processes()
        self.network.close()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        _reaper.discard(self)  # last, as in EmulatedNetwork.close

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        rates = sorted({format_rate(h.rate) for h in self.network.hosts})
        return f"<EmulatedCluster {self.scheduler_address} workers={self.n_workers} rate={', '.join(rates)}>"

    def _start_scheduler(self) -> None:
        scheduler_file = os.path.join(self._workdir, "scheduler.json")
        gateway = self.network.gateway
        dashboard = ["--dashboard-address", f"{gateway}:0"] if self.dashboard else ["--no-dashboard"]
        self._spawn(
            "scheduler",
            [
                sys.executable, "-m", "distributed.cli.dask_scheduler",
                "--host", gateway, "--port", "0", "--scheduler-file", scheduler_file,
                *dashboard, *self.scheduler_options,
            ],
        )  # fmt: skip
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                with open(scheduler_file) as f:
                    info = json.load(f)
                break
            except (FileNotFoundError, json.JSONDecodeError):
                self._check_started(deadline, "the scheduler did not write its address")
                time.sleep(0.05)
        self.scheduler_address = info["address"]
        if self.dashboard:
            self.dashboard_link = f"http://{gateway}:{info['services']['dashboard']}/status"

    def restart_exited_workers(self) -> list[int]:
        """Start again the workers whose process has ended, in their namespaces
        at their addresses, and wait until they are connected; returns their
        indices. (A worker whose connection to the scheduler breaks shuts
        down, its nanny with it: seen across a drop to 5 Mbit/s.)"""
        exited = [host for host in self.network.hosts if self._processes[f"worker-{host.index}"].poll() is not None]
        for host in exited:
            self._start_worker(host)
        if exited:
            self._wait_for_workers()
        return [host.index for host in exited]

    def _start_workers(self) -> None:
        for host in self.network.hosts:
            self._start_worker(host)
        self._wait_for_workers()

    def _start_worker(self, host: Host) -> None:
        argv = [
            sys.executable, "-m", "distributed.cli.dask_worker", self.scheduler_address,
            "--host", host.ip, "--worker-port", str(WORKER_PORT), "--name", f"w{host.index}",
            "--nthreads", str(self.nthreads), "--nanny" if self.nanny else "--no-nanny",
            "--no-dashboard", "--local-directory", os.path.join(self._workdir, f"worker-{host.index}"),
            # Should the scheduler be gone for good (SIGKILLed), workers exit rather than retry forever.
            "--death-timeout", "60",
            *self.worker_options,
        ]  # fmt: skip
        self._spawn(f"worker-{host.index}", self.network.exec_argv(host.index, argv))

    def _wait_for_workers(self) -> None:
        deadline = time.monotonic() + self.timeout
        with Client(self.scheduler_address, timeout=self.timeout, set_as_default=False) as client:
            while set(client.nthreads()) != set(self.worker_addresses):
                self._check_started(deadline, "not all workers connected to the scheduler")
                time.sleep(0.1)

    def _spawn(self, name: str, argv: list[str]) -> None:
        # Main thread only: the parent-death signal fires when the creating *thread* ends.
        in_main = threading.current_thread() is threading.main_thread()
        # Appended to: a restarted worker's log keeps why the first one ended.
        with open(os.path.join(self._workdir, f"{name}.log"), "ab") as log:
            # A session of its own keeps Ctrl-C in the terminal from reaching the
            # processes before close() stops them in order.
            self._processes[name] = subprocess.Popen(
                argv,
                # The dask config in force here, as LocalCluster's nannies pass it
                # on: a caller's timeouts must reach the scheduler and workers
                # too (the balance benchmark's 120 s connect timeout did not).
                env={**os.environ, "DASK_INTERNAL_INHERIT_CONFIG": dask.config.serialize(dask.config.global_config)},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent if in_main else None,  # noqa: PLW1509
            )

    def _check_started(self, deadline: float, waiting_for: str) -> None:
        exited = self.exited()
        if exited or time.monotonic() > deadline:
            problem = (
                ", ".join(f"{name} exited with code {code}" for name, code in exited.items())
                if exited
                else f"{waiting_for} within {self.timeout:g} s"
            )
            raise RuntimeError(f"emulated cluster failed to start: {problem}\n{self.log_tails()}")

    def log_tails(self) -> str:
        """The end of each process's log (the logs go when the cluster closes)."""
        return "\n".join(f"--- {name}.log (end) ---\n{self._log_tail(name)}" for name in self._processes)

    def _log_tail(self, name: str, lines: int = 15) -> str:
        try:
            with open(os.path.join(self._workdir, f"{name}.log"), errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def _stop_processes(self) -> None:
        processes = list(self._processes.values())
        for proc in processes:
            if proc.poll() is None:
                _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        for proc in processes:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in processes:
            # Also reaches a nanny's worker process left behind by its nanny.
            _signal_group(proc.pid, signal.SIGKILL)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                logger.warning("process %d did not exit after SIGKILL", proc.pid)
        self._processes.clear()


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # Runs in the child between fork and exec; survives exec. A SIGKILLed test run
    # then takes its scheduler and workers with it. SIGKILL: with the owner gone there
    # is no one to shut down gracefully for (SIGTERM took seconds on a busy machine),
    # and a nanny's worker exits by itself as soon as its nanny is gone.
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class _Reaper:
    """Closes every emulation still live when the interpreter exits or receives
    SIGTERM or SIGHUP, so that a killed run leaves no namespace or process behind.

    Example::

        _reaper.add(cluster)       # in start(); installs the handlers with the first
        _reaper.discard(cluster)   # in close(); restores them with the last

    After closing, a signal goes on to the handler that was there before (by default
    the process then dies of it, as it would have).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGHUP)
    _live: list
    _previous: dict[int, object]

    def __init__(self):
        self._live = []
        self._previous = {}
        self._lock = threading.RLock()  # re-entered when a signal arrives inside add()
        atexit.register(self.close_all)

    def add(self, emulation) -> None:
        with self._lock:
            if emulation not in self._live:
                self._live.append(emulation)
            if not self._previous and threading.current_thread() is threading.main_thread():
                for signum in self.SIGNALS:
                    self._previous[signum] = signal.signal(signum, self._on_signal)

    def discard(self, emulation) -> None:
        with self._lock:
            if emulation in self._live:
                self._live.remove(emulation)
            if not self._live and self._previous and threading.current_thread() is threading.main_thread():
                for signum, previous in self._previous.items():
                    if signal.getsignal(signum) == self._on_signal:
                        signal.signal(signum, previous)
                self._previous.clear()

    def close_all(self) -> None:
        # Oldest first: a cluster closes its own network after stopping its processes.
        for emulation in list(self._live):
            try:
                emulation.close()
            except Exception:
                logger.exception("tearing down %r failed", emulation)

    def _on_signal(self, signum, frame) -> None:
        previous = self._previous.get(signum, signal.SIG_DFL)
        self.close_all()
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)


_reaper = _Reaper()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dask_asgd.testing.netem",
        description="Run a Dask scheduler and workers, each worker in its own network namespace "
        "with a rate-limited link (root only), until Ctrl-C; then tear everything down.",
    )
    parser.add_argument("--workers", type=int, default=2, help="number of worker processes (default 2)")
    parser.add_argument("--rate", default=None, help="link rate per worker, tc notation: 100mbit, 10mbit, ... (default: unshaped)")
    parser.add_argument("--nthreads", type=int, default=1, help="threads per worker (default 1)")
    parser.add_argument("--no-nanny", dest="nanny", action="store_false", help="start workers without a nanny")
    parser.add_argument("--dashboard", action="store_true", help="serve the scheduler's dashboard on the bridge address")
    parser.add_argument("--subnet", default=None, help=f"a /24 for the hosts (default: the first free one in {ADDRESS_RANGE})")
    args = parser.parse_args(argv)
    # Ctrl-C (SIGINT) is how this command stops, also where SIGINT came in ignored:
    # a background job of a non-interactive shell inherits it so (seen in CI, where
    # the command then never stopped).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        cluster = EmulatedCluster(
            args.workers, args.rate, nthreads=args.nthreads, nanny=args.nanny, dashboard=args.dashboard, subnet=args.subnet
        )
    except ValueError as e:
        parser.error(str(e))
    try:
        with cluster:
            print(f"scheduler  {cluster.scheduler_address}", flush=True)
            if cluster.dashboard_link:
                print(f"dashboard  {cluster.dashboard_link}")
            for host, address in zip(cluster.workers, cluster.worker_addresses):
                print(f"worker {host.index}   {address}  netns {host.namespace}  link {host.link}  {format_rate(host.rate)}")
            print("Ctrl-C to stop and tear down.", flush=True)
            while not cluster.exited():
                time.sleep(0.5)
            print(f"a cluster process ended ({cluster.exited()}); tearing down", file=sys.stderr)
            return 1
    except (NetemUnavailable, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
