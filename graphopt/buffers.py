"""The buffer picture: which values share storage, and what is live at the peak, and why.

:func:`memory_report` compiles a function once with XLA's dump of its buffer assignment
(``Lowered.compile(compiler_options={"xla_dump_to": ...})``, a public JAX API) and reads:

- the allocations: each is an argument, an output, XLA's one preallocated temp block
  (where the temporaries share storage at offsets), a constant or a thread-local
  scratch; their sums are XLA's own ``memory_analysis()`` totals (checked);
- storage reuse: the temporaries' bytes laid out in the temp block minus its size;
- XLA's live ranges: bytes live at each step of its schedule, and what is live at its
  peak, each buffer labelled argument, output, residual for the backward (made by the
  forward, read by the backward: its instruction's name stack has no ``transpose(``
  while the peak's has) or temporary;
- graphopt's own liveness (:func:`graphopt.analysis.liveness`) of the program as
  graphopt runs it, with the same labels at its estimated peak.

``plot()`` draws XLA's live bytes and graphopt's estimate on one memory timeline.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import re
import tempfile
from collections import Counter

import numpy as np

import jax

from . import analysis, ir
from .errors import require

ARGUMENT, OUTPUT, RESIDUAL, TEMPORARY = "argument", "output", "residual for the backward", \
    "temporary"


@dataclasses.dataclass
class Allocation:
    """One XLA allocation: ``kind`` in argument / output / temp / constant / thread-local;
    ``aliased``: an argument whose buffer an output reuses (donation); ``values``:
    (name, bytes, offset) of the logical buffers that share it."""
    index: int
    size: int
    kind: str
    aliased: bool
    values: list


@dataclasses.dataclass
class Live:
    """A buffer live at a peak: its name (HLO instruction or jaxpr value), bytes, why."""
    name: str
    nbytes: int
    why: str
    where: str = ""


@dataclasses.dataclass
class BufferReport:
    allocations: list
    totals: dict              # argument/output/alias/temp bytes summed from the allocations
    xla: dict                 # XLA's memory_analysis() of the same compile
    xla_timeline: np.ndarray  # bytes live per step of XLA's schedule (arguments included)
    xla_peak: list            # Live buffers at XLA's peak
    xla_peak_step: int
    estimate: np.ndarray      # graphopt's estimate per equation (arguments included)
    estimate_peak: list       # Live values at graphopt's estimated peak
    estimate_peak_eqn: int

    @property
    def temp_logical_bytes(self) -> int:
        """Bytes of the temporaries laid out in XLA's temp block (before sharing)."""
        return sum(b for a in self.allocations if a.kind == "temp" for _, b, _ in a.values)

    @property
    def reused_bytes(self) -> int:
        """Storage reuse: temporaries' bytes minus the temp block holding them."""
        return max(0, self.temp_logical_bytes - self.totals["temp_bytes"])

    @property
    def peak_bytes(self) -> int:
        """arguments + outputs - aliased + temp: what the program holds at most."""
        t = self.totals
        return t["argument_bytes"] + t["output_bytes"] - t["alias_bytes"] + t["temp_bytes"]

    def matches_xla(self) -> bool:
        return all(self.totals[k] == self.xla[k] for k in self.totals)

    @staticmethod
    def by_why(live) -> dict:
        out: Counter = Counter()
        for x in live:
            out[x.why] += x.nbytes
        return dict(out)

    def __str__(self) -> str:
        f, t = analysis.fmt_bytes, self.totals
        lines = [
            "graphopt memory report (XLA buffer assignment + graphopt liveness)",
            f"  arguments {f(t['argument_bytes'])}, outputs {f(t['output_bytes'])}, aliased "
            f"(donated) {f(t['alias_bytes'])}, temp {f(t['temp_bytes'])}: peak "
            f"{f(self.peak_bytes)}" + ("" if self.matches_xla() else
                                       f"  (XLA memory_analysis says {self.xla})"),
            f"  storage reuse: {f(self.temp_logical_bytes)} of temporaries share a "
            f"{f(t['temp_bytes'])} temp block ({f(self.reused_bytes)} reused)",
            f"  XLA's live peak at step {self.xla_peak_step}: " + _mix(self.by_why(self.xla_peak)),
        ]
        lines += [f"    {f(x.nbytes):>10}  {x.why:<26} {x.name} {x.where}"
                  for x in sorted(self.xla_peak, key=lambda x: -x.nbytes)[:8]]
        lines.append(f"  graphopt's estimated peak at equation {self.estimate_peak_eqn}: "
                     + _mix(self.by_why(self.estimate_peak)))
        lines += [f"    {f(x.nbytes):>10}  {x.why:<26} {x.name} {x.where}"
                  for x in sorted(self.estimate_peak, key=lambda x: -x.nbytes)[:8]]
        return "\n".join(lines)

    __repr__ = __str__

    def plot(self, ax=None):
        """XLA's live bytes along its schedule and graphopt's estimate along the
        equations, on one axis of program progress (0 to 1)."""
        plt = require("matplotlib.pyplot", "viz", "graphopt.memory_report plots")
        if ax is None:
            _, ax = plt.subplots(figsize=(9, 3.5))
        for ys, lab in ((self.xla_timeline, "XLA live buffers (its schedule)"),
                        (self.estimate, "graphopt estimate (jaxpr order)")):
            if len(ys):
                ax.plot(np.linspace(0, 1, len(ys)), ys / 2**20, label=lab, lw=1.2)
        ax.axhline(self.peak_bytes / 2**20, ls="--", lw=0.8, color="gray",
                   label="XLA peak: args + outputs - aliased + temp")
        ax.set_xlabel("program progress")
        ax.set_ylabel("MiB")
        ax.set_title("live memory, arguments and outputs included")
        ax.legend(fontsize=8)
        return ax


