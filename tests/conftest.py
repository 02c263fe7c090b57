import pytest
from distributed import Client, LocalCluster


@pytest.fixture(scope="session")
def client():
    """A real cluster: two worker processes, one thread each, real TCP."""
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        with Client(cluster) as c:
            yield c
