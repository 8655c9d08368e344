"""Liveness and peak memory along a jaxpr's schedule, and XLA's own memory figures.

:func:`liveness` / :func:`peak_memory` / :func:`memory_timeline` say which values are
live along the jaxpr's own equation order and *estimate* the temporary memory XLA would
need (XLA fuses, reorders and reuses buffers, so its figure differs: compare with
:func:`xla_memory` / :func:`estimate_vs_xla`). :func:`xla_memory` / :func:`xla_cost` read
what XLA reports for the compiled program. Reads jaxprs only.
"""
from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable

import numpy as np

import jax

from . import ir
from .cost import fmt_bytes, is_higher_order, top_level

# ----------------------------------------------------------------------- liveness

ARG, TEMP, OUT = "arg", "temp", "out"


@dataclasses.dataclass
class Liveness:
    """Live values along a jaxpr's own equation order (an estimate of XLA's memory).

    Every value is live from its producing equation to its last use; program inputs
    and constants (``kind == 'arg'``) from the start, program outputs (``'out'``) to the
    end; everything else is a temporary (``'temp'``). ``intervals[v] = (start, last)``
    with ``start == -1`` for arguments and ``last == n_eqns`` for outputs.

    Arrays, one entry per equation ``i``:

    - ``temp_after[i]``: bytes of temporaries still live after equation ``i`` ran;
    - ``temp_during[i]``: bytes held while ``i`` runs — temporaries it reads or that
      pass it by, its temporary outputs (dropped ones too), plus ``inner_temp[i]``;
    - ``inner_temp[i]``: for an equation with sub-jaxprs, their own peak temporaries
      (recursively; a scan body's peak once, a cond's largest branch);
    - ``out_after[i]`` / ``out_during[i]``: program outputs produced so far.

    ``arg_bytes`` is the constant size of inputs and constants. Like XLA's
    ``temp_size_in_bytes``, ``temp_*`` excludes arguments and outputs. It ignores
    fusion (XLA never materializes most elementwise intermediates), buffer reuse
    limits and XLA's reordering, so expect it to overestimate XLA's figure on chains of
    elementwise ops and to differ either way after rescheduling.
    """
    n_eqns: int
    intervals: dict
    kind: dict
    nbytes: dict
    temp_after: np.ndarray
    temp_during: np.ndarray
    inner_temp: np.ndarray
    out_after: np.ndarray
    out_during: np.ndarray
    arg_bytes: int

    def live_after(self, i: int, kinds: Iterable[str] = (ARG, TEMP, OUT)) -> set:
        """Values of the given kinds live after equation ``i`` (``i=-1``: at entry)."""
        kinds = set(kinds)
        return {v for v, (s, l) in self.intervals.items()
                if self.kind[v] in kinds and s <= i < l}

    def total_after(self) -> np.ndarray:
        return self.temp_after + self.out_after + self.arg_bytes

    def total_during(self) -> np.ndarray:
        return self.temp_during + self.out_during + self.arg_bytes

    def peak(self, include_args: bool = False) -> tuple[int, int]:
        """(peak bytes, equation index) of ``temp_during`` (plus args/outputs if asked)."""
        arr = self.total_during() if include_args else self.temp_during
        if len(arr) == 0:
            return (self.arg_bytes if include_args else 0), -1
        i = int(np.argmax(arr))
        return int(arr[i]), i

    def __str__(self) -> str:
        peak, i = self.peak()
        return (f"Liveness over {self.n_eqns} eqns: peak temp {fmt_bytes(peak)} at eqn "
                f"{i}, args {fmt_bytes(self.arg_bytes)}, outputs "
                f"{fmt_bytes(int(self.out_after[-1]) if self.n_eqns else 0)} "
                "(estimate of XLA's temp_size_in_bytes)")


def _inner_peak_temp(eqn) -> int:
    """Peak temporaries an equation's sub-jaxprs need while it runs (0 if none)."""
    if not is_higher_order(eqn):
        return 0
    # sub-jaxprs of one equation never run at the same time (cond branches, while's
    # predicate and body), so the largest one counts; a scan body's peak once
    return max((peak_memory(sub)[0] for _, _, sub in ir.subjaxpr_params(eqn)), default=0)


