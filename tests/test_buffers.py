"""graphopt.memory_report: XLA's buffer assignment and live ranges beside graphopt's liveness."""
import matplotlib
matplotlib.use("Agg")

import jax
import jax.numpy as jnp

import graphopt
from graphopt import buffers
from graphopt.models import gpt

K = jax.random.PRNGKey(0)
GPT = dict(n_layers=1, d_model=16, n_heads=2, seq_len=8, vocab=32, batch=2)
FAST = {"xla_backend_optimization_level": 0}  # same buffer assignment, quicker codegen


def test_gpt_step_totals_match_xla_and_donation_shows_as_aliased():
    p = gpt.init(K, **GPT)
    o = gpt.init_opt_state(p)
    b = gpt.example_batch(K, **GPT)
    f = graphopt.optimize(gpt.train_step, passes=["prune"], donate="auto")
    r = graphopt.memory_report(f, p, o, b, compiler_options=FAST)
    state = sum(x.nbytes for x in jax.tree_util.tree_leaves((p, o)))
    assert r.matches_xla(), (r.totals, r.xla)
    assert r.totals["alias_bytes"] == state and r.xla["alias_bytes"] == state
    assert r.totals["argument_bytes"] == state + sum(x.nbytes for x in b)
    assert r.peak_bytes == (r.xla["argument_bytes"] + r.xla["output_bytes"]
                            - r.xla["alias_bytes"] + r.xla["temp_bytes"])
    # temporaries share the temp block: more logical bytes than storage
    assert r.temp_logical_bytes > r.totals["temp_bytes"] > 0 and r.reused_bytes > 0
    assert r.xla_timeline.max() == sum(x.nbytes for x in r.xla_peak)
    assert {x.why for x in r.xla_peak} <= {buffers.ARGUMENT, buffers.OUTPUT, buffers.RESIDUAL,
                                           buffers.TEMPORARY}
    assert buffers.ARGUMENT in {x.why for x in r.xla_peak}
    text = str(r)
    assert "storage reuse" in text and "aliased (donated)" in text
    assert r.plot().get_xlabel() == "program progress"


def test_residuals_for_the_backward_are_named_at_the_estimated_peak():
    def step(w, x):
        def loss(w):
            h = jnp.tanh(x @ w)
            return jnp.sum(jnp.tanh(h @ w) ** 2)
        return jax.grad(loss)(w)
    w, x = jnp.ones((16, 16)) * 0.1, jnp.ones((64, 16))
    r = buffers.memory_report(step, w, x)
    assert r.matches_xla()
    whys = {x.why for x in r.estimate_peak}
    assert buffers.RESIDUAL in whys and buffers.ARGUMENT in whys, r
    assert r.estimate.max() == sum(x.nbytes for x in r.estimate_peak)


def test_parse_buffer_assignment_text():
    text = """BufferAssignment:
allocation 0: size 64, parameter 0, shape |f32[16]| at ShapeIndex {}, maybe-live-out:
 value: <1 p.1 @0> (size=64,offset=0): f32[16]{0}
 value: <3 add.2 @0> (size=64,offset=0): f32[16]{0}
allocation 1: size 16, output shape is |(f32[16])|, maybe-live-out:
 value: <4 tuple.1{} @0> (size=16,offset=0): (f32[16]{0})
allocation 2: size 64, preallocated-temp:
 value: <5 a @0> (size=64,offset=0): f32[16]{0}
 value: <6 b @0> (size=64,offset=0): f32[16]{0}
"""
    allocs, _ = buffers.parse_buffer_assignment(text)
    assert [a.kind for a in allocs] == ["argument", "output", "temp"]
    assert allocs[0].aliased and allocs[2].values == [("a", 64, 0), ("b", 64, 0)]
    assert buffers.totals(allocs) == {"argument_bytes": 64, "output_bytes": 80,
                                      "alias_bytes": 64, "temp_bytes": 64}
