"""graphopt.draw(..., highlight=...): branches and critical path coloured on the drawing,
collapsed clusters, bad keys; and the parallelism line of a Report."""
import collections
import re
import xml.etree.ElementTree as ET

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import graphopt
from graphopt import parallelism, viz
from graphopt.viz_highlight import CRITICAL_FILL, colors

RNG = np.random.default_rng(0)
NODE = re.compile(r'^\s*"([a-z]+\d+)" \[label="([^"]*)" class="([^"]*)".*?fillcolor="([^"]*)"(.*)\]$')


def arr(*shape):
    return jnp.asarray(RNG.standard_normal(shape), jnp.float32)


def ensemble(ws, x):
    return jnp.mean(jnp.stack([jax.nn.relu(x @ w1) @ w2 for w1, w2 in ws]), 0)


WS = [(arr(8, 16), arr(16, 4)) for _ in range(4)]
X = arr(5, 8)
DEFAULT_FILLS = {"#ffffff", "#e5e7eb", "#f3f4f6", "#d1d5db", "#f9fafb"}


def fills(source: str) -> dict:
    """{node id: (fill, outlined)} of the drawn (non-legend) nodes of a DOT text."""
    out = {}
    for line in source.splitlines():
        m = NODE.match(line)
        if m and m[3] != "legend":
            out[m[1]] = (m[4], "penwidth=2.5" in m[5])
    return out


def test_report_highlight_colours_exactly_branches_and_critical_path():
    rep = parallelism.analyze(ensemble, WS, X)
    d = graphopt.draw(ensemble, WS, X, highlight=rep, render=False)
    got = fills(d.source)
    coloured = {n for n, (f, _) in got.items() if f not in DEFAULT_FILLS}
    assert coloured == set(d.highlight.labels)
    by_lane = {}
    for n, lab in d.highlight.labels.items():
        by_lane.setdefault(lab, set()).add(got[n][0])
    assert all(len(c) == 1 for c in by_lane.values())  # one colour per label
    lanes = [by_lane[f"group 0, branch {i}"].pop() for i in range(4)]
    assert len(set(lanes)) == 4 and CRITICAL_FILL not in lanes
    # every lane holds 2 dots and relu's body (opened from custom_jvp / jit), equally
    per_lane = collections.Counter(d.highlight.labels.values())
    assert len({per_lane[f"group 0, branch {i}"] for i in range(4)}) == 1 and per_lane["group 0, branch 0"] >= 3
    outlined = {n for n, (_, o) in got.items() if o}
    assert outlined == d.highlight.critical and len(outlined) >= len(rep.critical_path)
    assert outlined & {n for n, lab in d.highlight.labels.items() if lab == "group 0, branch 0"}
    # the join (stack, mean) is on the path and in no branch: light red, and outlined
    join = {n for n, lab in d.highlight.labels.items() if lab == "critical path"}
    assert join and join <= outlined and {n for n, (f, _) in got.items() if f == CRITICAL_FILL} == join
    legend = [ln for ln in d.source.splitlines() if 'class="legend"' in ln]
    assert len(legend) == 5 and any('"critical path"' in ln for ln in legend)


def test_dict_of_indices_and_equations_and_bad_keys():
    cj = jax.make_jaxpr(ensemble)(WS, X)
    eqns = cj.jaxpr.eqns
    d = graphopt.draw(cj, highlight={0: "first dot", eqns[-1]: "result", eqns[-2]: "result"},
                      render=False)
    got = fills(d.source)
    coloured = {n: f for n, (f, _) in got.items() if f not in DEFAULT_FILLS}
    assert len(coloured) == 3 and len(set(coloured.values())) == 2
    assert not any(o for _, o in got.values())  # a plain dict has no critical path
    with pytest.raises(TypeError, match="highlight keys must be equations"):
        graphopt.draw(cj, highlight={"dot": "x"}, render=False)
    with pytest.raises(IndexError, match="highlight index 99"):
        graphopt.draw(cj, highlight={99: "x"}, render=False)
    with pytest.raises(TypeError, match="highlight must be a dict"):
        graphopt.draw(cj, highlight=[0], render=False)
    other = jax.make_jaxpr(jnp.sin)(X).jaxpr.eqns[0]  # another program's equation
    with pytest.raises(ValueError, match="not in the drawn program"):
        graphopt.draw(cj, highlight={other: "x"}, render=False)


