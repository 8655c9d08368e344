"""graphopt.draw / graphopt.diff: node and cluster structure, rendered SVG, marks."""
import functools
import re
import xml.etree.ElementTree as ET

import jax
import jax.numpy as jnp
import pytest

import graphopt
from graphopt import analysis, ir, viz
from graphopt.models import gpt, mlp

needs_dot = pytest.mark.skipif(not viz.dot_available(),
                               reason="graphviz `dot` not installed (make system-deps installs it)")
SVG = "{http://www.w3.org/2000/svg}"


def leaf_eqns(cj) -> int:
    """Equations a full drawing shows: higher-order ones are opened into their bodies."""
    def count(j):
        n = 0
        for e in j.eqns:
            if analysis.is_higher_order(e):
                n += sum(count(ir.as_closed(s).jaxpr) for _, _, s in ir.subjaxpr_params(e))
            else:
                n += 1
        return n
    return count(cj.jaxpr)


def svg_nodes(svg: str):
    """(classes of node <g>s, titles of cluster <g>s) in a rendered SVG (must parse as XML)."""
    root = ET.fromstring(svg)
    nodes, clusters = [], []
    for g in root.iter(f"{SVG}g"):
        cls = g.get("class", "")
        if cls.startswith("node"):
            nodes.append(cls)
        elif cls.startswith("cluster"):
            clusters.append(g.find(f"{SVG}text").text if g.find(f"{SVG}text") is not None else "")
    return nodes, clusters


@pytest.fixture(scope="module")
def seed_mlp():
    k = jax.random.PRNGKey(0)
    params = mlp.init(k)
    return params, mlp.example_batch(k)


@pytest.fixture(scope="module")
def gpt_step():
    k = jax.random.PRNGKey(0)
    sizes = dict(gpt.SIZES, d_model=16, seq_len=8, vocab=32)
    params = gpt.init(k, **sizes)
    return params, gpt.init_opt_state(params), gpt.example_batch(k, **sizes)


def test_seed_mlp_forward_nodes_and_edges(seed_mlp):
    params, (x, _) = seed_mlp
    d = graphopt.draw(mlp.apply, params, x, render=False)
    cj = jax.make_jaxpr(mlp.apply)(params, x)
    # 3 layers: dot_general, broadcast, add each, 2 ReLUs (max inside custom_jvp/jit)
    assert d.counts == {"eqn": leaf_eqns(cj), "input": 7, "output": 1}
    assert d.counts["eqn"] == 11
    assert sum(1 for c in d.clusters if c.endswith("jit: relu")) == 2
    # edges carry shapes and dtypes: the hidden activations 8x4, 8x3 and logits 8x2
    for shape in ("f32[8,4]", "f32[8,3]", "f32[8,2]"):
        assert f'label="{shape}"' in d.source
    assert "max" in d.source and "dot_general" in d.source


@needs_dot
def test_rendered_svg_is_wellformed_with_expected_nodes(seed_mlp):
    params, (x, _) = seed_mlp
    d = graphopt.draw(mlp.apply, params, x)
    nodes, clusters = svg_nodes(d.svg)
    assert sum("eqn" in c for c in nodes) == 11
    assert sum("input" in c for c in nodes) == 7
    assert clusters.count("jit: relu") == 2
    assert d._repr_svg_().lstrip().startswith("<?xml") or "<svg" in d._repr_svg_()
    # one rich representation only: a notebook stores every one a class offers
    assert not hasattr(d, "_repr_html_")
    # slimmed for saved notebooks: no comments, the font named once, coordinates to 0.1
    assert "<!--" not in d.svg and "font-family=" not in d.svg and "text{font-family" in d.svg
    assert not re.search(r'points="[^"]*[.][0-9]{2}', d.svg)


def test_named_scopes_and_subjaxprs_are_clusters():
    @jax.jit
    def inner(x):
        return jnp.tanh(x) * 2.0

    def f(x, p):
        with jax.named_scope("encoder"):
            h = inner(x @ x.T)
        with jax.named_scope("head"):
            return jax.lax.cond(p, lambda h: h.sum(), lambda h: h.max(), h)

    x = jnp.ones((3, 4))
    d = graphopt.draw(f, x, True, render=False)
    assert {"encoder", "encoder/jit: inner", "head", "head/cond branch 0",
            "head/cond branch 1"} <= set(d.clusters)
    assert d.counts["eqn"] == leaf_eqns(jax.make_jaxpr(f)(x, True))
    # depth 0: each top-level cluster is one node; depth 1 opens them, closes their children
    d0 = graphopt.draw(f, x, True, depth=0, render=False)
    assert d0.collapsed == ["encoder", "head"] and d0.counts.get("eqn", 0) == 0
    d1 = graphopt.draw(f, x, True, depth=1, render=False)
    assert d1.collapsed == ["encoder/jit: inner", "head/cond branch 0", "head/cond branch 1"]
    # a collapsed cluster's node says how much it holds
    assert "2 eqns" in d1.source  # tanh, mul inside jit: inner
    dc = graphopt.draw(f, x, True, collapse="head", render=False)
    assert dc.collapsed == ["head"]


