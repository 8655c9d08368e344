"""Atoms, abstract values and equation predicates: what every rewrite asks of one value
or one equation (is it a variable, how many bytes, is it effectful or random)."""
from __future__ import annotations

import math
import re

import numpy as np

import jax

from .compat import DropVar, Literal, ShapedArray, Var


# Primitives whose result depends on hidden RNG state or whose repetition matters even
# without a declared effect: CSE must never merge them, folding must never run them.
RANDOM_PRIMITIVES = frozenset({
    "random_seed", "random_bits", "random_split", "random_fold_in", "random_wrap",
    "random_unwrap", "random_clone", "threefry2x32", "rng_uniform", "rng_bit_generator",
})


def is_literal(atom) -> bool:
    return isinstance(atom, Literal)


def is_var(atom) -> bool:
    t = type(atom)  # the exact-type tests first: this runs millions of times per pipeline
    if t is Var:
        return True
    if t is Literal or t is DropVar:
        return False
    return isinstance(atom, Var) and not isinstance(atom, DropVar)


def is_dropvar(atom) -> bool:
    return isinstance(atom, DropVar)


def literal(value, aval=None) -> Literal:
    """A literal holding ``value`` (a Python or NumPy scalar / small array)."""
    if aval is None:
        arr = np.asarray(value)
        aval = ShapedArray(arr.shape, arr.dtype)
    return Literal(value, aval)


def literal_value(atom):
    """The Python/NumPy value of a literal atom."""
    return atom.val


def aval_of(x) -> ShapedArray:
    """Abstract value of an atom, array or ShapeDtypeStruct."""
    if hasattr(x, "aval"):
        return x.aval
    return ShapedArray(np.shape(x), jax.dtypes.canonicalize_dtype(np.result_type(x)))


def is_tracer(x) -> bool:
    """True for a value being traced by a JAX transformation (not a concrete array)."""
    return isinstance(x, jax.core.Tracer)


def is_array_aval(aval) -> bool:
    return isinstance(aval, ShapedArray)


def aval_nbytes(aval) -> int:
    """Bytes of an array value; 0 for tokens and other non-array values."""
    if not is_array_aval(aval):
        return 0
    return math.prod(aval.shape) * aval.dtype.itemsize  # PRNG key dtypes too


def aval_str(aval) -> str:
    return aval.str_short(short_dtypes=True) if hasattr(aval, "str_short") else str(aval)


def same_aval(a, b) -> bool:
    """Equal shape, dtype and weak type: the interface a rewrite must keep."""
    return (getattr(a, "shape", None) == getattr(b, "shape", None)
            and getattr(a, "dtype", None) == getattr(b, "dtype", None)
            and getattr(a, "weak_type", False) == getattr(b, "weak_type", False))


def prim_name(eqn) -> str:
    return eqn.primitive.name


def effectful(eqn) -> bool:
    """True if the equation has a declared effect (print, callback, state, ordered IO)."""
    return bool(eqn.effects)


def impure(eqn) -> bool:
    """Effectful or random: never duplicated, merged, folded or dropped on a guess."""
    return effectful(eqn) or eqn.primitive.name in RANDOM_PRIMITIVES


_TRANSFORM_RE = re.compile(r"^[^()/]+\((.*)\)$")


def scope_path(ns: str, drop=frozenset()) -> tuple[str, ...]:
    """The ``jax.named_scope`` names of a name stack, AD/vmap wrappers removed.

    'transpose(jvp(block1))/attention' -> ('block1', 'attention'); names in ``drop``
    (scopes JAX pushes itself) are skipped, and a name AD pushes twice in a row
    ('transpose(jvp(b))/jvp(b)' for a rematerialized region) is kept once.
    """
    out: list[str] = []
    for comp in ns.split("/"):
        m = _TRANSFORM_RE.match(comp)
        while m:
            comp = m.group(1)
            m = _TRANSFORM_RE.match(comp)
        if comp and comp not in drop and (not out or out[-1] != comp):
            out.append(comp)
    return tuple(out)
