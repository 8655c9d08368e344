"""Parallelism analysis: total work, critical path, and the independent branches themselves.

:func:`analyze` answers "how much of this program could run side by side?":

- total FLOPs, the cost-weighted critical path (:mod:`graphopt.critical_path`) and their
  ratio, the *available parallelism* (about k for k equal independent chains);
- the connected components of the dataflow graph (work that shares no value at all);
- the **repeated branches**: k lanes that apply the same computation to different
  inputs (an ensemble written as a Python loop, attention heads or experts written as
  a loop), even when their results are joined at the end (``jnp.stack``, a sum).

Repeated branches are found by *packing*: equations with the same primitive, params
and input/output types at the same dataflow depth (longest chain of equations from the
inputs) cannot depend on each other, so they could be one batched equation; packs that
feed each other lane by lane form a region whose lanes are the branches. The
``batch_parallel`` pass batches exactly these packs. Everything here reads a jaxpr and
changes nothing.
"""
from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable

import numpy as np

from . import ir
from .cost import eqn_cost, fmt_flops, top_level
from .critical_path import critical_path, independent_branches, parallelism

MARK = "batch_parallel"  # name scope of what the pass wrote: never packed again


# ------------------------------------------------------------------------ signatures

def _param_key(v, memo: dict):
    if isinstance(v, (ir.Jaxpr, ir.ClosedJaxpr)):
        got = memo.get(id(v))
        if got is None:  # same body traced twice gives equal text, not the same object
            got = memo[id(v)] = ("jaxpr", str(v))
        return got
    if isinstance(v, (tuple, list)):
        return tuple(_param_key(x, memo) for x in v)
    if callable(v) or hasattr(v, "call_wrapped"):  # custom_jvp rules: one function, traced per call
        dbg = getattr(v, "debug_info", None)
        return ("callable", getattr(dbg, "func_src_info", None) or getattr(v, "__qualname__", id(v)))
    try:
        hash(v)
        return v
    except TypeError:
        return ("repr", repr(v))


def _aval_key(a):
    return (getattr(a, "shape", ()), getattr(a, "dtype", None), getattr(a, "weak_type", False))


def signature(eqn, memo: dict | None = None) -> tuple:
    """What makes two equations "the same computation": primitive, params, operand and
    result types (values of the operands excluded)."""
    memo = {} if memo is None else memo
    params = tuple(sorted((k, _param_key(v, memo)) for k, v in eqn.params.items()))
    return (eqn.primitive.name, params, tuple(_aval_key(a.aval) for a in eqn.invars),
            tuple(_aval_key(v.aval) for v in eqn.outvars))


def same_atom(a, b) -> bool:
    """The same variable, or literals of one type and value."""
    if a is b:
        return True
    if ir.is_literal(a) and ir.is_literal(b):
        return (_aval_key(a.aval) == _aval_key(b.aval)
                and np.array_equal(np.asarray(ir.literal_value(a)), np.asarray(ir.literal_value(b))))
    return False


# ------------------------------------------------------------------------------ packs

@dataclasses.dataclass
class Pack:
    """k equations (one per lane, in lane order) doing the same computation."""
    members: tuple[int, ...]
    depth: int


def dag_depths(jaxpr) -> tuple[list[int], list[set[int]]]:
    """(depth per equation: longest chain of equations from the inputs, predecessors);
    effectful equations are chained in program order."""
    producer: dict = {}
    preds: list[set[int]] = []
    depth: list[int] = []
    last_effect = None
    for i, e in enumerate(jaxpr.eqns):
        ps = {producer[a] for a in e.invars if ir.is_var(a) and a in producer}
        producer.update((v, i) for v in e.outvars)
        if ir.effectful(e):
            if last_effect is not None:
                ps.add(last_effect)
            last_effect = i
        preds.append(ps)
        depth.append(1 + max((depth[p] for p in ps), default=0))
    return depth, preds


