"""graphopt.bisect names the pass that changed a program's results and the equation
where the rewritten program first departs from the original, with its source line."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import graphopt
from graphopt import passes as passes_mod
from graphopt.bisect import BisectResult, bisect, first_differing_pass, locate
from graphopt.errors import EquivalenceError
from graphopt.interpreter import RuleTable, Stats, keep, rewrite
from graphopt.passes import Pass, PassResult, Pipeline

# ------------------------------------------------------------ deliberately wrong passes

SIN_TO_COS = RuleTable("sin_to_cos", default=keep)


@SIN_TO_COS.register("sin")
def _sin_to_cos(rw, eqn):
    rw.hit("wrong.sin_to_cos")
    return rw.bind(jnp.cos, eqn.invars[0])


TWO_TO_THREE = RuleTable("two_to_three", default=keep)


@TWO_TO_THREE.register("mul")
def _two_to_three(rw, eqn):
    x, y = eqn.invars
    if graphopt.ir.is_literal(y) and float(graphopt.ir.literal_value(y)) == 2.0:
        rw.hit("wrong.two_to_three")
        return rw.bind(lambda a: a * 3.0, x)
    return None


DROP_STOP_GRADIENT = RuleTable("drop_stop_gradient", default=keep)


@DROP_STOP_GRADIENT.register("stop_gradient")
def _drop_stop_gradient(rw, eqn):
    rw.hit("wrong.drop_stop_gradient")
    return [eqn.invars[0]]  # same forward value, different gradient


def table_pass(name, table):
    def run(cj, ctx=None):
        stats = Stats()
        out = rewrite(cj, table, stats)
        return PassResult(out, out is not cj, stats)
    return Pass(name, run, f"deliberately wrong: {name}", "test")


WRONG_SIN = table_pass("wrong_sin", SIN_TO_COS)
WRONG_MUL = table_pass("wrong_mul", TWO_TO_THREE)
WRONG_SG = table_pass("wrong_stop_gradient", DROP_STOP_GRADIENT)


@pytest.fixture
def registered_wrong_mul():
    # registered by name like any pass; removed after so other tests never see it
    graphopt.register_pass(WRONG_MUL)
    yield "wrong_mul"
    passes_mod._REGISTRY.pop("wrong_mul", None)


# ------------------------------------------------------------ programs

def _line(marker: str) -> int:
    with open(__file__) as fh:
        return next(i for i, l in enumerate(fh, 1) if l.rstrip().endswith(marker))


def model(x, w):
    h = jnp.tanh(x @ w) * 1.0
    s = jnp.sin(h)  # <SIN>
    return jnp.sum(s * s + h * 2.0)  # <MUL2>


def scanned(xs, w):
    def body(c, x):
        y = jnp.sin(x @ w) + c  # <SCAN-SIN>
        return y, y * 1.0
    c, ys = lax.scan(body, jnp.zeros(w.shape[1]), xs)
    return jnp.sum(c) + jnp.sum(ys)


X = jnp.asarray(np.random.default_rng(0).standard_normal((4, 3)), jnp.float32)
W = jnp.asarray(np.random.default_rng(1).standard_normal((3, 5)), jnp.float32)


# ------------------------------------------------------------ tests

def test_names_the_wrong_pass_and_the_equation_with_its_line():
    res = bisect(model, X, W, passes=["simplify", WRONG_SIN, "cse", "dce"])
    assert res.found and res.pass_name == "wrong_sin" and res.round == 0
    assert res.passes[:4] == ["simplify", "wrong_sin", "cse", "dce"]
    assert res.how == "value" and "cos" in res.equation
    assert f"test_bisect.py:{_line('# <SIN>')}" in res.source_line
    assert res.max_rel_err > 1e-2  # cos vs sin of O(1) values
    text = str(res)
    assert "wrong_sin" in text and "cos" in text and res.source_line in text


def test_wrong_constant_is_located_at_its_multiplication():
    res = bisect(model, X, W, passes=["prune", WRONG_MUL, "prune"])
    assert res.pass_name == "wrong_mul"
    assert "mul" in res.equation and "3.0" in res.equation
    assert f"test_bisect.py:{_line('# <MUL2>')}" in res.source_line
    # h*3 against h*2: relative error 1/3 of the larger value, at most
    assert res.max_rel_err == pytest.approx(1 / 3, rel=1e-3)


def test_search_goes_inside_a_scan_body_to_the_iteration():
    res = bisect(scanned, X, W, passes=["prune", WRONG_SIN])
    assert res.pass_name == "wrong_sin" and "cos" in res.equation
    assert f"test_bisect.py:{_line('# <SCAN-SIN>')}" in res.source_line
    assert any(w.startswith("scan") and w.endswith("iteration 0") for w in res.where)


def test_inside_a_jit_and_a_cond():
    def f(x, w):
        g = jax.jit(lambda a: jnp.sin(a @ w))
        return lax.cond(x.sum() > -1e9, g, lambda a: a @ w, x).sum()
    res = bisect(f, X, W, passes=[WRONG_SIN, "dce"])
    assert res.pass_name == "wrong_sin" and "cos" in res.equation
    assert [w.split(" ")[0] for w in res.where] == ["cond", "jit"]
    assert res.where[0].endswith("branch 1")


def test_gradient_only_difference_reports_the_earliest_change():
    def f(x, w):
        return jnp.sum(jnp.sin(lax.stop_gradient(x @ w)) * w.sum())
    res = bisect(f, X, W, passes=["simplify", WRONG_SG])
    assert res.pass_name == "wrong_stop_gradient"
    assert not res.errors["outputs"]["max_rel_err"] and not res.errors["gradients"]["ok"]
    assert res.how == "changed" and "sin" in res.equation  # its operand was rewired
    assert "earliest changed equation" in str(res)


def test_correct_pipeline_gives_no_difference():
    res = bisect(model, X, W)
    assert not res.found and res.pass_name is None
    assert str(res).startswith("no difference")
    assert "fold" in res.passes and "dce" in res.passes
    res = bisect(scanned, X, W, passes=["prune"])
    assert not res.found


def test_bisect_runs_the_pipeline_optimize_would():
    # a memory budget adds remat after the other passes, as in graphopt.optimize
    res = bisect(model, X, W, passes=["prune"], memory_budget="1GiB")
    assert not res.found and res.passes[:5] == ["fold", "simplify", "cse", "dce", "remat"]


def test_first_differing_pass_from_optimize_records(registered_wrong_mul):
    opt = graphopt.optimize(model, passes=["prune", registered_wrong_mul], check=True)
    with pytest.raises(EquivalenceError):
        opt(X, W)
    rep = opt.report(X, W)
    flat = jax.tree_util.tree_leaves({"x": X, "w": W})  # optimize flattens arguments by name
    res = first_differing_pass(opt.original_jaxpr(X, W), rep.records, flat)
    assert isinstance(res, BisectResult) and res.pass_name == "wrong_mul"
    assert res.index == [r.name for r in rep.records].index("wrong_mul")
    # a pipeline object is run on the original first
    res2 = first_differing_pass(opt.original_jaxpr(X, W), Pipeline(["dce", WRONG_SIN]), flat)
    assert res2.pass_name == "wrong_sin"
    good = graphopt.optimize(model, passes=["prune"])
    assert first_differing_pass(good.original_jaxpr(X, W), good.report(X, W).records,
                                flat) is None


def test_locate_compares_kept_variables_and_rewired_operands():
    cj = jax.make_jaxpr(model)(X, W)
    out = WRONG_SIN(cj).jaxpr
    spot = locate(cj, out, [X, W])
    assert spot.how == "value" and spot.eqn.primitive.name == "cos"
    assert locate(cj, cj, [X, W]) is None  # the same program: nothing to report


def test_check_true_names_the_first_differing_pass(registered_wrong_mul):
    # api.Optimized._check calls first_differing_pass when the check fails
    opt = graphopt.optimize(model, passes=["prune", registered_wrong_mul, "dce"], check=True)
    with pytest.raises(EquivalenceError, match=r"(?s)differs from the original.*"
                       r"pass 'wrong_mul' \(round 0.*mul .*3\.0.*test_bisect\.py:\d+"):
        opt(X, W)
