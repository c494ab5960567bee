"""Combine several labelers' rankings of one task into a consensus, and measure their agreement.

Each labeler's judgement of a task is its own comparison record (same `task_id`, different
`labeler`). `aggregate` turns every group into one comparison labelled `aggregate:<method>`;
`pairwise_agreement` is InstructGPT's inter-labeler agreement (they report ~73% among trainers).

    consensus = aggregate(read_comparisons("cmp.jsonl"), method="bradley_terry")
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from itertools import combinations

import numpy as np

from chatforge.core.io import UserError
from chatforge.data.formats import Comparison

TIE_TOL = 1e-6  # log-strengths (or scores) closer than this are a tie in the consensus


def group_by_task(comparisons: Iterable[Comparison]) -> dict[str, list[Comparison]]:
    """task_id -> its comparisons (one per labeler), in input order."""
    groups: dict[str, list[Comparison]] = defaultdict(list)
    for c in comparisons:
        groups[c.task_id].append(c)
    return dict(groups)


def _wins(cmps: list[Comparison], ids: list[str]) -> list[list[float]]:
    """wins[i][j]: how often i was ranked above j across labelers; a tie counts half to each."""
    idx = {r: i for i, r in enumerate(ids)}
    w = [[0.0] * len(ids) for _ in ids]
    for c in cmps:
        rank = c.rank_of()
        for a, b in combinations(ids, 2):
            i, j = idx[a], idx[b]
            if rank[a] < rank[b]:
                w[i][j] += 1
            elif rank[b] < rank[a]:
                w[j][i] += 1
            else:
                w[i][j] += 0.5
                w[j][i] += 0.5
    return w


def _layers(ids: list[str], score: list[float], tol: float = TIE_TOL) -> list[list[str]]:
    """Sort by score (high first) and group scores within `tol` of the group's first into ties."""
    order = sorted(range(len(ids)), key=lambda i: (-score[i], ids[i]))
    groups: list[list[str]] = []
    top = math.inf
    for i in order:
        if groups and top - score[i] <= tol:
            groups[-1].append(ids[i])
        else:
            groups.append([ids[i]])
            top = score[i]
    return groups


def bradley_terry_strengths(wins: list[list[float]], l2: float = 0.01, iters: int = 100,
                            tol: float = 1e-10) -> list[float]:
    """MAP log-strengths theta of a Bradley–Terry model, P(i beats j) = sigmoid(theta_i - theta_j).

    Maximises sum_ij wins[i][j] * log P(i beats j) - l2/2 * |theta|^2. The tiny L2 prior keeps theta
    finite when an item wins (or loses) every comparison and pins the free offset; it makes the
    objective strictly concave, so Newton's method (with step halving) converges in a few steps.
    """
    w = np.asarray(wins, dtype=np.float64)
    n_games = w + w.T

    def objective(th: np.ndarray) -> float:
        diff = th[:, None] - th[None, :]
        return float(-(w * np.logaddexp(0.0, -diff)).sum() - l2 / 2 * (th @ th))

    theta = np.zeros(len(w))
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(theta[:, None] - theta[None, :])))
        grad = (w - n_games * p).sum(axis=1) - l2 * theta
        curv = n_games * p * (1 - p)  # the Hessian is -(diag(curv.sum(1)) - curv) - l2*I
        hess = np.diag(curv.sum(axis=1) + l2) - curv
        step = np.linalg.solve(hess, grad)
        f0, t = objective(theta), 1.0
        while objective(theta + t * step) < f0 - 1e-12 and t > 1e-6:
            t /= 2
        theta = theta + t * step
        if np.abs(t * step).max() < tol:
            break
    return theta.tolist()


def _bradley_terry(cmps: list[Comparison], ids: list[str]) -> list[list[str]]:
    return _layers(ids, bradley_terry_strengths(_wins(cmps, ids)))


def _borda(cmps: list[Comparison], ids: list[str]) -> list[list[str]]:
    """Mean Borda score: items ranked strictly below, plus half the items tied, per labeler."""
    w = _wins(cmps, ids)
    return _layers(ids, [sum(row) / len(cmps) for row in w])


