"""Colouring chosen equations of a drawing: ``graphopt.draw(f, *args, highlight=...)``.

``highlight`` is ``{equation or equation index: label}`` or a
:class:`~graphopt.parallelism.ParallelismReport`. Each distinct label gets one fill
colour; labels ``"group g, branch l"`` (what ``ParallelismReport.highlight()`` writes)
share a colour family per group, one shade per branch. Given a ParallelismReport, the
branches are filled and the critical path gets a thick red outline (light red fill where
it is in no branch), so a path running through one branch shows both. A legend cluster
names every colour.

A collapsed cluster holding highlighted equations is coloured when all its equations
carry one label; otherwise it is left uncoloured and the drawing's note says how many
such clusters there are (``depth=None`` or ``drawing.full()`` opens them). It gets the
critical-path outline when the path runs through it.
"""
from __future__ import annotations

import collections
import colorsys
import re

from . import ir
from .cost import top_level
from .parallelism import ParallelismReport
from .viz import _q

CRITICAL = "critical path"
CRITICAL_FILL = "#fecaca"
CRITICAL_EDGE = 'color="#dc2626" penwidth=2.5'
# Hues (0..1) of the colour families: branch groups first, then other labels, in order.
_HUES = (0.58, 0.33, 0.08, 0.78, 0.5, 0.92, 0.17, 0.68)
_BRANCH = re.compile(r"^group (\d+), branch (\d+)$")
MAX_LEGEND = 12  # more labels than this: one legend entry per colour family


_SATURATIONS = (0.65, 0.3, 0.95)  # past len(_HUES) families, the hues repeat less or more saturated


