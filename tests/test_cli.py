"""The command line: `python -m graphopt demo` and `report FILE.py:FACTORY`, and the README example."""
import os
import re
import subprocess
import sys

import jax
import pytest

import graphopt
from graphopt import __main__ as cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # over 25 s on 2 cores: leg 1 only (.ci/run)
def test_demo_one_model_writes_table_and_html(tmp_path, capsys):
    rows = cli.demo(str(tmp_path), models=["mlp"])
    out = capsys.readouterr().out
    assert "mlp" in out and "step time" in out
    (row,) = rows
    assert row["eqns"][1] < row["eqns"][0]          # the default pipeline removed equations
    assert row["out_err"] <= 1e-6 and row["grad_err"] <= 1e-5
    assert row["temp"][0] is not None and row["temp"][0] > 0
    assert (tmp_path / "index.html").exists() and (tmp_path / "mlp.html").exists()
    assert "<table>" in (tmp_path / "mlp.html").read_text()
    # the budget column really remats, and every variant is said in words
    b = row["budget"]
    assert b["temp"] <= cli.BUDGET * row["temp"][0] * 1.05 and b["err"] <= 1e-4
    assert f"mlp: graphopt.optimize(step, memory_budget={cli.BUDGET}): temp" in out
    assert "mlp: graphopt.optimize(step): same temp memory" in out


def test_demo_says_noise_in_words():
    # ratios whose middle half straddles 1 are no change; a clear shift is named
    assert "within noise" in cli.verdict(100, 100, (1.02, 0.97, 1.08))
    assert cli.verdict(100, 50, (2.0, 1.8, 2.2)) == "temp 100 B -> 50 B (0.50x), 2.00x faster"
    assert "2.00x slower" in cli.verdict(None, None, (0.5, 0.45, 0.55))


FACTORY = '''
import jax.numpy as jnp
def f(x, w):
    return jnp.sin(x @ w) * 1.0 + jnp.sin(x @ w)
def factory():
    return f, (jnp.ones((4, 8)), jnp.ones((8, 3)))
def bad():
    return 3
'''


def test_report_command_on_user_factory(tmp_path):
    src = tmp_path / "user_model.py"
    src.write_text(FACTORY)
    out = subprocess.run([sys.executable, "-m", "graphopt", "report", f"{src}:factory",
                          "--out", str(tmp_path / "rep")], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "cse.dot_general" in out.stdout and "simplify.mul_one" in out.stdout
    assert (tmp_path / "rep" / "f.html").exists()


@pytest.mark.parametrize("spec,msg", [("nofile.py:factory", "no such file"),
                                      ("{src}:missing", "has no function 'missing'"),
                                      ("{src}:bad", "must return (fn, args)"),
                                      ("{src}", "expected FILE.py:FACTORY")])
def test_report_command_bad_input_says_why(tmp_path, spec, msg):
    src = tmp_path / "user_model.py"
    src.write_text(FACTORY)
    out = subprocess.run([sys.executable, "-m", "graphopt", "report", spec.format(src=src)],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode != 0
    assert msg in out.stderr and "Traceback" not in out.stderr


def test_readme_example_runs():
    text = open(os.path.join(ROOT, "README.md")).read()
    code = re.search(r"## Ten lines\n\n```python\n(.*?)```", text, re.S).group(1)
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    env = {"params": {"w1": jax.random.normal(k[0], (8, 16)), "w2": jax.random.normal(k[1], (16, 2))},
           "batch": (jax.random.normal(k[2], (4, 8)), jax.random.normal(k[3], (4, 2)))}
    exec(compile(code, "README.md", "exec"), env)
    loss = env["loss"]
    assert isinstance(loss, graphopt.Optimized)
    rep = loss.report(env["params"], env["batch"])
    assert rep.hits()["simplify.mul_one"] == 1
    plain = jax.grad(loss.__wrapped__)(env["params"], env["batch"])
    for a, b in zip(jax.tree.leaves(env["grads"]), jax.tree.leaves(plain)):
        assert graphopt.testing.max_rel_error(a, b) < 1e-6