def _ranked_pairs(cmps: list[Comparison], ids: list[str]) -> list[list[str]]:
    """Tideman's ranked pairs: lock majorities from strongest down, skipping any that closes a cycle.

    The consensus lists the locked graph's sources layer by layer; items in one layer have no locked
    order between them, which (by construction) means their margin is zero — a tie.
    """
    w = _wins(cmps, ids)
    n = len(ids)
    majorities = [(w[i][j] - w[j][i], w[i][j], i, j) for i in range(n) for j in range(n) if w[i][j] > w[j][i]]
    majorities.sort(key=lambda m: (-m[0], -m[1], ids[m[2]], ids[m[3]]))
    beats: list[set[int]] = [set() for _ in range(n)]

    def reaches(a: int, b: int) -> bool:
        stack, seen = [a], {a}
        while stack:
            x = stack.pop()
            if x == b:
                return True
            for y in beats[x] - seen:
                seen.add(y)
                stack.append(y)
        return False

    for _, _, i, j in majorities:
        if not reaches(j, i):
            beats[i].add(j)
    remaining, groups = set(range(n)), []
    while remaining:
        beaten = {j for i in remaining for j in beats[i]}
        layer = sorted(remaining - beaten, key=lambda i: ids[i])
        groups.append([ids[i] for i in layer])
        remaining -= set(layer)
    return groups


METHODS: dict[str, Callable[[list[Comparison], list[str]], list[list[str]]]] = {
    "bradley_terry": _bradley_terry,
    "ranked_pairs": _ranked_pairs,
    "borda": _borda,
}


def aggregate(comparisons: Iterable[Comparison], method: str = "bradley_terry") -> list[Comparison]:
    """One consensus comparison per task from all its labelers' rankings.

    Methods:
    - `bradley_terry`: fit item strengths by (lightly L2-regularised) maximum likelihood on every
      pairwise outcome of every labeler, ties counting half a win each; rank by strength.
    - `ranked_pairs`: Tideman's Condorcet method on pairwise majorities; robust to one outlier.
    - `borda`: mean number of items each item beat.
    Items with equal consensus scores are tied. The result keeps the first record's prompt and
    responses, unions the flags, puts the mean ratings and the labelers in `meta`, and uses the
    latest `created_at`.
    """
    if method not in METHODS:
        raise UserError(f"unknown aggregation method '{method}'; known: {', '.join(METHODS)}")
    out = []
    for task_id, cmps in group_by_task(comparisons).items():
        ids = cmps[0].response_ids()
        for c in cmps[1:]:
            if sorted(c.response_ids()) != sorted(ids):
                raise UserError(f"task {task_id}: labelers ranked different response sets "
                                f"({', '.join(sorted(ids))} vs {', '.join(sorted(c.response_ids()))})")
        flags: dict[str, list[str]] = {}
        ratings: dict[str, list[int]] = defaultdict(list)
        for c in cmps:
            for rid, fl in c.flags.items():
                flags[rid] = sorted(set(flags.get(rid, [])) | set(fl))
            for rid, r in c.ratings.items():
                ratings[rid].append(r)
        meta = {**cmps[0].meta, "labelers": [c.labeler for c in cmps], "n_labelers": len(cmps)}
        if ratings:
            meta["mean_ratings"] = {rid: sum(v) / len(v) for rid, v in ratings.items()}
        out.append(Comparison(
            task_id=task_id, prompt=cmps[0].prompt, responses=cmps[0].responses, source=cmps[0].source,
            meta=meta, ranking=METHODS[method](cmps, ids), flags=flags, labeler=f"aggregate:{method}",
            created_at=max(c.created_at for c in cmps),
        ))
    return out


def pairwise_agreement(comparisons: Iterable[Comparison]) -> float:
    """Inter-labeler agreement: over tasks with >= 2 labels, the fraction of (labeler pair, response
    pair) where both labelers order the two responses the same way. Pairs either labeler tied are
    left out. Returns NaN when no such pair exists.
    """
    agree = total = 0
    for cmps in group_by_task(comparisons).values():
        for c1, c2 in combinations(cmps, 2):
            r1, r2 = c1.rank_of(), c2.rank_of()
            for a, b in combinations(c1.response_ids(), 2):
                if a not in r2 or b not in r2:
                    continue
                d1, d2 = r1[a] - r1[b], r2[a] - r2[b]
                if d1 == 0 or d2 == 0:
                    continue
                total += 1
                agree += (d1 > 0) == (d2 > 0)
    return agree / total if total else float("nan")
