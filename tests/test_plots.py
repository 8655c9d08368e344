"""graphopt.plots (cost per block, report table, loss curves) and graphopt.progress."""
import matplotlib

matplotlib.use("Agg")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402

import graphopt  # noqa: E402
from graphopt import analysis, plots, progress  # noqa: E402
from graphopt.models import mlp  # noqa: E402

DEEP = dict(depth=3, width=8, batch=2, T=4)


@pytest.fixture(scope="module")
def deep():
    k = jax.random.PRNGKey(0)
    return mlp.init_deep(k, **DEEP), mlp.example_batch_deep(k, **DEEP)


def test_cost_per_block_sums_to_program_cost(deep):
    params, batch = deep
    fig = plots.cost_per_block(jax.grad(mlp.loss_deep), params, batch)
    costs = fig.block_costs
    assert {"block0", "block1", "block2"} <= set(costs)
    total = analysis.program_cost(jax.make_jaxpr(jax.grad(mlp.loss_deep))(params, batch))
    assert sum(c.flops for c in costs.values()) == pytest.approx(total.flops)
    # forward + backward of a block: x@w1, relu(.)@w2 and their two transposes each = 6 matmuls
    w = DEEP["width"]
    per_block_mm = 2 * DEEP["batch"] * DEEP["T"] * w * 4 * w
    assert costs["block1"].by_primitive["dot_general"] == 6 * per_block_mm
    assert len(fig.axes) == 2 and len(fig.axes[0].patches) == len(costs)


def test_report_table_has_a_row_per_pass_run():
    def f(x):
        return jnp.sin(x) * 1.0 + jnp.sin(x)
    rep = graphopt.optimize(f).report(jnp.ones(3))
    fig = plots.report_table(rep)
    table = fig.axes[0].tables[0]
    n_rows = max(r for r, _ in table.get_celld()) if table.get_celld() else 0
    assert n_rows == len(rep.rows()) > 0
    texts = {c.get_text().get_text() for c in table.get_celld().values()}
    assert {"simplify", "cse"} <= texts


def test_loss_curves_and_bars():
    fig = plots.loss_curves({"jax.jit": [3.0, 2.0, 1.0], "graphopt": [3.0, 2.0, 1.0]})
    assert len(fig.axes[0].lines) == 2
    fig = plots.compare_bars({"step ms": {"jit": 2.0, "graphopt": 1.5}, "temp MiB": {"jit": 4, "graphopt": 3}})
    assert len(fig.axes) == 2 and len(fig.axes[0].patches) == 2


def test_train_loop_lowers_the_loss():
    k = jax.random.PRNGKey(0)
    params = mlp.init(k)
    opt = mlp.optimizer(1e-2)
    step = jax.jit(mlp.make_train_step(opt))
    batch = mlp.example_batch(k, batch=32)
    params, _, losses = progress.train(step, params, opt.init(params), batch, steps=60)
    assert len(losses) == 60 and all(isinstance(x, float) for x in losses)
    assert losses[-1] < 0.8 * losses[0]
    # a list of batches and an iterator of batches work too
    _, _, l2 = progress.train(step, params, opt.init(params), [batch] * 3)
    _, _, l3 = progress.train(step, params, opt.init(params), iter([batch] * 4), steps=4)
    assert len(l2) == 3 and len(l3) == 4
    with pytest.raises(ValueError, match="steps="):
        progress.train(step, params, opt.init(params), lambda i: batch)


def test_timing_and_switch(monkeypatch):
    r = progress.time_fn(jax.jit(jnp.sin), jnp.ones(8), n=5, warmup=1)
    assert r["n"] == 5 and 0 < r["min_s"] <= r["median_s"]
    t = progress.compare_times({"a": jax.jit(jnp.sin), "b": jax.jit(jnp.cos)}, jnp.ones(8), n=3, rounds=1)
    assert set(t) == {"a", "b"} and all(v > 0 for v in t.values())
    monkeypatch.setenv("GRAPHOPT_PROGRESS", "0")
    assert not progress.enabled() and progress.bar(3).disable
    monkeypatch.setenv("GRAPHOPT_PROGRESS", "1")
    assert progress.enabled() and list(progress.track([1, 2])) == [1, 2]
