"""JAX internals and the shims that keep graphopt working across JAX releases.

Every ``jax._src`` / ``jax.extend`` name graphopt uses is imported here, each with the
reason, together with the tables and signature checks that differ between JAX 0.10,
0.11 and 0.12: ``Var``'s constructor, jax.checkpoint's primitive name, open vs closed
sub-jaxprs, scan's operand layout, the DCE rule signature, source info and name stacks.
The other ``graphopt.ir`` modules build on these names (``build.bind_eqn`` re-binds an
equation under its own name stack with ``_siu`` from here).
"""
from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Sequence

import jax
from jax.extend import core as _jex
from jax.extend import source_info_util as _siu

# jax._src names without a public home yet: abstract values, JAX's own DCE rules for
# higher-order primitives, and the pytree of literal-able scalar types.
from jax._src import core as _core
from jax._src.interpreters import partial_eval as _pe
from jax._src.interpreters import mlir as _mlir
try:  # scan's operand layout as flat trees (JAX >= 0.11)
    from jax._src import flattree as _flattree
except ImportError:  # pragma: no cover - older JAX keeps num_consts/num_carry
    _flattree = None


Jaxpr = _jex.Jaxpr
ClosedJaxpr = _jex.ClosedJaxpr
Var = _jex.Var
Literal = _jex.Literal
JaxprEqn = _jex.JaxprEqn
Primitive = _jex.Primitive
DropVar = _jex.DropVar
JaxprTypeError = _jex.JaxprTypeError
ShapedArray = jax.core.ShapedArray
Atom = Var | Literal


def _lowered_primitive_names() -> set[str]:
    names = {p.name for p in _mlir._lowerings}
    for table in _mlir._platform_specific_lowerings.values():
        names |= {p.name for p in table}
    return names


def new_var(aval) -> Var:
    """A fresh variable of abstract value ``aval``."""
    try:
        return Var(aval)
    except TypeError:  # older signature Var(suffix, aval)
        return Var("", aval)


def new_eqn(invars, outvars, primitive, params, effects=frozenset(), source_info=None,
            ctx=None) -> JaxprEqn:
    return _jex.new_jaxpr_eqn(list(invars), list(outvars), primitive, dict(params),
                              effects, source_info, ctx)


# jax.checkpoint's primitive: "remat2" in JAX 0.10, renamed "checkpoint" in later releases.
_CHECKPOINT_NAMES = frozenset({"remat2", "checkpoint"})


def is_checkpoint(eqn) -> bool:
    """True for a ``jax.checkpoint`` (remat) call equation."""
    return eqn.primitive.name in _CHECKPOINT_NAMES


def source_line(eqn) -> str:
    """'file.py:LINE (function)' of the user code that produced ``eqn``, or ''."""
    try:
        text = _siu.summarize(eqn.source_info)
    except Exception:  # source info is best-effort in JAX itself
        return ""
    # the file's name, not its path on this machine (reports and notebooks are shared)
    return re.sub(r"[^\s:()]*[/\\]([^/\\\s:()]+\.py)", r"\1", text)


def name_stack(eqn) -> str:
    """The ``jax.named_scope`` / transform path of ``eqn`` as 'a/b/c' ('' at top)."""
    try:
        return str(eqn.source_info.name_stack)
    except Exception:
        return ""


def eqn_with_name_stack(eqn, prefix: str):
    """``eqn`` whose name stack gets ``prefix`` pushed in front (for labelled rewrites)."""
    si = eqn.source_info
    ns = _siu.new_name_stack(prefix) + si.name_stack
    return eqn.replace(source_info=si.replace(name_stack=ns))


# JAX >= 0.11 folds ClosedJaxpr into Jaxpr (consts attached to the jaxpr itself), so
# the type no longer tells an open sub-jaxpr from a closed one: these params hold closed
# ones (consts allowed), every other sub-jaxpr param is taken as open (remat, shard_map).
_UNIFIED_JAXPR = ClosedJaxpr is Jaxpr
_CLOSED_SUBJAXPR_PARAMS = frozenset({
    ("cond", "branches"), ("scan", "jaxpr"), ("while", "body_jaxpr"), ("while", "cond_jaxpr"),
    ("jit", "jaxpr"), ("pjit", "jaxpr"), ("closed_call", "call_jaxpr"),
    ("core_call", "call_jaxpr"), ("custom_jvp_call", "call_jaxpr"),
    ("custom_vjp_call", "call_jaxpr"), ("custom_vjp_call_jaxpr", "fun_jaxpr"),
})


