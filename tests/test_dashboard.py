"""The dashboard page and the /metrics series on real schedulers: a LocalCluster
built after ``import dask_asgd``, a ``dask scheduler --preload dask_asgd.dashboard``
process, and the page drawn with live data in headless Chromium."""

import asyncio
import base64
import json
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
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from distributed import Client, LocalCluster
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from tornado.httpclient import AsyncHTTPClient
from tornado.websocket import websocket_connect

import dask_asgd
from dask_asgd.dashboard import ROUTE
from dask_asgd.dashboard._hook import after_import

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
SIZE = (1400, 1000)
WORKER_COLOURS = [(0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)]  # Category10's first two: the page's workers


# -- the cluster and a fit running beside the test ------------------------------

@contextmanager
def local_cluster():
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0"
    ) as cluster, Client(cluster) as client:
        yield client, cluster.dashboard_link.rsplit("/", 1)[0]


class FitThread(threading.Thread):
    """A K-Means fit on random rows, in a thread, so the test can watch it."""

    def __init__(self, client, max_time):
        super().__init__(daemon=True)
        self.estimator = dask_asgd.KMeans(50, max_time=max_time, max_epochs=10_000, tol=None, client=client)
        self.X = np.random.default_rng(0).normal(size=(20_000, 16))
        self.error = None

    def run(self):
        try:
            self.estimator.fit(self.X)
        except BaseException as exc:  # noqa: BLE001  (re-raised in the test by finish())
            self.error = exc

    def finish(self):
        self.join(timeout=120)
        assert not self.is_alive(), "the fit did not end"
        if self.error is not None:
            raise self.error


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.status == 200, (url, response.status)
        return response.read().decode()


def metrics(base: str) -> dict[str, list]:
    """``/metrics`` parsed: dask_asgd series name -> [(labels, value)]."""
    series: dict[str, list] = {}
    for family in text_string_to_metric_families(get(base + "/metrics")):
        for sample in family.samples:
            if sample.name.startswith("dask_asgd_"):
                series.setdefault(sample.name, []).append((sample.labels, sample.value))
    return series


