"""The cluster a pipeline runs on: a running scheduler reached with a short timeout,
or an embedded ``LocalCluster`` bound to 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from distributed import Client, LocalCluster

from . import config
from .errors import SchedulerUnreachable


@contextlib.contextmanager
def connect(scheduler: str | None = None, n_workers: int | None = None) -> Iterator[Client]:
    """A client on ``scheduler`` (an address such as ``tcp://10.0.0.5:8786``), else on
    an embedded ``LocalCluster`` of ``n_workers`` worker processes, closed afterwards.

    With a scheduler, waits up to ``asgd.cli.workers-timeout`` seconds for
    ``n_workers`` workers (default: at least one).

    Example::

        with connect("tcp://127.0.0.1:8786", n_workers=2) as client:
            pipeline.run(client)
    """
    if scheduler is None:
        n = n_workers or config.get("local-cluster.n-workers") or min(os.cpu_count() or 1, 4)
        with LocalCluster(
            n_workers=int(n),
            threads_per_worker=int(config.get("local-cluster.threads-per-worker")),
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
        ) as cluster, Client(cluster) as client:
            yield client
        return

    timeout = float(config.get("cli.connect-timeout"))
    try:
        client = Client(scheduler, timeout=timeout)
    except (OSError, TimeoutError) as e:
        raise SchedulerUnreachable(
            f"cannot reach the Dask scheduler at {scheduler} within {timeout:g} s; "
            "check the address (e.g. tcp://127.0.0.1:8786) and that `dask scheduler` is running there"
        ) from e
    except ValueError as e:
        raise SchedulerUnreachable(f"{scheduler!r} is not a scheduler address ({e}); pass one like tcp://127.0.0.1:8786") from e
    with client:
        wanted = n_workers or 1
        wait = float(config.get("cli.workers-timeout"))
        try:
            client.wait_for_workers(wanted, timeout=wait)
        except TimeoutError as e:
            have = len(client.scheduler_info(n_workers=-1)["workers"])
            raise SchedulerUnreachable(
                f"only {have} of {wanted} worker(s) joined the scheduler at {scheduler} within {wait:g} s; "
                f"start more with `dask worker {scheduler}` or ask for fewer with --workers"
            ) from e
        yield client


def dashboard_link(client: Client) -> str | None:
    """The dashboard's URL, or None when the scheduler serves none (bokeh missing)."""
    if "dashboard" not in client.scheduler_info(n_workers=0).get("services", {}):
        return None
    return client.dashboard_link
