"""Fusion passes: rewrites XLA cannot see on its own, on a pattern-rewrite engine.

Passes (names for ``graphopt.optimize(passes=[...])``; ``"fuse"`` runs them all):

- ``fuse_attention``: hand-written softmax(q·kᵀ)·v → ``jax.nn.dot_product_attention``
  (cuDNN on GPU where dtype and head size allow, XLA elsewhere, causal attention as a
  block-causal kernel that skips masked score blocks); see ``fuse_attention``.
  ``fuse_attention_auto`` (in the default pipeline) fires on GPU, and elsewhere only
  where the block-causal kernel applies.
- ``fuse_batchnorm``: conv/dense followed by inference batch norm → folded weights.
- ``fuse_parallel_dots``: dots sharing an input → one dot on concatenated weights.
- ``fuse_matmul_chain``: matmul chains → the cheapest association.
- ``fuse_cross_entropy``: output projection + softmax cross-entropy → chunked.
- ``user_rewrites``: every rule registered with ``graphopt.rewrite(pattern, replacement)``.

Each fires only where its cost model says it pays (see each module's docstring) and
says in the report why a candidate was left alone. Fusions that need the forward
before differentiation (attention, cross-entropy) cannot apply to a training step whose
jaxpr already holds the backward pass: the report then says to decorate the loss.
An option named after the pass switches it off (``fuse_batchnorm=False``,
``user_rewrites=False``).
"""
from __future__ import annotations

from graphopt import ir, patterns
from graphopt.interpreter import Stats
from graphopt.options import SWITCH, register_option
from graphopt.passes import Pass, PassContext, PassResult, register_group, register_pass

from . import fuse_attention, fuse_batchnorm, fuse_dots, fuse_xent


def _runner(name: str, rules):
    """The pass function applying ``rules`` (a list, or a function returning one)."""
    def run(cj, ctx: PassContext | None = None) -> PassResult:
        stats = Stats()
        if ctx is not None and ctx.option(name, True) is False:
            stats.note(f"{name}: switched off by option {name}=False")
            return PassResult(cj, False, stats)
        rs = rules() if callable(rules) else rules
        if not rs:
            return PassResult(cj, False, stats)
        out = patterns.apply_rules(cj, rs, stats, ctx)
        if ctx is not None and ctx.placement == "post-AD" and name in POST_AD_SENSITIVE \
                and not stats.hits and not stats.notes:
            stats.note(f"{name}: no candidate found in this post-AD jaxpr; if the forward holds "
                       "one, " + fuse_attention.POST_AD_HINT)
        return PassResult(out, out is not cj, stats)
    run.__name__ = name
    return run


def _off_switch(name: str) -> None:
    """``name=False`` switches the pass off (the report says so)."""
    register_option(name, name, SWITCH, f"False switches {name} off")


def _make_pass(name: str, rules, description: str) -> Pass:
    return register_pass(Pass(name, _runner(name, rules), description, "fuse"))


POST_AD_SENSITIVE = ("fuse_attention", "fuse_attention_auto", "fuse_cross_entropy")

fuse_attention_pass = _make_pass("fuse_attention", fuse_attention.RULES,
                                 "hand-written attention -> jax.nn.dot_product_attention")
fuse_batchnorm_pass = _make_pass("fuse_batchnorm", fuse_batchnorm.RULES,
                                 "fold inference batch norm into conv/dense weights")
fuse_parallel_dots_pass = _make_pass("fuse_parallel_dots", fuse_dots.PARALLEL_RULES,
                                     "dots sharing an input -> one dot on concatenated weights")
fuse_matmul_chain_pass = _make_pass("fuse_matmul_chain", fuse_dots.CHAIN_RULES,
                                    "matmul chains -> cheapest association")
_xent_run = _runner("fuse_cross_entropy", fuse_xent.RULES)


def _holds_logsumexp(e) -> bool:
    """A ``custom_jvp_call`` whose body takes an ``exp`` and a ``log`` (logsumexp, a log
    softmax): the only calls a cross-entropy can hide in (a relu's opens to nothing)."""
    if e.primitive.name != "custom_jvp_call":
        return False
    names = {q.primitive.name for q, _, _ in ir.walk_eqns(e.params["call_jaxpr"])}
    return {"exp", "log"} <= names


