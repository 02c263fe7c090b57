"""Security, on real parts: a TLS cluster (certificates made here with ``cryptography``)
that trains over tls:// end to end and refuses plain TCP and foreign certificates;
checkpoints and model files that hold pickles are refused, never unpickled; the
embedded clusters of the command line and of ``fit`` listen on 127.0.0.1 only;
pipeline and configuration files are parsed as data, never run."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import pickle
import subprocess
import sys
import textwrap

import dask.config
import numpy as np
import pytest
from distributed import Client, LocalCluster
from distributed.core import rpc

from dask_asgd import KMeans, checkpoint
from dask_asgd.balance._monitor import Monitor
from dask_asgd.channel import Channel
from dask_asgd.checkpoint import CorruptCheckpoint
from dask_asgd.errors import ConfigError, DataError
from dask_asgd.outputs import load_model
from dask_asgd.pipeline import Pipeline
from dask_asgd.testing.tls import make_certificates


class RunsCode:
    """Unpickling this touches ``marker``: proof that a file ran code when loaded."""

    def __init__(self, marker):
        self.marker = pathlib.Path(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


# ----------------------------------------------------------------------------------------
# TLS
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory):
    certs = make_certificates(tmp_path_factory.mktemp("tls"))
    security = certs.security()
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, protocol="tls://", host="127.0.0.1",
        security=security, dashboard_address="127.0.0.1:0",
    ) as cluster, Client(cluster, security=security) as client:
        client.wait_for_workers(2)
        client.register_plugin(Channel())
        yield cluster, client, security


def _links(dask_worker):
    channel = dask_worker.plugins[Channel.name]
    return {peer: link.sent for peer, link in channel.links.items()}


def _monitored(run_id, dask_scheduler):
    run = dask_scheduler.plugins[Monitor.name].runs.get(run_id)
    return [] if run is None else sorted(run.workers)


@pytest.mark.timeout(120)
def test_fit_over_tls_end_to_end(tls_cluster):
    cluster, client, _ = tls_cluster
    assert cluster.scheduler_address.startswith("tls://127.0.0.1:")
    workers = sorted(client.scheduler_info()["workers"])
    assert len(workers) == 2 and all(w.startswith("tls://127.0.0.1:") for w in workers)

    X = np.random.default_rng(0).normal(size=(100_000, 8))
    est = KMeans(5, max_epochs=5, tol=None, comm_interval=4096, random_state=0, client=client).fit(X)
    last = est.history_.isel(time=-1)
    assert sorted(est.history_.worker.values) == workers
    assert int(last.messages_delivered.sum()) > 0  # states crossed the channel...
    assert int((last.accepted + last.rejected).sum()) > 0  # ...and reached the filter
    # ...on worker-to-worker connections to tls:// addresses: the only listeners there are.
    sent = client.run(_links)
    assert all(peer.startswith("tls://") for links in sent.values() for peer in links)
    assert sum(n for links in sent.values() for n in links.values()) > 0
    # The workers' reports reached the scheduler's monitor over TLS too.
    assert client.run_on_scheduler(_monitored, est.history_.attrs["run_id"]) == workers


@pytest.mark.timeout(60)
def test_plain_tcp_and_foreign_certificates_are_refused(tls_cluster, tmp_path):
    cluster, _, _ = tls_cluster
    address = cluster.scheduler_address
    with pytest.raises(OSError):
        Client(address.replace("tls://", "tcp://"), timeout=5)
    foreign = make_certificates(tmp_path / "foreign", name="someone else").security()
    with pytest.raises(OSError):
        Client(address, security=foreign, timeout=5)


async def _deliver(address, connection_args):
    async with rpc(address, connection_args=connection_args) as peer:
        return await peer.asgd_deliver(topic="asgd/nobody/asgd", key=1, sender="tcp://10.6.6.6:1", payload=None, meta={})


@pytest.mark.timeout(60)
def test_the_channel_takes_no_message_without_the_cluster_certificate(tls_cluster, tmp_path):
    """A peer must hold a certificate of the cluster's CA to reach a worker's channel
    handler at all: plain TCP and a foreign CA fail before any message is read."""
    _, client, security = tls_cluster
    worker = min(client.scheduler_info()["workers"])
    # With the cluster's certificate the handler answers (whatever it makes of this message)...
    reply = asyncio.run(_deliver(worker, security.get_connection_args("worker")))
    assert isinstance(reply, dict) and reply["status"] in ("ok", "dropped"), reply
    # ...without it, nothing gets through.
    with pytest.raises(OSError):
        asyncio.run(_deliver(worker.replace("tls://", "tcp://"), {}))
    foreign = make_certificates(tmp_path / "foreign", name="someone else").security()
    with pytest.raises(OSError):
        asyncio.run(_deliver(worker, foreign.get_connection_args("worker")))


# ----------------------------------------------------------------------------------------
# Files that could run code
# ----------------------------------------------------------------------------------------
def _crafted_checkpoints(directory, marker):
    """Three files under checkpoint names that would run code if unpickled."""
    directory.mkdir(parents=True, exist_ok=True)
    np.savez(directory / "checkpoint-00000001.npz", params=np.zeros(4),
             __meta__=np.array([RunsCode(marker)], dtype=object), __sha256__=np.asarray("0" * 64))
    (directory / "checkpoint-00000002.npz").write_bytes(pickle.dumps(RunsCode(marker)))
    with open(directory / "checkpoint-00000003.npz", "wb") as f:
        np.save(f, np.array([RunsCode(marker)], dtype=object))
    return checkpoint.list_checkpoints(directory)


def test_checkpoints_holding_pickles_are_refused_not_run(tmp_path):
    marker = tmp_path / "code-ran"
    paths = _crafted_checkpoints(tmp_path / "ckpt", marker)
    assert len(paths) == 3
    for path in paths:
        with pytest.raises(CorruptCheckpoint, match="holds pickled Python objects.*could run code.*not loaded"):
            checkpoint.load(path)
    assert checkpoint.load_latest(tmp_path / "ckpt") is None  # each skipped, none loaded
    assert not marker.exists()
    # The files are what they claim: unpickling one does run code.
    pickle.loads((tmp_path / "ckpt" / "checkpoint-00000002.npz").read_bytes())
    assert marker.exists()


@pytest.mark.timeout(60)
def test_resume_from_a_pickled_checkpoint_is_refused(tls_cluster, tmp_path):
    _, client, _ = tls_cluster
    marker = tmp_path / "code-ran"
    _crafted_checkpoints(tmp_path / "ckpt", marker)
    X = np.random.default_rng(0).normal(size=(2_000, 4))
    with pytest.raises(CorruptCheckpoint, match="none of the 3 checkpoint"):
        KMeans(3, checkpoint=str(tmp_path / "ckpt"), resume=True, client=client).fit(X)
    assert not marker.exists()


def test_model_files_holding_pickles_are_refused_not_run(tmp_path):
    marker = tmp_path / "code-ran"
    np.savez(tmp_path / "model.npz", format=np.asarray("dask-asgd-model"), cluster_centers=np.zeros((2, 2)),
             estimator=np.array([RunsCode(marker)], dtype=object))
    with pytest.raises(DataError, match="allow_pickle=False"):
        load_model(tmp_path / "model.npz")
    assert not marker.exists()


# ----------------------------------------------------------------------------------------
# Embedded clusters listen on 127.0.0.1 only
# ----------------------------------------------------------------------------------------
_PROBE = textwrap.dedent("""
    import json, sys, threading, time
    import numpy as np, psutil

    def listening():
        me = psutil.Process()
        found = set()
        for p in [me] + me.children(recursive=True):
            try:
                found |= {(c.laddr.ip, c.laddr.port) for c in p.net_connections(kind="inet")
                          if c.status == psutil.CONN_LISTEN}
            except psutil.Error:
                pass
        return found

    def watch(seen, stop):
        while not stop.is_set():
            seen |= listening()
            time.sleep(0.05)

    if __name__ == "__main__":
        seen, stop = set(), threading.Event()
        watcher = threading.Thread(target=watch, args=(seen, stop))
        watcher.start()
        out = {}
        if sys.argv[1] == "cli":
            from dask_asgd.cluster import connect, dashboard_link
            with connect() as client:
                out["scheduler"] = client.scheduler.address
                out["dashboard"] = dashboard_link(client)
                out["workers"] = sorted(client.scheduler_info()["workers"])
                time.sleep(0.5)
        else:
            from distributed.deploy.spec import SpecCluster
            from dask_asgd import KMeans
            clusters = {}
            def spy():
                while not stop.is_set():
                    for c in list(SpecCluster._instances):
                        if "://" in c.scheduler_address:  # started
                            clusters[c.scheduler_address] = c.dashboard_link
                    time.sleep(0.05)
            threading.Thread(target=spy, daemon=True).start()
            X = np.random.default_rng(0).normal(size=(20_000, 4))
            est = KMeans(3, max_epochs=3, tol=None, random_state=0).fit(X)
            out["clusters"] = clusters
            out["workers"] = sorted(map(str, est.history_.worker.values))
        stop.set()
        watcher.join()
        out["listening"] = sorted(seen)
        print(json.dumps(out))