def find_packs(jaxpr, can_pack: Callable | None = None) -> list[Pack]:
    """Groups of >= 2 equations of one jaxpr level with the same :func:`signature` at the
    same dataflow depth (so none reads another's result), that differ in at least one
    operand (identical ones are common subexpressions, not parallel work).

    ``can_pack(eqn) -> bool`` filters candidates (the batching pass passes its rule
    table); equations the pass itself wrote are never packed again.
    """
    jaxpr = jaxpr.jaxpr if isinstance(jaxpr, ir.ClosedJaxpr) else jaxpr
    depth, _ = dag_depths(jaxpr)
    memo: dict = {}
    rough: dict = collections.defaultdict(list)  # the full signature only where it can matter
    for i, e in enumerate(jaxpr.eqns):
        rough[(e.primitive, depth[i], tuple(_aval_key(v.aval) for v in e.outvars))].append(i)
    groups: dict = collections.defaultdict(list)
    for same in rough.values():
        for i in same if len(same) > 1 else ():
            e = jaxpr.eqns[i]
            if not e.invars or ir.impure(e) or MARK in ir.name_stack(e):
                continue
            if can_pack is not None and not can_pack(e):
                continue
            groups[(signature(e, memo), depth[i])].append(i)
    packs = []
    for (_, d), members in groups.items():
        if len(members) < 2:
            continue
        eqs = [jaxpr.eqns[i] for i in members]
        if all(all(same_atom(a, b) for a, b in zip(eqs[0].invars, e.invars)) for e in eqs[1:]):
            continue
        packs.append(Pack(tuple(members), d))
    packs.sort(key=lambda p: p.members[0])
    return packs