def test_training_step_forward_backward_update(gpt_step):
    params, opt_state, batch = gpt_step
    cj = jax.make_jaxpr(gpt.train_step)(params, opt_state, batch)
    full = graphopt.draw(cj, depth=None, render=False)
    assert full.counts["eqn"] == leaf_eqns(cj)
    assert {"forward", "backward", "update", "forward/block0/attention",
            "backward/block1/attention"} <= set(full.clusters)
    # block level: both blocks' forward and backward are one node each
    blocks = graphopt.draw(cj, depth=0, collapse="update", render=False)
    assert {"forward/block0", "forward/block1", "backward/block0", "backward/block1",
            "update"} <= set(blocks.collapsed)
    assert blocks.counts["group"] == len(blocks.collapsed)
    assert blocks.counts["eqn"] < full.counts["eqn"] / 5
    # "auto" opens as much as max_nodes allows
    auto = graphopt.draw(cj, max_nodes=150, render=False)
    assert sum(auto.counts.values()) <= 150
    # the default budget collapses this step; full() is every equation again
    default = graphopt.draw(cj, render=False)
    assert sum(default.counts.values()) <= viz.MAX_NODES < full.counts["eqn"]
    assert default.full(render=False).counts == full.counts
    # phases are tinted clusters
    assert viz.PHASE_COLORS["backward"] in blocks.source


@needs_dot
def test_training_step_svg_clusters(gpt_step):
    params, opt_state, batch = gpt_step
    d = graphopt.draw(gpt.train_step, params, opt_state, batch, depth=0, collapse="update")
    nodes, clusters = svg_nodes(d.svg)
    assert {"forward", "backward"} <= set(clusters)
    assert sum("group" in c for c in nodes) == d.counts["group"]
    assert sum("eqn" in c for c in nodes) == d.counts["eqn"]


def test_missing_dot_gives_clear_error(monkeypatch, seed_mlp):
    params, (x, _) = seed_mlp
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(viz.DotNotFoundError, match="graphviz.*dot.*apt-get install graphviz"):
        graphopt.draw(mlp.apply, params, x)
    d = graphopt.draw(mlp.apply, params, x, render=False)  # DOT text needs no `dot`
    assert d.source.startswith("digraph")
    with pytest.raises(viz.DotNotFoundError, match="graphopt.diff"):
        graphopt.diff(jnp.sin, jnp.cos, x)


def test_bad_arguments():
    with pytest.raises(TypeError, match="graphopt.draw: expected a function"):
        graphopt.draw(42)
    with pytest.raises(ValueError, match="depth"):
        graphopt.draw(jnp.sin, jnp.ones(2), depth=-1, render=False)
    with pytest.raises(TypeError, match="graphopt.diff needs"):
        graphopt.diff(jnp.sin)


def _prunable(x, y):
    a = jnp.sin(x) * 1.0          # simplify drops the mul
    b = jnp.sin(x)                # cse merges with the first sin
    dead = jnp.exp(y) @ y         # dce drops exp and dot
    del dead
    return a + b


def test_diff_of_report_marks_each_pass():
    x = jnp.ones((3, 3))
    opt = graphopt.optimize(_prunable)
    rep = opt.report(x, x)
    d = graphopt.diff(rep, render=False)
    assert d.summary == {"removed": rep.eqns_before - rep.eqns_after} == {"removed": 4}
    assert dict(d.by_pass["dce"]) == {"removed": 2}
    assert dict(d.by_pass["cse"]) == {"removed": 1}
    assert dict(d.by_pass["simplify"]) == {"removed": 1}
    assert d.source.count('class="eqn removed"') == 4
    assert "[dce]" in d.source and '"cluster_before"' in d.source and '"cluster_after"' in d.source
    d2 = graphopt.diff(opt, x, x, render=False)  # an optimized function and its args
    assert d2.summary == d.summary


def test_diff_marks_cast_recompute_and_added():
    x = jnp.ones((4, 4))

    def f(x):
        h = jnp.exp(x)
        return h @ h

    def g(x):  # same value, matmul inputs cast, exp recomputed for its second use
        h1 = jnp.exp(x)
        h2 = jnp.exp(x)
        return (h1.astype(jnp.bfloat16) @ h2.astype(jnp.bfloat16)).astype(jnp.float32) + 0

    d = graphopt.diff(f, g, x, render=False)
    # 3 converts; the second exp copies the first; the f32 matmul became a bf16 one (+ add)
    assert d.summary == {"cast": 3, "recomputed": 1, "added": 2, "removed": 1}
    assert 'label="exp' in d.source


@needs_dot
def test_diff_svg_side_by_side():
    x = jnp.ones((3, 3))
    d = graphopt.diff(graphopt.optimize(_prunable).report(x, x))
    nodes, clusters = svg_nodes(d.svg)
    assert {"before", "after", "marks"} <= set(clusters)
    assert sum("removed" in c for c in nodes) == 4
    assert "<table>" in d._repr_html_() and "<svg" in d._repr_html_()
    assert not hasattr(d, "_repr_svg_")  # the SVG is stored once, inside the HTML


def test_drawing_an_optimized_function_draws_its_optimized_jaxpr():
    x = jnp.ones((3, 3))
    opt = graphopt.optimize(_prunable)
    d = graphopt.draw(opt, x, x, render=False)
    assert d.counts["eqn"] == ir.count_eqns(opt.jaxpr(x, x)) == 2


def test_source_lines_have_no_directories():
    d = graphopt.draw(functools.partial(mlp.apply), mlp.init(jax.random.PRNGKey(1)),
                      jnp.ones((2, 2)), render=False)
    assert "mlp.py:" in d.source and "/mlp.py" not in d.source