def _mix(d: dict) -> str:
    return ", ".join(f"{k} {analysis.fmt_bytes(v)}" for k, v in
                     sorted(d.items(), key=lambda kv: -kv[1])) or "nothing"


# ------------------------------------------------------------------ XLA's dump
_ALLOC = re.compile(r"^allocation (\d+): size (\d+)(.*?):$")
_VALUE = re.compile(r"^ value: <\d+ (\S+?)(\{[\d,]*\})? @\d+> \(size=(\d+),offset=(\d+)\)")
_FROM = re.compile(r"^ from instruction: %(\S+) = .*?op_name=\"([^\"]*)\"")


def _kind(attrs: str) -> str:
    if "parameter" in attrs:
        return "argument"
    if "preallocated-temp" in attrs:
        return "temp"
    if "constant" in attrs:
        return "constant"
    if "thread-local" in attrs:
        return "thread-local"
    if "live-out" in attrs or "output shape" in attrs:
        return "output"
    return "temp-other"


def parse_buffer_assignment(text: str) -> tuple[list, dict]:
    """(allocations, instruction -> op_name) from XLA's ``*buffer-assignment.txt``."""
    ops = {}
    for line in text.splitlines():
        m = _FROM.match(line)
        if m:
            ops[m.group(1)] = m.group(2)
    allocs, cur = [], None
    for line in text[text.find("BufferAssignment:"):].splitlines():
        m = _ALLOC.match(line)
        if m:
            attrs = m.group(3)
            cur = Allocation(int(m.group(1)), int(m.group(2)), _kind(attrs),
                             "parameter" in attrs and "live-out" in attrs, [])
            allocs.append(cur)
            continue
        m = _VALUE.match(line)
        if m and cur is not None:
            cur.values.append((m.group(1) + (m.group(2) or "").replace("{}", ""),
                               int(m.group(3)), int(m.group(4))))
    return allocs, ops


def totals(allocs) -> dict:
    """XLA's memory_analysis() figures summed from the allocations."""
    arg = sum(a.size for a in allocs if a.kind == "argument")
    alias = sum(a.size for a in allocs if a.aliased)
    out = sum(a.size for a in allocs if a.kind == "output") + alias
    temp = sum(a.size for a in allocs if a.kind == "temp")
    return {"argument_bytes": arg, "output_bytes": out, "alias_bytes": alias,
            "temp_bytes": temp}


def parse_live_ranges(text: str, allocs, ops) -> tuple[np.ndarray, list, int]:
    """(bytes live per schedule step, Live buffers at the peak, peak step) from XLA's
    ``*live-range.txt``."""
    seq = re.findall(r"^\s+(\d+):(\S+)$", text.split("BufferLiveRange:")[0], re.M)
    names = {int(i): n for i, n in seq}
    size = {name: b for a in allocs for name, b, _ in a.values}
    kind = {name: a.kind for a in allocs for name, _, _ in a.values}
    ranges = re.findall(r"^\s+(\S+?)\{([\d,]*)\}:(\d+)-(\d+)$",
                        text.split("BufferLiveRange:")[-1].split("Live ranges at")[0], re.M)
    n = max([int(e) for *_, e in ranges] + [len(names)]) + 1
    diff = np.zeros(n + 1, np.int64)
    spans = []
    for name, idx, s, e in ranges:
        key = name + (f"{{{idx}}}" if idx else "")
        b = size.get(key, 0)
        if kind.get(key) in ("constant", "thread-local") or b == 0:
            continue
        diff[int(s)] += b
        diff[int(e) + 1] -= b
        spans.append((key, b, int(s), int(e)))
    line = np.cumsum(diff)[:n]
    step = int(np.argmax(line)) if len(line) else 0
    backward = "transpose(" in ops.get(names.get(step, ""), "")
    peak = []
    for key, b, s, e in spans:
        if not s <= step <= e:
            continue
        op = ops.get(key.split("{")[0], "")
        if kind.get(key) == "argument":
            why = ARGUMENT
        elif kind.get(key) == "output":
            why = OUTPUT
        elif backward and "transpose(" not in op:
            why = RESIDUAL
        else:
            why = TEMPORARY
        peak.append(Live(key, b, why, op))
    return line, peak, step