def components(n: int, pairs) -> list[int]:
    """Per node 0..n-1, the label of its connected component under the joined ``pairs``."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    pairs = list(pairs)
    rows, cols = [a for a, _ in pairs], [b for _, b in pairs]
    graph = coo_matrix((np.ones(len(pairs)), (rows, cols)), shape=(n, n))
    return list(connected_components(graph, directed=False)[1]) if n else []


def lanes(jaxpr, packs: list[Pack]) -> list[list[list[int]]]:
    """Repeated branches: packs joined lane to lane (member i of one reads member i of
    another) form a region; per region, per lane, its equations (packed ones, plus
    unpacked equations reading only that lane and program inputs). Largest first."""
    jaxpr = jaxpr.jaxpr if isinstance(jaxpr, ir.ClosedJaxpr) else jaxpr
    g = ir.Graph(jaxpr)
    where = {}  # eqn -> (pack index, lane)
    for p, pk in enumerate(packs):
        for lane, i in enumerate(pk.members):
            where[i] = (p, lane)
    joined = []
    for p, pk in enumerate(packs):  # join packs fed lane by lane
        for lane, i in enumerate(pk.members):
            for a in jaxpr.eqns[i].invars:
                src = where.get(g.producer.get(a)) if ir.is_var(a) else None
                if src is not None and src[1] == lane and len(packs[src[0]].members) == len(pk.members):
                    joined.append((p, src[0]))
    region = components(len(packs), joined)
    lane_of: dict[int, tuple[int, int]] = {i: (int(region[p]), lane) for i, (p, lane) in where.items()}
    for i, e in enumerate(jaxpr.eqns):  # unpacked equations inside one lane (e.g. a custom_jvp)
        if i in lane_of:
            continue
        srcs = {lane_of.get(g.producer.get(a)) for a in e.invars if ir.is_var(a) and a in g.producer}
        if len(srcs) == 1 and None not in srcs:
            lane_of[i] = srcs.pop()
    regions: dict[int, dict[int, list[int]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    for i, (r, lane) in sorted(lane_of.items()):
        regions[r][lane].append(i)
    out = [[regions[r][lane] for lane in sorted(regions[r])] for r in regions]
    out = [reg for reg in out if len(reg) >= 2]
    return sorted(out, key=lambda reg: (-sum(len(x) for x in reg), reg[0][0]))


# ----------------------------------------------------------------------------- report

@dataclasses.dataclass
class BranchGroup:
    """k lanes applying the same computation to different inputs."""
    branches: list[list[int]]   # per lane, equation indices into the analysed jaxpr
    flops_per_branch: float
    primitives: dict            # primitive -> count, one lane

    @property
    def n_branches(self) -> int:
        return len(self.branches)

    def __repr__(self):
        prims = ", ".join(f"{n}×{p}" for p, n in sorted(self.primitives.items(), key=lambda x: -x[1])[:4])
        return (f"{self.n_branches} branches × {len(self.branches[0])} eqns "
                f"({fmt_flops(self.flops_per_branch)} each: {prims})")


@dataclasses.dataclass
class ParallelismReport:
    """What :func:`analyze` found. ``eqn_branch`` maps an equation index of ``jaxpr`` to
    (group, lane), for drawing the branches on the graph."""
    total_flops: float
    critical_path_flops: float
    parallelism: float
    n_eqns: int
    critical_path: list[int]
    components: list[list[int]]
    repeated: list[BranchGroup]
    jaxpr: object = dataclasses.field(repr=False, default=None)

    @property
    def eqn_branch(self) -> dict[int, tuple[int, int]]:
        return {i: (g, lane) for g, grp in enumerate(self.repeated)
                for lane, br in enumerate(grp.branches) for i in br}

    def highlight(self) -> dict:
        """{equation of ``jaxpr``: "group g, branch l"} for the critical path and every
        repeated branch: labels for drawing them on the graph of ``jaxpr``."""
        eqns = self.jaxpr.eqns
        out = {eqns[i]: "critical path" for i in self.critical_path}
        out.update({eqns[i]: f"group {g}, branch {lane}" for i, (g, lane) in self.eqn_branch.items()})
        return out

    def draw(self, **draw_kwargs):
        """``graphopt.draw`` of the analysed jaxpr with the branches and the critical path
        highlighted (keyword arguments as :func:`graphopt.viz.draw`)."""
        from .viz import draw
        draw_kwargs.setdefault("title", "parallelism")
        return draw(self.jaxpr, highlight=self, **draw_kwargs)

    def __repr__(self):
        lines = [f"ParallelismReport: {self.n_eqns} eqns, work {fmt_flops(self.total_flops)}, "
                 f"critical path {fmt_flops(self.critical_path_flops)} "
                 f"({len(self.critical_path)} eqns), available parallelism "
                 f"{self.parallelism:.2f}",
                 f"  independent components: {len(self.components)}"]
        if self.repeated:
            lines.append("  repeated branches (batchable):")
            lines += [f"    {g!r}" for g in self.repeated]
        else:
            lines.append("  repeated branches: none")
        return "\n".join(lines)


def _as_closed(f, args):
    if isinstance(f, (ir.ClosedJaxpr, ir.Jaxpr)):
        return f
    import jax
    if hasattr(f, "original_jaxpr"):  # a graphopt.optimize-d function: what it was given
        return f.original_jaxpr(*args)
    return jax.make_jaxpr(f)(*args)


def analyze(f, *args) -> ParallelismReport:
    """Parallelism of ``f`` on ``args`` (or of a ClosedJaxpr): work, critical path,
    available parallelism, independent components and repeated branches. A program
    that is one jit call is looked through. Indices refer to ``report.jaxpr``'s
    equations."""
    jaxpr = top_level(_as_closed(f, args))
    flops = [eqn_cost(e).flops for e in jaxpr.eqns]
    cp_flops, path = critical_path(jaxpr)
    groups = []
    for reg in lanes(jaxpr, find_packs(jaxpr)):
        prims = collections.Counter(jaxpr.eqns[i].primitive.name for i in reg[0])
        groups.append(BranchGroup(reg, sum(flops[i] for i in reg[0]), dict(prims)))
    return ParallelismReport(float(sum(flops)), cp_flops, parallelism(jaxpr), len(jaxpr.eqns),
                             path, independent_branches(jaxpr), groups, jaxpr)


def draw(f, *args, **draw_kwargs):
    """Draw ``f`` on ``args`` with its repeated branches and critical path highlighted:
    ``analyze(f, *args).draw(**draw_kwargs)``."""
    draw_kwargs.setdefault("title", getattr(f, "__name__", None) or "parallelism")
    return analyze(f, *args).draw(**draw_kwargs)


__all__ = ["analyze", "draw", "ParallelismReport", "BranchGroup", "Pack", "find_packs", "lanes", "components",
           "signature", "dag_depths", "same_atom", "MARK"]
