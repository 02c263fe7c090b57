"""The notebooks in notebooks/ run top to bottom in a fresh Jupyter kernel (nbclient,
ipykernel), as a reader would run them; any cell error fails the test."""

import os
import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from dask_asgd.testing.netem import NetemUnavailable, check_available

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NAMES = ["quickstart.ipynb", "balancing.ipynb", "dashboard.ipynb"]
CELL_TIMEOUT = 300  # seconds; the notebooks take about a minute each on 2 cores


def execute(name: str, env: dict | None = None) -> nbformat.NotebookNode:
    """The notebook, executed in a new kernel whose working directory is notebooks/."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(
        notebook, timeout=CELL_TIMEOUT, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    client.execute(**({} if env is None else {"env": env}))
    return notebook


def printed(notebook: nbformat.NotebookNode) -> str:
    return "".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs)


def netem_available() -> bool:
    try:
        check_available()
    except NetemUnavailable:
        return False
    return True


def test_notebooks_are_committed_without_outputs():
    for name in NAMES:
        notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
        code = [cell for cell in notebook.cells if cell.cell_type == "code"]
        assert code, name
        assert all(cell.outputs == [] and cell.execution_count is None for cell in code), (
            f"{name} holds outputs; clear them before committing (Jupyter: Edit > Clear Outputs of All Cells)"
        )


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name):
    notebook = execute(name)
    if name == "balancing.ipynb":
        # As root (CI) the notebook must have used the emulated network, not the fallback.
        marker = "Network emulation available" if netem_available() else "NETWORK EMULATION UNAVAILABLE"
        assert marker in printed(notebook)


@pytest.mark.timeout(900)
def test_balancing_falls_back_without_network_emulation():
    # Without `ip` and `tc` on the kernel's PATH, check_available() fails as it does for a
    # user without iproute2: the notebook must say so and still run, on a LocalCluster.
    path = [d for d in os.environ.get("PATH", "").split(os.pathsep)
            if d and not any(shutil.which(tool, path=d) for tool in ("ip", "tc"))]
    notebook = execute("balancing.ipynb", env={**os.environ, "PATH": os.pathsep.join(path)})
    text = printed(notebook)
    assert "NETWORK EMULATION UNAVAILABLE" in text
    assert "Falling back to a plain LocalCluster" in text
    assert "loopback: fit in" in text