def _open_custom_jvps(cj: ir.ClosedJaxpr):
    """``cj`` (its jit calls inlined) with its top-level ``custom_jvp_call``s that hold a
    logsumexp (:func:`_holds_logsumexp`) inlined too, and
    the outputs of the inlined equations that read a call's operands (its entries);
    (cj, empty) when it holds none."""
    flat, _ = patterns.inline_jits(cj)
    if not any(_holds_logsumexp(e) for e in flat.jaxpr.eqns):
        return cj, set()
    eqns, env, opened = [], {}, set()
    constvars, consts = list(flat.jaxpr.constvars), list(flat.consts)

    def look(a):
        return env.get(a, a) if ir.is_var(a) else a
    for e in flat.jaxpr.eqns:
        e = e.replace(invars=[look(v) for v in e.invars])
        if not _holds_logsumexp(e) or ir.effectful(e):
            eqns.append(e)
            continue
        body = e.params["call_jaxpr"]
        cvs = [ir.new_var(ir.aval_of(c)) for c in body.consts]
        constvars += cvs
        consts += list(body.consts)
        inner, outs = ir.copy_eqns(body.jaxpr, e.invars, cvs)
        eqns += inner
        operands = {v for v in e.invars if ir.is_var(v)}
        opened |= {v for ie in inner if any(ir.is_var(a) and a in operands for a in ie.invars)
                   for v in ie.outvars}
        env.update((v, a) for v, a in zip(e.outvars, outs) if ir.is_var(v))
    jaxpr = ir.make_jaxpr_from(flat.jaxpr, constvars=constvars, eqns=eqns,
                               outvars=[look(v) for v in flat.jaxpr.outvars])
    return ir.closed(jaxpr, consts), opened


def _cross_entropy(cj, ctx: PassContext | None = None) -> PassResult:
    """JAX >= 0.12 writes logsumexp (optax's losses) as a custom_jvp: when nothing fuses
    as traced, match again with those calls opened, and keep that only if the fused
    kernels consumed every opened call's reads of its operands (the kernel brings its own
    derivative; what is left are per-token steps on the kernel's statistics, while an
    opened call left unfused would lose its custom rule)."""
    res = _xent_run(cj, ctx)
    if res.changed:
        return res
    opened_cj, opened = _open_custom_jvps(cj)
    if not opened:
        return res
    again = _xent_run(opened_cj, ctx)
    left = [e for e, _, _ in ir.walk_eqns(again.jaxpr) if any(v in opened for v in e.outvars)]
    if again.changed and not left:
        return again
    return res


fuse_cross_entropy_pass = register_pass(Pass(
    "fuse_cross_entropy", _cross_entropy,
    "output projection + cross-entropy -> vocabulary chunks", "fuse"))
user_rewrites_pass = _make_pass("user_rewrites", patterns.user_rules,
                                "rules registered with graphopt.rewrite")


# On GPU the fused kernel (cuDNN, or XLA's attention) pays; elsewhere only the
# block-causal kernel does: XLA's plain attention is the hand-written computation itself.
_auto_run = _runner("fuse_attention_auto", fuse_attention.RULES_WHERE_IT_PAYS)


def _attention_where_it_pays(cj, ctx: PassContext | None = None) -> PassResult:
    res = _auto_run(cj, ctx)
    n = res.stats.details.pop(fuse_attention.NOT_PAYING, 0)  # what the forced pass would fuse
    if n and ctx is not None and ctx.platform != "gpu" and \
            ctx.option("fuse_attention_auto", True) is not False:
        res.stats.note(f"fuse_attention_auto: {n} attention(s) left as written on "
                       f"{ctx.platform}: not causal, masked, or shorter than "
                       f"{2 * fuse_attention.BLOCK_MIN} for the block-causal kernel, and "
                       "XLA's attention is the same computation there; "
                       "passes=['fuse_attention'] forces it")
    return res


fuse_attention_auto_pass = register_pass(Pass(
    "fuse_attention_auto", _attention_where_it_pays,
    "fuse_attention where it pays: GPU, or causal attention long enough for the "
    "block-causal kernel (the default pipeline's choice)", "fuse"))

for _name in ("fuse_attention", "fuse_batchnorm", "fuse_cross_entropy", "fuse_matmul_chain",
              "fuse_parallel_dots", "user_rewrites"):
    _off_switch(_name)

FUSE_PASSES = ["fuse_attention", "fuse_batchnorm", "fuse_cross_entropy", "fuse_matmul_chain",
               "fuse_parallel_dots", "user_rewrites"]
register_group("fuse", FUSE_PASSES)
# Exact fusions that join graphopt.optimize's default pipeline (each gated by its cost model).
DEFAULT_FUSIONS = ["fuse_attention_auto", "fuse_batchnorm", "fuse_cross_entropy", "fuse_parallel_dots",
                   "user_rewrites"]

__all__ = ["FUSE_PASSES", "DEFAULT_FUSIONS", "fuse_attention_pass", "fuse_batchnorm_pass",
           "fuse_parallel_dots_pass", "fuse_matmul_chain_pass", "fuse_cross_entropy_pass",
           "user_rewrites_pass"]
