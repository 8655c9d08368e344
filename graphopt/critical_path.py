"""Critical path and available parallelism of a jaxpr's top-level dataflow graph."""
from __future__ import annotations

import numpy as np

from . import ir
from .cost import eqn_cost, top_level

# ----------------------------------------------------------- critical path / parallel

# Added to every node's FLOPs when choosing the longest path, so a chain of zero-FLOP
# ops (reshapes, casts) still has a length; not included in the FLOPs reported.
NODE_EPS = 1e-3


def _dag_preds(jaxpr) -> list[set[int]]:
    g = ir.Graph(jaxpr)
    preds: list[set[int]] = [set() for _ in g.eqns]
    last_effect = None
    for i, e in enumerate(g.eqns):
        for a in e.invars:
            if ir.is_var(a) and a in g.producer:
                preds[i].add(g.producer[a])
        # effectful equations keep their order: chain them
        if ir.effectful(e):
            if last_effect is not None:
                preds[i].add(last_effect)
            last_effect = i
    return preds


def critical_path(closed_jaxpr) -> tuple[float, list[int]]:
    """Longest FLOP-weighted chain through the top-level dataflow graph.

    Nodes are top-level equations weighted by :func:`eqn_cost` FLOPs (a higher-order
    equation by its sub-jaxprs' FLOPs) plus :data:`NODE_EPS`; edges are data
    dependencies (and the order of effectful equations). Returns (FLOPs on the path,
    indices into ``top_level(closed_jaxpr).eqns`` along it, in order); ``(0.0, [])`` for
    no equations. A program that is one jit call is looked through (:func:`top_level`).
    """
    jaxpr = top_level(closed_jaxpr)
    eqns = jaxpr.eqns
    if not eqns:
        return 0.0, []
    flops = [eqn_cost(e).flops for e in eqns]
    preds = _dag_preds(jaxpr)
    dist = np.zeros(len(eqns))
    back = [-1] * len(eqns)
    for i in range(len(eqns)):  # jaxpr order is topological
        best, arg = 0.0, -1
        for p in sorted(preds[i]):  # ties go to the earliest predecessor
            if dist[p] > best:
                best, arg = dist[p], p
        dist[i] = best + flops[i] + NODE_EPS
        back[i] = arg
    i = int(np.argmax(dist))
    path = []
    while i != -1:
        path.append(i)
        i = back[i]
    path.reverse()
    return float(sum(flops[j] for j in path)), path


def parallelism(closed_jaxpr) -> float:
    """Total top-level FLOPs / critical-path FLOPs: how many chains could run at once.

    1.0 for a pure chain, about k for k equal independent branches. Where the program
    has no FLOPs, the ratio of equation counts is used instead.
    """
    jaxpr = top_level(closed_jaxpr)
    if not jaxpr.eqns:
        return 1.0
    path_flops, path = critical_path(jaxpr)
    total = sum(eqn_cost(e).flops for e in jaxpr.eqns)
    if path_flops > 0:
        return float(total / path_flops)
    return len(jaxpr.eqns) / max(len(path), 1)


def independent_branches(closed_jaxpr) -> list[list[int]]:
    """Groups of top-level equations that share no intermediate value.

    Connected components of the dataflow graph (program inputs do not connect: two
    matmuls reading the same ``x`` are independent), largest FLOPs first; each group's
    indices into ``top_level(closed_jaxpr).eqns`` in order. More than one group means
    work XLA could overlap.
    """
    jaxpr = top_level(closed_jaxpr)
    n = len(jaxpr.eqns)
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, ps in enumerate(_dag_preds(jaxpr)):
        for p in ps:
            parent[find(i)] = find(p)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    flops = [eqn_cost(e).flops for e in jaxpr.eqns]
    return sorted(groups.values(), key=lambda g: (-sum(flops[i] for i in g), g[0]))
