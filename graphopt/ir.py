"""The one place graphopt touches JAX internals.

Everything else in graphopt (and every pass in ``graphopt.transforms``) reaches
jaxprs, variables, literals and equations through the names defined here, so a JAX
upgrade is this file's problem. Public ``jax.extend.core`` is preferred; the few
``jax._src`` names used are imported in one block below, each with the reason.

Besides the re-exports this module offers a read-only graph view over a jaxpr
(:class:`Graph`: producers, users, topological order, source lines) and the small
structural helpers every rewrite needs (fresh variables, literals, sub-jaxpr walk,
inlining a traced function's equations).
"""
from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Callable, Iterator, Sequence

import numpy as np

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

# Primitives whose result depends on hidden RNG state or whose repetition matters even
# without a declared effect: CSE must never merge them, folding must never run them.
RANDOM_PRIMITIVES = frozenset({
    "random_seed", "random_bits", "random_split", "random_fold_in", "random_wrap",
    "random_unwrap", "random_clone", "threefry2x32", "rng_uniform", "rng_bit_generator",
})



def _lowered_primitive_names() -> set[str]:
    names = {p.name for p in _mlir._lowerings}
    for table in _mlir._platform_specific_lowerings.values():
        names |= {p.name for p in table}
    return names


# Primitives JAX itself defines (snapshot when graphopt is imported). Passes treat any
# other primitive as unknown: passed through untouched and counted in the report.
_KNOWN_PRIMITIVES = _lowered_primitive_names()


def known_primitives() -> set[str]:
    return _KNOWN_PRIMITIVES


def register_known_primitive(name: str) -> None:
    """Declare a user primitive pure: passes may then fold (evaluate) it on constants,
    merge two identical calls, and drop it when its result is unused."""
    _KNOWN_PRIMITIVES.add(name)


# --------------------------------------------------------------------------- atoms

def new_var(aval) -> Var:
    """A fresh variable of abstract value ``aval``."""
    try:
        return Var(aval)
    except TypeError:  # older signature Var(suffix, aval)
        return Var("", aval)


def is_literal(atom) -> bool:
    return isinstance(atom, Literal)


def is_var(atom) -> bool:
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
    return int(np.prod(aval.shape, dtype=np.int64)) * aval.dtype.itemsize  # PRNG key dtypes too


def aval_str(aval) -> str:
    return aval.str_short(short_dtypes=True) if hasattr(aval, "str_short") else str(aval)


def same_aval(a, b) -> bool:
    """Equal shape, dtype and weak type: the interface a rewrite must keep."""
    return (getattr(a, "shape", None) == getattr(b, "shape", None)
            and getattr(a, "dtype", None) == getattr(b, "dtype", None)
            and getattr(a, "weak_type", False) == getattr(b, "weak_type", False))


# ------------------------------------------------------------------------ equations

def new_eqn(invars, outvars, primitive, params, effects=frozenset(), source_info=None,
            ctx=None) -> JaxprEqn:
    return _jex.new_jaxpr_eqn(list(invars), list(outvars), primitive, dict(params),
                              effects, source_info, ctx)


def prim_name(eqn) -> str:
    return eqn.primitive.name


# jax.checkpoint's primitive: "remat2" in JAX 0.10, renamed "checkpoint" in later releases.
_CHECKPOINT_NAMES = frozenset({"remat2", "checkpoint"})


def is_checkpoint(eqn) -> bool:
    """True for a ``jax.checkpoint`` (remat) call equation."""
    return eqn.primitive.name in _CHECKPOINT_NAMES


def effectful(eqn) -> bool:
    """True if the equation has a declared effect (print, callback, state, ordered IO)."""
    return bool(eqn.effects)


def impure(eqn) -> bool:
    """Effectful or random: never duplicated, merged, folded or dropped on a guess."""
    return effectful(eqn) or eqn.primitive.name in RANDOM_PRIMITIVES


def varying_axes(x) -> frozenset:
    """Mesh axes along which ``x`` varies inside ``jax.shard_map`` (empty elsewhere):
    ``manual_axis_type.varying`` in JAX 0.10-0.12, ``vma`` in earlier releases."""
    aval = aval_of(x)
    mat = getattr(aval, "manual_axis_type", None)
    if mat is not None:
        return frozenset(getattr(mat, "varying", ()) or ())
    return frozenset(getattr(aval, "vma", ()) or ())


def per_device_spec(x):
    """A ``jax.ShapeDtypeStruct`` of a value inside ``jax.shard_map`` that keeps the mesh
    axes it varies along, so a trace from it inserts the ``pvary`` JAX's own would; None
    where this JAX cannot say so."""
    aval = aval_of(x)
    try:
        return jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=aval.weak_type,
                                    sharding=aval.sharding,
                                    manual_axis_type=aval.manual_axis_type)
    except (AttributeError, TypeError):
        return None


