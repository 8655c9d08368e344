"""Rendering DOT text to SVG with graphviz's ``dot`` (through the ``graphviz`` package),
slimmed for saved notebooks; :class:`DotNotFoundError` where ``dot`` is missing."""
from __future__ import annotations

import re
import shutil

from .errors import GraphoptError, require


class DotNotFoundError(GraphoptError, RuntimeError):
    """graphviz's ``dot`` program is not installed, so no SVG can be rendered."""


def dot_available() -> bool:
    return shutil.which("dot") is not None


def _dot_missing_message(what: str) -> str:
    return (f"{what} needs graphviz's `dot` program to render SVG, and it is not on PATH. "
            "Install it with `make system-deps` (as root on Debian/Ubuntu), "
            "`apt-get install graphviz`, `brew install graphviz` or `conda install graphviz`; "
            "the DOT text is available without it as `.source` (draw(..., render=False)).")


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
