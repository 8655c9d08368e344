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
Drawing only reads jaxprs; it never changes a program. The drawing model lives in
:mod:`graphopt.viz_model`, SVG rendering in :mod:`graphopt.viz_render`, ``highlight=``
colouring in :mod:`graphopt.viz_highlight`.
"""
from __future__ import annotations

import collections
import re
from collections.abc import Iterable
from typing import Any

import jax

from . import analysis, ir
from .viz_model import Group, Node, _Model, short_source  # noqa: F401 - re-exported
from .viz_render import DotNotFoundError, _Rendered, dot_available  # noqa: F401 - re-exported

PHASE_COLORS = {"forward": "#eaf2ff", "backward": "#fff1e0", "update": "#eefbef"}
MARK_COLORS = {"removed": "#f87171", "fused": "#c084fc", "recomputed": "#38bdf8",
               "cast": "#fbbf24", "added": "#4ade80"}
# Which mark a pass family leaves on what it removes / what it adds.
_FAMILY_MARKS = {"prune": ("removed", "added"), "fuse": ("fused", "fused"),
                 "remat": ("removed", "recomputed"), "precision": ("cast", "cast")}
# Node budget of depth="auto": what stays legible at notebook width (full(): everything).
MAX_NODES = 100

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
        self.styles: dict[str, tuple[str | None, str]] = {}  # visible id -> (fill, more attrs)
        self.extra: list[str] = []  # DOT lines added after the graph (a highlight legend)

    def _styled(self, v: str, attrs: str) -> str:
        fill, more = self.styles.get(v, (None, ""))
        if fill:
            attrs = re.sub(r'fillcolor="[^"]*"', f"fillcolor={_q(fill)}", attrs)
        return attrs + (" " + more if more else "")

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
                attrs = self._styled(v, attrs)
                line = f'{_q(v)} [label={_q(text)} class="group" {attrs} tooltip={_q(m.groups[v].path)}]'
                parent = m.groups[v].parent
            else:
                n = m.nodes[v]
                attrs = _NODE_STYLE[n.kind]
                if n.mark:
                    attrs = attrs.replace('"#ffffff"', _q(MARK_COLORS[n.mark]))
                attrs = self._styled(v, attrs)
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
        return out + self.extra

    def _inside_collapsed(self, gid: str) -> bool:
        collapsed = set(self.rep.values())
        return any(a in collapsed for a in self.model._chain(gid)[:-1])


class Drawing(_Rendered):
    """One drawn program. ``counts`` says how many nodes of each kind are visible;
    ``highlight`` is the :class:`~graphopt.viz_highlight.Highlight` drawn, if any."""
    highlight = None

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
        view = _View(self.model, None, (), self.view.edge_labels)
        note = self.highlight.apply(view) if self.highlight else ""
        out = Drawing(self.model, view, self.title, None, note)
        out.highlight = self.highlight
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
         render: bool = True, title: str | None = None, highlight=None) -> Drawing:
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
    ``highlight``: equations to colour, ``{equation or equation index: label}`` (indices
    into the program's top-level jaxpr, a single jit call looked through) or a
    :class:`~graphopt.parallelism.ParallelismReport` (its branches and critical path);
    one fill colour per label and a legend, see :mod:`graphopt.viz_highlight`.
    """
    cj = _as_closed_jaxpr(f, args)
    model = _Model(cj, show_io=show_io)
    hl = None
    if highlight is not None:
        from .viz_highlight import Highlight
        hl = Highlight(cj, model, highlight)
    d, pats, note = _pick_depth(model, depth, max_nodes, _patterns(collapse))
    view = _View(model, d, pats, edge_labels)
    if hl is not None:
        note = "; ".join(x for x in (note, hl.apply(view)) if x)
    name = title or getattr(f, "__name__", None) or "jaxpr"
    out = Drawing(model, view, name, d, note)
    out.highlight = hl
    if render:
        out.svg  # noqa: B018 - render now so a missing `dot` is reported here
    return out


def diff(*args, **kwargs):
    """See :func:`graphopt.viz_diff.diff` (kept here so ``graphopt.viz.diff`` works)."""
    from .viz_diff import diff as _diff
    return _diff(*args, **kwargs)


__all__ = ["draw", "diff", "Drawing", "DotNotFoundError", "dot_available", "PHASE_COLORS",
           "MARK_COLORS", "MAX_NODES"]