def wait_until(condition, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


def assert_menu_lists_the_page(base: str) -> None:
    status = get(base + "/status")
    menu = re.search(r'<div class="dropdown-content">(.*?)</div>', status, re.DOTALL)
    assert menu is not None, "no More... menu on the status page"
    assert f'href="{ROUTE.strip("/")}"' in menu.group(1), menu.group(1)


# -- registration without loading bokeh ------------------------------------------

def test_import_dask_asgd_loads_neither_bokeh_nor_prometheus_client():
    code = "import sys, dask_asgd; print(sorted({'bokeh', 'prometheus_client'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_after_import_calls_back_when_the_module_loads(tmp_path, monkeypatch):
    (tmp_path / "asgd_probe_late.py").write_text("VALUE = 1\n")
    (tmp_path / "asgd_probe_broken.py").write_text("VALUE = 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []

    def broken(module):
        raise RuntimeError("an extension that fails")

    try:
        after_import("asgd_probe_late", seen.append)
        assert seen == []
        import asgd_probe_late

        assert seen == [asgd_probe_late]
        assert "VALUE = 1" in asgd_probe_late.__loader__.get_source("asgd_probe_late")
        after_import("asgd_probe_late", seen.append)  # already loaded: called at once
        assert seen == [asgd_probe_late, asgd_probe_late]

        after_import("asgd_probe_broken", broken)
        import asgd_probe_broken  # the failure is logged, the import goes on

        assert asgd_probe_broken.VALUE == 2
    finally:
        for name in ("asgd_probe_late", "asgd_probe_broken"):
            sys.modules.pop(name, None)


# -- a LocalCluster built after import dask_asgd ---------------------------------

def ours(series: dict, workers: set) -> dict:
    """Only the series about these workers (plus the unlabelled totals)."""
    return {name: [(labels, v) for labels, v in values if labels.get("worker", next(iter(workers))) in workers]
            for name, values in series.items()}


def test_page_and_metrics_follow_a_fit_on_a_local_cluster():
    with local_cluster() as (client, base):
        workers = set(client.scheduler_info()["workers"])
        assert_menu_lists_the_page(base)
        assert "bokeh" in get(base + ROUTE).lower()
        before = metrics(base)
        # The collector reads every monitor in this process (one scheduler per
        # process in real use; here the session's cluster too): judge ours only.
        assert not [labels for labels, _ in before.get("dask_asgd_loss", []) if labels["worker"] in workers]
        dropped_before = before["dask_asgd_reports_dropped_total"]

        fit = FitThread(client, max_time=5)
        fit.start()
        live = wait_until(
            lambda: (m := ours(metrics(base), workers)) and len(m.get("dask_asgd_loss", [])) == 2 and m,
            what="dask_asgd_loss for both workers",
        )
        assert "bokeh" in get(base + ROUTE).lower()
        fit.finish()
        after = ours(metrics(base), workers)
        assert "bokeh" in get(base + ROUTE).lower()

    for series in (live, after):
        assert {labels["worker"] for labels, _ in series["dask_asgd_loss"]} == workers
        assert len({labels["run"] for labels, _ in series["dask_asgd_loss"]}) == 1
        assert all(math.isfinite(v) for _, v in series["dask_asgd_loss"])
        assert all(v > 0 for _, v in series["dask_asgd_comm_interval"])
        assert all(v > 0 for _, v in series["dask_asgd_message_size"])
        assert all(v >= 0 for _, v in series["dask_asgd_messages_in_flight"])
    assert all(v > 0 for _, v in after["dask_asgd_samples_total"])
    assert all(v > 0 for _, v in after["dask_asgd_messages_sent_total"])
    assert all(0 <= v <= 1 for _, v in after.get("dask_asgd_accept_ratio", []))
    assert all(v > 0 for _, v in after.get("dask_asgd_bandwidth_bytes_per_second", []))
    assert sorted(v for _, v in after["dask_asgd_done"]) == [1.0, 1.0]
    cpu, comm = ({labels["worker"]: v for labels, v in after[name]}
                 for name in ("dask_asgd_cpu_seconds_total", "dask_asgd_comm_cpu_seconds_total"))
    assert all(0 < comm[w] < cpu[w] for w in workers), (cpu, comm)
    # A clean fit drops no report (the total is the whole process's).
    assert after["dask_asgd_reports_dropped_total"] == dropped_before


# -- the page in a browser -----------------------------------------------------------

# What the browser holds of the page: the text of its Divs, the points plotted.
PAGE_JS = """(() => {
  const doc = window.Bokeh && Bokeh.documents && Bokeh.documents[0];
  if (!doc) return null;
  const models = [...doc.all_models];
  return {
    text: models.filter(m => m.type === "Div").map(m => m.text).join(" "),
    points: models.filter(m => m.type === "ColumnDataSource" && "elapsed" in m.data)
                  .reduce((n, m) => n + (m.get_length() || 0), 0),
  };
})()"""


class Chromium:
    """Headless Chromium over the DevTools protocol: open a page, read its Bokeh
    models, take a screenshot once data is drawn.

    ``--screenshot`` with ``--virtual-time-budget`` cannot do this for a Bokeh
    server page: virtual time does not wait for the websocket that brings the
    document, so the shot shows an empty page (distributed's pages too).

    Example::

        browser = Chromium(1400, 1000)
        browser.open(url)
        browser.wait_for(PAGE_JS, lambda page: page["points"] > 5)
        browser.screenshot("page.png")
        browser.close()
    """

    def __init__(self, width, height):
        self.loop = asyncio.new_event_loop()
        self.profile = tempfile.mkdtemp()
        self.process = subprocess.Popen(
            [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", f"--window-size={width},{height}",
             "--remote-debugging-port=0", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        self._ids = iter(range(1, 1 << 30))
        try:
            self.ws = self._run(self._connect())
            self._run(self._call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                                 deviceScaleFactor=1, mobile=False))
        except BaseException:
            self.close()
            raise

    def _run(self, coroutine, timeout=30):
        return self.loop.run_until_complete(asyncio.wait_for(coroutine, timeout))

    async def _connect(self):
        # Chromium writes the port it chose (--remote-debugging-port=0) here.
        port_file = Path(self.profile) / "DevToolsActivePort"
        while not (port_file.exists() and port_file.read_text().strip()):
            assert self.process.poll() is None, "chromium exited at start"
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = json.loads((await AsyncHTTPClient().fetch(f"http://127.0.0.1:{port}/json/list")).body)
        page = next(t for t in targets if t["type"] == "page")
        return await websocket_connect(page["webSocketDebuggerUrl"], max_message_size=64 << 20)

    async def _call(self, method, **params):
        call_id = next(self._ids)
        await self.ws.write_message(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = await self.ws.read_message()
            assert message is not None, "chromium closed the DevTools connection"
            message = json.loads(message)
            if message.get("id") == call_id:
                assert "error" not in message, message
                return message.get("result", {})

    def open(self, url):
        self._run(self._call("Page.navigate", url=url))

    def evaluate(self, expression):
        result = self._run(self._call("Runtime.evaluate", expression=expression, returnByValue=True))
        return result["result"].get("value")

    def wait_for(self, expression, condition, timeout=60.0):
        return wait_until(lambda: (v := self.evaluate(expression)) is not None and condition(v) and v,
                          timeout=timeout, what=f"the page: {expression[:60]}...")

    def screenshot(self, path):
        shot = self._run(self._call("Page.captureScreenshot", format="png"))
        with open(path, "wb") as f:
            f.write(base64.b64decode(shot["data"]))

    def close(self):
        if getattr(self, "ws", None) is not None:
            self.ws.close()
        # Its own process group: the renderers and helpers go with it.
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.loop.close()
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture
def chromium():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (ci/install-chromium.sh)")
    browser = Chromium(*SIZE)
    try:
        yield browser
    finally:
        browser.close()


def test_the_page_draws_a_live_run_in_chromium(chromium, tmp_path):
    with local_cluster() as (client, base):
        chromium.open(base + ROUTE)
        chromium.wait_for(PAGE_JS, lambda page: "no dask-asgd run yet" in page["text"])

        fit = FitThread(client, max_time=12)
        fit.start()
        # The page already open switches to the run by itself; shot while it trains.
        live = chromium.wait_for(PAGE_JS, lambda page: page["points"] >= 6 and "training," in page["text"])
        shot = tmp_path / "dashboard.png"
        chromium.screenshot(shot)
        fit.finish()

    assert "mode <b>asgd</b>" in live["text"] and "2 worker(s)" in live["text"]
    with Image.open(shot) as image:
        assert image.format == "PNG"
        assert image.size == SIZE
        rgb = image.convert("RGB")
    colours = rgb.getcolors(maxcolors=1 << 24)
    assert len(colours) > 1000, f"{len(colours)} colours: the page looks blank"
    # Each worker's lines and markers are drawn in its own colour.
    for worker_colour in WORKER_COLOURS:
        drawn = sum(n for n, c in colours if sum(abs(a - b) for a, b in zip(c, worker_colour)) < 40)
        assert drawn > 500, f"{drawn} pixels in {worker_colour}: a worker's lines are missing"


# -- a dask scheduler process with the preload -----------------------------------

def test_dask_scheduler_preload_serves_page_and_metrics(tmp_path):
    scheduler_file = tmp_path / "scheduler.json"
    dask = [sys.executable, "-m", "dask"]
    processes = []
    try:
        processes.append(subprocess.Popen(
            [*dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address", "127.0.0.1:0",
             "--scheduler-file", str(scheduler_file), "--preload", "dask_asgd.dashboard"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ))
        info = json.loads(wait_until(
            lambda: scheduler_file.exists() and scheduler_file.read_text().strip(), what="the scheduler file"
        ))
        base = f"http://127.0.0.1:{info['services']['dashboard']}"
        processes.append(subprocess.Popen(
            [*dask, "worker", info["address"], "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ))
        with Client(info["address"], timeout=30) as client:
            client.wait_for_workers(1, timeout=60)
            assert_menu_lists_the_page(base)
            assert "bokeh" in get(base + ROUTE).lower()
            FitThread(client, max_time=2).run()
            (worker,) = client.scheduler_info()["workers"]
        series = metrics(base)
        assert [labels["worker"] for labels, _ in series["dask_asgd_loss"]] == [worker]
        assert all(math.isfinite(v) for _, v in series["dask_asgd_loss"])
        assert series["dask_asgd_done"][0][1] == 1.0
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
