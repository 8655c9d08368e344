"""Command line: ``python -m graphopt demo``, ``python -m graphopt report FILE.py:FACTORY``, ``fuzz``.

``demo`` runs every zoo model's optax training step as ``jax.jit(step)``,
``graphopt.optimize(step)`` and ``graphopt.optimize(step, memory_budget=0.5)`` and prints
one table (equations, FLOPs, XLA temp memory, step-time ratio, largest relative error of
outputs and gradients) and, per model, what each changed in words ("same speed within
noise" rather than a noisy ratio); it writes an HTML report per model to
``graphopt-report/``. ``report`` does the same for a user's function: FACTORY is a
function in FILE.py returning ``(fn, args)`` or ``(fn, args, kwargs)``. ``fuzz --n N --seed S``
checks N random programs against graphopt's passes (:mod:`graphopt.fuzz`).
"""
from __future__ import annotations

import argparse
import html
import importlib.util
import os
import statistics
import sys
import time

import jax

from . import analysis, progress, testing
from .api import optimize
from .errors import GraphoptError

# Sizes that keep the whole demo under two minutes on two CPU cores.
DEMO_SIZES = {
    "mlp": dict(sizes=(64, 256, 128, 10), batch=256),
    "gpt": dict(n_layers=2, d_model=64, n_heads=4, seq_len=32, vocab=256, batch=4),
    "cnn": dict(batch=8, height=16, width=16, in_channels=3, channels=(16, 32), classes=10),
    "rnn": dict(batch=8, T=32, in_dim=16, hidden=64, out_dim=8),
}


def median_time(fn, *args, repeats: int = 20) -> float:
    """Median wall time of ``fn(*args)`` after warm-up, blocking on the result."""
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _temp(fn, *args) -> int | None:
    try:
        return analysis.xla_memory(fn, *args)["temp_bytes"]
    except Exception:
        return None


# What `make demo` compares: the plain jit, one decorator, one decorator with a budget.
BUDGET = 0.5
NOISE = 0.05  # a ratio whose middle half of rounds stays within 5% of 1 is "no change"


def timed_rounds(fns, args, rounds: int) -> list[list[float]]:
    """Per function its wall times over ``rounds`` rounds, the functions interleaved within
    each round so that load on the machine hits them alike (after one warm-up call each)."""
    for f in fns:
        jax.block_until_ready(f(*args))
    times = [[] for _ in fns]
    for _ in range(rounds):
        for f, ts in zip(fns, times):
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args))
            ts.append(time.perf_counter() - t0)
    return times


def speed(base_times, times) -> tuple[float, float, float]:
    """(median, first quartile, third quartile) of the per-round ratios base/variant."""
    q = statistics.quantiles([b / t for b, t in zip(base_times, times)], n=4)
    return q[1], q[0], q[2]


def verdict(base_temp, temp, ratio) -> str:
    """In words: what the variant changed, or that it changed nothing measurable."""
    said = []
    if base_temp and temp is not None:
        r = temp / base_temp
        said.append("same temp memory" if abs(r - 1) <= NOISE else
                    f"temp {analysis.fmt_bytes(base_temp)} -> {analysis.fmt_bytes(temp)} ({r:.2f}x)")
    med, lo, hi = ratio
    said.append(f"{med:.2f}x faster" if lo > 1 + NOISE else f"{1 / med:.2f}x slower"
                if hi < 1 - NOISE else f"same speed within noise ({lo:.2f}-{hi:.2f}x)")
    return ", ".join(said)


def _max_err(a, b) -> float:
    return max((testing.max_rel_error(x, y) for x, y in zip(
        jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))), default=0.0)


