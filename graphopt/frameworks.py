"""Arguments as flax NNX and equinox users pass them.

``graphopt.optimize`` traces a pure function of arrays. Framework objects are turned into
one around the call and back afterwards, the way ``nnx.jit`` and ``eqx.filter_jit`` do:

- flax NNX objects (``nnx.Module``, ``nnx.Optimizer``, ``nnx.Rngs``, metrics, Variables)
  are split together (``nnx.split``, so shared references survive) into a static graph
  definition and their state arrays; inside the trace they are merged into fresh objects,
  the user's function mutates those, and their new state is returned as extra outputs and
  written back to the caller's objects with ``nnx.update``. A change that cannot be carried
  back (new attributes or Variables, changed static attributes) is an error.
- equinox modules are partitioned with ``eqx.is_array``: array leaves are traced, every
  other leaf (activation functions, Python numbers) is static and part of the cache key,
  so it must be hashable. Modules in the outputs come back whole.

Neither flax nor equinox is imported here: a framework's objects can only reach us if the
user already imported it, so ``sys.modules`` tells whether to look.
"""
from __future__ import annotations

import sys

import jax

from .errors import GraphoptError

_tu = jax.tree_util


def _nnx():
    return sys.modules.get("flax.nnx")


def _eqx():
    return sys.modules.get("equinox")


def active() -> bool:
    """Whether a supported framework is loaded (else there is nothing to convert)."""
    return _nnx() is not None or _eqx() is not None


def _is_nnx(x) -> bool:
    nnx = _nnx()
    if nnx is None:
        return False
    base = getattr(nnx, "Pytree", None) or getattr(nnx, "Object")  # Object before flax 0.11
    return isinstance(x, (base, nnx.Variable))


def _is_eqx(x) -> bool:
    eqx = _eqx()
    return eqx is not None and isinstance(x, eqx.Module)


def _is_framework(x) -> bool:
    return _is_nnx(x) or _is_eqx(x)


def _stop(x) -> bool:
    """Where flattening stops: framework objects and our own slots (already converted)."""
    return _is_slot(x) or _is_framework(x)


# ---------------------------------------------------------------------- slots
@_tu.register_pytree_node_class
class NnxSlot:
    """Stands for the call's nnx object number ``index``: its state arrays are the children,
    the graph definition rides in the treedef (and so in jax.jit's and graphopt's cache key)."""

    def __init__(self, state, graphdef, index: int):
        self.state, self.graphdef, self.index = state, graphdef, index

    def tree_flatten(self):
        return (self.state,), (self.graphdef, self.index)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children[0], *aux)


@_tu.register_pytree_node_class
class NnxRef:
    """An output that is the call's nnx input object number ``index`` (returned as is)."""

    def __init__(self, index: int):
        self.index = index

    def tree_flatten(self):
        return (), self.index

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(aux)


class _Static:
    """An equinox module's non-array part, hashed and compared leaf by leaf (as static
    arguments are by jax.jit); Nones mark where the arrays go."""

    def __init__(self, module, where: str, key: bool = True):
        leaves, self.treedef = _tu.tree_flatten(module)
        self.module, self.leaves, self._hash = module, tuple(leaves), None
        if not key:  # an output's static part is only carried, never looked up
            return
        for path, leaf in _tu.tree_flatten_with_path(module)[0]:
            try:
                hash(leaf)
            except TypeError:
                raise TypeError(
                    f"{where}{_tu.keystr(path)} is a {type(leaf).__name__}: not an array, so it "
                    "is static (as under eqx.filter_jit), but it is not hashable and cannot be "
                    "part of the cache key; make it hashable (e.g. a frozen dataclass) or an "
                    "array") from None
        try:
            self._hash = hash((self.treedef, self.leaves))
        except TypeError as exc:  # a static field's value (in the treedef) is not hashable
            raise TypeError(f"{where}: its static part cannot be hashed for the cache key "
                            f"({exc}); make its static fields hashable") from None

    def __hash__(self):
        return self._hash if self._hash is not None else id(self)

    def __eq__(self, other):
        if not isinstance(other, _Static) or self.treedef != other.treedef:
            return False
        try:
            # the type too: 1, 1.0 and True compare equal but may trace differently
            return all(a is b or (type(a) is type(b) and bool(a == b))
                       for a, b in zip(self.leaves, other.leaves))
        except Exception:  # an __eq__ that is not a truth value: fall back to identity
            return all(a is b for a, b in zip(self.leaves, other.leaves))


@_tu.register_pytree_node_class
class EqxSlot:
    """An equinox module split by ``eqx.is_array``: the array part traced, the rest static."""

    def __init__(self, arrays, static: _Static):
        self.arrays, self.static = arrays, static

    @classmethod
    def of(cls, module, where: str, key: bool = True) -> "EqxSlot":
        eqx = _eqx()
        arrays, static = eqx.partition(module, eqx.is_array)
        return cls(arrays, _Static(static, where, key))

    def module(self):
        return _eqx().combine(self.arrays, self.static.module)

    def tree_flatten(self):
        return (self.arrays,), self.static

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children[0], aux)


