"""Graph drawings of jaxprs: ``draw`` one program, ``diff`` two (before/after a pass).

Nodes are equations, edges carry the shape and dtype of the value they move. Named
scopes (``jax.named_scope``) and sub-jaxprs (jit, cond branches, scan/while bodies,
custom_jvp/vjp, remat) become clusters that collapse into one node (``depth=``,
``collapse=``), so a 12-layer GPT training step reads at the block level and expands
to primitives. In a training step (post-AD jaxpr) the forward, backward (name stacks
with ``transpose(``) and update parts are separate, tinted clusters.

The DOT text is built here and rendered to SVG by graphviz's ``dot`` program through
the ``graphviz`` Python package; where ``dot`` is missing, rendering raises
:class:`DotNotFoundError` saying how to install it (the DOT text stays available).
Drawing only reads jaxprs; it never changes a program.
"""
from __future__ import annotations

import collections
import dataclasses
import fnmatch
import re
import shutil
from collections.abc import Iterable
from typing import Any

import jax

from . import analysis, ir
from .errors import GraphoptError, require

PHASE_COLORS = {"forward": "#eaf2ff", "backward": "#fff1e0", "update": "#eefbef"}
MARK_COLORS = {"removed": "#f87171", "fused": "#c084fc", "recomputed": "#38bdf8",
               "cast": "#fbbf24", "added": "#4ade80"}
# Which mark a pass family leaves on what it removes / what it adds.
_FAMILY_MARKS = {"prune": ("removed", "added"), "fuse": ("fused", "fused"),
                 "remat": ("removed", "recomputed"), "precision": ("cast", "cast")}
# Node budget of depth="auto": what stays legible at notebook width (full(): everything).
MAX_NODES = 100
_INTERNAL_SCOPES = frozenset({"rematted_computation", "checkpoint", "remat"})


class DotNotFoundError(GraphoptError, RuntimeError):
    """graphviz's ``dot`` program is not installed, so no SVG can be rendered."""


def dot_available() -> bool:
    return shutil.which("dot") is not None


def _dot_missing_message(what: str) -> str:
    return (f"{what} needs graphviz's `dot` program to render SVG, and it is not on PATH. "
            "Install it with `make system-deps` (as root on Debian/Ubuntu), "
            "`apt-get install graphviz`, `brew install graphviz` or `conda install graphviz`; "
            "the DOT text is available without it as `.source` (draw(..., render=False)).")


# ------------------------------------------------------------------------ model

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
    def _add(self, kind, label, group, phase, eqn, ctx, tooltip="") -> str | None:
        if kind != "eqn" and not self.show_io:
            return None
        nid = f"{self.prefix}{kind[0]}{self._n[kind]}"
        self._n[kind] += 1
        self.nodes[nid] = Node(nid, kind, label, group, phase, eqn, ctx, tooltip)
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

    def _walk(self, jaxpr, env, key: tuple, phase: str, parent: str | None):
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
                    self._walk(sj, sub_env, ckey, ph, cid)
                    for ov, iv in zip(outer_out, sj.outvars):
                        if ov is not None and ir.is_var(ov) and ir.is_var(iv):
                            env.setdefault(ov, []).extend(sub_env.get(iv, []))
                continue
            lits = [str(ir.literal_value(a)) for a in eqn.invars if ir.is_literal(a)]
            hint = _param_hint(eqn)
            label = ir.prim_name(eqn) + (f" {hint}" if hint else "") + (
                f" ({', '.join(lits)})" if lits else "")
            tip = f"{ns or '(top)'}  {short_source(eqn)}"
            nid = self._add("eqn", label, gid, ph, eqn, ctx, tip)
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


# ---------------------------------------------------------------------- DOT text

def _q(s: str) -> str:
    return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


_NODE_STYLE = {
    "eqn": 'shape=box style=filled fillcolor="#ffffff"',  # square: a short polygon in SVG
    "input": 'shape=ellipse style=filled fillcolor="#e5e7eb"',
    "const": 'shape=ellipse style=filled fillcolor="#f3f4f6"',
    "output": 'shape=ellipse style=filled fillcolor="#d1d5db"',
    "group": 'shape=box3d style=filled fillcolor="#f9fafb"',
}


# Edge colours by dtype (mixed precision shows at a glance); float32 keeps the default.
DTYPE_COLORS = {"bf16": "#2563eb", "f16": "#9333ea", "f64": "#dc2626"}


