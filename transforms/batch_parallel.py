"""Batching of repeated independent branches: k copies of one computation become one.

``batch_parallel`` rewrites what :func:`graphopt.parallelism.find_packs` finds: k
equations with the same primitive, params and types at the same dataflow depth (an
ensemble written as a Python loop, attention heads or experts written as a loop) become
one ``jax.vmap``-ed equation over their stacked operands, the way ``vmap`` would
batch the loop body: a dot_general gains a batch dimension, elementwise ops run on the
stacked arrays. Operands the lanes share stay unbatched; results flow stacked from pack
to pack, are sliced where a pack reads a contiguous range of another's lanes, and are
split back only where something outside the packs reads them.

Identity: ``[f(x_1), ..., f(x_k)] == unstack(vmap(f)(stack(x_1..x_k)))``. Outputs and
gradients equal the original up to float32 rounding (a batched dot may sum in another
order). Works on a model (pre-AD, ``jax.grad`` outside: the batched forward is what JAX
differentiates) and on a whole training step (post-AD, forward and backward packs).

When it fires: ``batch_parallel="auto"`` (the default pipeline) batches only where the
per-platform cost model (:mod:`.batch_parallel_rules`) expects it to pay: on a GPU each
small kernel pays a launch that batching saves k-1 times; on CPU XLA runs small ops back
to back and its batched dots are slower, so it mostly declines. ``"force"`` batches
regardless; ``False`` switches it off.

Must not: batch effectful, random or unknown primitives, collectives, sharding
constraints, shard_map bodies, loops and conds (a batched predicate runs every branch),
or custom_vjp calls (their rules cannot be compared across lanes). Those stay as written
and the report says which and why. custom_jvp calls with equal bodies are batched with a
derivative that runs each lane's own rule on its slice. Sub-jaxprs (jit, scan,
cond branches, custom_jvp bodies, ...) are batched inside; shard_map bodies are not
entered.
"""
from __future__ import annotations

import collections
import heapq

import jax
import jax.numpy as jnp
from jax import lax

from graphopt import ir
from graphopt.interpreter import Stats
from graphopt.options import register_option
from graphopt.parallelism import MARK, components, dag_depths, find_packs, same_atom
from graphopt.passes import Pass, PassContext, PassResult, register_pass

from . import batch_parallel_rules as rules

_MODES = ("auto", "force", False)
# Sub-jaxprs the pass does not enter: per-device bodies, whose values carry per-device
# types that a retraced batched equation would not.
_NO_RECURSE = frozenset({"shard_map"})


def _mode(v):
    if v is True:
        return "force"
    if v == "never":
        return False
    if any(v is m if isinstance(m, bool) else (not isinstance(v, bool) and v == m) for m in _MODES):
        return v
    raise ValueError(f"must be 'auto', 'force' (or True) or False, got {v!r}")


register_option("batch_parallel", "batch_parallel", _mode,
                "'auto' (batch repeated branches where the platform's cost model says it "
                "pays), 'force' or False", adds_pass="batch_parallel")


# ------------------------------------------------------------------------ planning

def _plan_operand(eqns, members, j, where, packs, g):
    """How operand ``j`` of a pack reaches the batched equation: ('shared', atom),
    ('stacked', pack, out), ('slice', pack, out, lo, hi) or ('stack', atoms)."""
    atoms = [eqns[i].invars[j] for i in members]
    a0 = atoms[0]
    if all(same_atom(a, a0) for a in atoms):
        return ("shared", a0)
    srcs = [where.get(g.producer.get(a)) if ir.is_var(a) else None for a in atoms]
    if all(s is not None for s in srcs) and len({s[0] for s in srcs}) == 1:
        q = srcs[0][0]
        outs = {eqns[packs[q].members[s[1]]].outvars.index(a) for s, a in zip(srcs, atoms)}
        lanes = [s[1] for s in srcs]
        if len(outs) == 1 and lanes == list(range(lanes[0], lanes[0] + len(lanes))):
            r = outs.pop()
            if len(lanes) == len(packs[q].members):
                return ("stacked", q, r)
            return ("slice", q, r, lanes[0], lanes[-1] + 1)
    return ("stack", atoms)