""")


def _probe(what: str) -> dict:
    env = {**os.environ, "DASK_ASGD__LOCAL_CLUSTER__N_WORKERS": "1"}
    done = subprocess.run([sys.executable, "-c", _PROBE, what], capture_output=True, text=True, timeout=120, env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _port(url: str) -> int:
    return int(url.rstrip("/").rsplit(":", 1)[1].split("/")[0])


@pytest.mark.timeout(150)
def test_command_line_cluster_listens_on_localhost_only():
    out = _probe("cli")
    assert out["scheduler"].startswith("tcp://127.0.0.1:")
    assert out["dashboard"].startswith("http://127.0.0.1:")
    assert all(w.startswith("tcp://127.0.0.1:") for w in out["workers"]) and out["workers"]
    ports = {port for _, port in out["listening"]}
    assert {_port(out["scheduler"]), _port(out["dashboard"])} <= ports
    assert {ip for ip, _ in out["listening"]} == {"127.0.0.1"}, out["listening"]


@pytest.mark.timeout(150)
def test_fit_without_a_client_listens_on_localhost_only():
    out = _probe("fit")
    [(scheduler, dashboard)] = out["clusters"].items()
    assert scheduler.startswith("tcp://127.0.0.1:") and dashboard.startswith("http://127.0.0.1:")
    assert all(w.startswith("tcp://127.0.0.1:") for w in out["workers"]) and out["workers"]
    ports = {port for _, port in out["listening"]}
    assert {_port(scheduler), _port(dashboard)} <= ports
    assert {ip for ip, _ in out["listening"]} == {"127.0.0.1"}, out["listening"]


# ----------------------------------------------------------------------------------------
# Pipeline and configuration files are data
# ----------------------------------------------------------------------------------------
def test_pipeline_text_that_looks_like_code_stays_text_or_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    code = f"__import__('pathlib').Path({str(marker)!r}).touch()"  # no double quotes: a TOML string
    # As a name it would also be a path (results/<name>): refused for its '/'.
    with pytest.raises(ConfigError, match="name = .* is not valid"):
        Pipeline.from_string(f'name = "{code}"\n[source]\nkind = "blobs"\n[train]\nestimator = "kmeans"\n')
    harmless = "__import__('os').getpid()"
    pipeline = Pipeline.from_string(f'name = "{harmless}"\n[source]\nkind = "blobs"\n[train]\nestimator = "kmeans"\n')
    assert pipeline.name == harmless  # a string, kept as written
    refused = {
        f'[source]\nkind = "blobs"\n[train]\nestimator = "{code}"\n': "estimator = .* is not known",
        f'[source]\nkind = "{code}"\n[train]\n': "kind = .* is not known",
        f'[source]\nkind = "blobs"\nn_samples = "{code}"\n[train]\n': "n_samples = .* is not valid",
        f'[source]\nkind = "blobs"\n[train]\nestimator = "kmeans"\nn_clusters = "{code}"\n': "n_clusters=.* is not valid",
        f'{code} = 1\n[source]\nkind = "blobs"\n[train]\n': "not valid TOML",
    }
    for text, message in refused.items():
        with pytest.raises(ConfigError, match=message):
            Pipeline.from_string(text).check()
    assert not marker.exists()


def test_configuration_files_and_variables_are_parsed_not_run(tmp_path, monkeypatch):
    marker = tmp_path / "code-ran"
    folder = tmp_path / "config"
    folder.mkdir()
    (folder / "asgd.yaml").write_text(
        f"asgd:\n  engine:\n    segment-seconds: !!python/object/apply:pathlib.Path.touch [!!python/object/apply:pathlib.Path [{str(marker)!r}]]\n"
    )
    # dask reads YAML with yaml.safe_load: a Python tag is an error, never a call.
    with pytest.raises(ValueError, match=r"(?s)malformed.*could not determine a constructor"):
        dask.config.collect(paths=[str(folder)], env={})
    code = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    settings = dask.config.collect(paths=[], env={"DASK_ASGD__ENGINE__SEGMENT_SECONDS": code})
    assert dask.config.get("asgd.engine.segment-seconds", config=settings) == code  # a string, not run
    assert not marker.exists()