def pins_placement(eqn) -> bool:
    """True for a call (``jax.jit(..., in_shardings=, out_shardings=, donate_argnums=)``)
    whose params fix where its values live or which inputs it donates: inlining its body
    would drop them, so rewrites keep the call and work inside it."""
    p = eqn.params
    if any(isinstance(s, jax.sharding.Sharding)
           for k in ("in_shardings", "out_shardings") for s in p.get(k, ()) or ()):
        return True
    if any(la is not None for k in ("in_layouts", "out_layouts") for la in p.get(k, ()) or ()):
        return True
    return any(p.get("donated_invars", ()) or ())


def contains_unknown(eqn) -> bool:
    """True if a sub-jaxpr of ``eqn`` (at any depth) holds a primitive graphopt does not know."""
    for _, _, sub in subjaxpr_params(eqn):
        if any(e.primitive.name not in _KNOWN_PRIMITIVES for e, _, _ in walk_eqns(sub)):
            return True
    return False


def removable_if_dead(eqn) -> bool:
    """May ``eqn`` be dropped when nothing reads its results? Never for effects, RNG or
    primitives graphopt does not know (at any depth): those pass through untouched."""
    if impure(eqn) or eqn.primitive.name not in _KNOWN_PRIMITIVES:
        return False
    return not (has_subjaxprs(eqn) and contains_unknown(eqn))


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


def eqn_with_name_stack(eqn, prefix: str):
    """``eqn`` whose name stack gets ``prefix`` pushed in front (for labelled rewrites)."""
    si = eqn.source_info
    ns = _siu.new_name_stack(prefix) + si.name_stack
    return eqn.replace(source_info=si.replace(name_stack=ns))


# ----------------------------------------------------------------------- sub-jaxprs

def _is_jaxpr_like(v) -> bool:
    return isinstance(v, (Jaxpr, ClosedJaxpr))


def subjaxpr_params(eqn) -> Iterator[tuple[str, int | None, Jaxpr | ClosedJaxpr]]:
    """(param name, index in a tuple param or None, sub-jaxpr) of every sub-jaxpr."""
    for key, val in eqn.params.items():
        if _is_jaxpr_like(val):
            yield key, None, val
        elif isinstance(val, (tuple, list)) and val and all(_is_jaxpr_like(v) for v in val):
            for i, v in enumerate(val):
                yield key, i, v


_HAS_SUBJAXPRS: dict = {}


def has_subjaxprs(eqn) -> bool:
    # Whether a primitive carries sub-jaxprs is fixed per primitive: cache it (hot path).
    prim = eqn.primitive
    got = _HAS_SUBJAXPRS.get(prim)
    if got is None:
        got = _HAS_SUBJAXPRS[prim] = next(subjaxpr_params(eqn), None) is not None
    return got


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


def as_closed(j) -> ClosedJaxpr:
    return j if isinstance(j, ClosedJaxpr) else ClosedJaxpr(j, [])


def map_subjaxprs(eqn, fn: Callable[[ClosedJaxpr, bool], ClosedJaxpr]) -> JaxprEqn:
    """``eqn`` with every sub-jaxpr ``j`` replaced by ``fn(closed j, is_open)``.

    ``is_open`` tells ``fn`` that the param holds an open :class:`Jaxpr` (remat,
    shard_map, ...): its result must then have no consts, because the equation has no
    place to feed them.
    """
    new_params = None
    for key, idx, sub in list(subjaxpr_params(eqn)):
        is_open = is_open_subjaxpr(eqn, key, sub)
        out = fn(as_closed(sub), is_open)
        if is_open:
            if out.consts:
                raise ValueError(f"rewrite of open sub-jaxpr {key!r} of {eqn.primitive} "
                                 "introduced constants")
            out = out.jaxpr
        if out is sub:
            continue
        if new_params is None:
            new_params = dict(eqn.params)
        if idx is None:
            new_params[key] = out
        else:
            seq = list(new_params[key])
            seq[idx] = out
            new_params[key] = type(eqn.params[key])(seq)
    if new_params is None:
        return eqn
    return eqn.replace(params=new_params)


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


def dce_same_interface(jaxpr: Jaxpr, keep_impure: bool = True) -> Jaxpr:
    """``jaxpr`` without equations nothing reads, same invars and outvars (effectful and
    random ones stay unless ``keep_impure`` is False: a slice that only recomputes)."""
    need = {v for v in jaxpr.outvars if is_var(v)}
    kept = []
    for e in reversed(jaxpr.eqns):
        if (keep_impure and impure(e)) or any(is_var(v) and v in need for v in e.outvars):
            kept.append(e)
            need.update(a for a in e.invars if is_var(a))
    kept.reverse()
    return make_jaxpr_from(jaxpr, eqns=kept)


