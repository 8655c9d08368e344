"""docs/coverage.md: every JAX primitive has a decision per pass family, read from the
families' rule tables, and the document matches what the tables say today."""
import json
import subprocess
import sys
from pathlib import Path

import jax
import pytest

import graphopt  # noqa: F401  (registers the pass families)
from graphopt import coverage, ir
from graphopt.coverage import DECISIONS, FAMILIES, PASS, REFUSE, REWRITE
from graphopt.transforms import prune
from graphopt.transforms.remat import batch as remat_batch, plan as remat_plan

DOC = Path(__file__).resolve().parents[1] / "docs" / "coverage.md"


def test_every_jax_primitive_has_a_decision_for_every_family():
    table = coverage.coverage_table()
    assert set(table) == set(ir.known_primitives())
    assert coverage.undecided() == []
    for p, row in table.items():
        assert tuple(row) == FAMILIES, p
        assert set(row.values()) <= set(DECISIONS), (p, row)


def test_decisions_come_from_the_rule_tables():
    table = coverage.coverage_table()
    for p in set(prune.SIMPLIFY.rules) & set(table):
        assert table[p]["simplify"] == REWRITE, p
    for p in set(remat_batch.RULES) & set(table):
        assert table[p]["remat micro-batches"] == REWRITE, p
    for p in ir.RANDOM_PRIMITIVES & set(table):
        assert table[p]["dce"] == table[p]["cse"] == table[p]["remat keep"] == PASS, p
        assert table[p]["remat micro-batches"] == REFUSE, p
    for p in remat_plan.NO_RECOMPUTE & set(table):
        assert table[p]["remat keep"] == PASS, p
    assert table["dot_general"]["fuse"] == REWRITE  # a fusion root
    assert table["sin"]["simplify"] == PASS and table["sin"]["fold"] == REWRITE
    # traits that belong to equations, read from probe programs' equations
    for p in ("debug_callback", "io_callback"):
        assert set(table[p].values()) - {PASS} == {REFUSE}, (p, table[p])
    assert table["cond"]["fold"] == PASS and table["cond"]["dce"] == REWRITE
    assert table["jit"]["remat micro-batches"] == REWRITE  # inlined, then split
    assert table["cholesky"]["remat micro-batches"] == REFUSE  # no batch rule


def test_a_new_rule_shows_up_in_the_table(monkeypatch):
    monkeypatch.setitem(prune.SIMPLIFY.rules, "sin", lambda rw, eqn: None)
    monkeypatch.setitem(remat_batch.RULES, "cholesky", remat_batch.RULES["sin"])
    table = coverage.coverage_table()
    assert table["sin"]["simplify"] == REWRITE
    assert table["cholesky"]["remat micro-batches"] == REWRITE


def test_a_default_coverage_does_not_know_leaves_primitives_undecided(monkeypatch):
    monkeypatch.setattr(prune.SIMPLIFY, "default", lambda rw, eqn: None)
    gaps = coverage.undecided()
    assert ("sin", "simplify") in gaps and ("mul", "simplify") not in gaps  # mul has a rule
    with pytest.raises(coverage.CoverageError, match="no decision"):
        coverage.coverage_table()


def test_a_primitive_new_to_jax_lands_in_explicit_defaults(monkeypatch):
    monkeypatch.setattr(ir, "_KNOWN_PRIMITIVES", ir.known_primitives() | {"brand_new_op"})
    row = coverage.coverage_table()["brand_new_op"]
    assert row == {"dce": REWRITE, "fold": REWRITE, "cse": REWRITE, "simplify": PASS,
                   "fuse": PASS, "remat keep": REWRITE, "remat micro-batches": REFUSE}


def test_docs_are_current_for_this_jax():
    # a fresh process: other tests register primitives of their own in this one
    code = ("import json, sys, graphopt.coverage as c\n"
            "text = open(sys.argv[1]).read()\n"
            "try:\n    print(json.dumps({'stale': c.stale(text)}))\n"
            "except LookupError as e:\n    print(json.dumps({'missing': str(e)}))\n")
    out = subprocess.run([sys.executable, "-c", code, str(DOC)], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    if "missing" in got:  # a JAX the document was never generated with: nothing to compare
        pytest.skip(f"docs/coverage.md: {got['missing']}; regenerate it under this JAX")
    assert got["stale"] is None, (
        f"docs/coverage.md is stale: {got['stale']}; regenerate it: python -c \"import "
        "graphopt.coverage as c; c.write_docs('docs/coverage.md')\"")


def test_write_docs_replaces_only_this_versions_section(tmp_path):
    old = "## JAX 0.0.1\n\nkept as it was\n"
    path = tmp_path / "coverage.md"
    path.write_text("old preface\n\n" + old + f"## JAX {jax.__version__}\n\nstale\n")
    coverage.write_docs(path)
    preface, sections = coverage.read_sections(path.read_text())
    assert preface == coverage.render_preface() + "\n"
    assert sections["0.0.1"] == old
    assert sections[jax.__version__] == coverage.render_section()
    assert list(sections) == ["0.0.1", jax.__version__]
    assert coverage.stale(path.read_text()) is None
    with pytest.raises(LookupError, match="no section for JAX"):
        coverage.stale(coverage.render_preface() + "\n" + old)
