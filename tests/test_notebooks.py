"""Every notebook runs top to bottom (its assert cells check the numbers it shows) and is
committed with its outputs, so it reads well on a code host without being run."""
import json
import os
import pathlib
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
TIMEOUT_S = 300  # per notebook; each runs in under ~90 s on a 2-core CPU, most under 60 s
MAX_TOTAL_BYTES = 1_000_000  # all notebooks together, outputs included
QUIET_ENV = {"GRAPHOPT_PROGRESS": "0", "JAX_PPRINT_USE_COLOR": "0"}  # as notebooks/execute.py


@pytest.mark.slow  # minutes of compiles: the full leg only (CI leg 1)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch):
    nb = nbformat.read(path, as_version=4)
    assert any("assert" in c.source for c in nb.cells if c.cell_type == "code"), \
        f"{path.name} has no assert cell"
    for k, v in QUIET_ENV.items():
        monkeypatch.setenv(k, v)  # the kernel inherits it
    client = nbclient.NotebookClient(nb, timeout=TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    t0 = time.perf_counter()
    client.execute()
    took = time.perf_counter() - t0
    assert took < TIMEOUT_S, f"{path.name} took {took:.0f} s"


def _outputs(nb):
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_committed_with_outputs(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]
    assert code and all(c.execution_count is not None for c in code), \
        f"{path.name}: run it and save it with outputs"
    assert any(c.outputs for c in code)
    errors = [o for o in _outputs(nb) if o.output_type == "error"]
    assert not errors, f"{path.name} was saved with an error output"
    text = json.dumps(nb)
    assert str(ROOT) not in text and os.path.expanduser("~") + "/" not in text, \
        f"{path.name} leaks a local path"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_outputs_are_plain(path):
    """No progress-bar fragments, no terminal colours, and each drawing stored once."""
    nb = nbformat.read(path, as_version=4)
    for o in _outputs(nb):
        text = json.dumps(o)
        assert "\\u001b[" not in text, f"{path.name}: ANSI escape codes in an output: {text[:200]}"
        if o.output_type == "stream":
            assert "\r" not in o.text and "it/s]" not in o.text, \
                f"{path.name}: a progress bar was saved: {o.text[:200]!r}"
        data = o.get("data", {})
        assert not ("image/svg+xml" in data and "text/html" in data), \
            f"{path.name}: a drawing stored twice (as SVG and as HTML)"


def test_notebooks_total_size():
    sizes = {p.name: p.stat().st_size for p in NOTEBOOKS}
    assert sum(sizes.values()) < MAX_TOTAL_BYTES, sizes
