"""The fast remat solver (:func:`solve_greedy`), a heuristic under the byte model.

A DP over the chain of pieces (segments are intervals of consecutive pieces). Per cap on
the largest recomputed segment's bytes, it finds the fewest FLOPs for every bucket of
bytes saved under an additive byte model (:class:`_Chain`: pieces left as is keep their
residuals, recomputed segments their live-ins; a state for how far back the last kept
piece lies). Caps are searched by branch and bound over intervals of cap values (the
interval's largest cap with its smallest cap's budget bounds it from below). Every DP
plan is checked with :meth:`Plan.model_bytes`, asking for more bytes saved by what the
additive model missed; a second search prices live-ins from far back as the first one's
plan does. The per-cap knapsack (bytes saved per FLOP, exact accounting) adds its plans;
the best is then trimmed (segments the target does not need) and improved by exact local
search (recompute one more segment, drop others). Unreachable targets get the
least-memory plan of the knapsack and the DP.
"""
from __future__ import annotations

import heapq
import math
import time

import numpy as np

from .plan import Plan
from .solution import Solution, solution


class _State:
    """Persistent-byte bookkeeping with reference counts (a value persists while any
    reason holds: pinned, residual of a kept segment, live-in of a recomputed one)."""

    def __init__(self, plan: Plan):
        self.nb = plan.nbytes
        self.refs: dict = {}
        self.total = 0
        for v in plan.pinned:
            self._inc(v, 1)
        seen = set()   # nothing recomputed yet: every residual persists (once)
        for s in plan.segments:
            for v in s.outputs:
                if v not in seen:
                    seen.add(v)
                    self._inc(v, 1)

    def _inc(self, v, d):
        old = self.refs.get(v, 0)
        new = old + d
        self.refs[v] = new
        if old <= 0 < new:
            self.total += self.nb[v]
        elif new <= 0 < old:
            self.total -= self.nb[v]

    def switch(self, s, on: bool):
        d = 1 if on else -1
        for v in s.outputs:
            self._inc(v, -d)
        for v in s.liveins:
            self._inc(v, d)


def _greedy_capped(plan: Plan, target: int, cap: int) -> list:
    """Greedy over segments whose residuals (transient bytes) are at most ``cap``."""
    segs = plan.segments
    n = len(segs)
    remat = [False] * n
    st = _State(plan)
    owner = [None] * plan.n_pieces   # which chosen segment covers each piece
    allowed = [s.out_bytes <= cap for s in segs]
    chosen_t = 0
    while st.total + chosen_t > target:
        best, best_score, best_rm = None, 0.0, ()
        cur = st.total
        for i, s in enumerate(segs):
            if remat[i] or not allowed[i]:
                continue
            inside = {owner[p] for p in range(*s.pieces) if owner[p] is not None}
            if any(not (s.pieces[0] <= segs[j].pieces[0] and segs[j].pieces[1] <= s.pieces[1])
                   for j in inside):
                continue
            for j in inside:
                st.switch(segs[j], False)
            st.switch(s, True)
            gain = cur - st.total
            st.switch(s, False)
            for j in inside:
                st.switch(segs[j], True)
            if gain <= 0:
                continue
            dflops = s.flops - sum(segs[j].flops for j in inside)
            score = gain / max(dflops + 1.0, 1.0)
            if score > best_score:
                best, best_score, best_rm = i, score, tuple(inside)
        if best is None:
            break
        for j in best_rm:
            st.switch(segs[j], False)
            remat[j] = False
        st.switch(segs[best], True)
        remat[best] = True
        for p in range(*segs[best].pieces):
            owner[p] = best
        chosen_t = max(segs[i].out_bytes for i in range(n) if remat[i])
    return _give_back(plan, remat, target)