def trip_count(eqn) -> float:
    """How often the sub-jaxprs of ``eqn`` run per execution of ``eqn`` (for costs).

    ``scan`` runs ``length`` times; a ``while`` loop's count is unknown statically and
    counts once (the report says so); ``cond`` branches count once each (callers take
    the max over branches).
    """
    if eqn.primitive.name == "scan":
        return float(eqn.params["length"])
    return 1.0


# --------------------------------------------------------------------- jaxpr build

def _fit_debug_info(dbg, n_in: int, n_out: int):
    """Debug info whose arg/result name counts match a jaxpr whose interface changed."""
    if dbg is None:
        return None
    fix = {}
    if dbg.arg_names is not None and len(dbg.arg_names) != n_in:
        fix["arg_names"] = tuple(("",) * n_in)
    rp = dbg.result_paths
    if isinstance(rp, tuple) and len(rp) != n_out:
        fix["result_paths"] = tuple(("",) * n_out)
    return dbg._replace(**fix) if fix else dbg


def eqns_effects(eqns) -> frozenset:
    out = set()
    for e in eqns:
        out |= set(e.effects)
    return frozenset(out)


def make_jaxpr_from(template: Jaxpr, *, constvars=None, invars=None, outvars=None,
                    eqns=None, effects=None) -> Jaxpr:
    """A new :class:`Jaxpr` like ``template`` with the given parts replaced.

    Effects default to the template's, restricted to what the equations still carry
    plus input effects (state refs) the template declared.
    """
    constvars = template.constvars if constvars is None else constvars
    invars = template.invars if invars is None else invars
    outvars = template.outvars if outvars is None else outvars
    eqns = template.eqns if eqns is None else eqns
    if effects is None:
        kept = eqns_effects(eqns)
        effects = frozenset(e for e in template.effects
                            if e in kept or type(e).__name__ == "JaxprInputEffect") | kept
    dbg = _fit_debug_info(template.debug_info, len(invars), len(outvars))
    return Jaxpr(list(constvars), list(invars), list(outvars), list(eqns), effects, dbg)


def closed(jaxpr: Jaxpr, consts: Sequence = ()) -> ClosedJaxpr:
    return ClosedJaxpr(jaxpr, [canonical_const(c) for c in consts])


def canonical_const(c):
    """A constant as JAX's tracers accept it: a jax.Array, not a NumPy array (a pass
    folding on NumPy values would otherwise break a later trace of the program, e.g.
    differentiating it again)."""
    if isinstance(c, (np.ndarray, np.generic)):
        with jax.ensure_compile_time_eval():  # a concrete array even under an outer trace
            return jax.numpy.asarray(c)
    return c


def check(cj: ClosedJaxpr | Jaxpr) -> None:
    """Type-check a jaxpr (raises :class:`JaxprTypeError`)."""
    _jex.check_jaxpr(cj.jaxpr if isinstance(cj, ClosedJaxpr) else cj)


def eval_jaxpr(cj: ClosedJaxpr, *args):
    """Evaluate a closed jaxpr as an ordinary JAX function (traceable by jit/grad/vmap)."""
    return _core.eval_jaxpr(cj.jaxpr, cj.consts, *args)


def bind_eqn(eqn, vals: Sequence, **param_updates) -> list:
    """Run one equation on ``vals`` (arrays or tracers, one per invar, literals included)
    with some params replaced: re-running a first-order equation at another shape
    (a micro-batch) needs its shape params changed. Returns one value per outvar."""
    if has_subjaxprs(eqn) and param_updates:
        raise ValueError(f"bind_eqn: cannot change params of {eqn.primitive} "
                         "(it carries sub-jaxprs)")
    # what jax.core.eval_jaxpr does per equation (JAX 0.10 to 0.12), the equation's
    # name stack and source line restored so a re-bound backward stays 'transpose(...)'
    params = eqn.primitive.get_bind_params({**eqn.params, **param_updates})
    si = eqn.source_info
    with (_siu.user_context(si.traceback, name_stack=_siu.current_name_stack() + si.name_stack),
          eqn.ctx.manager):
        out = eqn.primitive.bind(*vals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


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


# ------------------------------------------------------------------------- tracing

def trace_flat(fn: Callable, avals: Sequence) -> ClosedJaxpr:
    """Trace ``fn(*flat_args)`` on abstract values into a closed jaxpr."""
    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=getattr(a, "weak_type", False))
             for a in avals]
    return jax.make_jaxpr(fn)(*specs)


