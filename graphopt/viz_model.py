"""The drawing model of a jaxpr: every equation (sub-jaxprs opened) as a :class:`Node` with
its cluster path (named scopes, sub-jaxprs, forward/backward/update phases) as
:class:`Group`s, and the edges between them. :mod:`graphopt.viz` draws it."""
from __future__ import annotations

import collections
import dataclasses
import fnmatch
import re
from typing import Any

import jax

from . import analysis, ir

_INTERNAL_SCOPES = frozenset({"rematted_computation", "checkpoint", "remat"})

@dataclasses.dataclass
class Node:
    id: str
    kind: str                 # "eqn", "input", "output", "const"
    label: str
    group: str | None = None  # innermost cluster id
    phase: str = ""
    eqn: Any = None
    ctx: tuple = ()           # labels of enclosing groups (for matching in diff)
    tooltip: str = ""
    mark: str = ""
    outer: tuple = ()         # ids of the higher-order equations it is inside


@dataclasses.dataclass
class Group:
    id: str
    kind: str                 # "phase", "scope", "call"
    label: str
    parent: str | None
    level: int                # nesting level, phase clusters not counted
    path: str                 # "forward/block0/attention"


def _scope_components(ns: str) -> list[str]:
    """named_scope names of a name stack with AD/vmap wrappers removed."""
    return list(ir.scope_path(ns, _INTERNAL_SCOPES))


def _phase_of(ns: str, inherited: str, post_ad: bool, seen_backward: bool) -> str:
    if not post_ad:
        return ""
    if "transpose(" in ns:
        return "backward"
    if inherited:
        return inherited
    if "jvp(" in ns or not seen_backward:
        return "forward"
    return "update"


_PATH_RE = re.compile(r"[^\s:()]*[/\\]([^/\\\s:()]+\.py)")


def short_source(eqn) -> str:
    """'file.py:LINE (function)' without directories (drawings get committed in notebooks)."""
    return _PATH_RE.sub(r"\1", ir.source_line(eqn))


def _param_hint(eqn) -> str:
    p, name = eqn.params, ir.prim_name(eqn)
    if name == "integer_pow":
        return f"y={p['y']}"
    if name == "convert_element_type":
        return f"→ {jax.numpy.dtype(p['new_dtype']).name}"
    if name.startswith("reduce_") and "axes" in p:
        return f"axes={tuple(p['axes'])}"
    if name == "transpose":
        return f"perm={tuple(p['permutation'])}"
    if name in ("jit", "pjit", "closed_call") and "name" in p:
        return str(p["name"])
    return ""


def _sub_io(eqn):
    """[(sub jaxpr, label, outer atoms for its invars, outer vars for its outvars)], or None
    where the argument mapping of a higher-order primitive is not known."""
    name, p = ir.prim_name(eqn), eqn.params
    subs = list(ir.subjaxpr_params(eqn))
    if name == "cond":
        return [(ir.as_closed(s).jaxpr, f"cond branch {i}", eqn.invars[1:], eqn.outvars)
                for _, i, s in subs]
    if name == "while":
        cn, bn = p["cond_nconsts"], p["body_nconsts"]
        carry = eqn.invars[cn + bn:]
        return [(p["cond_jaxpr"].jaxpr, "while cond", eqn.invars[:cn] + carry, [None]),
                (p["body_jaxpr"].jaxpr, "while body", eqn.invars[cn:cn + bn] + carry, eqn.outvars)]
    out = []
    for key, _, s in subs:
        j = ir.as_closed(s).jaxpr
        if len(j.invars) != len(eqn.invars):
            return None
        outs = eqn.outvars if len(j.outvars) == len(eqn.outvars) else [None] * len(j.outvars)
        label = name + (f": {p['name']}" if isinstance(p.get("name"), str) else "")
        if name == "scan":
            label = f"scan ×{p['length']}"
        out.append((j, label, eqn.invars, outs))
    return out


