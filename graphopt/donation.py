"""Buffer donation: which inputs an output can overwrite, and a fence that lets XLA do it.

``graphopt.optimize(step, donate="auto")`` donates every input leaf whose buffer an
output of the same shape and dtype can take over (parameters, optimizer state, carried
state); ``donate_argnums`` / ``donate_argnames`` donate whole arguments as ``jax.jit``
does. :func:`plan` decides from the optimized jaxpr, pairing outputs with donated inputs
in the order ``jax.jit`` pairs them (per output, the first unused donated input of the
same shape and dtype). An input is refused, with the reason, when it is returned
unchanged, when the same array is also a closed-over constant or passed twice, or when
no output can take its buffer.

On XLA:CPU a donated parameter that a fused backward reads beside its own update is
copied first (XLA cannot prove the read precedes the write); the aliased bytes stay,
the copy costs temp memory (see docs/memory.md).

Reads jaxprs through :mod:`graphopt.ir` only; rewrites nothing.
"""
from __future__ import annotations

import collections
import dataclasses
import numbers

import jax

from . import ir
from .cost import fmt_bytes
from .errors import OptionError
from .interpreter import Stats
from .passes import PassRecord

AUTO = "auto"


def check_option(donate, donate_argnums, donate_argnames, jit: bool, where: str):
    """(donate, argnums tuple, argnames tuple) checked; :class:`OptionError` naming the bad one."""
    if donate not in (None, False, AUTO):
        raise OptionError(f"{where}: donate must be 'auto', None or False, got {donate!r} "
                          "(to donate given arguments use donate_argnums=/donate_argnames=)")
    if isinstance(donate_argnums, numbers.Integral) and not isinstance(donate_argnums, bool):
        donate_argnums = (donate_argnums,)
    if isinstance(donate_argnames, str):
        donate_argnames = (donate_argnames,)
    try:
        nums = tuple(donate_argnums or ())
        names = tuple(donate_argnames or ())
    except TypeError:
        raise OptionError(f"{where}: donate_argnums must be an int or ints and donate_argnames "
                          f"a str or strs, got {donate_argnums!r} / {donate_argnames!r}") from None
    if any(isinstance(i, bool) or not isinstance(i, numbers.Integral) or i < 0 for i in nums):
        raise OptionError(f"{where}: donate_argnums must be non-negative ints, got {nums!r}")
    if any(not isinstance(n, str) for n in names):
        raise OptionError(f"{where}: donate_argnames must be strings, got {names!r}")
    if (donate == AUTO or nums or names) and not jit:
        raise OptionError(f"{where}: donation needs jit=True (only a compiled program can "
                          "reuse an input's buffer)")
    if donate == AUTO and (nums or names):
        raise OptionError(f"{where}: give donate='auto' or donate_argnums/donate_argnames, "
                          "not both")
    return (donate or None), tuple(int(i) for i in nums), names


def argnames(sig, static_argnums, static_argnames, nums, names, fname: str) -> frozenset:
    """donate_argnums / donate_argnames as the argument names graphopt keys arguments by
    (``arg<i>`` for a function without a signature)."""
    where = f"graphopt.optimize({fname})"
    params = list(sig.parameters) if sig is not None else None
    out = set(names)
    for i in nums:
        if params is not None and i >= len(params):
            raise OptionError(f"{where}: donate_argnums {i} is out of range: the function "
                              f"takes {len(params)} argument(s)")
        out.add(params[i] if params is not None else f"arg{i}")
    if params is not None:
        bad = [n for n in names if n not in params]
        if bad:
            raise OptionError(f"{where}: donate_argnames {bad} name no argument of the "
                              f"function (arguments: {', '.join(params)})")
    static = {n for n in out if n in static_argnames or (
        params is not None and params.index(n) in static_argnums)}
    if static:
        raise OptionError(f"{where}: argument(s) {sorted(static)} are both static and "
                          "donated; a static argument has no buffer to donate")
    return frozenset(out)


@dataclasses.dataclass
class Plan:
    """What donation does (or would do) for one input signature.

    ``donated``: flat input indices handed to ``jax.jit(donate_argnums=...)``; ``pairs``:
    flat input -> flat output whose buffer it becomes; ``refused``: flat input -> why
    not; ``labels``: per flat input, where it sits in the call (``params['w']``)."""
    donated: tuple
    pairs: dict
    refused: dict
    labels: list
    nbytes: list

    @property
    def saved_bytes(self) -> int:
        return sum(self.nbytes[i] for i in self.pairs)

    def arguments(self) -> list[str]:
        """The call's arguments (top-level names) that donate at least one leaf."""
        return list(dict.fromkeys(self.labels[i].split("[")[0].split(".")[0]
                                  for i in sorted(self.pairs)))