def _dump(lowered, options=None) -> tuple:
    """Compile ``lowered`` with XLA's buffer dump: (compiled, assignment text, live ranges)."""
    with tempfile.TemporaryDirectory(prefix="graphopt_buffers_") as d:
        compiled = lowered.compile(compiler_options={
            **(options or {}), "xla_dump_to": d, "xla_dump_hlo_as_text": True})
        found = sorted(glob.glob(os.path.join(d, "*after_optimizations-buffer-assignment.txt")),
                       key=os.path.getsize)
        if not found:
            raise RuntimeError(f"XLA wrote no buffer assignment on backend "
                               f"{jax.default_backend()!r}; memory_report cannot read one")
        ba = found[-1]  # the program itself, not a small helper module
        lr = ba.replace("-buffer-assignment.txt", "-live-range.txt")
        with open(ba) as f:
            ba_text = f.read()
        lr_text = open(lr).read() if os.path.exists(lr) else ""
    return compiled, ba_text, lr_text


# ------------------------------------------------------------------ graphopt's side
def estimate_at_peak(cj: ir.ClosedJaxpr) -> tuple[np.ndarray, list, int]:
    """graphopt's liveness of ``cj``: (total live bytes per equation, Live values held
    while the peak equation runs, its index), labelled like XLA's."""
    lv = analysis.liveness(cj)
    line = lv.total_during()
    if not len(line):
        return line, [], -1
    i = int(np.argmax(line))
    top = analysis.top_level(cj)
    g = ir.Graph(top)
    back = lambda k: "transpose(" in ir.name_stack(top.eqns[k])  # noqa: E731
    peak = []
    for v, (s, l) in lv.intervals.items():
        k = lv.kind[v]
        if not s <= i <= l:  # held while equation i runs
            continue
        if k == "arg":
            why = ARGUMENT
        elif k == "out":
            why = OUTPUT
        elif not back(s) and any(back(u) for u in g.users.get(v, ())):
            why = RESIDUAL
        else:
            why = TEMPORARY
        where = ir.source_line(top.eqns[s]) if s >= 0 else ""
        peak.append(Live(ir.aval_str(v.aval), lv.nbytes[v], why, where))
    return line, peak, i


def memory_report(fn, *args, compiler_options: dict | None = None, **kwargs) -> BufferReport:
    """The buffer picture of ``fn(*args)``: XLA's buffer assignment and live ranges of
    the compiled program, beside graphopt's liveness of its jaxpr.

    ``fn``: a plain function (jitted as is) or a ``graphopt.optimize`` result (the program
    that runs, donation included). Compiles once; ``compiler_options`` go to XLA (e.g.
    ``{"xla_backend_optimization_level": 0}`` compiles faster: it changes code generation
    only, and gave the same memory figures on the zoo GPT step).
    """
    if hasattr(fn, "jaxpr") and hasattr(fn, "lower") and hasattr(fn, "original_jaxpr"):
        lowered, cj = fn.lower(*args, **kwargs), fn.jaxpr(*args, **kwargs)
    else:
        jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
        lowered, cj = jitted.lower(*args, **kwargs), jax.make_jaxpr(fn)(*args, **kwargs)
    compiled, ba_text, lr_text = _dump(lowered, compiler_options)
    allocs, ops = parse_buffer_assignment(ba_text)
    xla = _xla_dict(compiled)
    line, peak, step = parse_live_ranges(lr_text, allocs, ops)
    est, est_peak, eqn = estimate_at_peak(cj)
    return BufferReport(allocs, totals(allocs), xla, line, peak, step, est, est_peak, eqn)


def _xla_dict(compiled) -> dict:
    ma = compiled.memory_analysis()
    return {"argument_bytes": int(ma.argument_size_in_bytes),
            "output_bytes": int(ma.output_size_in_bytes),
            "alias_bytes": int(ma.alias_size_in_bytes),
            "temp_bytes": int(ma.temp_size_in_bytes)}


__all__ = ["memory_report", "BufferReport", "Allocation", "Live", "parse_buffer_assignment",
           "parse_live_ranges", "totals", "estimate_at_peak"]