class _Chain:
    """The plan as a chain for the DP: pieces in a line, segments are intervals.

    Persistent bytes, made additive: each piece left as is keeps its residuals; a
    recomputed segment keeps its live-ins, where a live-in that is a residual of an
    earlier piece costs only if that piece is recomputed. The DP state k is how many
    pieces back the last piece with residuals that is left as is lies (capped at
    ``max_state``), which settles that for live-ins from up to k + 1 pieces back; older
    ones cost half their bytes, or, given ``covered`` (pieces a plan found before
    recomputes), what they cost in that plan. Live-ins shared by two recomputed
    segments count twice. Exact accounting (:meth:`Plan.model_bytes`) settles all that.
    """

    def __init__(self, plan: Plan, covered=None, max_state: int = 4):
        segs, P, nb = plan.segments, plan.n_pieces, plan.nbytes
        piece_of = {v: s.pieces[0] for s in segs if s.pieces[1] - s.pieces[0] == 1
                    for v in s.outputs}
        self.P, self.rb = P, np.zeros(P)
        for v, p in piece_of.items():
            self.rb[p] += nb[v]
        pinned = set(plan.pinned)
        self.pinned_bytes = sum(nb[v] for v in pinned)
        far = [(i, v, s.pieces[0] - 1 - piece_of[v], s.pieces[0]) for i, s in enumerate(segs)
               for v in s.liveins if v in piece_of]
        # a live-in from a piece at or after the segment's start (d < 0: degenerate plans,
        # fuzz seed 2026 program 925) is charged in full, as one from no piece is
        inside = [(i, v) for i, v, d, _ in far if d < 0]
        far = [t for t in far if t[2] >= 0]
        S = self.S = 1 + min(max_state, max((d + 1 for _, _, d, _ in far), default=0))
        n = len(segs)
        cost = np.zeros((n, S))
        for i, s in enumerate(segs):
            cost[i] += sum(nb[v] for v in s.liveins if v not in pinned and v not in piece_of)
        for i, v in inside:
            cost[i] += nb[v]
        self.guessed = any(d > 0 for _, _, d, _ in far)
        for i, v, d, a in far:
            cost[i, d + 1:] += nb[v]
            # further back than the state sees: half, or as in a plan found before
            guess = nb[v] * (0.5 if covered is None else float(covered[a - d - 1]))
            cost[i, :min(d, S - 1)] += guess
            if d >= S - 1:
                cost[i, S - 1] += guess
        start = np.array([s.pieces[0] for s in segs], np.int64)
        end = np.array([s.pieces[1] for s in segs], np.int64)
        # transitions (segment, or -1: piece p left as is; source state), by end piece
        cs = np.concatenate([np.repeat(np.arange(n), S), np.full(P * S, -1)])
        ck = np.tile(np.arange(S), n + P)
        pp = np.repeat(np.arange(P), S)
        cstart = np.concatenate([start[cs[:n * S]], pp])
        cend = np.concatenate([end[cs[:n * S]], pp + 1])
        dest = np.minimum(ck + cend - cstart, S - 1)
        dest[n * S:][self.rb[pp] > 0] = 0
        order = np.lexsort((dest, cend))
        self.cs, self.crow = cs[order], (cstart * S + ck)[order]
        # bytes saved against recomputing nothing: the residuals dropped, less the live-ins
        csum = np.concatenate([[0.0], np.cumsum(self.rb)])
        saved = (csum[end] - csum[start])[:, None] - cost
        self.csave = np.concatenate([saved.ravel(), np.zeros(P * S)])[order]
        self.cflops = np.concatenate([np.repeat([s.flops + 1.0 for s in segs], S),
                                      np.zeros(P * S)])[order]
        cend, dest = cend[order], dest[order]
        # per end piece: a (S, M) table of transitions into each state, -1 = padding
        self.table = []
        for p in range(P + 1):
            lo, hi = np.searchsorted(cend, [p, p + 1])
            d = dest[lo:hi]
            cnt = np.bincount(d, minlength=S)
            t = np.full((S, max(cnt.max(initial=0), 1)), -1, np.int64)
            for k in range(S):
                t[k, :cnt[k]] = lo + np.nonzero(d == k)[0]
            self.table.append(t)
        self.out = np.array([s.out_bytes for s in segs], np.float64)

    def dp(self, allowed, need: float, K: int):
        """Least FLOPs per bucket of additive bytes saved (``K`` buckets up to ``need``,
        the last one: that much or more), over the segments ``allowed`` (and saving
        bytes); returns (F, backtrack, bucket size)."""
        P, S, W = self.P, self.S, K + 1
        q = max(need, 1.0) / K
        inf_row = (P + 1) * S        # an all-inf row: padding and disallowed transitions
        T = np.full(((P + 1) * S + 1, 2 * W), np.inf)
        T[0, W] = 0.0
        suf = T.copy()               # suffix minima: "at least u saved"
        sv = np.clip(np.rint(self.csave / q), 0, W).astype(np.int64)
        use = np.concatenate([allowed, [True]])[self.cs] & (self.csave >= 0)
        row = np.append(np.where(use, self.crow, inf_row), inf_row)
        sv, fl = np.append(sv, 0), np.append(self.cflops, 0.0)
        cols = W + np.arange(W)
        choice = np.zeros(((P + 1) * S, W), np.int64)
        for p in range(1, P + 1):
            t = self.table[p]
            r, d = row[t][..., None], sv[t]
            vals = T[r, cols - d[..., None]]
            vals[..., K] = suf[r[..., 0], W + K - d]   # saturated: anything at the top
            vals += fl[t][..., None]
            j = np.argmin(vals, 1)
            blk = np.take_along_axis(vals, j[:, None], 1)[:, 0]
            T[p * S:(p + 1) * S, W:] = blk
            suf[p * S:(p + 1) * S, W:] = np.minimum.accumulate(blk[:, ::-1], 1)[:, ::-1]
            choice[p * S:(p + 1) * S] = np.take_along_axis(t, j, 1)
        F = T[P * S:(P + 1) * S, W:].min(0)

        def back(u: int) -> list:
            chosen, p = [], P
            k = int(np.argmin(T[P * S:(P + 1) * S, W + u]))
            while p > 0:
                c = choice[p * S + k, u]
                if self.cs[c] >= 0:
                    chosen.append(int(self.cs[c]))
                src = int(self.crow[c])
                u = u - sv[c] if u < K else K - sv[c] + int(np.argmin(T[src, W + K - sv[c]:]))
                p, k = divmod(src, S)
            return chosen
        return F, back, q


