"""Before/after drawings: ``diff`` marks what each pass removed, fused, recomputed or cast.

Two jaxprs (or a :class:`~graphopt.report.Report`, whose pass records attribute each
change to the pass run that made it) are drawn side by side with :mod:`graphopt.viz`'s
drawing model; equations are matched by primitive, scope and local structure.
"""
from __future__ import annotations

import collections
import html

from . import ir
from .viz import (MARK_COLORS, MAX_NODES, _FAMILY_MARKS, Node,
                  _as_closed_jaxpr, _Model, _patterns, _pick_depth, _q, _Rendered, _View,
                  short_source)


def _local_key(n: Node) -> tuple:
    e = n.eqn
    params = tuple(sorted((k, str(v)) for k, v in e.params.items()
                          if not isinstance(v, (ir.Jaxpr, ir.ClosedJaxpr, tuple, list))
                          or k in ("axes", "permutation", "dimensions", "shape")))
    # literal operands are left out: a pass that only substitutes an input (fold turning
    # a computed scale into 1.0) keeps the equation; they count in _match's first level
    return (n.ctx, ir.prim_name(e), params, tuple(ir.aval_str(v.aval) for v in e.outvars),
            short_source(e))


def _match(a: _Model, b: _Model):
    """(unmatched nodes of a, unmatched nodes of b): equations one side has, the other not."""
    def keyed(m):
        keys = {n.id: _local_key(n) for n in m.eqn_nodes()}
        preds = collections.defaultdict(list)
        for s, d, _ in m.edges:
            if d in keys:
                preds[d].append(keys.get(s, m.nodes[s].label))
        return {nid: (k, tuple(str(ir.literal_value(a)) for a in m.nodes[nid].eqn.invars
                               if ir.is_literal(a)) + tuple(sorted(map(str, preds[nid]))))
                for nid, k in keys.items()}
    ka, kb = keyed(a), keyed(b)
    left_a, left_b = dict(ka), dict(kb)
    # first with inputs, then without, then ignoring source lines and enclosing clusters
    for level in (lambda k: k, lambda k: k[0], lambda k: k[0][1:4]):
        pool = collections.defaultdict(list)
        for nid, k in left_b.items():
            pool[level(k)].append(nid)
        for nid, k in list(left_a.items()):
            cands = pool.get(level(k))
            if cands:
                left_b.pop(cands.pop(0))
                left_a.pop(nid)
    return [a.nodes[i] for i in left_a], [b.nodes[i] for i in left_b]


def _family(pass_name: str) -> str:
    from .passes import resolve
    try:
        fam = resolve(pass_name)[0].family
    except Exception:
        fam = ""
    for k in _FAMILY_MARKS:
        if k in (fam or pass_name):
            return k
    return "prune" if pass_name in ("dce", "cse", "fold", "simplify") else ""


def _guess_added(n: Node, before_keys: set) -> str:
    name = ir.prim_name(n.eqn)
    if name == "convert_element_type":
        return "cast"
    if "fuse" in ir.name_stack(n.eqn) or "fused" in name or name not in ir.known_primitives():
        return "fused"
    if _local_key(n)[1:4] in before_keys:
        return "recomputed"
    return "added"


