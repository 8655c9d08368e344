"""Random well-typed JAX programs for :mod:`graphopt.fuzz`, and their Python source.

A :class:`Program` is statements over named values: *ops* (one JAX expression each) and
*blocks* (``jit``, ``checkpoint``, ``cond``, ``scan``, ``while``, ``custom_jvp``,
``custom_vjp``) holding statements, nested up to three deep. Operands an op needs are
fresh inputs (a step's parameters) or constants. Types come from ``jax.eval_shape`` of
each expression: the generator proposes, JAX decides what is well-typed.
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np

import jax
import jax.numpy as jnp
from jax import lax

BLOCKS = ("jit", "checkpoint", "cond", "scan", "while", "custom_jvp", "custom_vjp")  # 4 close over
# adam's and rmsprop's eps bounds how far they amplify a gradient that is float noise (a
# parameter the loss does not depend on: default eps makes it ±lr by the noise's sign)
OPTIMIZERS = ("optax.sgd(0.1)", "optax.sgd(0.05, momentum=0.9)", "optax.adam(0.01, eps=1e-3)",
              "optax.adamw(0.01, eps=1e-3)", "optax.rmsprop(0.01, eps=1e-3)")
PASSES = ("prune", "dce", "fold", "cse", "simplify", "fuse", "fuse_attention", "remat",
          "fuse_attention_auto", "fuse_batchnorm", "fuse_cross_entropy", "fuse_matmul_chain",
          "fuse_parallel_dots")
NAME = re.compile(r"\b[vxwda]\d+\b")


def kind_of(dtype) -> str:
    d = np.dtype(dtype)
    return "b" if d == np.bool_ else "u" if d.kind == "u" else "i" if d.kind == "i" else "f"


# ----------------------------------------------------------------- helpers programs call
def perturb(x):
    """The other branch of a generated ``cond``: same types, different values."""
    k = kind_of(x.dtype)
    return ~x if k == "b" else x * 0.5 if k == "f" else x + 1


def custom_jvp(fn):
    """``fn`` with a ``jax.custom_jvp`` rule of half the true derivative."""
    f = jax.custom_jvp(fn)
    f.defjvp(lambda p, t: (lambda o, tn: (o, tuple(u * 0.5 for u in tn)))(*jax.jvp(fn, p, t)))
    return f


def custom_vjp(fn):
    """``fn`` with a ``jax.custom_vjp`` backward of half the true one."""
    f = jax.custom_vjp(fn)
    f.defvjp(lambda *x: (fn(*x), x), lambda x, g: tuple(c * 0.5 for c in jax.vjp(fn, *x)[1](g)))
    return f


def attention(q, k, v, causal=False, fill=-1e9):
    """Hand-written scaled dot-product attention, as ``fuse_attention`` looks for it."""
    s = jnp.einsum("btd,bsd->bts", q, k) * (q.shape[-1] ** -0.5)
    if causal:
        s = jnp.where(jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool)), s, fill)
    return jnp.einsum("bts,bsd->btd", jax.nn.softmax(s, axis=-1), v)


def bn_affine(y, mean, var, scale, bias):
    """Inference batch norm with per-channel statistics (``fuse_batchnorm``)."""
    return (y - mean) * lax.rsqrt(jnp.abs(var) + 0.5) * scale + bias


def xent(h, w, labels):
    """log p(label) of the projection ``h @ w`` (``fuse_cross_entropy``)."""
    lp = jax.nn.log_softmax(h @ w, axis=-1)
    return jnp.take_along_axis(lp, labels[..., None], axis=-1)[..., 0]


HELPERS = dict(perturb=perturb, custom_jvp=custom_jvp, custom_vjp=custom_vjp,
               attention=attention, bn_affine=bn_affine, xent=xent)
NAMESPACE = dict(jax=jax, jnp=jnp, lax=lax, np=np, **HELPERS)


# ------------------------------------------------------------------------- programs
@dataclasses.dataclass
class Input:
    name: str
    shape: tuple
    dtype: str
    role: str = "arg"          # "arg" (a function's), "param" or "batch" (a step's)
    hi: int | None = None      # integers drawn from [0, hi): indices


@dataclasses.dataclass
class Stmt:
    outs: list
    kind: str                  # "op" or a block kind
    expr: str = ""             # an op's expression
    ins: list = dataclasses.field(default_factory=list)     # a block's operands
    params: list = dataclasses.field(default_factory=list)  # its body's parameters
    body: list = dataclasses.field(default_factory=list)
    ret: list = dataclasses.field(default_factory=list)     # what the body returns
    attrs: dict = dataclasses.field(default_factory=dict)   # trips, policy, pred, n_carry

    def uses(self) -> set:
        if self.kind == "op":
            return set(NAME.findall(self.expr))
        inner = set(self.ret) | {n for s in self.body for n in s.uses()}
        return set(self.ins) | {self.attrs.get("pred")} - {None} | (
            inner - set(self.params) - {o for s in self.body for o in s.outs})


def walk(body):
    """(statement, the list holding it) for every statement, blocks before their bodies."""
    for s in body:
        yield s, body
        yield from walk(s.body)


@dataclasses.dataclass
class Program:
    kind: str                  # "fn" or "step"
    inputs: list
    body: list
    outs: list                 # fn: outputs; step: [loss, *aux]
    x64: bool = False
    config: dict = dataclasses.field(default_factory=dict)  # passes, options, jit, ad, optimizer
    label: str = ""

    def count(self) -> int:
        return sum(1 for _ in walk(self.body))

    def source(self) -> str:
        if self.kind == "fn":
            return "\n".join([f"def f({', '.join(i.name for i in self.inputs)}):"]
                             + _render(self.body, 1) + [f"    return {_tuple(self.outs)}\n"])
        lines = [f"OPT = {self.config.get('optimizer', OPTIMIZERS[0])}\n",
                 "def loss_fn(params, batch):"]
        for group, role in (("params", "param"), ("batch", "batch")):
            names = [i.name for i in self.inputs if i.role == role]
            lines.append(f"    {', '.join(names)}, = " + ", ".join(
                f'{group}["{n}"]' for n in names) + ",")
        return "\n".join(lines + _render(self.body, 1) + [
            f"    return {self.outs[0]}, {_tuple(self.outs[1:])}\n",
            "def step(params, opt_state, batch):",
            "    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)",
            "    updates, opt_state = OPT.update(grads, opt_state, params)",
            "    return optax.apply_updates(params, updates), opt_state, loss, aux\n"])


def _tuple(names) -> str:
    return "(" + ", ".join(names) + ("," if len(names) == 1 else "") + ")"


def _render(body, depth) -> list:
    pad, out = "    " * depth, []
    for s in body:
        if s.kind == "op":
            out.append(f"{pad}{s.outs[0]} = {s.expr}")
            continue
        f, a, ins, nc = "f" + s.outs[0][1:], s.attrs, ", ".join(s.ins), s.attrs.get("n_carry", 0)
        p = ", ".join(s.params[:-1] if s.kind == "scan" else s.params)
        out += [pad + h for h in {"while": [f"def {f}(c):", f"    i, {p}, = c"],
                                  "scan": [f"def {f}(carry, {s.params[-1]}):", f"    {p}, = carry"]
                                  }.get(s.kind, [f"def {f}({p}):"])]
        out += _render(s.body, depth + 1)
        if s.kind == "while":
            out += [f"{pad}    return (i + 1, {', '.join(s.ret)})",
                    f"{pad}_, {', '.join(s.outs)}, = lax.while_loop("
                    f"lambda c: c[0] < {a['trips']}, {f}, (jnp.int32(0), {ins}))"]
        elif s.kind == "scan":
            out += [f"{pad}    return {_tuple(s.ret[:nc])}, {_tuple(s.ret[nc:])}",
                    f"{pad}{_tuple(s.outs[:nc])}, {_tuple(s.outs[nc:])} = lax.scan("
                    f"{f}, {_tuple(s.ins[:nc])}, {s.ins[nc]}, reverse={a['reverse']})"]
        else:
            call = {"jit": f"jax.jit({f})", "custom_jvp": f"custom_jvp({f})",
                    "custom_vjp": f"custom_vjp({f})", "checkpoint":
                    f"jax.checkpoint({f}, policy={a.get('policy')})"}.get(s.kind)
            out += [f"{pad}    return {_tuple(s.ret)}", f"{pad}{', '.join(s.outs)}, = " + (
                f"{call}({ins})" if call else
                f"lax.cond({a['pred']}, {f}, lambda *a: {f}(*map(perturb, a)), {ins})")]
    return out


def make_inputs(prog, seed: int = 0) -> dict:
    """Deterministic inputs: normal floats, small integers (indices below ``hi``), bools."""
    rng, out = np.random.default_rng(seed), {}
    for i in prog.inputs:
        k = kind_of(i.dtype)
        v = (rng.standard_normal(i.shape) if k == "f" else rng.random(i.shape) < 0.5 if k == "b"
             else rng.integers(0, i.hi, i.shape) if i.hi is not None
             else rng.integers(0 if k == "u" else -4, 8, i.shape))
        out[i.name] = jnp.asarray(v if k == "f" else np.asarray(v).astype(i.dtype), dtype=i.dtype)
    return out




def generate(seed, kind: str | None = None, x64: bool | None = None) -> Program:
    """One random program from ``seed`` (:func:`graphopt.fuzz_gen.generate`)."""
    from .fuzz_gen import generate as gen  # the generator imports this module's types
    return gen(seed, kind, x64)
