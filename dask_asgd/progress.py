"""Progress lines for long work: one as each pipeline stage starts and ends, with its
time, and a heartbeat every ``asgd.cli.progress-interval`` seconds while it runs."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TextIO

from . import config


class Progress:
    """Times stages and, given a stream, reports on them there.

    Example::

        progress = Progress(sys.stdout)
        with progress.stage("train", "kmeans on 2 workers", heartbeat=lambda s: f"{s:.0f} s"):
            est.fit(X)
        progress.times["train"]        # seconds
    """

    out: TextIO | None
    interval: float
    times: dict[str, float]

    def __init__(self, out: TextIO | None = sys.stdout, interval: float | None = None):
        self.out = out
        self.interval = float(config.get("cli.progress-interval") if interval is None else interval)
        self.times = {}

    def note(self, message: str) -> None:
        if self.out is not None:
            print(message, file=self.out, flush=True)

    @contextlib.contextmanager
    def stage(self, name: str, detail: str = "", heartbeat: Callable[[float], str] | None = None) -> Iterator[None]:
        self.note(f"[{name}] {detail}".rstrip())
        start = time.perf_counter()
        stop = threading.Event()
        ticker = None
        if self.out is not None and heartbeat is not None and self.interval > 0:
            def tick():
                while not stop.wait(self.interval):
                    self.note(f"[{name}] ... {heartbeat(time.perf_counter() - start)}")
            ticker = threading.Thread(target=tick, name=f"progress-{name}", daemon=True)
            ticker.start()
        try:
            yield
        finally:
            stop.set()
            if ticker is not None:
                ticker.join()
            self.times[name] = time.perf_counter() - start
        self.note(f"[{name}] done in {self.times[name]:.1f} s")
