"""The mixed-precision policy: one class per primitive, and the user's settings.

Four classes, as in TensorFlow's auto mixed precision and PyTorch's autocast lists:

- ``allow``: matmuls and convolutions run on compute-dtype inputs and accumulate in
  float32 (``preferred_element_type``); their result is a low-precision candidate.
- ``infer``: elementwise ops follow their inputs (low when their inputs are), so casts
  do not ping-pong between neighbours.
- ``clear``: shape and movement ops run on whatever dtype their input already has, so a
  cast placed at a later use slides past them (to the smaller side of a broadcast).
- ``deny``: exponentials, logarithms, sums, normalisation statistics (and so the loss)
  run in float32.

Anything else falls to :data:`DEFAULT_CLASS` ("deny": run at the program's own dtype);
primitives graphopt does not know at all pass through untouched and are reported.
"""
from __future__ import annotations

import dataclasses

import numpy as np

import jax.numpy as jnp

ALLOW, INFER, CLEAR, DENY = "allow", "infer", "clear", "deny"

# Unlisted primitives keep the program's own dtype: never a guess at lower precision.
DEFAULT_CLASS = DENY

POLICY: dict[str, str] = {}
POLICY.update({p: ALLOW for p in ("dot_general", "conv_general_dilated")})
POLICY.update({p: INFER for p in (
    "add", "add_any", "sub", "mul", "div", "neg", "max", "min", "abs", "sign", "tanh",
    "logistic", "select_n", "integer_pow", "square", "sqrt", "erf", "erfc", "sin", "cos",
    "clamp", "concatenate", "pad", "dynamic_update_slice", "reduce_max", "reduce_min",
    "argmax", "argmin", "eq", "ne", "lt", "le", "gt", "ge", "is_finite", "round", "floor",
    "ceil", "copysign", "nextafter", "rem", "relu")})
POLICY.update({p: CLEAR for p in (
    "reshape", "transpose", "broadcast_in_dim", "squeeze", "expand_dims", "slice",
    "dynamic_slice", "gather", "rev", "copy", "copy_p", "reduce_precision")})
POLICY.update({p: DENY for p in (
    "exp", "exp2", "log", "log1p", "expm1", "pow", "rsqrt", "reduce_sum", "reduce_prod",
    "cumsum", "cumprod", "cumlogsumexp", "cummax", "cummin", "logsumexp", "sort",
    "scatter-add", "scatter_add", "scatter-mul", "scatter_mul", "reduce_and", "reduce_or",
    "atan2", "lgamma", "digamma", "erf_inv", "tan", "acos", "asin", "atan", "sinh", "cosh",
    "asinh", "acosh", "atanh", "cbrt", "top_k", "cholesky", "triangular_solve", "lu",
    "eigh", "svd", "qr", "fft", "reduce_window_sum", "select_and_scatter_add")})

# Operands of a CLEAR primitive that carry the data (the rest are indices or sizes).
CLEAR_DATA_OPERAND = 0

COMPUTE_DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16}


def policy_class(name: str) -> str:
    return POLICY.get(name, DEFAULT_CLASS)


@dataclasses.dataclass(frozen=True)
class Precision:
    """What ``graphopt.optimize(f, precision=...)`` casts.

    compute: "bfloat16" or "float16", the dtype matmuls, convolutions and the elementwise
        ops between them run in.
    keep_float32: primitive names (``"exp"``, ``"dot_general"``) or ``jax.named_scope``
        names (``"layer_norm"``, ``"router"``) whose equations stay in float32; an entry
        that matches nothing is reported.
    cast_float64: also cast float64 values (x64 programs); off by default, since a
        float64 program asked for float64 on purpose.
    """
    compute: str = "bfloat16"
    keep_float32: tuple = ()
    cast_float64: bool = False

    def __post_init__(self):
        if self.compute not in COMPUTE_DTYPES:
            raise ValueError(f"Precision: compute must be one of "
                             f"{', '.join(map(repr, COMPUTE_DTYPES))}, got {self.compute!r}")
        keep = self.keep_float32
        if isinstance(keep, str):
            keep = (keep,)
        if not all(isinstance(k, str) and k for k in keep):
            raise ValueError(f"Precision: keep_float32 must be primitive or scope names "
                             f"(strings), got {self.keep_float32!r}")
        object.__setattr__(self, "keep_float32", tuple(keep))

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(COMPUTE_DTYPES[self.compute])

    def castable(self) -> frozenset:
        """Source dtypes the pass may lower."""
        src = {np.dtype(np.float32)}
        if self.cast_float64:
            src.add(np.dtype(np.float64))
        return frozenset(src)


def as_precision(value) -> Precision | None:
    """A :class:`Precision` from the option value (a dtype name or a Precision)."""
    if value is None:
        return None
    if isinstance(value, Precision):
        return value
    if isinstance(value, str):
        return Precision(compute=value)
    if hasattr(value, "compute"):
        return Precision(compute=value.compute, keep_float32=tuple(value.keep_float32),
                         cast_float64=bool(getattr(value, "cast_float64", False)))
    raise ValueError(f"precision must be one of {', '.join(map(repr, COMPUTE_DTYPES))} or a "
                     f"graphopt.Precision, got {value!r}")


__all__ = ["ALLOW", "INFER", "CLEAR", "DENY", "DEFAULT_CLASS", "POLICY", "Precision",
           "COMPUTE_DTYPES", "policy_class", "as_precision"]