def study(name: str, fn, args, loss_fn=None, loss_args=None, repeats: int = 20,
          budget: float | None = None) -> dict:
    """Baseline vs graphopt for one function: one row of the demo table; with ``budget``
    also ``optimize(fn, memory_budget=budget)``."""
    opt = optimize(fn)
    base = jax.jit(fn)
    report = opt.report(*args)
    cmp = testing.compare_fns(base, opt, args, grads=False)
    grad_err = 0.0
    if loss_fn is not None:
        grad_err = _max_err(jax.grad(loss_fn)(*loss_args), jax.grad(optimize(loss_fn))(*loss_args))
    fns, row_budget = [base, opt], None
    if budget is not None:
        remat = optimize(fn, memory_budget=budget)
        try:
            row_budget = dict(err=_max_err(base(*args), remat(*args)), temp=_temp(remat, *args))
            fns.append(remat)
        except GraphoptError as exc:  # an infeasible budget is a result too: say it
            row_budget = dict(error=str(exc).split("\n")[0])
    times = timed_rounds(fns, args, repeats)
    cb, ca = report.cost_before(), report.cost_after()
    temps = (_temp(base, *args), _temp(opt, *args))
    ratio = speed(times[0], times[1])
    row = dict(model=name, eqns=(report.eqns_before, report.eqns_after), flops=(cb.flops, ca.flops),
               temp=temps, speedup=ratio[0], speed_quartiles=ratio[1:],
               out_err=cmp["outputs"]["max_rel_err"], grad_err=grad_err, report=report,
               placement=report.placement, verdict=verdict(temps[0], temps[1], ratio))
    if row_budget is not None and "error" not in row_budget:
        r = speed(times[0], times[2])
        row_budget.update(speedup=r[0], verdict=verdict(temps[0], row_budget["temp"], r))
    row["budget"] = row_budget
    return row


def _fmt_temp(t):
    return "n/a" if t is None else analysis.fmt_bytes(t)


def format_table(rows: list[dict]) -> str:
    head = (f"{'model':<8}{'equations':>16}{'FLOPs':>26}{'XLA temp':>26}"
            f"{'step time':>12}{'out err':>10}{'grad err':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['model']:<8}{r['eqns'][0]:>7} -> {r['eqns'][1]:<6}"
            f"{analysis.fmt_flops(r['flops'][0]):>12} -> {analysis.fmt_flops(r['flops'][1]):<10}"
            f"{_fmt_temp(r['temp'][0]):>12} -> {_fmt_temp(r['temp'][1]):<10}"
            f"{r['speedup']:>10.2f}x{r['out_err']:>10.1e}{r['grad_err']:>10.1e}")
    lines.append("step time: jax.jit time / graphopt time, median of interleaved rounds (>1 is "
                 "faster); errors: largest relative error vs. the unoptimized step")
    lines.append("")
    lines.append("in words, against jax.jit(step):")
    for r in rows:
        lines.append(f"  {r['model']}: graphopt.optimize(step): {r['verdict']}")
        b = r.get("budget")
        if b is not None:
            said = b.get("verdict") or f"refused: {b['error']}"
            err = f"; max rel. error {b['err']:.1e}" if "err" in b else ""
            lines.append(f"  {r['model']}: graphopt.optimize(step, memory_budget={BUDGET}): "
                         f"{said}{err}")
    return "\n".join(lines)


def write_index(directory: str, rows: list[dict], table: str) -> str:
    os.makedirs(directory, exist_ok=True)
    links = "".join(f"<li><a href='{html.escape(r['model'])}.html'>{html.escape(r['model'])}</a></li>"
                    for r in rows)
    path = os.path.join(directory, "index.html")
    with open(path, "w") as f:
        f.write(f"<!doctype html><html><head><meta charset='utf-8'><title>graphopt demo</title></head>"
                f"<body><h1>graphopt demo</h1><pre>{html.escape(table)}</pre><ul>{links}</ul></body></html>")
    return path


def demo(out_dir: str = "graphopt-report", models: list[str] | None = None) -> list[dict]:
    from graphopt.models import ZOO
    rows = []
    for name in progress.track(models or list(ZOO), "demo models"):
        mod = ZOO[name]
        sizes = DEMO_SIZES[name]
        params = mod.init(jax.random.PRNGKey(0), **sizes)
        batch = mod.example_batch(jax.random.PRNGKey(1), **sizes)
        opt_state = mod.init_opt_state(params)
        print(f"[demo] {name}: tracing, optimizing, compiling, timing ...", flush=True)
        row = study(name, mod.train_step, (params, opt_state, batch), mod.loss, (params, batch),
                    budget=BUDGET)
        row["report"].write_html(out_dir, f"{name}.html")
        rows.append(row)
    table = format_table(rows)
    print()
    print("graphopt demo: each zoo model's optax training step: jax.jit(step) against "
          f"graphopt.optimize(step) and optimize(step, memory_budget={BUDGET}), one run "
          f"({jax.default_backend()}, JAX {jax.__version__})")
    print(table)
    print(f"\nHTML reports: {write_index(out_dir, rows, table)}")
    return rows


