"""The differential fuzzer (graphopt.fuzz): 1000 seeded programs through graphopt.optimize
against the originals, in chunks pytest-xdist can spread; and the fuzzer's own behaviour
(it catches a deliberately wrong pass, shrinks what fails, and its command line)."""
import os
import re
import subprocess
import sys

import pytest

import jax
import jax.numpy as jnp
from jax import lax

from graphopt import fuzz, fuzz_programs as fp, ir
from graphopt.passes import Pass, PassResult

# GRAPHOPT_FUZZ_N programs of run GRAPHOPT_FUZZ_SEED from GRAPHOPT_FUZZ_START, in CHUNKS
# tests (so CI legs can split 1,000 programs over seeds); GRAPHOPT_FUZZ=1 alone: 1,000 of seed 7.
# Not marked slow: a leg that asks for programs runs them in either tier (.ci/run does).
ENV = os.environ
PROGRAMS = int(ENV.get("GRAPHOPT_FUZZ_N", 1000 if ENV.get("GRAPHOPT_FUZZ") else 0))
SEED, START, CHUNKS = int(ENV.get("GRAPHOPT_FUZZ_SEED", 7)), int(ENV.get("GRAPHOPT_FUZZ_START", 0)), 10


def _chunk(c: int) -> tuple[int, int]:
    """(first program, count) of chunk ``c``: PROGRAMS split as evenly as CHUNKS allows."""
    lo, hi = (START + PROGRAMS * k // CHUNKS for k in (c, c + 1))
    return lo, hi - lo


@pytest.mark.skipif(not PROGRAMS, reason=(
    "fuzzed programs take minutes: GRAPHOPT_FUZZ_N=N [GRAPHOPT_FUZZ_SEED=S] runs N of them, "
    "GRAPHOPT_FUZZ=1 1,000 of seed 7 (or python -m graphopt fuzz --n 1000 --seed 7)"))
@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_fuzz_programs(chunk):
    start, n = _chunk(chunk)
    if not n:
        pytest.skip("no programs in this chunk")
    logs = []
    summ = fuzz.run(n, SEED, start=start, shrink_failures=2, shrink_seconds=60, log=logs.append)
    assert summ.ok, summ.line() + f" (programs {start}..{start + n - 1})\n\n" + "\n".join(logs)


def test_chunks_cover_the_programs_once():
    global PROGRAMS, START
    saved = PROGRAMS, START
    try:
        for PROGRAMS, START in ((1000, 0), (334, 2000), (7, 5)):
            spans = [_chunk(c) for c in range(CHUNKS)]
            covered = [k for lo, n in spans for k in range(lo, lo + n)]
            assert covered == list(range(START, START + PROGRAMS))
    finally:
        PROGRAMS, START = saved


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


@pytest.mark.slow  # over 25 s on 2 cores: leg 1 only (.ci/run)
def test_shrinking_gives_a_smaller_failing_program():
    prog, out = _first_failure()
    small, small_out = fuzz.shrink(prog, out, seconds=90)
    assert small_out.signature == out.signature
    assert small.count() < prog.count() or len(small.inputs) < len(prog.inputs)
    assert fuzz.check(small).failed
    text = fuzz.to_test(small, small_out, why="A deliberately wrong pass.")
    compile(text, "<regression>", "exec")  # a readable, valid test module
    assert "def test_fuzz_" in text and "    regression(f, INPUTS, CONFIG, kind='fn'" in text
    assert "A deliberately wrong pass." in text and "noqa" not in text
    ns = dict(fp.NAMESPACE)  # the shared helper fails on it as the saved test would
    exec(compile(small.source(), "<small>", "exec"), ns)
    with pytest.raises(AssertionError, match=r"^mismatch in "):
        fuzz.regression(ns["f"], small.inputs, small.config, kind="fn", x64=small.x64)


def test_regression_helper_passes_a_correct_program_and_refuses_an_invalid_one():
    def f(x):
        return (jnp.sin(x) * 1.0 + 0.0,)
    inputs = [("x", (3, 2), "float32", "arg", None)]
    out = fuzz.regression(f, inputs, {"passes": ["prune"], "ad": ("vjp", "jvp")})
    assert out.status == "ok"

    def bad(x):  # JAX rejects it: a regression test must not pass by not running
        return (x @ x,)
    with pytest.raises(AssertionError, match=r"^invalid in "):
        fuzz.regression(bad, inputs, {"passes": ["prune"]})


def test_correct_passes_pass_and_jit_path_runs():
    for k in range(4):
        prog = fuzz.program(11, k, kind="fn", passes=["prune"])
        prog.config["jit"] = True  # also through graphopt.optimize's own jax.jit
        out = fuzz.check(prog)
        assert not out.failed, out.detail


def test_adam_does_not_amplify_a_noise_gradient():
    """seed 23 program 8: a loss invariant to its parameters (mean square of a batch-normalized
    value) has float-noise gradients; with adam's default eps the update was ±lr by their sign,
    so any reassociation read as a mismatch. The generated optimizers bound that (eps=1e-3)."""
    prog = fuzz.program(23, 8)
    assert "eps=1e-3" in prog.config["optimizer"] and "bn_affine" in prog.source()
    out = fuzz.check(prog)
    assert out.status == "ok" and out.where != "unchanged", (out.status, out.where, out.detail)


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


def test_generated_inputs_have_distinct_names():
    # seed 2026 program 1028 drew an operand "d3" beside the batch input d3: one shadowed
    # the other in the batch dict, so a drawn input was never used
    for seed, k in [(2026, 1028), (101, 5), (102, 7)] + [(103, k) for k in range(40)]:
        try:
            prog = fuzz.program(seed, k, kind="step")
        except IndexError:  # a draw the runner draws again
            continue
        names = [i.name for i in prog.inputs]
        assert len(names) == len(set(names)), (seed, k, names)


def test_nudged_inputs_excuse_rounding_only_where_the_program_cancels():
    import numpy as np
    eps = np.finfo(np.float32).eps
    x = np.float32([1.0, 2.0])
    y = x + np.float32(3000 * eps) * x  # x - y cancels: an ulp of x is 3e-4 of the output
    cj = jax.make_jaxpr(lambda x, y: (x - y) * 1e3)(x, y)
    a = np.asarray(ir.eval_jaxpr(cj, x, y)[0])
    nudged = fuzz._nudged(cj, [], [], [], ([x, y], {}), seed=0)["outputs"]
    assert np.abs(nudged[0] - a).max() > 1e-5 * np.abs(a).max()  # the program moved
    rounded = a + np.float32(eps) * 1e3 * x  # one ulp of an input, as reassociation moves it
    assert fuzz.mismatch(a, rounded) is not None
    assert fuzz.mismatch(a, rounded, nudged[0], near=fuzz.NUDGE_NEAR) is None
    assert fuzz.mismatch(a, a * 1.5, nudged[0], near=fuzz.NUDGE_NEAR) is not None
    smooth = jax.make_jaxpr(lambda x, y: (x + y) * 1e3)(x, y)  # well-conditioned: no excuse
    b = np.asarray(ir.eval_jaxpr(smooth, x, y)[0])
    nudged = fuzz._nudged(smooth, [], [], [], ([x, y], {}), seed=0)["outputs"]
    assert fuzz.mismatch(b, b * (1 + 1e-4), nudged[0], near=fuzz.NUDGE_NEAR) is not None


def test_a_float32_value_computed_in_bfloat16_is_judged_at_bfloat16():
    import numpy as np
    cj = jax.make_jaxpr(lambda x: jnp.sum(x).astype(jnp.float32))(jnp.ones(4, jnp.bfloat16))
    assert fuzz._coarsest(cj) == "bfloat16"
    a = np.float32([11.5])
    assert fuzz.mismatch(a, a + 0.08) is not None  # float32's tolerance: 1.2e-4 here
    assert fuzz.mismatch(a, a + 0.08, coarse="bfloat16") is None  # one bfloat16 ulp is 0.0625
    assert fuzz.mismatch(a, a * 1.5, coarse="bfloat16") is not None
    assert fuzz._coarsest(jax.make_jaxpr(jnp.sin)(1.0)) == "float32"


def _cli(*args, register_broken=False):
    code = ("import sys\nfrom graphopt.__main__ import main\n" + (
        "import graphopt\nfrom tests.test_fuzz import BROKEN\ngraphopt.register_pass(BROKEN)\n"
        if register_broken else "") + f"sys.exit(main({['fuzz', *args]!r}))\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                          timeout=600)


@pytest.mark.slow  # over 25 s on 2 cores: leg 1 only (.ci/run)
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


def _pre_ad_program():
    def f(x, w):  # a loss graphopt.optimize rematerializes before AD (custom_vjp segments)
        h = x
        for _ in range(4):
            h = h + jnp.tanh(h @ w)
        return (jnp.mean(h ** 2),)
    inputs = [("x", (4, 64, 16), "float32", "arg", None), ("w", (16, 16), "float32", "arg", None)]
    config = {"passes": ["remat"], "options": {"memory_budget": 0.8, "remat_solver": "greedy"},
              "ad": ("jvp",)}
    return f, inputs, config


def test_pre_ad_segments_get_their_vjp_compared_when_jvp_is_skipped():
    f, inputs, config = _pre_ad_program()
    out = fuzz.check_function(f, inputs, config, ad=config["ad"])
    assert out.status == "ok", out.detail
    assert out.seen.get("rule remat.bytes_saved"), out.seen  # the segments are there
    assert out.compared == ("outputs", "vjp")  # jvp of a custom_vjp skipped, vjp added


def test_a_wrong_pre_ad_backward_is_caught_with_jvp_only(monkeypatch):
    from graphopt.transforms.remat import pre_ad as remat_mod  # its segments call fenced
    real = remat_mod.fenced

    def doubled(fn, gs, *xs):  # the segments' backward, wrong by a factor of two
        return tuple(2 * g for g in real(fn, gs, *xs))
    monkeypatch.setattr(remat_mod, "fenced", doubled)
    f, inputs, config = _pre_ad_program()
    out = fuzz.check_function(f, inputs, config, ad=config["ad"])
    assert out.status == "mismatch" and out.where == "vjp", (out.status, out.where, out.detail)
