"""graphopt.memory: timelines (recomputations marked) and the Pareto helper."""
import matplotlib
matplotlib.use("Agg")

import jax
import pytest

import graphopt
from graphopt import memory
from graphopt.models import mlp

SIZES = dict(depth=3, width=16, batch=4, T=64)


@pytest.fixture(scope="module")
def args():
    k = jax.random.PRNGKey(0)
    p = mlp.init_deep(k, **SIZES)
    return p, mlp.init_opt_state(p), mlp.example_batch_deep(k, **SIZES)


def test_timeline_before_after_marks_recomputation(args):
    f = graphopt.optimize(mlp.train_step_deep, passes=["remat"], memory_budget=0.85,
                          remat_measure="estimate", remat_micro_batches=False)
    lines = memory.memory_timeline(f, *args, plot=True, xla=False)
    assert [t.label for t in lines] == ["original", "optimized"]
    assert not lines[0].recomputed and lines[1].recomputed
    assert lines[1].live_bytes.max() < lines[0].live_bytes.max()
    assert graphopt.memory_timeline is memory.memory_timeline


@pytest.mark.slow  # over 25 s on 2 cores: leg 1 only (.ci/run)
def test_pareto_rows_monotone(args):
    rows = memory.pareto(mlp.train_step_deep, *args, budgets=(1.0, 0.8, 1))
    assert rows[0]["flops_recomputed"] == 0 and rows[0]["error"] is None
    assert rows[2]["error"] and "smallest feasible budget" in rows[2]["error"]
    ax = memory.plot_pareto(rows)
    assert ax.get_xlabel() == "recomputed GFLOP"


def test_pareto_passes_remat_options(args):
    # the default tries micro-batches first (nothing recomputed in this MLP); the option
    # gives the curve of choosing what to keep alone
    auto, keep = (memory.pareto(mlp.train_step_deep, *args, budgets=(0.6,), options=o)[0]
                  for o in (None, {"remat_micro_batches": False}))
    assert auto["solver"].startswith("micro-batches") and auto["flops_recomputed"] == 0
    assert not keep["solver"].startswith("micro-batches") and keep["flops_recomputed"] > 0