def _dtype_color(label: str) -> list[str]:
    color = DTYPE_COLORS.get(label.split("[", 1)[0])
    return [f"color={_q(color)} fontcolor={_q(color)} penwidth=1.5"] if color else []


class _View:
    """A model seen at a given collapse level: visible nodes, clusters, merged edges."""

    def __init__(self, model: _Model, depth, patterns, edge_labels: bool):
        self.model = model
        self.rep = model.collapsed_chain(depth, patterns)
        self.edge_labels = edge_labels
        members: dict[str, list[Node]] = collections.defaultdict(list)
        for nid, r in self.rep.items():
            if r != nid:
                members[r].append(model.nodes[nid])
        self.members = dict(members)
        self.visible = sorted(set(self.rep.values()), key=lambda x: (x in model.groups, x))

    def counts(self) -> dict:
        c = collections.Counter("group" if v in self.model.groups else self.model.nodes[v].kind
                                for v in self.visible)
        return dict(c)

    def group_label(self, gid: str) -> tuple[str, str]:
        g = self.model.groups[gid]
        inner = [n for n in self.members[gid] if n.kind == "eqn"]
        flops = sum(analysis.eqn_cost(n.eqn).flops for n in inner)
        marks = collections.Counter(n.mark for n in inner if n.mark)
        text = f"{g.label}\n{len(inner)} eqns, {analysis.fmt_flops(flops)}"
        if marks:
            text += "\n" + ", ".join(f"{v} {k}" for k, v in sorted(marks.items()))
        return text, (marks.most_common(1)[0][0] if marks else "")

    def lines(self) -> list[str]:
        m = self.model
        cluster_nodes: dict[str | None, list[str]] = collections.defaultdict(list)
        for v in self.visible:
            if v in m.groups:
                text, mark = self.group_label(v)
                attrs = _NODE_STYLE["group"]
                if mark:
                    attrs = attrs.replace('"#f9fafb"', _q(MARK_COLORS[mark]))
                line = f'{_q(v)} [label={_q(text)} class="group" {attrs} tooltip={_q(m.groups[v].path)}]'
                parent = m.groups[v].parent
            else:
                n = m.nodes[v]
                attrs = _NODE_STYLE[n.kind]
                if n.mark:
                    attrs = attrs.replace('"#ffffff"', _q(MARK_COLORS[n.mark]))
                cls = n.kind + (f" {n.mark}" if n.mark else "")
                line = (f'{_q(v)} [label={_q(n.label)} class={_q(cls)} {attrs} '
                        f'tooltip={_q(n.tooltip or n.label)}]')
                parent = n.group
            cluster_nodes[parent].append(line)
        children: dict[str | None, list[str]] = collections.defaultdict(list)
        shown = {g for g in m.groups if g not in self.rep.values() and not self._inside_collapsed(g)}
        for g in shown:
            children[m.groups[g].parent].append(g)
        out = list(cluster_nodes[None])

        def emit(gid, indent):
            g = m.groups[gid]
            color = PHASE_COLORS.get(g.label if g.kind == "phase" else "", "")
            style = f'style=filled fillcolor={_q(color)}' if color else (
                'style="rounded,dashed"' if g.kind == "call" else 'style=rounded')
            lab = g.label
            body = [f'{indent}subgraph {_q("cluster_" + gid)} {{',
                    f'{indent}  label={_q(lab)} class={_q("cluster " + g.kind)} {style}']
            body += [indent + "  " + ln for ln in cluster_nodes[gid]]
            for c in sorted(children[gid]):
                body += emit(c, indent + "  ")
            return body + [indent + "}"]

        for g in sorted(children[None]):
            out += emit(g, "")
        seen: dict[tuple, list[str]] = {}
        for s, d, lab in m.edges:
            rs, rd = self.rep[s], self.rep[d]
            if rs != rd:
                seen.setdefault((rs, rd), []).append(lab)
        for (s, d), labs in seen.items():
            lab = labs[0] + (f" (+{len(labs) - 1})" if len(labs) > 1 else "")
            attrs = ([f"label={_q(lab)}"] if self.edge_labels else []) + _dtype_color(labs[0])
            out.append(f'{_q(s)} -> {_q(d)}' + (f' [{" ".join(attrs)}]' if attrs else ""))
        return out

    def _inside_collapsed(self, gid: str) -> bool:
        collapsed = set(self.rep.values())
        return any(a in collapsed for a in self.model._chain(gid)[:-1])


