"""The keep policies: what a recomputation keeps rather than recomputes, in one table.

Each row mirrors one of ``jax.checkpoint``'s policies, so a rewrite keeps what the
hand-placed policy keeps. The post-AD scan rewrite (:mod:`.scan`) names a row by its
short name (``"dots"``), pre-AD scan checkpointing (:mod:`.pre_ad`) by the JAX policy's
name (``"dots_saveable"``); :func:`policy` takes either. Rows run from least to most
recomputation, the order both strategies try them in.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax

from graphopt.primitives import DOTS


def _dot(e) -> bool:
    return e.primitive.name in DOTS


def _dot_without_batch_dims(e) -> bool:
    return e.primitive.name == "dot_general" and not e.params["dimension_numbers"][1][0]


@dataclasses.dataclass(frozen=True)
class KeepPolicy:
    short: str                  # the scan rewrite's name for it
    name: str                   # jax.checkpoint_policies' name for it
    saves: Callable | None      # equation -> whether its output is kept (None: nothing is)
    jax_policy: Callable        # the jax.checkpoint policy itself
    desc: str = ""              # words for the pass's notes ("" when nothing is kept)


POLICIES = (
    KeepPolicy("dots", "dots_saveable", _dot, jax.checkpoint_policies.dots_saveable,
               "dot outputs kept"),
    KeepPolicy("dots_no_batch", "dots_with_no_batch_dims_saveable", _dot_without_batch_dims,
               jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
               "dots without batch dims kept"),
    KeepPolicy("none", "nothing_saveable", None, jax.checkpoint_policies.nothing_saveable),
)

_BY_NAME = {n: p for p in POLICIES for n in (p.short, p.name)}


def policy(name: str) -> KeepPolicy:
    """The row named ``name`` (short or JAX name); a clear error for any other name."""
    if name not in _BY_NAME:
        raise ValueError(f"remat: keep policy must be one of {sorted(_BY_NAME)}, got {name!r}")
    return _BY_NAME[name]


def saved(e, name: str) -> bool:
    """Whether the policy ``name`` keeps ``e``'s output."""
    s = policy(name).saves
    return s is not None and s(e)


# Views of the table in each vocabulary (what callers and tests index).
KEEP = {p.short: p.saves for p in POLICIES}
KEEP_ORDER = tuple(p.short for p in POLICIES)
SAVED_BY = {p.name: p.saves for p in POLICIES}
SCAN_LEVELS = tuple((p.name, p.jax_policy) for p in POLICIES)

__all__ = ["KeepPolicy", "POLICIES", "policy", "saved", "KEEP", "KEEP_ORDER", "SAVED_BY",
           "SCAN_LEVELS"]