def _walk(plan: Plan, F, back, q, target: int, lo: int, n_iter: int = 16):
    """From bucket ``lo`` up: the first DP plan that meets ``target`` exactly (each miss
    asks for what the additive model missed, saved on top)."""
    n, K = len(plan.segments), len(F) - 1
    for _ in range(n_iter):
        if lo > K:
            return None
        u = lo + int(np.argmin(F[lo:]))
        if not np.isfinite(F[u]):
            return None
        remat = [False] * n
        for s in back(u):
            remat[s] = True
        mb = plan.model_bytes(remat)
        if mb <= target:
            return remat
        lo = u + max(1, math.ceil((mb - target) / q))
    return None


def _swap(plan: Plan, remat: list, target: int, rounds: int = 8) -> list:
    """Exact local search: recompute one more segment (dropping those it overlaps), then
    stop recomputing others, most FLOPs first, while the target holds; the move that
    saves the most FLOPs, per round."""
    segs = plan.segments
    st = _State(plan)
    chosen = {i for i, r in enumerate(remat) if r}
    for i in chosen:
        st.switch(segs[i], True)

    def ok(c):
        return st.total + max((segs[i].out_bytes for i in c), default=0) <= target

    for _ in range(rounds):
        best, best_fl = None, sum(segs[i].flops for i in chosen) - 1.0
        for j, s in enumerate(segs):
            if j in chosen:
                continue
            over = {i for i in chosen if segs[i].pieces[0] < s.pieces[1]
                    and s.pieces[0] < segs[i].pieces[1]}
            new = (chosen - over) | {j}
            for i in over:
                st.switch(segs[i], False)
            st.switch(s, True)
            dropped = []
            for d in sorted(new - {j}, key=lambda i: -segs[i].flops):
                st.switch(segs[d], False)
                new.discard(d)
                if ok(new):
                    dropped.append(d)
                else:
                    st.switch(segs[d], True)
                    new.add(d)
            fl = sum(segs[i].flops for i in new)
            if fl < best_fl and ok(new):
                best, best_fl = set(new), fl
            for d in dropped:
                st.switch(segs[d], True)
            st.switch(s, False)
            for i in over:
                st.switch(segs[i], True)
        if best is None:
            break
        for i in chosen - best:
            st.switch(segs[i], False)
        for i in best - chosen:
            st.switch(segs[i], True)
        chosen = best
    return [i in chosen for i in range(len(segs))]


def _give_back(plan: Plan, remat: list, target: int) -> list:
    """Un-recompute segments the target does not need, most FLOPs first."""
    remat = list(remat)
    for i in sorted(range(len(remat)), key=lambda i: -plan.segments[i].flops):
        if remat[i]:
            remat[i] = False
            if plan.model_bytes(remat) > target:
                remat[i] = True
    return remat