def _render(source: str, what: str) -> str:
    graphviz = require("graphviz", "viz", what)
    if not dot_available():
        raise DotNotFoundError(_dot_missing_message(what))
    try:
        return _slim_svg(graphviz.Source(source).pipe(format="svg", encoding="utf-8"))
    except graphviz.ExecutableNotFound as exc:
        raise DotNotFoundError(_dot_missing_message(what)) from exc


_GEOMETRY = re.compile(r'\b(points|d|x|y|cx|cy|rx|ry|transform)="([^"]*)"')
_NUMBER = re.compile(r"-?[0-9]+[.][0-9]+")
_FONT = ' font-family="Helvetica,sans-Serif"'


def _slim_svg(svg: str) -> str:
    """The same picture in fewer bytes (saved notebooks): no comments, no ids or titles of
    graphviz's own (hover text is kept), whole-point coordinates, the font named once."""
    svg = re.sub(r"<!--.*?-->\n?", "", svg, flags=re.S)
    svg = re.sub(r'<title>[^<]*</title>\n?|\sid="[^"]*"', "", svg)
    svg = _GEOMETRY.sub(lambda m: m[1] + '="' + _NUMBER.sub(lambda n: str(round(float(n[0]))), m[2])
                        + '"', svg)
    svg = re.sub(r'font-size="([0-9]+)[.]00"', r'font-size="\1"', svg)
    if _FONT in svg:
        svg = svg.replace(_FONT, "")
        svg = re.sub(r"(<svg\b[^>]*>)", r"\1\n<style>text{font-family:Helvetica,sans-serif}</style>",
                     svg, count=1)
    return svg


class _Rendered:
    """DOT text plus a lazily rendered SVG; shows itself inline in notebooks."""
    source: str
    _what = "graphopt.draw"

    def __init__(self):
        self._svg = None

    @property
    def svg(self) -> str:
        if self._svg is None:
            self._svg = _render(self.source, self._what)
        return self._svg

    def save(self, path: str) -> str:
        """Write the SVG (path ending in .svg) or the DOT text (any other ending)."""
        with open(path, "w") as f:
            f.write(self.svg if path.endswith(".svg") else self.source)
        return path

    # One rich representation per object (IPython stores every one a class defines, so an
    # SVG offered as both image/svg+xml and text/html would be saved twice): Drawing shows
    # itself as SVG, Diff as HTML (the SVG and its per-pass table).


class Drawing(_Rendered):
    """One drawn program. ``counts`` says how many nodes of each kind are visible."""

    def __init__(self, model: _Model, view: _View, title: str, depth, note: str = ""):
        super().__init__()
        self.model, self.view, self.title, self.depth, self.note = model, view, title, depth, note
        head = [f"digraph {_q(title)} {{", "  compound=true rankdir=TB newrank=true",
                f'  label={_q(title + (" - " + note if note else ""))} labelloc=t fontname=Helvetica',
                '  node [fontname=Helvetica fontsize=10] edge [fontname=Helvetica fontsize=8 color="#555555"]']
        self.source = "\n".join(head + ["  " + ln for ln in view.lines()] + ["}"])

    @property
    def counts(self) -> dict:
        return self.view.counts()

    @property
    def phase_counts(self) -> dict[str, int]:
        """Equations per phase ('forward', 'backward', 'update'; '' before AD)."""
        return dict(collections.Counter(n.phase for n in self.model.eqn_nodes()))

    @property
    def clusters(self) -> list[str]:
        """Paths of the clusters drawn open (phase, scope and sub-jaxpr clusters)."""
        collapsed = set(self.view.rep.values())
        return sorted(g.path for gid, g in self.model.groups.items()
                      if gid not in collapsed and not self.view._inside_collapsed(gid))

    @property
    def collapsed(self) -> list[str]:
        """Paths of the clusters drawn as one node."""
        return sorted(self.model.groups[g].path for g in self.view.visible if g in self.model.groups)

    def _repr_svg_(self) -> str:
        return self.svg

    def full(self, render: bool = True) -> Drawing:
        """The same program with every cluster open (``depth=None``), however many nodes."""
        out = Drawing(self.model, _View(self.model, None, (), self.view.edge_labels),
                      self.title, None)
        if render:
            out.svg  # noqa: B018 - render now, as draw does
        return out

    def __repr__(self):
        return f"<Drawing {self.title!r} {self.counts} depth={self.depth}>"


