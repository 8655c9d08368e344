"""Shrinking a failing fuzz program (:func:`shrink`) and writing it as a regression test
(:func:`to_test`) whose one test calls :func:`regression`, the helper every file under
``tests/regressions/`` shares. The oracle is :mod:`graphopt.fuzz`.
"""
from __future__ import annotations

import copy
import re
import time
from typing import TYPE_CHECKING

import graphopt

from . import fuzz_programs as fp
from .fuzz_programs import Program

if TYPE_CHECKING:
    from .fuzz import Outcome

def regression(fn, inputs, config: dict, *, kind: str = "fn", x64: bool = False, opt=None):
    """The oracle on a saved regression program under the config it failed with; raises
    ``AssertionError`` (status, place, detail) on a mismatch or crash, and on a program
    JAX itself rejects (a regression test that no longer runs its program proves nothing).
    ``config["ad"]`` says which derivatives are compared (both when absent)."""
    from .fuzz import check_function
    out = check_function(fn, inputs, config, kind=kind, x64=x64, opt=opt,
                         ad=tuple(config.get("ad", ("vjp", "jvp"))))
    if out.failed or out.status == "invalid":
        raise AssertionError(f"{out.status} in {out.where}: {out.detail}")
    return out


# ------------------------------------------------------------------------ shrinking
def _rename(prog, old: str, new: str) -> None:
    pat, sub = re.compile(rf"\b{old}\b"), lambda names: [new if n == old else n for n in names]
    for s, _ in fp.walk(prog.body):
        s.expr, s.ins, s.ret = pat.sub(new, s.expr), sub(s.ins), sub(s.ret)
        s.attrs.update({"pred": new} if s.attrs.get("pred") == old else {})
    prog.outs = sub(prog.outs)


def _prune(prog) -> Program:
    """Drop statements nothing reads, then inputs nothing uses (in place)."""
    while True:
        stmts = list(fp.walk(prog.body))
        used = set(prog.outs) | {n for s, _ in stmts for n in s.uses() | set(s.ret)}
        dead = [(s, h) for s, h in stmts if not set(s.outs) & used]
        if not dead:
            break
        dead[-1][1].remove(dead[-1][0])
    keep = [i for i in prog.inputs if i.name in used]
    for role in ("param", "batch"):  # a step keeps one of each
        if not any(i.role == role for i in keep) and any(i.role == role for i in prog.inputs):
            keep.append(next(i for i in prog.inputs if i.role == role))
    prog.inputs = keep
    return prog


def _edits(prog):
    """Smaller variants of ``prog``, most aggressive first (some will not type-check)."""
    def variant(edit, *a):
        p = copy.deepcopy(prog)
        edit(p, *a)
        return p

    def stmt(p, k):
        return list(fp.walk(p.body))[k]

    def bypass(p, k, name):  # the statement's output replaced by one of its operands
        t, holder = stmt(p, k)
        holder.remove(t)
        _rename(p, t.outs[0], name)

    def inline(p, k):  # a block replaced by its body (cond: the true branch)
        t, holder = stmt(p, k)
        holder[holder.index(t):holder.index(t) + 1] = t.body
        args = dict(zip(t.params, t.ins))
        for name in list(args) + t.outs:
            _rename(p, name, args[name] if name in args else args.get(t.ret[t.outs.index(name)],
                                                                        t.ret[t.outs.index(name)]))

    def dims(p, d, new):
        for i in p.inputs:
            i.shape = tuple(new if x == d else x for x in i.shape)
            i.hi = min(i.hi, new) if i.hi == d else i.hi
    for j in range(len(prog.outs) - 1, prog.kind == "step", -1):
        yield variant(lambda p, j: p.outs.pop(j), j)
    n = len(list(fp.walk(prog.body)))
    for k in range(n - 1, -1, -1):
        yield variant(lambda p, k: stmt(p, k)[1].remove(stmt(p, k)[0]), k)
    for k in range(n - 1, -1, -1):
        s = stmt(prog, k)[0]
        for name in sorted(s.uses() - set(s.params)) if len(s.outs) == 1 else []:
            yield variant(bypass, k, name)
        if s.kind not in ("op", "while", "scan"):
            yield variant(inline, k)
        if s.attrs.get("trips", 1) > 1 or s.attrs.get("reverse"):
            yield variant(lambda p, k: stmt(p, k)[0].attrs.update(trips=1, reverse=False), k)
    yield from _config_edits(prog, variant)
    for d in sorted({d for i in prog.inputs for d in i.shape if d > 1}, reverse=True):
        for new in sorted({1, 2, d - 1} - {d}):
            yield variant(dims, d, new)


