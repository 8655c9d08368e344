"""Fusions after AD by differentiating the fused loss.

A training step's jaxpr already holds the backward pass when graphopt sees it, and a
fusion that exists to keep [T, T] scores or [tokens, V] logits out of memory must replace
the forward *and* the backward equations that read them. Rather than matching the
transposed equations (one spelling per JAX version), graphopt recovers the differentiated
function: while it traces a decorated step, each function the step hands to
``jax.grad`` / ``jax.value_and_grad`` (also what ``nnx.value_and_grad`` and
``eqx.filter_value_and_grad`` call underneath) is first optimized with the step's fusion
passes, so JAX differentiates the fused kernels, whose backward is their own custom VJP.

What it catches: those two functions looked up on ``jax`` at call time. ``from jax import
grad`` bound before the step was defined, ``jax.vjp`` and hand-written custom VJPs are
left as traced (the post-AD passes then report what they could not fuse).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
import time

import jax

from .errors import GraphoptError
from .interpreter import Stats
from .options import SWITCH, register_option

# Passes that must see the forward before AD to pay (the rest run on the whole step).
PRE_AD_PASSES = ("fuse_attention", "fuse_attention_auto", "fuse_cross_entropy")
_TARGETS = ("grad", "value_and_grad")
_LOCK = threading.RLock()  # jax's module attributes are process-wide: one patcher at a time


register_option("fuse_before_ad", "fuse_before_ad", SWITCH,
                "False: leave the functions a step differentiates as written")


@dataclasses.dataclass
class Inner:
    """One differentiated function optimized during a step's trace."""
    name: str
    via: str                    # "jax.grad" or "jax.value_and_grad"
    stats: Stats
    error: str | None = None    # why it was differentiated as written instead


def pre_ad_passes(pass_specs) -> list:
    """The passes of a pipeline that run on differentiated functions before AD (each once,
    with its own settings when it was configured: ``graphopt.passes.fuse(...)``)."""
    from .passes import resolve
    first = {}
    for p in resolve(list(pass_specs)):
        first.setdefault(p.name, p)
    return [p for n, p in first.items() if n in PRE_AD_PASSES]


def pre_ad_options(options: dict, passes) -> dict:
    """The options read by ``passes`` (a memory budget stays with the whole step)."""
    from .options import OPTIONS
    names = {p.name for p in passes}
    return {k: v for k, v in options.items()
            if k in names or getattr(OPTIONS.get(k), "pass_name", None) in names}


@contextlib.contextmanager
def fusing_grads(passes: list, options: dict, found: list[Inner]):
    """Within the block, ``jax.grad(f)`` / ``jax.value_and_grad(f)`` differentiate ``f``
    optimized with ``passes``; each such function is appended to ``found``."""
    if not passes:
        yield
        return
    with _LOCK:
        saved = {n: getattr(jax, n) for n in _TARGETS}
        for n in _TARGETS:
            setattr(jax, n, _patched(n, saved[n], passes, options, found))
        try:
            yield
        finally:
            for n, f in saved.items():
                setattr(jax, n, f)


def _patched(via: str, original, passes, options, found):
    @functools.wraps(original)
    def grad_like(fun, *a, **k):
        return original(_fused(fun, f"jax.{via}", passes, options, found), *a, **k)
    return grad_like


def _fused(fun, via, passes, options, found):
    """``fun`` optimized with ``passes`` when called; as written if the pipeline refuses."""
    from .api import Optimized
    opt = Optimized(fun, passes=passes, jit=False, options=options)
    inner = Inner(opt.__name__, via, Stats())
    found.append(inner)

    @functools.wraps(fun)
    def call(*args, **kwargs):
        try:
            entry, _ = opt._build(args, kwargs)
        except GraphoptError as exc:  # a pass refused: differentiate the function as written
            inner.error = str(exc).splitlines()[0]
            return fun(*args, **kwargs)
        for r in entry.report.records:
            if r.name != "donate":  # the loss's own buffers are the step's business
                inner.stats.merge(r.stats)
        return opt(*args, **kwargs)
    return call


def trace(flat_fun, specs, pass_specs, options):
    """``(original, to_optimize, out_shape, record)``: the step traced as written, and
    traced with its differentiated functions fused before AD when any fusion fired there
    (``record`` then says what, as the pipeline's first record; else ``None`` and
    ``to_optimize is original``)."""
    from .passes import PassRecord
    found: list[Inner] = []
    passes = pre_ad_passes(pass_specs) if options.get("fuse_before_ad", True) else []
    t0 = time.perf_counter()
    with fusing_grads(passes, pre_ad_options(options, passes), found):
        # a fresh function object each time: make_jaxpr caches traces per function
        traced, out_shape = jax.make_jaxpr(lambda *a: flat_fun(*a), return_shape=True)(*specs)
    if not any(i.stats.hits for i in found):
        return traced, traced, out_shape, None
    # as written too: the report's "before", and what check=True compares against
    original = jax.make_jaxpr(lambda *a: flat_fun(*a))(*specs)
    record = PassRecord("fuse_before_ad", 0, original, traced, True, summary(found),
                        time.perf_counter() - t0)
    return original, traced, out_shape, record


def summary(found: list[Inner]) -> Stats:
    """What the pre-AD fusions did in the step's differentiated functions, as pass stats."""
    stats = Stats()
    for inner in found:
        stats.hits.update(inner.stats.hits)
        for n in inner.stats.notes:
            stats.note(f"{inner.via}({inner.name}): {n}")
        if inner.error:
            stats.note(f"{inner.via}({inner.name}) differentiated as written: {inner.error}")
    fused = sum(sum(i.stats.hits.values()) for i in found)
    if found:
        stats.note(f"fuse_before_ad: {len(found)} function(s) differentiated inside the step "
                   f"were optimized before AD ({fused} fusion(s)), so their backward is the "
                   "fused kernels' own")
    return stats


__all__ = ["PRE_AD_PASSES", "Inner", "fusing_grads", "pre_ad_passes", "pre_ad_options",
           "summary", "trace"]