def load_factory(spec: str):
    """'path/to/file.py:factory' -> (fn, args, kwargs)."""
    if ":" not in spec:
        raise SystemExit(f"graphopt report: expected FILE.py:FACTORY, got {spec!r}")
    path, name = spec.rsplit(":", 1)
    if not os.path.exists(path):
        raise SystemExit(f"graphopt report: no such file {path!r}")
    spec_ = importlib.util.spec_from_file_location("_graphopt_user_module", path)
    mod = importlib.util.module_from_spec(spec_)
    sys.modules[spec_.name] = mod  # dataclasses and pickling look their module up there
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    spec_.loader.exec_module(mod)
    factory = getattr(mod, name, None)
    if factory is None or not callable(factory):
        raise SystemExit(f"graphopt report: {path} has no function {name!r}")
    got = factory()
    if not isinstance(got, tuple) or len(got) not in (2, 3) or not callable(got[0]):
        raise SystemExit(f"graphopt report: {name}() must return (fn, args) or (fn, args, kwargs)")
    fn, args = got[0], tuple(got[1])
    kwargs = dict(got[2]) if len(got) == 3 else {}
    return fn, args, kwargs


def report_cmd(spec: str, out_dir: str) -> dict:
    fn, args, kwargs = load_factory(spec)
    if kwargs:
        def call(*a):
            return fn(*a, **kwargs)
        call.__name__ = getattr(fn, "__name__", "fn")
    else:
        call = fn
    row = study(getattr(fn, "__name__", "fn"), call, args)
    print(row["report"])
    print()
    print(format_table([row]))
    print(f"\nHTML report: {row['report'].write_html(out_dir)}")
    return row


def _fuzz_arguments(ap) -> None:
    ap.add_argument("--n", type=int, default=100, help="programs to check")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start", type=int, default=0, help="first program number")
    ap.add_argument("--kind", choices=["fn", "step"], default=None)
    ap.add_argument("--passes", nargs="+", default=None, help="instead of the random choice")
    ap.add_argument("--no-shrink", action="store_true")
    ap.add_argument("--shrink-seconds", type=float, default=120.0)
    ap.add_argument("--verbose", action="store_true", help="one line per program")
    ap.add_argument("--coverage", action="store_true", help="rules fired, primitives traced")
    ap.add_argument("--save", nargs="?", const=os.path.join("tests", "regressions"), default=None,
                    metavar="DIR", help="write each shrunk failure as a test (tests/regressions)")


def fuzz_cmd(ns) -> int:
    """``python -m graphopt fuzz``: the last line is the summary; exit status 1 on a failure."""
    from . import fuzz
    summ = fuzz.run(ns.n, ns.seed, start=ns.start, kind=ns.kind, passes=ns.passes, save=ns.save,
               shrink_failures=not ns.no_shrink, shrink_seconds=ns.shrink_seconds, verbose=ns.verbose)
    for k, v in sorted(summ.seen.items()) if ns.coverage else ():
        print(f"  {v:6d}  {k}")
    other = ", ".join(f"{v} {k}" for k, v in sorted(summ.counts.items()) if k not in ("mismatch", "crash"))
    print(f"({other}; {summ.seconds:.1f} s)")
    print(summ.line())
    return 1 if summ.failures else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m graphopt", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="the zoo's training steps through the default pipeline")
    d.add_argument("--out", default="graphopt-report")
    d.add_argument("--models", nargs="*", default=None, help="subset of: mlp gpt cnn rnn")
    r = sub.add_parser("report", help="report for FILE.py:FACTORY returning (fn, args[, kwargs])")
    r.add_argument("spec")
    r.add_argument("--out", default="graphopt-report")
    _fuzz_arguments(sub.add_parser("fuzz", help="differential fuzzer: random programs through "
                                   "graphopt.optimize against the originals"))
    ns = ap.parse_args(argv)
    if ns.cmd == "fuzz":
        return fuzz_cmd(ns)
    if ns.cmd == "demo":
        demo(ns.out, ns.models)
    else:
        report_cmd(ns.spec, ns.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