def _search(plan: Plan, ch: _Chain, caps: list, target: int, best, buckets: int,
            slack: float, max_dp: int):
    """Branch and bound over intervals of caps; the best (FLOPs, plan) meeting target."""
    heap = [(0.0, 0, len(caps) - 1)]   # best-first by the relaxation's bound
    for _ in range(max_dp):
        if not heap:
            break
        bound, lo, hi = heapq.heappop(heap)
        budget = target - caps[lo] - ch.pinned_bytes
        if budget < 0 or (best is not None and bound >= best[0]):
            continue
        # buckets of bytes saved up to twice the need; the walk starts a little below
        F, back, q = ch.dp(ch.out <= caps[hi], 2 * (ch.rb.sum() - budget), buckets)
        start = int((1 - slack) * buckets / 2)
        bound = F[start:].min()
        if bound >= (np.inf if best is None else best[0]):
            continue      # not even the relaxation meets the target or beats the best
        remat = _walk(plan, F, back, q, target, start)
        if remat is not None and (best is None or plan.flops(remat) < best[0]):
            best = (plan.flops(remat), remat)
        if lo < hi:
            mid = (lo + hi) // 2
            heapq.heappush(heap, (bound, lo, mid))
            heapq.heappush(heap, (bound, mid + 1, hi))
    return best


def solve_greedy(plan: Plan, target: int, time_limit: float = 10.0, *, n_caps: int | None = None,
                 buckets: int = 256, slack: float = 0.2, max_dp: int | None = None,
                 swap: bool = True) -> Solution:
    """Chain DP per cap on the largest recomputed segment's bytes, exact accounting.

    For an interval of caps [c_lo, c_hi] (sorted distinct segment residual bytes), the
    DP over segments with bytes <= c_hi under budget target - c_lo bounds every cap
    inside from below (in the additive model); intervals whose bound cannot beat the
    best plan so far are dropped, the others split, best bound first, at most
    ``max_dp`` DPs (default 64, 12 above 256 segments) of ``buckets`` buckets of bytes
    saved (up to twice what the target needs; plans the additive model has saving up
    to ``slack`` too little are tried too). Every plan is checked with
    :meth:`Plan.model_bytes`; see the module docstring for the knapsack, the trimming
    and the local search (``swap``).
    Unreachable targets get the least-memory plan found. ``n_caps`` limits the cap
    values considered (default: all). ``time_limit`` is unused (the shared solver
    signature): the heuristic runs well under a second.
    """
    t0 = time.perf_counter()
    n = len(plan.segments)
    none = [False] * n
    if not n or plan.model_bytes(none) <= target:
        return solution(plan, "greedy", none, t0, target)
    ch = _Chain(plan)
    caps = sorted({s.out_bytes for s in plan.segments})
    if n_caps is not None and len(caps) > n_caps:
        caps = [caps[int(round(x))] for x in np.linspace(0, len(caps) - 1, n_caps)]
    small = n <= 256             # big plans: fewer DPs and knapsack caps, under a second
    n_knap, max_dp = (8, max_dp or 64) if small else (3, max_dp or 12)
    best = _search(plan, ch, caps, target, None, buckets, slack, max_dp)
    if best is not None and ch.guessed:  # again, far live-ins priced as in that plan
        cov = np.zeros(plan.n_pieces, bool)
        for i, r in enumerate(best[1]):
            cov[plan.segments[i].pieces[0]:plan.segments[i].pieces[1]] |= r
        best = _search(plan, _Chain(plan, cov), caps, target, best, buckets, slack, max_dp)
    sizes = caps if len(caps) <= n_knap else \
        [caps[int(round(x))] for x in np.linspace(0, len(caps) - 1, n_knap)]
    # the knapsack too: where the additive model misleads the DP, it often does not
    knap = [_greedy_capped(plan, target, c) for c in sizes]
    for remat in knap:
        if plan.model_bytes(remat) <= target and (best is None or plan.flops(remat) < best[0]):
            best = (plan.flops(remat), remat)
    if best is not None:
        remat = _give_back(plan, best[1], target)
        return solution(plan, "greedy", _swap(plan, remat, target) if swap else remat, t0, target)
    return solution(plan, "greedy", _least_memory(plan, ch, sizes, knap), t0, target)


def _least_memory(plan: Plan, ch: _Chain, sizes: list, knap: list) -> list:
    """The fewest model bytes: the knapsack's plans for an unreachable target (it ran
    until nothing saved bytes) and the DP's smallest ones."""
    key = lambda r: (plan.model_bytes(r), plan.flops(r))  # noqa: E731
    best = min(knap, key=key)
    total = ch.rb.sum()
    for c in sizes:
        F, back, _ = ch.dp(ch.out <= c, total, 256)
        for u in np.nonzero(np.isfinite(F))[0][::-1][:4]:
            remat = [False] * len(plan.segments)
            for s in back(int(u)):
                remat[s] = True
            best = min(best, remat, key=key)
    return best


__all__ = ["solve_greedy"]