class Diff(_Rendered):
    """Two drawings side by side; ``summary`` counts marks, ``by_pass`` attributes them."""
    _what = "graphopt.diff"

    def __init__(self, before: _Model, after: _Model, records=None, depth="auto",
                 collapse=None, max_nodes: int = MAX_NODES, edge_labels: bool = True, title="diff"):
        super().__init__()
        self.before, self.after = before, after
        removed, added = _match(before, after)
        self.by_pass: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        owners = self._attribute(records or [])
        bkeys = {_local_key(n)[1:4] for n in before.eqn_nodes()}
        for n in removed:
            p = owners["removed"].pop_for(_local_key(n))
            n.mark = _FAMILY_MARKS.get(_family(p), ("removed",))[0] if p else "removed"
            n.label += f"\n[{p}]" if p else ""
            self.by_pass[p or "?"][n.mark] += 1
        for n in added:
            p = owners["added"].pop_for(_local_key(n))
            n.mark = _FAMILY_MARKS[_family(p)][1] if p and _family(p) else _guess_added(n, bkeys)
            n.label += f"\n[{p}]" if p else ""
            self.by_pass[p or "?"][n.mark] += 1
        self.removed, self.added = removed, added
        d1, p1, note = _pick_depth(before, depth, max_nodes, _patterns(collapse))
        d2, p2, _ = _pick_depth(after, depth, max_nodes, _patterns(collapse))
        d = d2 if d1 is None else d1 if d2 is None else min(d1, d2)
        pats = tuple(dict.fromkeys(p1 + p2))
        self.views = (_View(before, d, pats, edge_labels), _View(after, d, pats, edge_labels))
        lines = [f"digraph {_q(title)} {{", "  compound=true rankdir=TB newrank=true",
                 '  node [fontname=Helvetica fontsize=10] edge [fontname=Helvetica fontsize=8 color="#555555"]',
                 f'  label={_q(title + (" - " + note if note else ""))} labelloc=t fontname=Helvetica']
        for side, view in zip(("before", "after"), self.views):
            lines += [f'  subgraph "cluster_{side}" {{', f'    label={_q(side)} class="cluster side" style=bold']
            lines += ["    " + ln for ln in view.lines()] + ["  }"]
        lines += ["  " + ln for ln in self._legend()] + ["}"]
        self.source = "\n".join(lines)

    def _attribute(self, records):
        """Per pass record: which local keys it removed and added (first pass to do so)."""
        class Owners:
            def __init__(self):
                self.items: list[tuple[tuple, str]] = []

            def pop_for(self, key):
                for i, (k, p) in enumerate(self.items):
                    if k[1:] == key[1:]:  # contexts differ once a call was inlined
                        return self.items.pop(i)[1]
                return None
        owners = {"removed": Owners(), "added": Owners()}
        for r in records:
            if not getattr(r, "changed", False):
                continue
            rem, add = _match(_Model(r.before), _Model(r.after))
            owners["removed"].items += [(_local_key(n), r.name) for n in rem]
            owners["added"].items += [(_local_key(n), r.name) for n in add]
        return owners

    @property
    def summary(self) -> dict[str, int]:
        c = collections.Counter(n.mark for n in self.removed + self.added)
        return dict(c)

    def _legend(self) -> list[str]:
        s = self.summary
        rows = "".join(f'<TR><TD BGCOLOR="{MARK_COLORS[k]}">  </TD><TD ALIGN="LEFT">{k}: {s.get(k, 0)}</TD></TR>'
                       for k in MARK_COLORS)
        return ['subgraph "cluster_legend" { label="marks" class="cluster legend"',
                f'  "legend" [shape=plaintext class="legend" label=<<TABLE BORDER="0">{rows}</TABLE>>]', "}"]

    def table_html(self) -> str:
        cats = list(MARK_COLORS)
        rows = "".join(f"<tr><td>{html.escape(p)}</td>" + "".join(f"<td>{c.get(k, 0)}</td>" for k in cats)
                       + "</tr>" for p, c in self.by_pass.items())
        return (f"<table><thead><tr><th>pass</th>{''.join(f'<th>{k}</th>' for k in cats)}</tr></thead>"
                f"<tbody>{rows}</tbody></table>")

    def _repr_html_(self) -> str:  # the only rich representation: the SVG is stored once
        return f'<div style="overflow:auto;max-height:900px">{self.svg}</div>' + self.table_html()

    def __repr__(self):
        return f"<Diff {self.summary} by pass {dict((k, dict(v)) for k, v in self.by_pass.items())}>"


def diff(before, after=None, *args, records=None, depth="auto", collapse=None,
         max_nodes: int = MAX_NODES, edge_labels: bool = True, show_io: bool | None = None,
         render: bool = True, title: str | None = None) -> Diff:
    """Draw ``before`` and ``after`` side by side, marking what the passes changed.

    Accepts ``diff(report)`` (a :class:`~graphopt.Report`: its records attribute each
    change to a pass), ``diff(optimized_fn, *args)`` (a ``graphopt.optimize``-d function
    and its arguments), ``diff(jaxpr_before, jaxpr_after)`` or ``diff(f, g, *args)``.
    Other arguments as in :func:`draw`.
    Marks: removed (dropped), fused (replaced by / part of a fused op), recomputed
    (rematerialized copies), cast (precision changes), added (other new equations).
    """
    from .api import Optimized
    from .report import Report
    if isinstance(before, Optimized):
        report = before.report(*((after,) + args if after is not None else args))
        before, after, records = report.original, report.optimized, report.records
    elif isinstance(before, Report):
        before, after, records = before.original, before.optimized, before.records
    elif after is None:
        raise TypeError("graphopt.diff needs a Report, an optimized function with its "
                        "arguments, two ClosedJaxprs, or two functions and their arguments")
    else:
        before, after = _as_closed_jaxpr(before, args), _as_closed_jaxpr(after, args)
    out = Diff(_Model(before, "b", show_io), _Model(after, "a", show_io), records, depth, collapse, max_nodes,
               edge_labels, title or "before / after")
    if render:
        out.svg  # noqa: B018
    return out


__all__ = ["diff", "Diff"]
