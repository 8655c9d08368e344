"""Recognise attention in any layout: the softmax, and the scores chain back to q·kᵀ.

Every axis of the scores is named after the q·kᵀ axis it comes from (an *atom*: a batch
axis ``("b", j)``, the query length ``"t"``, extra query axes ``("g", j)`` such as GQA
head groups, the key length ``"s"``) and followed through transposes, reshapes that
merge axes or add/drop size-1 axes, casts, scales, masks and biases. The fused kernel
then lays every operand out by atom, so heads first or last, heads folded into batch,
vmapped groups and reshaped head groups are one case. Atoms of size 1 carry no data and
are dropped wherever they appear.

:func:`softmax_input` finds the softmax; :func:`scores_chain` walks back from it and
raises :class:`Refused` (a reason for the report) once a q·kᵀ dot is reached through an
equation it cannot carry, :class:`NotAttention` when no dot is reached.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from graphopt import ir
from graphopt.patterns import View
from .fuse_xent import _centered, _prod, _reduce, _through, log_softmax_input

FILL_MAX = -1e9  # a where-fill at or below this is a mask (exp underflows to exactly 0)


class NotAttention(Exception):
    """No attention here (nothing to report)."""


class Refused(Exception):
    """Attention recognised, left unfused: ``str(exc)`` says which condition failed."""


def _softmax_call_input(view: View, p, eqns: set):
    """``p`` = a ``custom_jvp_call`` whose body is a softmax (``jax.nn.softmax`` from
    JAX 0.12 on, or with ``jax_softmax_custom_jvp``): (s, axis) or None."""
    e = _prod(view, p, "custom_jvp_call")
    if e is None or len(e.invars) != 1 or len(e.outvars) != 1:
        return None
    inner = View(ir.as_closed(e.params["call_jaxpr"]))
    got = softmax_input(inner, inner.jaxpr.outvars[0], set())
    if got is None or got[0] is not inner.jaxpr.invars[0]:
        return None
    eqns.add(view.producer[p])
    return e.invars[0], got[1]


def softmax_input(view: View, p, eqns: set):
    """If ``p`` is a softmax of s along one axis: (s, axis); equations go into ``eqns``."""
    called = _softmax_call_input(view, p, eqns)
    if called is not None:
        return called
    e = _prod(view, p, "div", "mul", "exp")
    if e is None:
        return None
    local = {view.producer[p]}
    if e.primitive.name == "exp":  # exp(log_softmax(s))
        got = log_softmax_input(view, e.invars[0], local)
        if got is None:
            return None
        eqns |= local
        return got
    num, den = e.invars
    if e.primitive.name == "mul":
        for a, b in ((num, den), (den, num)):
            r = _prod(view, b, "div", "integer_pow")
            if r is None:
                continue
            if r.primitive.name == "div" and view.scalar_value(r.invars[0]) == 1.0:
                num, den = a, r.invars[1]
            elif r.primitive.name == "integer_pow" and r.params["y"] == -1:
                num, den = a, r.invars[0]
            else:
                continue
            local.add(view.producer[b])
            break
        else:
            return None
    ex = _prod(view, num, "exp")
    if ex is None:
        return None
    local.add(view.producer[num])
    red = _reduce(view, den, "reduce_sum", local)
    if red is None or red[0] is not num:
        return None
    s, ax = _centered(view, ex.invars[0], local)
    if ax is not None and ax != red[1]:
        return None
    if ax is None:  # a row maximum computed on another layout of s (vmap moves axes)
        s = _centered_rows(view, s, red[1], local)
    eqns |= local
    return s, red[1]


_MOVES = ("broadcast_in_dim", "reshape", "transpose", "stop_gradient", "convert_element_type")


def _centered_rows(view: View, z, axis: int, eqns: set):
    """``z`` = s - c where c is constant along ``axis`` and is a row maximum of s seen
    through layout changes (softmax is unchanged by any per-row shift): s, else z."""
    e = _prod(view, z, "sub")
    if e is None:
        return z
    s, c = e.invars
    if c.aval.ndim != s.aval.ndim or c.aval.shape[axis] != 1:
        return z
    local = {view.producer[z]}
    x = _through(view, c, _MOVES, local)
    m = _prod(view, x, "max")
    if m is not None:
        k = next((k for k in (0, 1) if view.scalar_value(m.invars[k]) == -np.inf), None)
        if k is None:
            return z
        local.add(view.producer[x])
        x = _through(view, m.invars[1 - k], _MOVES, local)
    red = _prod(view, x, "reduce_max")
    if red is None or len(red.params["axes"]) != 1:
        return z
    local.add(view.producer[x])
    src, y = red.invars[0], s
    for _ in range(8):  # s is src, or src moved by transposes/reshapes
        if y is src:
            eqns |= local
            return s
        ye = view.producer_eqn(y)
        if ye is None or ye.primitive.name not in ("transpose", "reshape", "convert_element_type"):
            return z
        y = ye.invars[0]
    return z


@dataclasses.dataclass
class Chain:
    """The scores chain, forward: q·kᵀ at ``dot``, then ``steps`` in program order.

    A step is ("cast"|"scale"|"transpose"|"reshape"|"mask"|"bias", eqn index, data):
    scale: the factor; transpose: the permutation; reshape: the new shape; mask:
    (pred atom, keep_if_true, fill); bias: the bias atom.
    """
    dot: int
    steps: list


def _only_adds_ones(e) -> bool:
    """A broadcast_in_dim that adds size-1 axes only (a reshape in disguise)."""
    shape, bd = e.outvars[0].aval.shape, e.params["broadcast_dimensions"]
    ins = e.invars[0].aval.shape
    return (list(bd) == sorted(bd) and all(shape[d] == n for d, n in zip(bd, ins))
            and all(shape[d] == 1 for d in range(len(shape)) if d not in bd))


def layout_step(view: View, i: int):
    """Equation ``i`` as a step that only moves axes (or casts), else None."""
    e = view.eqns[i]
    name = e.primitive.name
    if name == "convert_element_type":
        return ("cast", i, None)
    if name == "transpose":
        return ("transpose", i, tuple(e.params["permutation"]))
    if name in ("reshape", "squeeze") or (name == "broadcast_in_dim" and _only_adds_ones(e)):
        if len(e.invars) == 1 or name == "broadcast_in_dim":
            return ("reshape", i, tuple(e.outvars[0].aval.shape))
    return None


def replay(labels: list, step, sizes: dict) -> list:
    """Axis labels after a layout step."""
    kind, _, data = step
    if kind == "transpose":
        return [labels[d] for d in data]
    if kind == "reshape":
        return regroup(labels, data, sizes)
    return labels


def scores_chain(view: View, s, eqns: set) -> Chain:
    """Walk back from the softmax input ``s`` to q·kᵀ (see the module docstring)."""
    dot, steps, found, problem = _walk(view, s, int(np.prod(s.aval.shape)), False, 64)
    if problem:
        raise Refused(problem)
    eqns |= found
    return Chain(dot, steps)


def _walk(view: View, atom, size: int, seen_scale: bool, depth: int):
    """(dot index, steps backward, equations, first problem) from ``atom`` back to q·kᵀ."""
    e = view.producer_eqn(atom)
    if e is None or depth == 0:
        raise NotAttention
    i, name = view.producer[atom], e.primitive.name
    if name == "dot_general":
        return i, [], {i}, None
    options = []   # (next atom, step or None, problem, seen_scale): tried in order
    lay = layout_step(view, i)
    if lay is not None:
        options.append((e.invars[0], lay, None, seen_scale))
    elif name in ("mul", "div"):
        for k in ((0, 1) if name == "mul" else (1,)):
            c, other = view.scalar_value(e.invars[k]), e.invars[1 - k]
            if c is not None and c != 0 and other.aval.shape == atom.aval.shape:
                options.append((other, ("scale", i, c if name == "mul" else 1.0 / c), None, True))
    elif name == "select_n" and len(e.invars) == 3:
        pred, a, b = e.invars
        for keep_true, fill, x in ((True, a, b), (False, b, a)):
            fv = view.scalar_value(fill)
            if fv is not None and x.aval.shape == atom.aval.shape and pred.aval.dtype == np.bool_:
                why = (f"the where-fill {fv:g} is not a large negative number (not a mask)"
                       if fv > FILL_MAX else
                       "a scale follows the mask (it would scale the fill)" if seen_scale else None)
                options.append((x, ("mask", i, (pred, keep_true, fv)), why, seen_scale))
    elif name == "add":
        for k in (0, 1):
            x, bias = e.invars[k], e.invars[1 - k]
            if x.aval.shape == atom.aval.shape:
                why = "a scale follows the bias (it would scale the bias)" if seen_scale else None
                options.append((x, ("bias", i, bias), why, seen_scale))
    if not options:  # an equation the kernel cannot replay: said if a dot lies behind it
        why = f"{name} between q·kᵀ and the softmax"
        options = [(x, None, why, seen_scale) for x in e.invars
                   if ir.is_var(x) and int(np.prod(getattr(x.aval, "shape", ()))) == size]
    for nxt, step, why, scaled in options:
        try:
            dot, steps, found, problem = _walk(view, nxt, size, scaled, depth - 1)
        except NotAttention:
            continue
        if step is not None:
            steps.append(step)
            found.add(i)
        return dot, steps, found, problem or why
    raise NotAttention


# ============================================================================ layouts

def regroup(layout: list, new_shape, sizes: dict) -> list:
    """Axis labels after a reshape to ``new_shape``: merged atoms stay in order, size-1
    axes get (); a reshape that splits an atom raises :class:`Refused`."""
    queue = [a for ax in layout for a in ax if sizes[a] > 1]
    out = []
    for n in new_shape:
        if n == 1:
            out.append(())
            continue
        got, prod = [], 1
        while prod < n and queue:
            a = queue.pop(0)
            got.append(a)
            prod *= sizes[a]
        if prod != n:
            raise Refused("a reshape of the scores splits one of their axes")
        out.append(tuple(got))
    return out


def nonunit(labels, sizes: dict) -> list:
    """The atoms of ``labels`` (axis labels) that carry data, in order."""
    return [a for ax in labels for a in ax if sizes[a] > 1]


def to_layout(xp, x, labels, sizes: dict, want: list, shape):
    """``x`` (axes labelled ``labels``) with its atoms in the order ``want``, reshaped to
    ``shape``; ``xp`` is numpy or jax.numpy."""
    cur = nonunit(labels, sizes)
    x = xp.reshape(x, [sizes[a] for a in cur])
    perm = [cur.index(a) for a in want]
    if perm != sorted(perm):
        x = xp.transpose(x, perm)
    return xp.reshape(x, shape)


def _unbroadcast(view: View, x):
    """(source, broadcast dims) of ``x`` = broadcast_in_dim(source), else (x, identity):
    the kernel takes the small operand and broadcasts it itself."""
    e = view.producer_eqn(x)
    if e is not None and e.primitive.name == "broadcast_in_dim" \
            and list(e.params["broadcast_dimensions"]) == sorted(e.params["broadcast_dimensions"]):
        return e.invars[0], tuple(e.params["broadcast_dimensions"])
    return x, tuple(range(x.aval.ndim))


def mask_terms(view: View, terms, sizes: dict, want: list, bnts):
    """Masks and biases in program order as kernel terms, and the index of the one that
    is a constant causal mask (or None). A term: (kind, atom, labels, broadcast dims,
    (keep_if_true, fill, shape at the term, pred shape, additive)). A constant bias of
    0 / large negative values that leaves every row a key is a mask ("additive"): a masked
    score adds e^-big = 0 to its row's sum either way."""
    causal_at, out = None, []
    T, S = bnts[2:]
    for kind, data, lab, shp in terms:
        if kind == "bias":
            val = view.constant_value(data) if int(np.prod(shp)) <= (1 << 22) else None
            full = None if val is None else np.broadcast_to(val, shp)
            if full is None or not np.issubdtype(full.dtype, np.floating) \
                    or not ((full == 0) | (full <= FILL_MAX)).all() \
                    or not to_layout(np, full == 0, lab, sizes, want, bnts).any(axis=-1).all():
                src, bd = _unbroadcast(view, data)
                out.append(("bias", src, lab, bd, (None, None, shp, data.aval.shape, False)))
                continue
            data = (data, True, float(full.max(initial=FILL_MAX, where=full != 0)))
        pred, keep_true, fill = data
        additive = pred.aval.dtype != np.bool_
        src, bd = _unbroadcast(view, pred)
        val = view.constant_value(src) if int(np.prod(shp)) <= (1 << 22) else None
        if val is not None:
            val = (val == 0) if additive else val
            full = np.broadcast_to(np.reshape(val, [src.aval.shape[bd.index(d)] if d in bd else 1
                                                    for d in range(pred.aval.ndim)]), shp)
            keep = to_layout(np, full if keep_true else ~full, lab, sizes, want, bnts)
            if fill == -np.inf and not keep.any(axis=-1).all():
                raise Refused("a -inf mask fill empties a row (NaN in the original)")
            if causal_at is None and (keep == np.tril(np.ones((T, S), bool))).all():
                causal_at = len(out)
        elif fill == -np.inf:
            raise Refused("a -inf mask fill may empty a row (NaN in the original)")
        out.append(("mask", src, lab, bd, (keep_true, fill, shp, pred.aval.shape, additive)))
    return out, causal_at