class _Model:
    """Every equation of a program (nested ones expanded) with its cluster path."""

    def __init__(self, cj: ir.ClosedJaxpr, prefix: str = "", show_io: bool | None = None):
        self.prefix = prefix
        self.nodes: dict[str, Node] = {}
        self.groups: dict[str, Group] = {}
        self.edges: list[tuple[str, str, str]] = []
        self._group_ids: dict[tuple, str] = {}
        self.post_ad = any("transpose(" in ir.name_stack(e) for e, _, _ in ir.walk_eqns(cj))
        self._seen_backward = False
        self._n = collections.Counter()
        jaxpr = cj.jaxpr
        env: dict = {}
        n_io = len(jaxpr.invars) + len(jaxpr.outvars) + len(jaxpr.constvars)
        self.show_io = n_io <= 40 if show_io is None else show_io
        dbg = getattr(jaxpr, "debug_info", None)
        names = list(getattr(dbg, "arg_names", None) or [])
        for i, v in enumerate(jaxpr.invars):
            nm = names[i] if i < len(names) and names[i] else f"in[{i}]"
            env[v] = [self._add("input", f"{nm}\n{ir.aval_str(v.aval)}", None, "", None, ())]
        for i, v in enumerate(jaxpr.constvars):
            env[v] = [self._add("const", f"const {ir.aval_str(v.aval)}", None, "", None, ())]
        env = {v: [s for s in srcs if s] for v, srcs in env.items()}
        self._walk(jaxpr, env, (), "", None)
        paths = list(getattr(dbg, "result_paths", None) or []) if dbg else []
        for i, v in enumerate(jaxpr.outvars):
            nm = paths[i] if i < len(paths) and isinstance(paths[i], str) and paths[i] else f"out[{i}]"
            nid = self._add("output", f"{nm}\n{ir.aval_str(v.aval)}", None, "", None, ())
            if nid:
                self._connect(env, v, nid)

    # -- building
    def _add(self, kind, label, group, phase, eqn, ctx, tooltip="", outer=()) -> str | None:
        if kind != "eqn" and not self.show_io:
            return None
        nid = f"{self.prefix}{kind[0]}{self._n[kind]}"
        self._n[kind] += 1
        self.nodes[nid] = Node(nid, kind, label, group, phase, eqn, ctx, tooltip, outer=outer)
        return nid

    def _group(self, key: tuple, kind: str, label: str, parent: str | None) -> str:
        gid = self._group_ids.get(key)
        if gid is None:
            gid = f"{self.prefix}g{len(self._group_ids)}"
            self._group_ids[key] = gid
            par = self.groups.get(parent) if parent else None
            level = 0 if par is None else par.level + (par.kind != "phase")
            path = label if par is None else f"{par.path}/{label}"
            self.groups[gid] = Group(gid, kind, label, parent, level, path)
        return gid

    def _connect(self, env, atom, dst):
        if ir.is_var(atom):
            for src in env.get(atom, ()):
                self.edges.append((src, dst, ir.aval_str(atom.aval)))

    def _walk(self, jaxpr, env, key: tuple, phase: str, parent: str | None, outer: tuple = ()):
        for eqn in jaxpr.eqns:
            ns = ir.name_stack(eqn)
            ph = _phase_of(ns, phase, self.post_ad, self._seen_backward)
            self._seen_backward |= ph == "backward"
            gkey, gid = key, parent
            if ph and ph != phase:  # entering a phase cluster (top level, or backward inside)
                gkey = key + (("phase", ph),)
                gid = self._group(gkey, "phase", ph, parent)
            for comp in _scope_components(ns):
                gkey = gkey + (("scope", comp),)
                gid = self._group(gkey, "scope", comp, gid)
            subs = _sub_io(eqn) if analysis.is_higher_order(eqn) else None
            ctx = tuple(self.groups[g].label for g in self._chain(gid))
            if subs:
                self._n["call"] += 1
                for sj, label, outer_in, outer_out in subs:
                    ckey = gkey + (("call", self._n["call"], label),)
                    cid = self._group(ckey, "call", label, gid)
                    sub_env = {v: env.get(a, []) for v, a in zip(sj.invars, outer_in) if ir.is_var(a)}
                    self._walk(sj, sub_env, ckey, ph, cid, outer + (id(eqn),))
                    for ov, iv in zip(outer_out, sj.outvars):
                        if ov is not None and ir.is_var(ov) and ir.is_var(iv):
                            env.setdefault(ov, []).extend(sub_env.get(iv, []))
                continue
            lits = [str(ir.literal_value(a)) for a in eqn.invars if ir.is_literal(a)]
            hint = _param_hint(eqn)
            label = ir.prim_name(eqn) + (f" {hint}" if hint else "") + (
                f" ({', '.join(lits)})" if lits else "")
            tip = f"{ns or '(top)'}  {short_source(eqn)}"
            nid = self._add("eqn", label, gid, ph, eqn, ctx, tip, outer)
            for a in eqn.invars:
                self._connect(env, a, nid)
            for v in eqn.outvars:
                if ir.is_var(v):
                    env[v] = [nid]

    # -- queries
    def _chain(self, gid: str | None) -> list[str]:
        out = []
        while gid is not None:
            out.append(gid)
            gid = self.groups[gid].parent
        return out[::-1]

    def eqn_nodes(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.kind == "eqn"]

    def collapsed_chain(self, depth, patterns) -> dict[str, str]:
        """node id -> id of the outermost collapsed group holding it (or itself)."""
        collapsed = {gid for gid, g in self.groups.items() if (
            (depth is not None and g.kind != "phase" and g.level >= depth)
            or any(fnmatch.fnmatch(g.label, p) or fnmatch.fnmatch(g.path, p) for p in patterns))}
        rep = {}
        for nid, n in self.nodes.items():
            rep[nid] = next((g for g in self._chain(n.group) if g in collapsed), nid)
        return rep

    def max_level(self) -> int:
        return max((g.level for g in self.groups.values() if g.kind != "phase"), default=-1)
