"""A read-only dataflow view over one jaxpr: producers, users, outputs, source lines."""
from __future__ import annotations

from .atoms import is_var
from .compat import ClosedJaxpr, Jaxpr, Var, source_line


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
        producer, users = self.producer, self.users  # locals: a hot loop on large jaxprs
        for i, e in enumerate(self.eqns):
            for v in e.invars:
                if is_var(v):
                    got = users.get(v)
                    if got is None:
                        users[v] = [i]
                    else:
                        got.append(i)
            for v in e.outvars:
                if is_var(v):
                    producer[v] = i
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