def _is_slot(x) -> bool:
    return isinstance(x, (NnxSlot, NnxRef, EqxSlot))


# ---------------------------------------------------------------------- before the call
class Prepared:
    """The call's arguments with framework objects replaced by slots, and what to do
    with the result (write nnx state back, rebuild returned modules)."""

    def __init__(self, dynamic: dict, nodes: tuple):
        self.dynamic, self.nodes = dynamic, nodes

    def finish(self, result):
        """Outside the trace: write the new nnx state back, rebuild returned objects."""
        if self.nodes:
            result, state = result
            _nnx().update(self.nodes, state)
        return unwrap_outputs(result, self.nodes)


def prepare(dynamic: dict, name: str) -> Prepared | None:
    """``dynamic`` ({argument name: value}) with nnx objects and equinox modules as slots;
    None when it holds none (the common case costs one flatten)."""
    if not active():
        return None
    found, tdef = _tu.tree_flatten_with_path(dynamic, is_leaf=_stop)
    if not any(_is_framework(leaf) for _, leaf in found):
        return None
    nodes = tuple(leaf for _, leaf in found if _is_nnx(leaf))
    parts: dict = {}
    if nodes:
        graphdef, state = _nnx().split(nodes)  # together, so shared objects stay shared
        parts = dict(state)
    new, k = [], 0
    for path, leaf in found:
        if _is_nnx(leaf):
            # a node reachable only through an earlier one has no state of its own
            new.append(NnxSlot(parts.get(k), graphdef, k))
            k += 1
        elif _is_eqx(leaf):
            new.append(EqxSlot.of(leaf, f"graphopt.optimize({name}): argument "
                                  f"{_tu.keystr(path)}"))
        else:
            new.append(leaf)
    return Prepared(_tu.tree_unflatten(tdef, new), nodes)


# ---------------------------------------------------------------------- inside the trace
def call(fun, args, kwargs, name: str):
    """Trace-time call of ``fun``: slots become framework objects again; with nnx
    arguments the result is ``(out, new state of the nnx objects)``."""
    if not active():
        return fun(*args, **kwargs)
    leaves, tdef = _tu.tree_flatten((args, kwargs), is_leaf=_is_slot)
    slots = [x for x in leaves if isinstance(x, NnxSlot)]
    nodes: tuple = ()
    if slots:
        nnx = _nnx()
        graphdef = slots[0].graphdef
        nodes = nnx.merge(graphdef, nnx.State({s.index: s.state for s in slots
                                               if s.state is not None}))
    leaves = [nodes[x.index] if isinstance(x, NnxSlot) else
              x.module() if isinstance(x, EqxSlot) else x for x in leaves]
    args, kwargs = _tu.tree_unflatten(tdef, leaves)
    out = _wrap_outputs(fun(*args, **kwargs), nodes, name)
    if not slots:
        return out
    new_graphdef, new_state = _nnx().split(nodes)
    if new_graphdef != graphdef:
        raise GraphoptError(
            f"graphopt.optimize({name}): the function changed the structure of its flax NNX "
            "arguments (added or removed attributes or Variables, changed a non-Variable "
            "attribute or Variable metadata); only Variable values can be carried back to the "
            "caller's objects. Keep such changes out of the optimized function")
    return out, new_state


def _wrap_outputs(out, nodes: tuple, name: str):
    if not active():
        return out
    found, tdef = _tu.tree_flatten_with_path(out, is_leaf=_is_framework)
    if not any(_is_framework(x) for _, x in found):
        return out
    new = []
    for path, leaf in found:
        index = next((i for i, n in enumerate(nodes) if n is leaf), None)
        if index is not None:
            new.append(NnxRef(index))
        elif _is_nnx(leaf):
            if isinstance(leaf, _nnx().Variable):  # a new Variable: plain data, as a pytree
                new.append(leaf)
            else:
                raise GraphoptError(
                    f"graphopt.optimize({name}): output {_tu.keystr(path)} is a flax NNX "
                    f"{type(leaf).__name__} that is not one of the arguments; graphopt can "
                    "return argument objects (updated) but not new ones. Return its state "
                    "(nnx.state(...)) and merge it outside, or build it outside")
        elif _is_eqx(leaf):
            new.append(EqxSlot.of(leaf, f"graphopt.optimize({name}): output", key=False))
        else:
            new.append(leaf)
    return _tu.tree_unflatten(tdef, new)


def unwrap_outputs(out, nodes: tuple = ()):
    """Outside the trace: returned equinox modules whole again, nnx objects the caller's."""
    if not active():
        return out
    leaves, tdef = _tu.tree_flatten(out, is_leaf=_is_slot)
    if not any(_is_slot(x) for x in leaves):
        return out
    return _tu.tree_unflatten(tdef, [
        nodes[x.index] if isinstance(x, NnxRef) else
        x.module() if isinstance(x, EqxSlot) else x for x in leaves])


__all__ = ["active", "prepare", "call", "unwrap_outputs", "Prepared"]