def _hex(family: int, light: float) -> str:
    hue = _HUES[family % len(_HUES)]
    sat = _SATURATIONS[family // len(_HUES) % len(_SATURATIONS)]
    r, g, b = colorsys.hls_to_rgb(hue, light, sat)
    return "#{:02x}{:02x}{:02x}".format(*(round(255 * c) for c in (r, g, b)))


def colors(labels) -> dict[str, str]:
    """{label: fill colour}: a family of shades per branch group, one hue per other label."""
    labels = sorted(set(labels), key=_order)
    branch = collections.defaultdict(list)
    for lab in labels:
        m = _BRANCH.match(lab)
        if m:
            branch[int(m[1])].append(lab)
    out = {CRITICAL: CRITICAL_FILL} if CRITICAL in labels else {}
    for n, (g, labs) in enumerate(sorted(branch.items())):
        for i, lab in enumerate(labs):  # shades from mid to light across the lanes
            out[lab] = _hex(n, 0.55 + 0.3 * i / max(1, len(labs) - 1))
    others = [lab for lab in labels if lab not in out]
    for n, lab in enumerate(others):
        out[lab] = _hex(len(branch) + n, 0.7)
    return out


def _order(lab: str):
    m = _BRANCH.match(lab)
    return (0, int(m[1]), int(m[2]), "") if m else (1, 0, 0, lab)


def _family(lab: str) -> str:
    m = _BRANCH.match(lab)
    return f"group {m[1]}" if m else lab


class Highlight:
    """Labels of the drawn equations, resolved once per program; :meth:`apply` colours a
    view of it. ``labels``: {node id: label}; ``critical``: node ids on the critical
    path; ``colors``: {label: fill}; ``mixed``: paths of collapsed clusters left
    uncoloured by the last :meth:`apply` (their equations carry several labels)."""

    def __init__(self, cj, model, spec):
        by_id = collections.defaultdict(list)  # equation -> the nodes drawing it (or its body)
        for n in model.eqn_nodes():
            for k in (id(n.eqn),) + n.outer:
                by_id[k].append(n.id)
        critical: set = set()
        if isinstance(spec, ParallelismReport):
            keyed = {spec.jaxpr.eqns[i]: f"group {g}, branch {lane}"
                     for i, (g, lane) in spec.eqn_branch.items()}
            crit_eqns = [spec.jaxpr.eqns[i] for i in spec.critical_path]
            keyed.update({e: CRITICAL for e in crit_eqns if e not in keyed})
            resolved = self._resolve(cj, by_id, keyed, spec.jaxpr)
            critical = set(self._resolve(cj, by_id, dict.fromkeys(crit_eqns, CRITICAL), spec.jaxpr))
        elif isinstance(spec, dict):
            resolved = self._resolve(cj, by_id, spec, None)
        else:
            raise TypeError("graphopt.draw: highlight must be a dict {equation or equation index: "
                            f"label}} or a ParallelismReport, got {type(spec).__name__}")
        self.labels: dict[str, str] = resolved
        self.critical: set[str] = critical
        self.colors = colors(resolved.values())
        self.mixed: list[str] = []

    @staticmethod
    def _resolve(cj, by_id, spec: dict, source) -> dict[str, str]:
        """{node id: label} from {equation or index: label}; equations of ``source`` (the
        jaxpr a ParallelismReport analysed) that the drawing traced anew match by position."""
        top = top_level(cj).eqns
        out, missing = {}, []
        pos = {}  # the same program traced again: equal primitives at equal positions
        if source is not None and [ir.prim_name(e) for e in source.eqns] == [ir.prim_name(e) for e in top]:
            pos = {id(e): k for k, e in enumerate(source.eqns)}
        for key, label in spec.items():
            if isinstance(key, bool) or not (isinstance(key, int) or hasattr(key, "primitive")):
                raise TypeError("graphopt.draw: highlight keys must be equations or equation "
                                f"indices, got {type(key).__name__}")
            if isinstance(key, int):
                if not -len(top) <= key < len(top):
                    raise IndexError(f"graphopt.draw: highlight index {key} is out of range: the "
                                     f"drawn program's top-level jaxpr has {len(top)} equations")
                key = top[key]
            elif id(key) not in by_id and id(key) in pos:
                key = top[pos[id(key)]]
            if id(key) not in by_id:
                missing.append(key)
                continue
            out.update(dict.fromkeys(by_id[id(key)], str(label)))
        if missing:
            raise ValueError(
                f"graphopt.draw: {len(missing)} highlighted equations (e.g. "
                f"{ir.prim_name(missing[0])}) are not in the drawn program (was it traced again?); "
                "draw the jaxpr they come from, or pass the ParallelismReport itself")
        return out

    def apply(self, view) -> str:
        """Set fills, outlines and the legend on ``view``; returns a note for the title."""
        m = view.model
        self.mixed = []
        for v in view.visible:
            if v in m.groups:
                inner = [n.id for n in view.members.get(v, ()) if n.kind == "eqn"]
                labs = {self.labels.get(nid) for nid in inner}
                crit = any(nid in self.critical for nid in inner)
                if labs and None not in labs and len(labs) == 1:
                    fill = self.colors[labs.pop()]
                else:
                    fill = None
                    if labs - {None}:
                        self.mixed.append(m.groups[v].path)
            else:
                lab = self.labels.get(v)
                fill, crit = (self.colors[lab] if lab else None), v in self.critical
            if fill or crit:
                view.styles[v] = (fill, CRITICAL_EDGE if crit else "")
        view.extra = self._legend(view.model.prefix)
        if not self.mixed:
            return ""
        return (f"{len(self.mixed)} collapsed clusters hold several highlight labels and are "
                "left uncoloured (depth=None opens them)")

    def _legend(self, prefix: str) -> list[str]:
        entries = {lab: c for lab, c in self.colors.items()}
        if len(entries) > MAX_LEGEND:  # one entry per family, its mid shade
            fam: dict[str, list[str]] = collections.defaultdict(list)
            for lab in sorted(entries, key=_order):
                fam[_family(lab)].append(lab)
            entries = {(f"{f}: {len(labs)} branches" if len(labs) > 1 else labs[0]):
                       entries[labs[len(labs) // 2]] for f, labs in fam.items()}
        if self.critical:
            entries[CRITICAL] = CRITICAL_FILL
        if not entries:
            return []
        ids = [f"{prefix}legend{i}" for i in range(len(entries))]
        out = ['subgraph "cluster_legend" {', '  label="highlight" class="cluster legend" style=rounded']
        for nid, (lab, c) in zip(ids, entries.items()):
            edge = " " + CRITICAL_EDGE if lab == CRITICAL and self.critical else ""
            out.append(f'  {_q(nid)} [label={_q(lab)} class="legend" shape=box style=filled '
                       f"fillcolor={_q(c)}{edge}]")
        out += [f"  {_q(a)} -> {_q(b)} [style=invis]" for a, b in zip(ids, ids[1:])]
        return out + ["}"]


__all__ = ["Highlight", "colors", "CRITICAL", "CRITICAL_FILL", "MAX_LEGEND"]