# ----------------------------------------------------------------------- tracing

def _as_closed_jaxpr(f, args) -> ir.ClosedJaxpr:
    from .api import Optimized
    from .report import Report
    if isinstance(f, ir.ClosedJaxpr):
        return f
    if isinstance(f, ir.Jaxpr):
        return ir.closed(f)
    if isinstance(f, Report):
        return f.optimized
    if isinstance(f, Optimized):
        return f.jaxpr(*args)
    if not callable(f):
        raise TypeError(f"graphopt.draw: expected a function, a Report or a ClosedJaxpr, "
                        f"got {type(f).__name__}")
    return jax.make_jaxpr(f)(*args)


def _pick_depth(model: _Model, depth, max_nodes: int, patterns=()) -> tuple[Any, tuple, str]:
    """(depth, collapse patterns, note): ``"auto"`` opens as deep as ``max_nodes`` allows,
    then folds the optimizer update (unscoped in optax) into one node if still too many."""
    if depth != "auto":
        if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int) or depth < 0):
            raise ValueError(f"depth must be None, 'auto' or an int >= 0, got {depth!r}")
        return depth, patterns, ""
    top = model.max_level() + 1
    for d in range(top, -1, -1):
        if len(set(model.collapsed_chain(d, patterns).values())) <= max_nodes:
            return (None if d == top else d), patterns, ("" if d == top else f"collapsed below depth {d}")
    if model.post_ad and "update" not in patterns:
        return _pick_depth(model, depth, max_nodes, patterns + ("update",))
    return 0, patterns, "collapsed at depth 0"


def _patterns(collapse) -> tuple[str, ...]:
    if collapse is None:
        return ()
    if isinstance(collapse, str):
        return (collapse,)
    return tuple(collapse)


def draw(f, *args, depth="auto", collapse: str | Iterable[str] | None = None,
         max_nodes: int = MAX_NODES, edge_labels: bool = True, show_io: bool | None = None,
         render: bool = True, title: str | None = None) -> Drawing:
    """Draw ``f``'s jaxpr on ``args``: equations as nodes, values (shape, dtype) as edges.

    ``f``: a function (traced with ``jax.make_jaxpr(f)(*args)``; bind keyword arguments
    with ``functools.partial``), a ``graphopt.optimize``-d function (its optimized
    jaxpr), a :class:`~graphopt.Report` (its optimized jaxpr) or a ClosedJaxpr.
    ``depth``: cluster levels drawn open (0: every top-level named scope or sub-jaxpr is
    one node; ``None``: everything open; ``"auto"``: the deepest level with at most
    ``max_nodes`` nodes, default 100 so a drawing reads at notebook width;
    ``drawing.full()`` or ``depth=None`` draws everything). ``collapse``: glob patterns of cluster names or paths
    ("block*", "forward/block0/attention", "update") drawn as one node at any depth.
    ``show_io``: draw program inputs and outputs as nodes (default: when there are at
    most 40 of them; a training step's parameter and optimizer-state leaves are many).
    ``render``: produce the SVG now (needs graphviz's ``dot``; raises
    :class:`DotNotFoundError` without it); with False only the DOT text is built.
    """
    cj = _as_closed_jaxpr(f, args)
    model = _Model(cj, show_io=show_io)
    d, pats, note = _pick_depth(model, depth, max_nodes, _patterns(collapse))
    view = _View(model, d, pats, edge_labels)
    name = title or getattr(f, "__name__", None) or "jaxpr"
    out = Drawing(model, view, name, d, note)
    if render:
        out.svg  # noqa: B018 - render now so a missing `dot` is reported here
    return out


def diff(*args, **kwargs):
    """See :func:`graphopt.viz_diff.diff` (kept here so ``graphopt.viz.diff`` works)."""
    from .viz_diff import diff as _diff
    return _diff(*args, **kwargs)


__all__ = ["draw", "diff", "Drawing", "DotNotFoundError", "dot_available", "PHASE_COLORS",
           "MARK_COLORS", "MAX_NODES"]
