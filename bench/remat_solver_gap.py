"""Heuristic vs exact remat solver: recomputed FLOPs at the same model-byte target.

For the post-AD plan of each zoo training step (the top level for the scanned GPT)
and a sweep of model targets from the least-memory plan's model bytes
(``solve_greedy(plan, 0)``) to the model bytes without remat, prints per target:
``solve_milp`` FLOPs (10 s limit), ``solve_greedy`` FLOPs, their gap, both times and
whether each met the target; then the largest gap where milp proved its optimum.
Tracing only, no XLA compile.

    python bench/remat_solver_gap.py [--quick]
"""
import sys

import jax

from graphopt.models import cnn, gpt, mlp, rnn
from graphopt.transforms.remat.plan import backward_start, build_plan
from graphopt.transforms.remat.solvers import solve_greedy, solve_milp

QUICK = "--quick" in sys.argv
FRACS = (0.0, 0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9)  # of the way from least memory to none


def zoo(quick: bool = QUICK):
    """(name, training step, args), the models of bench/remat_bench.py."""
    k = jax.random.PRNGKey(0)
    s = dict(depth=8, width=128, batch=4, T=256)
    p = mlp.init_deep(k, **s)
    yield "mlp (8 blocks)", mlp.train_step_deep, (p, mlp.init_opt_state(p),
                                                  mlp.example_batch_deep(k, **s))
    for n_layers in (4,) if quick else (4, 8):
        g = dict(n_layers=n_layers, d_model=128, n_heads=4, seq_len=128, vocab=256, batch=4)
        p = gpt.init(k, **g)
        batch = gpt.example_batch(k, **{x: g[x] for x in ("batch", "seq_len", "vocab")})
        yield f"gpt ({n_layers} layers)", gpt.train_step, (p, gpt.init_opt_state(p), batch)
    ps = gpt.init(k, **g, scan_layers=True)
    yield "gpt scan", gpt.make_train_step(gpt.optimizer(), scan_layers=True), \
        (ps, gpt.init_opt_state(ps), batch)
    c = dict(batch=16, height=32, width=32, in_channels=3, channels=(32, 64), classes=10)
    p = cnn.init(k, **c)
    yield "cnn", cnn.train_step, (p, cnn.init_opt_state(p), cnn.example_batch(k, **c))
    r = dict(batch=16, T=64, in_dim=64, hidden=256, out_dim=32)
    p = rnn.init(k, **r)
    yield "rnn", rnn.train_step, (p, rnn.init_opt_state(p), rnn.example_batch(k, **r))


def sweep_targets(plan, fracs=FRACS) -> list[int]:
    """Model targets ``frac`` of the way from the least-memory plan to no remat."""
    lo = solve_greedy(plan, 0).model_bytes
    hi = plan.model_bytes([False] * len(plan.segments))
    return [int(lo + f * (hi - lo)) for f in fracs]


def gap(milp_flops: float, greedy_flops: float) -> float:
    """Relative excess of the heuristic's FLOPs over the exact ones (0 when both are 0)."""
    return (greedy_flops - milp_flops) / max(milp_flops, 1.0)


def solver_gap_rows(plan, targets, time_limit: float = 10.0) -> list[dict]:
    """Per target: both solutions and the gap; ``optimal`` when milp proved its optimum."""
    rows = []
    for t in targets:
        m = solve_milp(plan, t, time_limit)
        g = solve_greedy(plan, t)
        optimal = m.feasible and "optimal" in m.status.lower()
        rows.append(dict(target=t, milp=m, greedy=g, optimal=optimal,
                         gap=gap(m.flops, g.flops) if m.feasible and g.feasible else None))
    return rows


def print_rows(rows) -> None:
    print(f"{'target MiB':>10} {'milp GFLOP':>10} {'greedy GFLOP':>12} {'gap':>8} "
          f"{'milp s':>7} {'greedy s':>8} {'milp ok':>7} {'greedy ok':>9} {'optimal':>7}")
    for r in rows:
        m, g = r["milp"], r["greedy"]
        gp = "-" if r["gap"] is None else f"{r['gap']:+.1%}"
        print(f"{r['target'] / 2**20:>10.3f} {m.flops / 1e9:>10.4f} {g.flops / 1e9:>12.4f} "
              f"{gp:>8} {m.seconds:>7.2f} {g.seconds:>8.3f} {str(m.feasible):>7} "
              f"{str(g.feasible):>9} {str(r['optimal']):>7}")


def max_gap(rows) -> float | None:
    """Largest gap over the targets where milp proved optimality."""
    gaps = [r["gap"] for r in rows if r["optimal"] and r["gap"] is not None]
    return max(gaps) if gaps else None


def main():
    summary = []
    for name, step, args in zoo():
        cj = jax.make_jaxpr(step)(*args)
        plan = build_plan(cj, backward_start(cj.jaxpr))
        print(f"\n== {name}: {len(cj.jaxpr.eqns)} eqns, {plan.n_pieces} pieces, "
              f"{len(plan.segments)} segments")
        if not plan.segments:
            continue
        rows = solver_gap_rows(plan, sweep_targets(plan))
        print_rows(rows)
        missed = sum(r["milp"].feasible and not r["greedy"].feasible for r in rows)
        mg = max_gap(rows)
        summary.append((name, mg, missed, max(r["greedy"].seconds for r in rows)))
    print(f"\n{'model':>16} {'max gap (milp optimal)':>22} {'greedy infeasible':>17} "
          f"{'greedy max s':>12}")
    for name, mg, missed, gs in summary:
        print(f"{name:>16} {'-' if mg is None else format(mg, '+.1%'):>22} {missed:>17} "
              f"{gs:>12.3f}")
    worst = [mg for _, mg, _, _ in summary if mg is not None]
    print(f"max gap over all: {max(worst):+.1%}" if worst else "max gap: no milp optimum")


if __name__ == "__main__":
    main()