def _bytes(a) -> int:
    return ir.aval_nbytes(a.aval)


def _vmapped(eqn, axes):
    return lambda *ops: jax.vmap(lambda *a: ir.bind_eqn(eqn, a), in_axes=axes, out_axes=0)(*ops)


def _custom_jvp_batched(members, axes):
    """k custom_jvp calls with equal bodies: the body batched, and a derivative that runs
    each lane's own rule on its slice (the rules themselves cannot be compared)."""
    prim = _vmapped(members[0], axes)
    f = jax.custom_jvp(prim)

    def rule(primals, tangents):
        lanes = []
        for lane, e in enumerate(members):
            ops = [p if ax is None else p[lane] for p, ax in zip(primals, axes)]
            ts = [t if ax is None else t[lane] for t, ax in zip(tangents, axes)]
            lanes.append(jax.jvp(lambda *a, e=e: ir.bind_eqn(e, a), ops, ts)[1])
        return prim(*primals), [jnp.stack([t[r] for t in lanes]) for r in range(len(lanes[0]))]
    f.defjvp(rule)
    return f


def _build_fn(eqn, plans, k, n_unstack, members=None):
    """Traceable fn(flat operands) -> stacked outputs + requested unstacked pieces;
    ``members``: every lane's equation, for custom_jvp calls (their rules may differ)."""
    def fn(*flat):
        with jax.named_scope(MARK):
            ops, axes, it = [], [], iter(flat)
            for pl in plans:
                kind = pl[0]
                if kind == "shared":
                    ops.append(next(it))
                    axes.append(None)
                elif kind == "stacked":
                    ops.append(next(it))
                    axes.append(0)
                elif kind == "slice":
                    ops.append(lax.slice_in_dim(next(it), pl[3], pl[4], axis=0))
                    axes.append(0)
                else:
                    ops.append(jnp.stack([next(it) for _ in range(k)]))
                    axes.append(0)
            if eqn.primitive.name == "custom_jvp_call":
                outs = _custom_jvp_batched(members, axes)(*ops)
            else:
                outs = _vmapped(eqn, axes)(*ops)
            pieces = [lax.index_in_dim(outs[r], lane, 0, keepdims=False) for r, lane in n_unstack]
            return list(outs) + pieces
    return fn


# ------------------------------------------------------------------------ one level