def liveness(closed_jaxpr) -> Liveness:
    """Live-value analysis of the top-level jaxpr in its equation order.

    See :class:`Liveness`. Sub-jaxprs are not unrolled: an equation that has them adds,
    while it runs, their own peak temporaries (recursively). A program that is a single
    jit call is analysed inside that call (see :func:`top_level`).
    """
    jaxpr = top_level(closed_jaxpr)
    eqns = jaxpr.eqns
    n = len(eqns)
    intervals: dict = {}
    kind: dict = {}
    nbytes: dict = {}
    for v in list(jaxpr.constvars) + list(jaxpr.invars):
        if ir.is_var(v):
            intervals[v] = (-1, -1)
            kind[v] = ARG
            nbytes[v] = ir.aval_nbytes(v.aval)
    drop_bytes = np.zeros(n, dtype=np.int64)  # outputs nobody holds (DropVar)
    for i, e in enumerate(eqns):
        for a in e.invars:
            if ir.is_var(a) and a in intervals:
                s, _ = intervals[a]
                intervals[a] = (s, i)
        for v in e.outvars:
            if ir.is_var(v):
                intervals[v] = (i, i)
                kind[v] = TEMP
                nbytes[v] = ir.aval_nbytes(v.aval)
            else:
                drop_bytes[i] += ir.aval_nbytes(v.aval)
    for v in jaxpr.outvars:
        if ir.is_var(v) and v in intervals:
            intervals[v] = (intervals[v][0], n)
            if kind[v] == TEMP:
                kind[v] = OUT
    # arguments stay allocated the whole program (XLA frees no parameter it does not own)
    for v, k in kind.items():
        if k == ARG:
            intervals[v] = (-1, n)

    inner = np.array([_inner_peak_temp(e) for e in eqns], dtype=np.int64)
    # difference arrays: value live after i for s <= i < l; held during i for s < i <= l
    d_after = {TEMP: np.zeros(n + 1, np.int64), OUT: np.zeros(n + 1, np.int64)}
    d_during = {TEMP: np.zeros(n + 2, np.int64), OUT: np.zeros(n + 2, np.int64)}
    arg_bytes = 0
    for v, (s, l) in intervals.items():
        k, b = kind[v], nbytes[v]
        if k == ARG:
            arg_bytes += b
            continue
        if l > s:
            d_after[k][s] += b
            d_after[k][min(l, n)] -= b
        # held while it is produced (s) and until its last reader has run (l)
        d_during[k][s] += b
        d_during[k][min(l, n - 1) + 1] -= b
    temp_after = np.cumsum(d_after[TEMP])[:n]
    out_after = np.cumsum(d_after[OUT])[:n]
    temp_during = np.cumsum(d_during[TEMP])[:n] + drop_bytes + inner
    out_during = np.cumsum(d_during[OUT])[:n]
    return Liveness(n, intervals, kind, nbytes, temp_after, temp_during, inner,
                    out_after, out_during, int(arg_bytes))


def peak_memory(closed_jaxpr, include_args: bool = False) -> tuple[int, int]:
    """Estimated peak bytes along the equation order, and the equation where it occurs.

    Temporaries only by default (like XLA's ``temp_size_in_bytes``, which excludes
    argument and output buffers); ``include_args=True`` adds inputs, constants and the
    outputs produced so far. An estimate: no fusion, no reordering (see
    :class:`Liveness`). The index is into ``top_level(closed_jaxpr).eqns``; ``-1`` for
    a program without equations.
    """
    return liveness(closed_jaxpr).peak(include_args)


def memory_timeline(closed_jaxpr, include_args: bool = False,
                    at: str = "after") -> np.ndarray:
    """Estimated live bytes per top-level equation (for plots).

    ``at="after"``: what stays live once equation ``i`` has run; ``at="during"``: what
    is held while it runs (its inputs, outputs and sub-jaxprs' temporaries; its maximum
    is :func:`peak_memory`). Temporaries only unless ``include_args``.
    """
    lv = liveness(closed_jaxpr)
    if at == "after":
        return lv.total_after() if include_args else lv.temp_after.copy()
    if at == "during":
        return lv.total_during() if include_args else lv.temp_during.copy()
    raise ValueError(f"at must be 'after' or 'during', got {at!r}")


# --------------------------------------------------------------------- XLA figures

_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def memory_aware_scheduler_flag() -> str:
    """The ``XLA_FLAGS`` entry that makes XLA:CPU schedule for memory.

    XLA's default CPU scheduler optimizes for concurrency and ignores memory, so
    rematerialization savings only show in :func:`xla_memory` with this flag. It must be
    in the ``XLA_FLAGS`` environment variable before JAX initializes its backend (before
    the first computation), e.g. ``XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_
    scheduler=false python ...``; setting it later in a running process has no effect.
    Reports should say whether it was set (:func:`memory_aware_scheduler_active`).
    """
    return _SCHEDULER_FLAG