def is_open_subjaxpr(eqn, key: str, sub) -> bool:
    """True if param ``key`` of ``eqn`` holds an open jaxpr (no place for consts)."""
    if not _UNIFIED_JAXPR:
        return not isinstance(sub, ClosedJaxpr)
    return not sub.consts and (eqn.primitive.name, key) not in _CLOSED_SUBJAXPR_PARAMS


def scan_layout(eqn) -> tuple[int, int, int]:
    """(num consts, num carry, num xs) of a ``scan`` equation."""
    if "num_consts" in eqn.params:  # JAX <= 0.10
        nc, nk = eqn.params["num_consts"], eqn.params["num_carry"]
        return nc, nk, len(eqn.invars) - nc - nk
    nc, nk, nx = (len(part) for part in eqn.params["ft_in"].unpack())  # JAX >= 0.11: flat trees
    return nc, nk, nx


def replace_scan(eqn, *, jaxpr: ClosedJaxpr, invars=None, outvars=None, num_consts=None,
                 linear=None):
    """``scan`` equation ``eqn`` with a new body, operands and results; the carries stay.

    Rebuilds the layout parameters of either JAX generation (``num_consts``/``linear``,
    or the ``ft_in``/``ft_out`` flat trees). ``linear``: per operand (old JAX only;
    default all False when the operand count changes)."""
    invars = list(eqn.invars) if invars is None else list(invars)
    outvars = list(eqn.outvars) if outvars is None else list(outvars)
    nc, nk, _ = scan_layout(eqn)
    nc = nc if num_consts is None else num_consts
    params = {**eqn.params, "jaxpr": jaxpr}
    if "num_consts" in eqn.params:
        params["num_consts"] = nc
        if "linear" in params and (linear is not None or len(invars) != len(eqn.invars)):
            params["linear"] = tuple(linear) if linear is not None else (False,) * len(invars)
    else:
        ft = _flattree
        params["ft_in"] = ft.pack((ft.nones(nc), ft.nones(nk), ft.nones(len(invars) - nc - nk)))
        params["ft_out"] = ft.pack((ft.nones(nk), ft.nones(len(outvars) - nk)))
    return eqn.replace(invars=invars, outvars=outvars, params=params)


def check(cj: ClosedJaxpr | Jaxpr) -> None:
    """Type-check a jaxpr (raises :class:`JaxprTypeError`)."""
    _jex.check_jaxpr(cj.jaxpr if isinstance(cj, ClosedJaxpr) else cj)


def eval_jaxpr(cj: ClosedJaxpr, *args):
    """Evaluate a closed jaxpr as an ordinary JAX function (traceable by jit/grad/vmap)."""
    return _core.eval_jaxpr(cj.jaxpr, cj.consts, *args)


def jaxpr_as_fun(cj: ClosedJaxpr) -> Callable:
    return _jex.jaxpr_as_fun(cj)


def _takes_live_ins(rule) -> bool:
    # JAX 0.12 added ``live_ins`` (which Ref inputs are read later) before ``eqn``.
    try:
        return len(inspect.signature(rule).parameters) >= 3
    except (TypeError, ValueError):
        return False


def dce_rule(primitive) -> Callable | None:
    """JAX's own output-pruning rule for a higher-order primitive, if it has one.

    Signature ``rule(used_outputs, eqn) -> (used_inputs, new_eqn | None)`` on every JAX:
    where JAX's rule also takes ``live_ins``, every input is treated as live (graphopt
    never drops a write another equation could read).
    """
    rule = _pe.dce_rules.get(primitive)
    if rule is None or not _takes_live_ins(rule):
        return rule
    return lambda used_outputs, eqn: rule(used_outputs, [True] * len(eqn.invars), eqn)


def dce_jaxpr(jaxpr: Jaxpr, used_outputs: Sequence[bool], instantiate=False):
    """JAX's DCE of one jaxpr (used to prune loop bodies): (new jaxpr, used inputs)."""
    return _pe.dce_jaxpr(jaxpr, list(used_outputs), instantiate=instantiate)
