"""What a plain `pip install graphopt` (no extras) gives: the core imports and runs, and
the drawing/plotting functions name the extra to install instead of a bare ImportError."""
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import jax
import jax.numpy as jnp

import graphopt
from graphopt import progress
from graphopt.errors import GraphoptError, MissingExtraError, require

ROOT = Path(__file__).resolve().parents[1]


def _readme_example() -> str:
    """The README's ten-line example with made-up params and batch in front of it."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Ten lines\s+```python\n(.*?)```", text, re.S).group(1)
    setup = textwrap.dedent("""\
        import jax, jax.numpy as jnp
        k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
        params = {"w1": jax.random.normal(k1, (8, 16)), "w2": jax.random.normal(k2, (16, 2))}
        batch = (jax.random.normal(k3, (4, 8)), jnp.zeros((4, 2)))
        """)
    return setup + block


def test_require_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "graphviz", None)  # import graphviz -> ImportError
    with pytest.raises(MissingExtraError, match=r'pip install "graphopt\[viz\]"') as e:
        require("graphviz", "viz", "graphopt.draw")
    assert isinstance(e.value, GraphoptError) and isinstance(e.value, ImportError)
    assert "graphopt.draw" in str(e.value) and "'graphviz'" in str(e.value)


def test_draw_and_plots_without_their_extra_name_it(monkeypatch):
    f = lambda x: jnp.sin(x) * 2.0  # noqa: E731
    x = jnp.ones(3)
    monkeypatch.setitem(sys.modules, "graphviz", None)
    with pytest.raises(MissingExtraError, match=r"graphopt\.draw.*graphopt\[viz\]"):
        graphopt.draw(f, x)
    assert "digraph" in graphopt.draw(f, x, render=False).source  # DOT text needs nothing
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(MissingExtraError, match=r"memory_timeline.*graphopt\[viz\]"):
        graphopt.memory_timeline(f, x)


def test_progress_without_tqdm_is_silent_and_still_trains(monkeypatch):
    monkeypatch.setattr(progress, "tqdm", None)
    monkeypatch.setenv("GRAPHOPT_PROGRESS", "1")
    assert not progress.enabled()
    step = lambda p, s, b: (p - 0.5 * b, s, jnp.sum(p))  # noqa: E731
    p, s, losses = progress.train(step, jnp.ones(2), None, jnp.ones(2), steps=3)
    assert losses == [2.0, 1.0, 0.0] and float(p[0]) == -0.5
    assert list(progress.track(range(3))) == [0, 1, 2]


def test_readme_example_runs_here():
    ns: dict = {}
    exec(compile(_readme_example(), "README.md", "exec"), ns)
    assert set(ns["grads"]) == {"w1", "w2"}
    assert "placement" in str(ns["loss"].report(ns["params"], ns["batch"]))


@pytest.mark.slow
def test_wheel_without_extras_in_a_fresh_venv(tmp_path):
    """Build the wheel, install it without extras into a new venv (its dependencies from
    the package index, pip's cache makes that quick), run the README example there."""
    dist, venv = tmp_path / "dist", tmp_path / "venv"
    run = lambda *cmd, **kw: subprocess.run(cmd, check=True, capture_output=True, text=True,  # noqa: E731
                                            timeout=900, **kw)
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-w",
        str(dist), str(ROOT))
    (wheel,) = dist.glob("graphopt-*.whl")
    run(sys.executable, "-m", "venv", str(venv))
    py = str(venv / "bin" / "python")
    # the same JAX as this environment: the test is about graphopt's own imports
    pins = [f"jax=={jax.__version__}", f"jaxlib=={jax.__version__}"]
    run(py, "-m", "pip", "install", "-q", str(wheel), *pins)
    script = _readme_example() + textwrap.dedent("""
        import importlib.util, graphopt
        assert importlib.util.find_spec("tqdm") is None, "tqdm came without an extra"
        assert set(grads) == {"w1", "w2"}
        try:
            graphopt.draw(loss, params, batch)
        except graphopt.MissingExtraError as e:
            print("draw:", e)
        """)
    env = {**os.environ, "GRAPHOPT_PROGRESS": "1"}
    out = run(py, "-c", script, cwd=str(tmp_path), env=env).stdout
    assert 'draw: graphopt.draw needs the Python package \'graphviz\'' in out
    assert 'pip install "graphopt[viz]"' in out