def _batch_level(cj, ctx: PassContext, stats: Stats, mode) -> ir.ClosedJaxpr:
    jaxpr = cj.jaxpr
    eqns = jaxpr.eqns
    candidates = find_packs(jaxpr)
    packs, refused = [], collections.Counter()
    for p in candidates:
        why = rules.refusal(eqns[p.members[0]])
        if why is None and any(getattr(eqns[i].invars[j].aval, "weak_type", False)
                               for i in p.members for j in range(len(eqns[i].invars))
                               if not ir.is_literal(eqns[i].invars[j])):
            why = "weakly typed operands"
        if why is None:
            packs.append(p)
        else:
            refused[(eqns[p.members[0]].primitive.name, why)] += len(p.members)
    for (prim, why), n in sorted(refused.items()):
        stats.note(f"batch_parallel: {n} {prim} equations in repeated branches left as "
                   f"written: {why}")
        if why.startswith("unknown"):
            stats.unknown[prim] += n
    if not packs:
        return cj
    g = ir.Graph(jaxpr)
    plat = rules.platform(ctx.platform)
    # Keep the packs that pay; dropping one changes its neighbours' copies: repeat.
    first = None
    for _ in range(8):
        where, plans, unstack = _plan(eqns, packs, g)
        times = [rules.pack_times(eqns[pk.members[0]], len(pk.members), *_copies(
            eqns, pk, plans[p], unstack.get(p, ())), plat) for p, pk in enumerate(packs)]
        first = first or (sum(b for b, _ in times), sum(a for _, a in times))
        if mode == "force":
            break
        keep = _paying(packs, plans, times)
        if len(keep) == len(packs) or not keep:
            packs = keep
            break
        packs = keep
    else:  # still shrinking after 8 rounds: plan what is left once more
        where, plans, unstack = _plan(eqns, packs, g)
        times = [rules.pack_times(eqns[pk.members[0]], len(pk.members), *_copies(
            eqns, pk, plans[p], unstack.get(p, ())), plat) for p, pk in enumerate(packs)]
    before = sum(b for b, _ in times) if packs else first[0]
    after = sum(a for _, a in times) if packs else first[1]
    n_eq = sum(len(pk.members) for pk in packs)
    found = {"packs": len(packs), "eqns": n_eq, "ways": sorted({len(pk.members) for pk in packs}),
             "est_us_as_written": round(before * 1e6, 2), "est_us_batched": round(after * 1e6, 2),
             "platform": ctx.platform}
    if mode != "force" and (not packs or after > 0.95 * before):
        n_all = sum(len(p.members) for p in candidates)
        stats.note(f"batch_parallel: {n_all} equations in repeated branches could be batched, "
                   f"but on {ctx.platform} the cost model expects no gain "
                   f"({found['est_us_batched']} us batched vs {found['est_us_as_written']} us "
                   f"as written); batch_parallel='force' applies it")
        stats.details.setdefault("declined", []).append(found)
        return cj
    out = _emit(cj, packs, plans, unstack, where)
    if out is None:
        stats.note("batch_parallel: a batched result's type differed from the original "
                   "(weak type), or the packs could not be ordered; left as written")
        return cj
    stats.details.setdefault("batched", []).append(found)
    stats.hit("batch_parallel.pack", len(packs))
    stats.hit("batch_parallel.eqns_batched", n_eq)
    return out


def _paying(packs, plans, times) -> list:
    """The packs of the regions (packs feeding each other stacked) that pay as a whole:
    an elementwise pack saves nothing alone but spares its neighbours' copies."""
    region = components(len(packs), [(p, op[1]) for p, pl in enumerate(plans) for op in pl
                                     if op[0] in ("stacked", "slice")])
    gain = collections.Counter()
    for p, (b, a) in enumerate(times):
        gain[region[p]] += b - a
    return [pk for p, pk in enumerate(packs) if gain[region[p]] >= 0]


def _plan(eqns, packs, g):
    """(eqn -> (pack, lane), per pack its operand plans, per pack the (out, lane) results
    read outside the packs or restacked, which must be split back out)."""
    where = {i: (p, lane) for p, pk in enumerate(packs) for lane, i in enumerate(pk.members)}
    plans = [[_plan_operand(eqns, pk.members, j, where, packs, g)
              for j in range(len(eqns[pk.members[0]].invars))] for pk in packs]
    unstack: dict[int, list[tuple[int, int]]] = collections.defaultdict(list)
    restacked = {id(a) for pl in plans for op in pl if op[0] in ("stack", "shared")
                 for a in (op[1] if op[0] == "stack" else [op[1]])}
    for p, pk in enumerate(packs):
        for lane, i in enumerate(pk.members):
            for r, v in enumerate(eqns[i].outvars):
                if ir.is_var(v) and (v in g.outputs or id(v) in restacked
                                     or any(u not in where for u in g.users.get(v, ()))):
                    unstack[p].append((r, lane))
    return where, plans, unstack


def _copies(eqns, pk, plans, unstack) -> tuple[int, int]:
    """(bytes, ops) the pack's batching copies: stacked operands and split-out results."""
    stacks = [op for op in plans if op[0] == "stack"]
    n = sum(_bytes(a) for op in stacks for a in op[1])
    n += sum(_bytes(eqns[pk.members[lane]].outvars[r]) for r, lane in unstack)
    return n, len(stacks) + len(unstack)