def memory_aware_scheduler_active() -> bool:
    """Whether ``XLA_FLAGS`` in this process's environment carries the flag above."""
    return _SCHEDULER_FLAG in os.environ.get("XLA_FLAGS", "").split()


def _compile(fn, args, kwargs):
    if isinstance(fn, ir.ClosedJaxpr):
        fn = ir.jaxpr_as_fun(fn)
    lower = getattr(fn, "lower", None)  # already jitted: keep its static args etc.
    if lower is None:
        lower = jax.jit(fn).lower
    return lower(*args, **kwargs).compile()


def _memory_dict(compiled) -> dict:
    ma = compiled.memory_analysis()
    if ma is None:
        raise RuntimeError(
            f"XLA reports no memory_analysis() on backend {jax.default_backend()!r}; "
            "use peak_memory() for an estimate instead")
    peak = getattr(ma, "peak_memory_in_bytes", None)
    return {
        "temp_bytes": int(ma.temp_size_in_bytes),
        "argument_bytes": int(ma.argument_size_in_bytes),
        "output_bytes": int(ma.output_size_in_bytes),
        "alias_bytes": int(ma.alias_size_in_bytes),
        "generated_code_bytes": int(ma.generated_code_size_in_bytes),
        "peak_bytes": None if peak is None else int(peak),
    }


def xla_memory(fn, *args, **kwargs) -> dict:
    """XLA's own memory figures for ``jax.jit(fn)`` compiled on ``args``.

    Keys: ``temp_bytes``, ``argument_bytes``, ``output_bytes``, ``alias_bytes``,
    ``generated_code_bytes`` (ints) and ``peak_bytes`` (int, or None where this jaxlib
    does not report it). ``fn`` may be a plain function, an already-jitted one (its
    static arguments are honoured) or a ClosedJaxpr (``args`` then are its flat inputs).
    On CPU the figure depends on the scheduler: see :func:`memory_aware_scheduler_flag`.
    Raises RuntimeError where the backend reports no memory analysis.
    """
    return _memory_dict(_compile(fn, args, kwargs))


def _cost_dict(compiled) -> dict:
    raw = compiled.cost_analysis()
    if raw is None:
        raise RuntimeError(
            f"XLA reports no cost_analysis() on backend {jax.default_backend()!r}; "
            "use program_cost() for an estimate instead")
    # older jaxlibs return one dict per device/partition in a list
    parts = [raw] if isinstance(raw, dict) else [p for p in raw if p]
    merged: dict[str, float] = {}
    for p in parts[:1]:
        merged.update({k: float(v) for k, v in p.items()
                       if isinstance(v, (int, float, np.number))})
    return {
        "flops": merged.get("flops", 0.0),
        "transcendentals": merged.get("transcendentals", 0.0),
        "bytes_accessed": merged.get("bytes accessed", 0.0),
        "raw": merged,
    }


def xla_cost(fn, *args, **kwargs) -> dict:
    """XLA's ``cost_analysis()`` of ``jax.jit(fn)`` on ``args``, normalized to one dict.

    Keys ``flops``, ``transcendentals``, ``bytes_accessed`` (floats; XLA counts after
    fusion, and a while body once) and ``raw`` (every numeric entry XLA gave). Raises
    RuntimeError where the backend reports none.
    """
    return _cost_dict(_compile(fn, args, kwargs))


def estimate_vs_xla(fn, *args, **kwargs) -> dict:
    """Compare :func:`peak_memory` of ``jax.make_jaxpr(fn)(*args)`` with XLA's temp bytes.

    Returns ``estimate`` and ``xla`` (bytes), ``rel_error`` ((estimate - xla) / xla;
    0 when both are 0, inf when only XLA's is 0), ``eqn_at_peak`` and ``scheduler``
    ('memory-aware' or 'default', see :func:`memory_aware_scheduler_flag`).
    """
    cj = jax.make_jaxpr(fn)(*args, **kwargs)
    est, at = peak_memory(cj)
    xla = xla_memory(fn, *args, **kwargs)["temp_bytes"]
    if xla:
        rel = (est - xla) / xla
    else:
        rel = 0.0 if est == 0 else math.inf
    return {"estimate": int(est), "xla": int(xla), "rel_error": float(rel),
            "eqn_at_peak": at,
            "scheduler": "memory-aware" if memory_aware_scheduler_active() else "default"}