def _key(aval):
    return (tuple(aval.shape), aval.dtype)


def match(in_avals, out_avals, donated, prefer=None, strict: bool = False) -> dict:
    """input -> output: per output in order, a donated input of the same shape and dtype
    (its ``prefer``-red one, an input it is computed from, when still free; else the first
    free one; ``strict``: only an input it is computed from). Greedy in output order;
    :func:`jit_order` makes ``jax.jit`` pair them so."""
    free: dict = {}
    for i in donated:
        free.setdefault(_key(in_avals[i]), []).append(i)
    pairs = {}
    for j, a in enumerate(out_avals):
        pool = free.get(_key(a))
        if pool:
            want = [i for i in (prefer or {}).get(j, ()) if i in pool]
            if not want and strict:
                continue
            i = want[0] if want else pool[0]
            pool.remove(i)
            pairs[i] = j
    return pairs


def jit_order(n_in: int, n_out: int, pairs: dict) -> tuple[list, list]:
    """(inputs, outputs) reordered so that ``jax.jit``, which pairs each output in order
    with the first free donated input of its shape, pairs them as ``pairs`` says: the
    donated inputs first, by their output, and their outputs first, in that order."""
    don = sorted(pairs, key=pairs.get)
    outs = [pairs[i] for i in don]
    return (don + [i for i in range(n_in) if i not in pairs],
            outs + [j for j in range(n_out) if j not in set(outs)])


def _sources(jaxpr, g) -> dict:
    """Per output, the inputs it is computed from through equations of its own shape
    (the elementwise update chain that replaces a state input), nearest first."""
    ins = {v: i for i, v in enumerate(jaxpr.invars)}
    out = {}
    for j, o in enumerate(jaxpr.outvars):
        if not ir.is_var(o) or o not in g.producer:
            continue
        shape, found, seen, queue = o.aval.shape, [], set(), collections.deque([o])
        while queue:  # breadth first: `params + update` names params before mu and nu
            v = queue.popleft()
            if v in seen:
                continue
            seen.add(v)
            if v in ins:
                found.append(ins[v])
                continue
            k = g.producer.get(v)
            if k is None:
                continue
            queue.extend(a for a in g.eqns[k].invars
                         if ir.is_var(a) and getattr(a.aval, "shape", None) == shape)
        out[j] = found
    return out


def plan(cj: ir.ClosedJaxpr, labels, leaves=(), requested=None) -> Plan:
    """Donation for ``cj``: ``requested`` flat inputs (None: infer, 'auto');
    ``leaves``: the call's concrete inputs, to spot arrays also closed over or passed
    twice (the check is skipped for tracers)."""
    jaxpr = cj.jaxpr
    invars, outvars = jaxpr.invars, jaxpr.outvars
    nbytes = [ir.aval_nbytes(v.aval) for v in invars]
    refused: dict = {}
    returned = {v for v in outvars if ir.is_var(v)}
    consts = {id(c) for c in cj.consts}
    seen: dict = {}
    for i, v in enumerate(invars):
        x = leaves[i] if i < len(leaves) else None
        if v in returned:
            refused[i] = "returned unchanged (the output is the input itself)"
        elif x is not None and not ir.is_tracer(x) and id(x) in consts:
            refused[i] = "the same array is also closed over by the function"
        elif x is not None and not ir.is_tracer(x) and id(x) in seen:
            refused[i] = f"the same array is also passed as {labels[seen[id(x)]]}"
        elif not ir.is_array_aval(v.aval) or nbytes[i] == 0:
            refused[i] = "holds no buffer"
        if x is not None and not ir.is_tracer(x):
            seen.setdefault(id(x), i)
    want = range(len(invars)) if requested is None else sorted(requested)
    ok = [i for i in want if i not in refused]
    # an output that is an input, a literal or a constant owns no fresh buffer to share
    fresh = [v.aval if ir.is_var(v) and v not in set(invars) and v not in
             set(jaxpr.constvars) else _NO_BUFFER for v in outvars]
    # inferred: an output takes only the buffer of an input it is computed from (its
    # replacement), so an unrelated input of the same shape, a data batch, is kept
    pairs = match([v.aval for v in invars], fresh, ok, _sources(jaxpr, ir.Graph(jaxpr)),
                  strict=requested is None)
    for i in ok:
        if i not in pairs:
            refused[i] = ("no output of the same shape and dtype computed from it is left to "
                          "take its buffer" if requested is None else
                          "no output of the same shape and dtype is left to take its buffer")
    donated = tuple(sorted(pairs) if requested is None else
                    [i for i in want if i not in refused or i in pairs])
    return Plan(donated, pairs, {i: r for i, r in refused.items() if i in want}, list(labels),
                nbytes)