def unrepeat(view: View, x, labels: list, atom):
    """``x`` = ``jnp.repeat(x0, G, axis)`` along the axis labelled ``atom`` (GQA heads
    repeated for the dot): (x0, G), else None."""
    r = _prod(view, x, "reshape")
    if r is None or len(r.invars) != 1:
        return None
    b = _prod(view, r.invars[0], "broadcast_in_dim")
    if b is None:
        return None
    a = next((d for d, lab in enumerate(labels) if lab == (atom,)), None)
    x0, shape = b.invars[0], b.outvars[0].aval.shape
    want = tuple(x0.aval.shape[:a + 1]) + (shape[a + 1] if a is not None and a + 1 < len(shape)
                                            else -1,) + tuple(x0.aval.shape[a + 1:])
    if a is None or tuple(b.params["broadcast_dimensions"]) != tuple(
            d for d in range(len(shape)) if d != a + 1) or tuple(shape) != want \
            or x.aval.shape[a] != x0.aval.shape[a] * shape[a + 1]:
        return None
    return x0, shape[a + 1]


def prod(sizes: dict, atoms) -> int:
    return math.prod(sizes[a] for a in atoms)


__all__ = ["FILL_MAX", "NotAttention", "Refused", "softmax_input", "scores_chain", "Chain",
           "regroup", "nonunit", "to_layout", "prod", "mask_terms", "layout_step", "replay",
           "unrepeat"]