def _config_edits(prog, variant):
    cfg, opts = prog.config, prog.config.get("options", {})
    for key, value in (("jit", False), ("ad", ()), ("ad", ("vjp",)), ("ad", ("jvp",))):
        if cfg.get(key, ("vjp", "jvp")) and cfg.get(key) != value:
            yield variant(lambda p, key, value: p.config.update({key: value}), key, value)
    passes = list(cfg.get("passes") or graphopt.default_passes())
    for k in range(len(passes) if len(passes) > 1 or cfg.get("passes") is None else 0):
        yield variant(lambda p, k: p.config.update(passes=[passes[k]]), k)
        yield variant(lambda p, k: p.config.update(passes=passes[:k] + passes[k + 1:]), k)
    def drop(p, key):  # without memory_budget, no remat option may stay
        p.config["options"] = {k: v for k, v in opts.items()
                               if k != key and not (key == "memory_budget" and "remat" in k)}
    for key in opts:
        yield variant(drop, key)


_key = lambda p: (p.source(), repr(p.config), [(i.shape, i.hi) for i in p.inputs])  # noqa: E731


def shrink(prog: Program, outcome: Outcome, *, seconds: float = 120.0, max_checks: int = 400,
           log=None) -> tuple[Program, Outcome]:
    """The smallest variant of ``prog`` (fewer statements, outputs, passes, options, smaller
    shapes) found within the limits that still fails the same way (status and place)."""
    from .fuzz import check
    best, best_out, checks, t0 = _prune(copy.deepcopy(prog)), outcome, 0, time.time()
    improved = True
    while improved and checks < max_checks and time.time() - t0 < seconds:
        improved = False
        for cand in _edits(best):
            if _key(_prune(cand)) == _key(best):  # an edit that changed nothing
                continue
            checks += 1
            out = check(cand)
            if out.signature == outcome.signature:
                best, best_out, improved = cand, out, True
                if log:
                    log(f"  shrunk to {best.count()} statements, {len(best.inputs)} inputs")
                break
            if checks >= max_checks or time.time() - t0 > seconds:
                break
    return best, best_out


# ---------------------------------------------------------------- tests and the runner
# What a generated program may call, and the import that provides it.
_IMPORTS = (("jax", "import jax"), ("jnp", "import jax.numpy as jnp"),
            ("np", "import numpy as np"), ("optax", "import optax"), ("lax", "from jax import lax"))


def to_test(prog: Program, outcome: Outcome, why: str = "") -> str:
    """``prog`` as a pytest module that fails while graphopt has the bug it found: the
    program, its inputs and config, and one test calling :func:`regression`. ``why``: a
    paragraph for the docstring (the cause, once known)."""
    src, name = prog.source(), re.sub(r"\W+", "_", prog.label).strip("_")
    helpers = sorted(h for h in fp.HELPERS if re.search(rf"\b{h}\(", src))
    config = dict(prog.config)  # a Pass object is written as its (registered) name
    if config.get("passes") is not None:
        config["passes"] = [getattr(p, "name", p) for p in config["passes"]]
    detail = "\n".join(line[:100] for line in outcome.detail.splitlines()[:6])
    imports = [imp for mod, imp in _IMPORTS if re.search(rf"\b{mod}\.", src)]
    fn = "f" if prog.kind == "fn" else "step"
    args = f"kind={prog.kind!r}" + (", x64=True" if prog.x64 else "") + (
        ", opt=OPT" if prog.kind == "step" else "")
    return (f'"""graphopt.fuzz regression ({prog.label}): {outcome.status} in {outcome.where}.\n\n'
            + (f"{why.strip()}\n\n" if why.strip() else "") + f'{detail}\n"""\n'
            + "".join(f"{imp}\n" for imp in imports) + ("\n" if imports else "")
            + "from graphopt.fuzz import regression\n"
            + (f"from graphopt.fuzz_programs import {', '.join(helpers)}\n" if helpers else "")
            + f"\n\n{src}\n\nINPUTS = [  # name, shape, dtype, role, integers drawn below"
            + "".join(f"\n    {(i.name, i.shape, i.dtype, i.role, i.hi)!r}," for i in prog.inputs)
            + f"\n]\nCONFIG = {config!r}\n\n\ndef test_fuzz_{name}():\n"
            f"    regression({fn}, INPUTS, CONFIG, {args})\n")


__all__ = ["regression", "shrink", "to_test"]
