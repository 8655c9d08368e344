"""Progress bars (tqdm) for what a user waits for: training loops, solvers, benchmarks.

``track(iterable)`` and ``bar(total)`` are tqdm with graphopt's defaults (text bars,
which render in terminals and live notebooks alike); they are off when stderr is
neither a terminal nor a notebook (logs, ``python bench/x.py > out.txt``), and
``GRAPHOPT_PROGRESS=0`` / ``=1`` turns every bar off / on (``notebooks/execute.py``
sets 0, so saved notebooks hold no bar fragments). ``train`` runs an optax-style step
function over batches with the loss in the bar; ``time_fn`` / ``compare_times`` measure medians
after warm-up with ``jax.block_until_ready``. Nothing here changes a program.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping

import jax

try:  # tqdm is an optional extra: without it every bar is off
    from tqdm import tqdm
except ImportError:
    tqdm = None


class _NoBar:
    """What ``bar`` returns without tqdm: the calls a bar takes, doing nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n: int = 1):
        pass

    def set_postfix(self, *args, **kwargs):
        pass

    def close(self):
        pass


def enabled() -> bool:
    """GRAPHOPT_PROGRESS if set (0/false/off/no: off), else whether anyone watches stderr;
    always off without tqdm."""
    if tqdm is None:
        return False
    env = os.environ.get("GRAPHOPT_PROGRESS")
    if env is not None:
        return env.lower() not in ("0", "false", "off", "no")
    # a redirected log gets no carriage-return animation; a notebook kernel renders bars
    return "ipykernel" in sys.modules or bool(getattr(sys.stderr, "isatty", lambda: False)())


def bar(total: int | None = None, desc: str | None = None, **kwargs):
    """A tqdm bar (``with bar(n, "solve") as b: ... b.update()``); a silent stand-in
    without tqdm."""
    if tqdm is None:
        return _NoBar()
    kwargs.setdefault("disable", not enabled())
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("mininterval", 0.5)
    return tqdm(total=total, desc=desc, **kwargs)


def track(iterable: Iterable, desc: str | None = None, total: int | None = None, **kwargs):
    """Iterate with a progress bar."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    with bar(total, desc, **kwargs) as b:
        for x in iterable:
            yield x
            b.update()


def train(step: Callable, params, opt_state, batches, steps: int | None = None,
          desc: str = "train", log_every: int = 10):
    """Run ``params, opt_state, loss = step(params, opt_state, batch)`` over ``batches``.

    ``batches``: an iterable of batches, or a function ``i -> batch``, or one batch
    reused every step (then ``steps`` is required). Returns (params, opt_state, losses)
    with losses as Python floats, one per step.
    """
    if callable(batches):
        get = batches
    elif isinstance(batches, (list, tuple)) and batches and not _is_batch(batches):
        get = batches.__getitem__
        steps = len(batches) if steps is None else steps
    elif hasattr(batches, "__next__"):
        get = lambda i: next(batches)  # noqa: E731 - an iterator of batches
    else:
        get = lambda i: batches  # noqa: E731 - one batch reused
    if steps is None:
        raise ValueError("progress.train: pass steps= when batches is a function or one batch")
    losses: list = []
    with bar(steps, desc) as b:
        for i in range(steps):
            params, opt_state, loss = step(params, opt_state, get(i))
            losses.append(loss)
            if (i + 1) % log_every == 0 or i + 1 == steps:
                b.set_postfix(loss=f"{float(loss):.4f}", refresh=False)
            b.update()
    return params, opt_state, [float(x) for x in jax.device_get(losses)]


def _is_batch(x) -> bool:
    """A tuple of arrays (x, y) is one batch, not a list of batches."""
    return isinstance(x, tuple) and all(hasattr(a, "shape") for a in x)


def time_fn(fn: Callable, *args, n: int = 20, warmup: int = 2, desc: str | None = None) -> dict:
    """Median / min wall time of ``fn(*args)`` (seconds) over ``n`` runs after ``warmup``."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in track(range(n), desc or f"time {getattr(fn, '__name__', 'fn')}"):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "n": n, "times": times}


def compare_times(fns: Mapping[str, Callable], *args, n: int = 20, warmup: int = 2,
                  rounds: int = 3) -> dict[str, float]:
    """Median seconds per function, interleaving them in ``rounds`` so drift hits all alike."""
    for f in fns.values():
        for _ in range(warmup):
            jax.block_until_ready(f(*args))
    samples: dict[str, list[float]] = {k: [] for k in fns}
    per = max(1, n // rounds)
    with bar(per * rounds * len(fns), "benchmark") as b:
        for _ in range(rounds):
            for name, f in fns.items():
                for _ in range(per):
                    t0 = time.perf_counter()
                    jax.block_until_ready(f(*args))
                    samples[name].append(time.perf_counter() - t0)
                    b.update()
    return {k: statistics.median(v) for k, v in samples.items()}


__all__ = ["enabled", "bar", "track", "train", "time_fn", "compare_times"]