def test_report_of_another_trace_matches_by_position():
    rep = parallelism.analyze(ensemble, WS, X)
    again = jax.make_jaxpr(lambda ws, x: ensemble(ws, x))(WS, X)  # a fresh trace, same program
    assert not set(map(id, again.jaxpr.eqns)) & set(map(id, rep.jaxpr.eqns))
    d = graphopt.draw(again, highlight=rep, render=False)
    direct = graphopt.draw(rep.jaxpr, highlight=rep, render=False)
    assert sorted(d.highlight.labels.values()) == sorted(direct.highlight.labels.values())
    assert len(d.highlight.critical) == len(direct.highlight.critical) >= len(rep.critical_path)
    with pytest.raises(ValueError, match="pass the ParallelismReport"):  # its dict cannot be matched
        graphopt.draw(again, highlight=rep.highlight(), render=False)


def test_collapsed_clusters_coloured_only_when_one_label():
    def f(x, w):
        with jax.named_scope("one"):
            a = jnp.tanh(x @ w)
        with jax.named_scope("two"):
            b = jnp.sin(a) + jnp.cos(a)
        return b
    cj = jax.make_jaxpr(f)(X, arr(8, 8))
    eqns = cj.jaxpr.eqns
    names = [e.primitive.name for e in eqns]
    spec = {eqns[0]: "A", eqns[1]: "A", eqns[names.index("sin")]: "B", eqns[names.index("cos")]: "C"}
    d = graphopt.draw(cj, highlight=spec, depth=0, render=False)
    groups = {ln.split('"')[1]: ln for ln in d.source.splitlines() if 'class="group"' in ln}
    one = next(ln for ln in groups.values() if 'label="one' in ln)
    two = next(ln for ln in groups.values() if 'label="two' in ln)
    assert d.highlight.colors["A"] in one
    assert not any(d.highlight.colors[k] in two for k in "BC")
    assert d.highlight.mixed == ["two"] and "1 collapsed clusters hold several" in d.note
    full = d.full(render=False)  # opened: each equation its own colour again
    assert full.highlight is d.highlight and full.note == ""
    assert sum(f not in DEFAULT_FILLS for f, _ in fills(full.source).values()) == 4


@pytest.mark.skipif(not viz.dot_available(), reason="graphviz `dot` not installed")
def test_parallelism_draw_renders_colours_and_legend():
    d = parallelism.draw(ensemble, WS, X)
    root = ET.fromstring(d.svg)
    svg_fills = {p.get("fill") for p in root.iter() if p.get("fill")}
    assert set(d.highlight.colors.values()) <= svg_fills
    assert "legend" in d.svg and d.title == "ensemble"


def test_report_parallelism_line():
    forced = graphopt.optimize(ensemble, batch_parallel="force").report(WS, X)
    text = str(forced)
    assert forced.parallelism is forced.parallelism  # computed once
    assert forced.parallelism.repeated[0].n_branches == 4
    line = next(ln for ln in text.splitlines() if "parallelism:" in ln)
    assert "available parallelism 3." in line and "1 repeated-branch groups" in line
    assert "batch_parallel batched 3 packs" in line
    assert "available parallelism" in forced._repr_html_()
    off = graphopt.optimize(ensemble, batch_parallel=False).report(WS, X)
    assert "batch_parallel" not in off.parallelism_line()


def test_report_parallelism_line_skipped_on_big_programs(monkeypatch):
    from graphopt import report as report_mod
    rep = graphopt.optimize(ensemble).report(WS, X)
    monkeypatch.setattr(report_mod, "PARALLELISM_MAX_EQNS", 3)
    assert "not analysed for" in str(rep) and "parallelism" not in rep.__dict__
    assert rep.parallelism.n_eqns > 3  # on demand still analyses
    assert "available parallelism" in str(rep)


def test_report_prints_when_the_analysis_fails(monkeypatch):
    rep = graphopt.optimize(ensemble).report(WS, X)

    def broken(*a):
        raise ValueError("no cost rule for my_prim")
    monkeypatch.setattr(parallelism, "analyze", broken)
    assert "parallelism: not analysed (ValueError: no cost rule for my_prim)" in str(rep)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 16), min_size=0, max_size=6),
       st.sets(st.text("abcxyz ", min_size=1, max_size=6), max_size=12))
def test_colors_one_distinct_fill_per_label(lanes_per_group, others):
    labels = [f"group {g}, branch {b}" for g, n in enumerate(lanes_per_group) for b in range(n)]
    labels += sorted(others)
    got = colors(labels + labels[:3])  # repeats change nothing
    assert set(got) == set(labels)
    assert len(set(got.values())) == len(labels)  # no two labels share a fill
    assert all(re.fullmatch(r"#[0-9a-f]{6}", c) for c in got.values())