def _emit(cj, packs, plans, unstack, where):
    jaxpr = cj.jaxpr
    eqns = jaxpr.eqns
    _, preds = dag_depths(jaxpr)
    node = {i: ("p", p) for i, (p, _) in where.items()}
    nodes: dict = {}
    for i in range(len(eqns)):
        nodes.setdefault(node.get(i, ("e", i)), []).append(i)
    npreds = {n: {node.get(q, ("e", q)) for i in ms for q in preds[i]} - {n} for n, ms in nodes.items()}
    succs = collections.defaultdict(set)
    for n, ps in npreds.items():
        for q in ps:
            succs[q].add(n)
    left = {n: len(ps) for n, ps in npreds.items()}
    heap = [(min(ms), n) for n, ms in nodes.items() if not left[n]]
    heapq.heapify(heap)
    env, stacked, new_eqns = {}, {}, []
    constvars, consts = list(jaxpr.constvars), list(cj.consts)

    def look(a):
        return env.get(a, a) if ir.is_var(a) else a
    done = 0
    while heap:
        _, n = heapq.heappop(heap)
        done += 1
        if n[0] == "e":
            e = eqns[n[1]]
            ins = [look(a) for a in e.invars]
            new_eqns.append(e.replace(invars=ins) if any(x is not y for x, y in zip(ins, e.invars)) else e)
        else:
            p = n[1]
            pk, pl = packs[p], plans[p]
            flat = []
            for op in pl:
                if op[0] == "shared":
                    flat.append(look(op[1]))
                elif op[0] in ("stacked", "slice"):
                    flat.append(stacked[(op[1], op[2])])
                else:
                    flat += [look(a) for a in op[1]]
            e0 = eqns[pk.members[0]]
            want = unstack.get(p, [])
            inl = ir.inline(_build_fn(e0, pl, len(pk.members), want,
                                      [eqns[i] for i in pk.members]), flat)
            new_eqns += inl.eqns
            for cv, val in inl.consts:
                constvars.append(cv)
                consts.append(val)
            nout = len(e0.outvars)
            for r in range(nout):
                stacked[(p, r)] = inl.outs[r]
            for (r, lane), atom in zip(want, inl.outs[nout:]):
                v = eqns[pk.members[lane]].outvars[r]
                if not ir.same_aval(v.aval, atom.aval):
                    return None
                env[v] = atom
        for s in succs.get(n, ()):
            left[s] -= 1
            if not left[s]:
                heapq.heappush(heap, (min(nodes[s]), s))
    if done != len(nodes):  # a cycle between packs: cannot happen at equal depths, but never drop
        return None
    new = ir.make_jaxpr_from(jaxpr, constvars=constvars, eqns=new_eqns,
                             outvars=[look(v) for v in jaxpr.outvars])
    return ir.closed(new, consts)


# ------------------------------------------------------------------------ recursion

def _rewrite(cj, ctx, stats, mode):
    eqns, changed = [], False
    for e in cj.jaxpr.eqns:
        if ir.has_subjaxprs(e) and e.primitive.name not in _NO_RECURSE:
            def sub(c, is_open):
                out = _rewrite(c, ctx, stats, mode)
                return c if (is_open and out.consts) else out
            ne = ir.map_subjaxprs(e, sub)
            changed |= ne is not e
            eqns.append(ne)
        else:
            eqns.append(e)
    if changed:
        cj = ir.closed(ir.make_jaxpr_from(cj.jaxpr, eqns=eqns), cj.consts)
    return _batch_level(cj, ctx, stats, mode)


def batch_parallel(cj: ir.ClosedJaxpr, ctx: PassContext | None = None) -> PassResult:
    """Batch repeated independent branches (see the module docstring)."""
    ctx = ctx if ctx is not None else PassContext()
    stats = Stats()
    mode = ctx.option("batch_parallel", "auto")
    if mode is False:
        stats.note("batch_parallel: switched off by option batch_parallel=False")
        return PassResult(cj, False, stats)
    out = _rewrite(cj, ctx, stats, mode)
    return PassResult(out, out is not cj, stats)


batch_parallel_pass = register_pass(Pass(
    "batch_parallel", batch_parallel,
    "repeated independent branches (ensembles, heads or experts as loops) -> one batched "
    "computation, where the platform's cost model says it pays", "parallel"))

__all__ = ["batch_parallel", "batch_parallel_pass"]