class _NoBuffer:
    shape, dtype = (None,), None


_NO_BUFFER = _NoBuffer()


def notes(p: Plan, mode: str) -> list[str]:
    """The report's lines: what was donated (``mode``: 'auto', 'explicit') or, with
    ``mode=None``, what donating would save."""
    out = []
    args = ", ".join(p.arguments())
    if mode is None:
        if p.pairs:
            out.append(f"donate: donating would save {fmt_bytes(p.saved_bytes)} "
                       f"({p.saved_bytes} bytes) of device memory: {len(p.pairs)} input "
                       f"buffer(s) of argument(s) {args} can be reused by the outputs "
                       "that replace them; pass donate='auto'")
        return out
    if not p.pairs:
        out.append("donate: no output can reuse any input's buffer (no output of the same "
                   "shape and dtype replaces an input); nothing donated")
    else:
        out.append(f"donate ({mode}): {len(p.pairs)} input buffer(s) of argument(s) {args} "
                   f"reused by the outputs, {fmt_bytes(p.saved_bytes)} ({p.saved_bytes} "
                   "bytes); the donated arrays are deleted by the call")
    why: dict = {}
    for i, r in sorted(p.refused.items()):
        why.setdefault(r, []).append(p.labels[i])
    for r, labs in why.items():
        shown = ", ".join(labs[:4]) + (f" and {len(labs) - 4} more" if len(labs) > 4 else "")
        out.append(f"donate: not donated: {shown}: {r}")
    return out


# ------------------------------------------------------------------ on an optimize entry

def attach(entry, dynamic, leaves, requested, mode) -> None:
    """Decide what ``entry`` (an optimize cache entry) donates (or, ``mode`` None, what
    donating would save) and say so in its report as a 'donate' record; ``requested``:
    the flat inputs named by donate_argnums/argnames (None: "auto" picks)."""
    labels = [f"{p[0].key}{jax.tree_util.keystr(p[1:])}"
              for p, _ in jax.tree_util.tree_flatten_with_path(dynamic)[0]]
    chosen = plan(entry.optimized, labels, leaves, requested)
    stats = Stats()
    for n in notes(chosen, mode):
        stats.note(n)
    entry.report.records.append(PassRecord("donate", 0, entry.optimized, entry.optimized,
                                           False, stats, 0.0))
    if mode is None or not chosen.pairs:
        return
    entry.plan = chosen
    entry.order = ins, outs = jit_order(len(leaves), len(entry.optimized.out_avals),
                                        chosen.pairs)
    where = {k: n for n, k in enumerate(ins)}
    optimized = entry.optimized

    def run_ordered(*xs):  # jax.jit pairs donated inputs with outputs in order
        res = ir.eval_jaxpr(optimized, *[xs[where[k]] for k in range(len(xs))])
        return [res[j] for j in outs]
    entry.donated = jax.jit(run_ordered, donate_argnums=tuple(range(len(chosen.pairs))))


def may_donate(entry, leaves) -> bool:
    """This call's donated arrays are neither passed twice nor closed over (checked per
    call: the plan was made on the first call's arrays); else it runs undonated."""
    ids = [id(x) for x in leaves]
    seen = collections.Counter(ids)
    consts = {id(c) for c in entry.optimized.consts}
    clash = [entry.plan.labels[k] for k in entry.plan.pairs
             if seen[ids[k]] > 1 or ids[k] in consts]
    if clash:
        note = (f"donate: a call passed {', '.join(clash[:3])} twice or closed over it: "
                "that call ran without donation")
        rec = entry.report.records[-1]
        if rec.name == "donate" and note not in rec.stats.notes:
            rec.stats.note(note)
    return not clash


__all__ = ["argnames", "Plan", "plan", "match", "jit_order", "notes", "check_option", "AUTO",
           "attach", "may_donate"]
