"""What a remat solver returns (:class:`Solution`), built the one way (:func:`solution`)."""
from __future__ import annotations

import dataclasses
import time

from .plan import Plan


@dataclasses.dataclass
class Solution:
    solver: str
    remat: list          # bool per segment
    model_bytes: int
    flops: float
    seconds: float
    feasible: bool
    status: str = ""


def solution(plan: Plan, name: str, remat, t0, target, status="") -> Solution:
    """``remat`` (bools per segment) as a :class:`Solution`, timed from ``t0``."""
    remat = [bool(r) for r in remat]
    mb = plan.model_bytes(remat)
    return Solution(name, remat, mb, plan.flops(remat), time.perf_counter() - t0,
                    mb <= target, status)


__all__ = ["Solution", "solution"]
