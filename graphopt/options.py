"""The pass options ``graphopt.optimize(f, **options)`` accepts: one table, checked once.

Every option a pass reads through ``ctx.option(name)`` is declared here with the pass
that reads it, what it accepts and what it means. :func:`validate` runs when
``optimize`` (or ``graphopt.remat``) is called, so a misspelt option or a malformed
value is an error at once that names the valid choices, never a silently ignored knob.
Values are returned normalized (``"64KiB"`` -> 65536), so passes read plain numbers.
"""
from __future__ import annotations

import dataclasses
import difflib
import numbers
import re
from collections.abc import Callable

from .errors import OptionError

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20,
          "gib": 2**30, "tib": 2**40}


def parse_bytes(value, what: str, minimum: int = 1) -> int:
    """A byte count >= ``minimum`` from an int (NumPy ints too) or a string like '64KiB'."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        if int(value) < minimum:
            raise OptionError(f"{what} must be at least {minimum} bytes, got {value}")
        return int(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if m and m.group(2).lower() in _UNITS:
            n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
            if n < minimum:
                raise OptionError(f"{what} must be at least {minimum} bytes, got {value!r}")
            return n
        raise OptionError(f"cannot read {what} {value!r}; write e.g. '2GiB', '512MiB', "
                          f"'300MB' or bytes as an int")
    raise OptionError(f"{what} must be bytes (an int or a string like '2GiB'), got "
                      f"{type(value).__name__} {value!r}")


def parse_budget(budget, reference: int | None = None) -> int:
    """Bytes for an int, a string like "2GiB", or a float fraction in (0, 1] of
    ``reference`` (NumPy scalars too)."""
    what = "remat: memory_budget"
    if isinstance(budget, numbers.Real) and not isinstance(budget, (bool, numbers.Integral)):
        frac = float(budget)
        if not 0.0 < frac <= 1.0:
            raise OptionError(f"{what}: a float is a fraction in (0, 1], got {budget}")
        if reference is None:
            raise OptionError(f"{what}: a fraction needs the program's temp memory")
        return max(1, int(frac * reference))
    if budget is None or isinstance(budget, bool):
        raise OptionError(f"{what} must be bytes, a string like '2GiB' or a fraction in "
                          f"(0, 1], got {budget!r}")
    return parse_bytes(budget, what)


def _check_budget(v):
    parse_budget(v, 1)
    return v  # a fraction stays a fraction: the pass knows the reference


def _one_of(*choices):
    def check(v):
        # `is` for booleans: 1 == True and 0 == False must not pass as True/False
        if any(v is c if isinstance(c, bool) else (not isinstance(v, bool) and v == c)
               for c in choices):
            return v
        raise ValueError(f"must be one of {', '.join(map(repr, choices))}, got {v!r}")
    return check


def _positive(kind):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or v <= 0 \
                or (kind is int and not isinstance(v, numbers.Integral)):
            raise ValueError(f"must be a positive {kind.__name__}, got {v!r}")
        return kind(v)
    return check


def _micro_batches(v):
    if v is True or v is False or v == "auto" or (
            isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 1):
        return v if not isinstance(v, numbers.Integral) or isinstance(v, bool) else int(v)
    raise ValueError(f"must be 'auto', True, False or a number of micro-batches > 1, got {v!r}")


def _fraction(v):
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 < v <= 1:
        raise ValueError(f"must be a fraction in (0, 1], got {v!r}")
    return float(v)


@dataclasses.dataclass(frozen=True)
class Option:
    name: str
    pass_name: str          # the pass (or group) that reads it
    check: Callable         # value -> normalized value; raises on a bad one
    doc: str
    adds_pass: str | None = None    # giving the option appends this pass to the pipeline
    check_rtol: Callable | None = None  # value -> rtol for optimize(check=True), or None


_AUTO_BOOL = _one_of("auto", True, False)
SWITCH = _one_of(True, False)  # an on/off option (a pass's off-switch, say)
_PRECISIONS = {"bfloat16": 5e-2, "float16": 2e-2}  # compute dtype -> rtol of check=True


def _precision(v):
    """A compute-dtype name, or a graphopt.Precision (anything with .compute)."""
    compute = v if isinstance(v, str) else getattr(v, "compute", None)
    if compute not in _PRECISIONS:
        raise ValueError(f"must be one of {', '.join(map(repr, _PRECISIONS))} or a "
                         f"graphopt.Precision, got {v!r}")
    return v


def _precision_rtol(v):
    return _PRECISIONS[v if isinstance(v, str) else v.compute]


OPTIONS: dict[str, Option] = {o.name: o for o in [
    Option("memory_budget", "remat", _check_budget,
           "XLA temp bytes for the program: int, '2GiB' or a fraction in (0, 1]; adds remat",
           adds_pass="remat"),
    Option("remat_micro_batches", "remat", _micro_batches,
           "'auto', True, False or K: run a post-AD step as micro-batches"),
    Option("remat_measure", "remat", _one_of("xla", "estimate"),
           "how memory is measured: XLA's compiled figure or graphopt's estimate"),
    Option("remat_solver", "remat", _one_of("auto", "milp", "greedy"),
           "which solver chooses what to keep"),
    Option("remat_time_limit", "remat", _positive(float), "seconds the MILP solver may take"),
    Option("remat_max_cuts", "remat", _positive(int), "most segments the plan cuts"),
    Option("remat_refine_max", "remat", _positive(int), "most segments tried one by one"),
    Option("remat_scan", "remat", _one_of(True, False), "rewrite lax.scan layers"),
    Option("remat_order_backward", "remat", _AUTO_BOOL, "reorder the backward pass"),
    Option("remat_narrow_fence", "remat", _AUTO_BOOL, "fence only what is recomputed"),
    Option("remat_skip_kept", "remat", _AUTO_BOOL, "do not recompute outputs kept anyway"),
    Option("fold_max_bytes", "fold", lambda v: parse_bytes(v, "fold_max_bytes", minimum=0),
           "largest constant folding may create (int or '64KiB')"),
    Option("xent_chunk", "fuse_cross_entropy", _positive(int), "vocabulary chunk size"),
    Option("xent_chunk_bytes", "fuse_cross_entropy",
           lambda v: parse_bytes(v, "xent_chunk_bytes"), "bytes of logits per chunk"),
    Option("xent_min_bytes", "fuse_cross_entropy",
           lambda v: parse_bytes(v, "xent_min_bytes", minimum=0),
           "smallest logits worth chunking (0: always)"),
    Option("chain_ratio", "fuse_matmul_chain", _fraction,
           "reorder a matmul chain only below this FLOP ratio"),
    Option("parallel_dots", "fuse_parallel_dots", _one_of("auto", "always", "never", False),
           "merge parallel dots on a shared input"),
    Option("precision", "precision", _precision,
           "'bfloat16', 'float16' or graphopt.Precision(...): compute dtype of dots, convs "
           "and the elementwise ops between them; adds the precision pass",
           adds_pass="precision", check_rtol=_precision_rtol),
    Option("fuse_attention_auto", "fuse_attention_auto", SWITCH,
           "say in the report why attention stays unfused"),
]}


def register_option(name: str, pass_name: str, check: Callable = lambda v: v,
                    doc: str = "", adds_pass: str | None = None,
                    check_rtol: Callable | None = None) -> Option:
    """Declare an option your own pass reads with ``ctx.option(name)``; ``check`` takes
    the value and returns it normalized, raising ValueError on a bad one. ``adds_pass``:
    a pass the option switches on; ``check_rtol``: value -> the tolerance
    ``optimize(check=True)`` compares with (for passes that change numerics on purpose)."""
    if name in OPTIONS and OPTIONS[name].pass_name != pass_name:
        raise OptionError(f"option {name!r} is already read by pass {OPTIONS[name].pass_name!r}")
    OPTIONS[name] = Option(name, pass_name, check, doc, adds_pass, check_rtol)
    return OPTIONS[name]


def implied_passes(options: dict, present) -> list[str]:
    """Passes the given options switch on that ``present`` lacks; "remat" last, since a
    memory budget is measured on the program the other passes leave."""
    added = [OPTIONS[k].adds_pass for k, v in options.items()
             if v is not None and OPTIONS[k].adds_pass and OPTIONS[k].adds_pass not in present]
    added = list(dict.fromkeys(added))
    return sorted(added, key=lambda p: p == "remat")


def check_rtol(options: dict) -> float | None:
    """The loosest tolerance the given options ask ``check=True`` for (None: the default)."""
    tols = [OPTIONS[k].check_rtol(v) for k, v in options.items()
            if v is not None and OPTIONS[k].check_rtol is not None]
    tols = [t for t in tols if t is not None]
    return max(tols) if tols else None


def suggest(name: str, among=None) -> str:
    """' (did you mean ...?)' for the closest of ``among`` (default: every option), or ''."""
    close = difflib.get_close_matches(name, OPTIONS if among is None else among, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def validate(options: dict, where: str) -> dict:
    """``options`` checked and normalized; :class:`OptionError` naming the bad one."""
    out = {}
    for name, value in options.items():
        opt = OPTIONS.get(name)
        if opt is None:
            if name in ("donate", "donate_argnums", "donate_argnames"):
                raise OptionError(f"{where}: {name} is an argument of graphopt.optimize, not a "
                                  "pass option; graphopt.remat and optimize_jaxpr do not donate")
            raise OptionError(f"{where}: unknown option {name!r}{suggest(name)}; valid "
                              f"options: {', '.join(sorted(OPTIONS))}")
        try:
            out[name] = opt.check(value)
        except OptionError as exc:
            raise OptionError(f"{where}: {exc}") from None
        except (TypeError, ValueError) as exc:
            raise OptionError(f"{where}: option {name!r} (read by pass {opt.pass_name!r}) "
                              f"{exc}") from None
    return out


__all__ = ["OPTIONS", "Option", "register_option", "validate", "parse_budget", "parse_bytes",
           "implied_passes", "check_rtol"]