@dataclasses.dataclass
class Inlined:
    """Equations of a traced helper, wired to caller atoms."""
    eqns: list
    outs: list
    consts: list  # (constvar, value) pairs the caller must provide


def copy_eqns(inner: Jaxpr, in_atoms: Sequence, const_atoms: Sequence = ()) -> tuple[list, list]:
    """The equations of ``inner`` with fresh variables, wired to the given atoms.

    Fresh variables matter: JAX caches traces, so one traced body inlined twice would
    otherwise define the same variables twice. Returns (equations, output atoms).
    """
    sub = dict(zip(inner.constvars, const_atoms))
    sub.update(zip(inner.invars, in_atoms))
    out = []
    for e in inner.eqns:
        ins = [sub.get(v, v) if is_var(v) else v for v in e.invars]
        outs = []
        for v in e.outvars:
            nv = new_var(v.aval)
            if not is_dropvar(v):
                sub[v] = nv
            outs.append(nv)
        out.append(e.replace(invars=ins, outvars=outs))
    return out, [sub.get(v, v) if is_var(v) else v for v in inner.outvars]


def inline(fn: Callable, in_atoms: Sequence) -> Inlined:
    """Trace ``fn`` on the avals of ``in_atoms``; its equations (fresh variables) wired to
    them. Array constants it captured come back in ``consts`` under new constvars."""
    cj = trace_flat(fn, [a.aval for a in in_atoms])
    cvs = [new_var(v.aval) for v in cj.jaxpr.constvars]
    eqns, outs = copy_eqns(cj.jaxpr, list(in_atoms), cvs)
    return Inlined(eqns, outs, list(zip(cvs, cj.consts)))


# ----------------------------------------------------------------------- graph view

class Graph:
    """Read-only dataflow view over one (not nested) jaxpr.

    ``producer[v]`` is the index of the equation defining ``v`` (absent for inputs and
    constants); ``users[v]`` the indices of equations reading ``v``; outputs read by
    the jaxpr's result are in ``outputs``. Equations are already in a topological
    order (jaxprs are SSA, each variable defined before use), so ``order`` is simply
    ``range(len(eqns))``.
    """

    def __init__(self, jaxpr: Jaxpr | ClosedJaxpr):
        self.jaxpr = jaxpr.jaxpr if isinstance(jaxpr, ClosedJaxpr) else jaxpr
        self.eqns = self.jaxpr.eqns
        self.producer: dict[Var, int] = {}
        self.users: dict[Var, list[int]] = {}
        for i, e in enumerate(self.eqns):
            for v in e.invars:
                if is_var(v):
                    self.users.setdefault(v, []).append(i)
            for v in e.outvars:
                if is_var(v):
                    self.producer[v] = i
        self.outputs = {v for v in self.jaxpr.outvars if is_var(v)}

    @property
    def order(self) -> range:
        return range(len(self.eqns))

    def n_uses(self, v) -> int:
        return len(self.users.get(v, ())) + (1 if v in self.outputs else 0)

    def producer_eqn(self, atom):
        i = self.producer.get(atom) if is_var(atom) else None
        return None if i is None else self.eqns[i]

    def user_eqns(self, v) -> list:
        return [self.eqns[i] for i in self.users.get(v, ())]

    def source_line(self, i: int) -> str:
        return source_line(self.eqns[i])


def walk_eqns(jaxpr: Jaxpr | ClosedJaxpr, weight: float = 1.0, depth: int = 0
              ) -> Iterator[tuple[JaxprEqn, float, int]]:
    """Every equation, nested ones included, with its trip-count weight and depth."""
    jaxpr = jaxpr.jaxpr if isinstance(jaxpr, ClosedJaxpr) else jaxpr
    for e in jaxpr.eqns:
        yield e, weight, depth
        w = weight * trip_count(e)
        for _, _, sub in subjaxpr_params(e):
            yield from walk_eqns(sub, w, depth + 1)


def count_eqns(jaxpr, nested: bool = True) -> int:
    """Number of equations, nested sub-jaxprs included when ``nested``."""
    if not nested:
        return len((jaxpr.jaxpr if isinstance(jaxpr, ClosedJaxpr) else jaxpr).eqns)
    return sum(1 for _ in walk_eqns(jaxpr))


def primitive_counts(jaxpr) -> dict[str, int]:
    """How often each primitive occurs, nested equations included."""
    out: dict[str, int] = {}
    for e, _, _ in walk_eqns(jaxpr):
        out[e.primitive.name] = out.get(e.primitive.name, 0) + 1
    return out


__all__ = [n for n in dir() if not n.startswith("_")]
