"""The differential fuzzer (graphopt.fuzz): 1000 seeded programs through graphopt.optimize
against the originals, in chunks pytest-xdist can spread; and the fuzzer's own behaviour
(it catches a deliberately wrong pass, shrinks what fails, and its command line)."""
import os
import re
import subprocess
import sys

import pytest

import jax
from jax import lax

from graphopt import fuzz, ir
from graphopt.passes import Pass, PassResult

SEED, PROGRAMS, CHUNKS = 7, 1000, 10


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("GRAPHOPT_FUZZ"), reason=(
    "1,000 fuzzed programs take minutes: GRAPHOPT_FUZZ=1 runs them "
    "(or python -m graphopt fuzz --n 1000 --seed 7)"))
@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_fuzz_programs(chunk):
    per = PROGRAMS // CHUNKS
    logs = []
    summ = fuzz.run(per, SEED, start=chunk * per, shrink_failures=2, shrink_seconds=60,
                    log=logs.append)
    assert summ.ok, summ.line() + "\n\n" + "\n".join(logs)


def _mul_to_add(cj, ctx=None):
    """A wrong pass: every top-level float ``mul`` becomes an ``add``."""
    eqns, changed = [], False
    for e in cj.jaxpr.eqns:
        if e.primitive.name == "mul" and e.outvars[0].aval.dtype.kind == "f":
            e = ir.new_eqn(e.invars, e.outvars, lax.add_p, {}, e.effects, e.source_info)
            changed = True
        eqns.append(e)
    if not changed:
        return PassResult(cj, False)
    return PassResult(ir.closed(ir.make_jaxpr_from(cj.jaxpr, eqns=eqns), cj.consts), True)


BROKEN = Pass("broken_mul_to_add", _mul_to_add, "deliberately wrong", "test")


def _first_failure(seed=3, n=40):
    for k in range(n):
        prog = fuzz.program(seed, k, kind="fn", passes=[BROKEN])
        out = fuzz.check(prog)
        if out.failed:
            return prog, out
    raise AssertionError("the broken pass went unnoticed")


def test_fuzzer_catches_a_wrong_pass():
    summ = fuzz.run(12, 3, kind="fn", passes=[BROKEN], shrink_failures=False, log=lambda m: None)
    assert summ.counts.get("mismatch", 0) >= 1, summ.counts
    assert not summ.ok and "mismatches" in summ.line()


def test_shrinking_gives_a_smaller_failing_program():
    prog, out = _first_failure()
    small, small_out = fuzz.shrink(prog, out, seconds=90)
    assert small_out.signature == out.signature
    assert small.count() < prog.count() or len(small.inputs) < len(prog.inputs)
    assert fuzz.check(small).failed
    text = fuzz.to_test(small, small_out)
    compile(text, "<regression>", "exec")  # a readable, valid test module
    assert "def test_fuzz_" in text and "check_function(" in text


def test_correct_passes_pass_and_jit_path_runs():
    for k in range(4):
        prog = fuzz.program(11, k, kind="fn", passes=["prune"])
        prog.config["jit"] = True  # also through graphopt.optimize's own jax.jit
        out = fuzz.check(prog)
        assert not out.failed, out.detail


def test_oracle_tolerances():
    import numpy as np
    a = np.array([1.0, 2.0, np.nan], np.float32)
    assert fuzz.mismatch(a, a + 1e-6) is None
    assert fuzz.mismatch(a, a + 1e-3) is not None
    assert "NaN" in fuzz.mismatch(a, np.array([1.0, np.nan, np.nan], np.float32))
    assert fuzz.mismatch(np.array([1, 2]), np.array([1, 3])) is not None
    assert fuzz.mismatch(np.array([True]), np.array([True])) is None
    with jax.enable_x64(True):
        b = np.array([1.0, 2.0], np.float64)
        assert fuzz.mismatch(b, b + 1e-9) is not None  # float64 is held to 1e-12


def _cli(*args, register_broken=False):
    code = ("import sys\nfrom graphopt.__main__ import main\n" + (
        "import graphopt\nfrom tests.test_fuzz import BROKEN\ngraphopt.register_pass(BROKEN)\n"
        if register_broken else "") + f"sys.exit(main({['fuzz', *args]!r}))\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                          timeout=600)


def test_cli_summary_and_exit_status(tmp_path):
    ok = _cli("--n", "3", "--seed", "1", "--kind", "fn", "--passes", "prune")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    last = ok.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"fuzz: 3 programs, 0 mismatches, 0 crashes, seed 1", last), last
    bad = _cli("--n", "12", "--seed", "3", "--kind", "fn", "--passes", "broken_mul_to_add",
               "--no-shrink", "--save", str(tmp_path), register_broken=True)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    last = bad.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"fuzz: 12 programs, [1-9]\d* mismatches, \d+ crashes, seed 3", last), last
    assert list(tmp_path.glob("test_fuzz_*.py"))
