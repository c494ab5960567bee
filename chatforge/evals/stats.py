"""Small, dependency-free (numpy only) statistics for evaluation reports.

Everything here works on plain lists/arrays so the eval stage can feed it judge outcomes, reward-model
scores or probe results alike. Intervals are 95% by default; every function is deterministic given its
`seed`, so a report re-run on the same inputs prints the same numbers.

- `wilson_interval`: binomial proportion interval that behaves at p near 0/1 and small n (unlike Wald).
- `bootstrap_ci`: percentile bootstrap for any statistic of i.i.d. units (prompts, pairs, examples).
- `win_rate` / `length_controlled_win_rate`: pairwise model-vs-baseline outcomes, AlpacaEval style.
- `bradley_terry` / `bradley_terry_bootstrap`: Chatbot-Arena style strengths from many pairwise games.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

import numpy as np

ELO_SCALE = 400.0 / math.log(10.0)  # one unit of log-strength in Elo points
ELO_BASE = 1000.0


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a proportion `successes / n` (successes may be fractional, e.g. ties as 0.5).

    With n == 0 there is no information, so the whole range (0, 1) is returned.
    """
    if n <= 0:
        return (0.0, 1.0)
    if not 0 <= successes <= n:
        raise ValueError(f"successes={successes} must lie in [0, n={n}]")
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return (max(0.0, center - half), min(1.0, center + half))


def _resample_idx(n: int, n_boot: int, seed: int, max_cells: int = 4_000_000) -> Iterator[np.ndarray]:
    """Bootstrap index rows, (chunk, n) at a time so memory stays bounded for large n."""
    rng = np.random.default_rng(seed)
    chunk = max(1, max_cells // max(n, 1))
    for start in range(0, n_boot, chunk):
        yield rng.integers(0, n, size=(min(chunk, n_boot - start), n))


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    stat: Callable[..., Any] = np.mean,
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float]:
    """Percentile bootstrap interval of `stat(values)`, resampling the first axis of `values`.

    `np.mean` / `np.median` / `np.sum` are vectorised over all resamples at once; any other callable is
    applied resample by resample (it receives an array shaped like `values`). NaN results of a resample
    (e.g. an undefined correlation) are dropped. Empty input gives (nan, nan).
    """
    arr = np.asarray(values, dtype=float)
    n = arr.shape[0] if arr.ndim else 0
    if n == 0:
        return (float("nan"), float("nan"))
    if stat in (np.mean, np.median, np.sum) and arr.ndim == 1:
        boots = np.concatenate([stat(arr[idx], axis=1) for idx in _resample_idx(n, n_boot, seed)])
    else:
        boots = np.array([stat(arr[i]) for idx in _resample_idx(n, n_boot, seed) for i in idx], dtype=float)
    boots = boots[~np.isnan(boots)]
    if boots.size == 0:
        return (float("nan"), float("nan"))
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return (float(lo), float(hi))


def jackknife_ci(n: int, stat: Callable[[np.ndarray], float], z: float = 1.96) -> tuple[float, float]:
    """Normal interval from the leave-one-out jackknife of `stat(indices)` over items 0..n-1.

    For pooled statistics such as distinct-n, where a bootstrap resample's duplicated items are themselves
    repeats (so every resample scores low and the percentile interval misses the estimate); the jackknife
    never duplicates an item. Fewer than 2 items give (nan, nan).
    """
    if n < 2:
        return (float("nan"), float("nan"))
    idx = np.arange(n)
    loo = np.array([stat(np.delete(idx, i)) for i in range(n)], dtype=float)
    se = float(np.sqrt((n - 1) / n * np.sum((loo - loo.mean()) ** 2)))
    full = float(stat(idx))
    return (full - z * se, full + z * se)


def _check_outcomes(outcomes: Sequence[float]) -> np.ndarray:
    y = np.asarray(outcomes, dtype=float)
    bad = ~np.isin(y, (0.0, 0.5, 1.0))
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"outcome #{i} is {outcomes[i]!r}; expected 1 (model wins), 0 (baseline wins) or 0.5 (tie)")
    return y


def win_rate(outcomes: Sequence[float], n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Win rate of model M over baseline B from one outcome per prompt (1 M wins, 0 B wins, 0.5 tie).

    Ties count half. Two 95% intervals: Wilson on (wins + ties/2) / n, and a percentile bootstrap over
    prompts (ties make the Wilson interval slightly conservative, the bootstrap is exact for them).
    """
    y = _check_outcomes(outcomes)
    n = int(y.size)
    wins, losses, ties = int((y == 1).sum()), int((y == 0).sum()), int((y == 0.5).sum())
    rate = float(y.mean()) if n else float("nan")
    return {
        "win_rate": rate,
        "wins": wins,
        "losses": losses,
        "ties": ties,
        "n": n,
        "ci_wilson": wilson_interval(wins + 0.5 * ties, n),
        "ci_bootstrap": bootstrap_ci(y, np.mean, n_boot=n_boot, seed=seed),
    }


# ---------------------------------------------------------------- length-controlled win rate


def _fit_logistic(x: np.ndarray, y: np.ndarray, ridge: float = 1e-2, iters: int = 50) -> tuple[float, float]:
    """Fit P(y=1) = sigmoid(a + b·x) by Newton's method; y may be fractional (ties = 0.5).

    A small ridge on both coefficients keeps the fit finite when the data are separable.
    """
    X = np.stack([np.ones_like(x), x], axis=1)
    w = np.zeros(2)
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(X @ w)))
        grad = X.T @ (p - y) + ridge * w
        hess = (X * (p * (1 - p))[:, None]).T @ X + ridge * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-9:
            break
    return float(w[0]), float(w[1])


def _lc_point(y: np.ndarray, diff: np.ndarray) -> tuple[float, float]:
    sd = diff.std()
    x = np.tanh(diff / sd) if sd > 0 else np.zeros_like(diff)
    a, b = _fit_logistic(x, y)
    return 1.0 / (1.0 + math.exp(-a)), b


def length_controlled_win_rate(
    outcomes: Sequence[float],
    len_m: Sequence[float],
    len_b: Sequence[float],
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Win rate with the effect of reply length regressed out (a simplified AlpacaEval-LC).

    Model: P(M wins on prompt i) = sigmoid(a + b · tanh(d_i / sd(d))), where d_i = len_m[i] - len_b[i]
    (any length unit: tokens, words or characters). `b` captures how much being longer helps; the
    length-controlled win rate is the prediction at zero length difference, sigmoid(a). AlpacaEval-LC
    adds a per-instruction difficulty term that is omitted here (it needs many models per prompt).
    Ties are fractional targets (0.5). The interval is a percentile bootstrap over prompts (refitting).
    """
    y = _check_outcomes(outcomes)
    lm, lb = np.asarray(len_m, dtype=float), np.asarray(len_b, dtype=float)
    if not (y.size == lm.size == lb.size):
        raise ValueError(f"outcomes ({y.size}), len_m ({lm.size}) and len_b ({lb.size}) must have equal length")
    n = int(y.size)
    if n == 0:
        return {"lc_win_rate": float("nan"), "length_coef": float("nan"), "win_rate": float("nan"),
                "ci_bootstrap": (float("nan"), float("nan")), "n": 0}
    diff = lm - lb
    lc, coef = _lc_point(y, diff)
    boots = np.array([_lc_point(y[i], diff[i])[0] for idx in _resample_idx(n, n_boot, seed) for i in idx])
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return {
        "lc_win_rate": lc,
        "length_coef": coef,
        "win_rate": float(y.mean()),
        "mean_len_diff": float(diff.mean()),
        "ci_bootstrap": (float(lo), float(hi)),
        "n": n,
    }


# ---------------------------------------------------------------- Bradley-Terry


def _parse_comparisons(
    comparisons: Sequence[Sequence[Any]], items: Sequence[Hashable] | None
) -> tuple[list[Hashable], np.ndarray, np.ndarray, np.ndarray]:
    """(winner, loser) or (a, b, score_of_a in {1, 0.5, 0}) -> item list and index/score arrays."""
    names: list[Hashable] = list(items) if items is not None else []
    index = {k: i for i, k in enumerate(names)}
    ia, ib, sa = [], [], []
    for n, c in enumerate(comparisons):
        if len(c) == 2:
            a, b, s = c[0], c[1], 1.0
        elif len(c) == 3:
            a, b, s = c[0], c[1], float(c[2])
        else:
            raise ValueError(f"comparison #{n} {c!r}: expected (winner, loser) or (a, b, score_of_a)")
        if s not in (0.0, 0.5, 1.0):
            raise ValueError(f"comparison #{n}: score {s!r} must be 1, 0.5 or 0")
        if a == b:
            raise ValueError(f"comparison #{n}: an item cannot be compared with itself ({a!r})")
        for k in (a, b):
            if k not in index:
                if items is not None:
                    raise ValueError(f"comparison #{n}: unknown item {k!r} (not in items)")
                index[k] = len(names)
                names.append(k)
        ia.append(index[a])
        ib.append(index[b])
        sa.append(s)
    return names, np.array(ia, dtype=int), np.array(ib, dtype=int), np.array(sa, dtype=float)


def _bt_fit(k: int, ia: np.ndarray, ib: np.ndarray, sa: np.ndarray, w: np.ndarray, prior: float) -> np.ndarray:
    """Newton MLE of log-strengths s under P(a beats b) = sigmoid(s_a - s_b), Gaussian prior N(0, 1/prior).

    `w` are per-comparison weights (bootstrap multiplicities). Ties contribute half a win to each side.
    """
    # Aggregate into k×k "games" and "points" so each Newton step costs O(k^2), not O(#comparisons).
    games = np.zeros((k, k))
    points = np.zeros((k, k))
    np.add.at(games, (ia, ib), w)
    np.add.at(points, (ia, ib), w * sa)
    np.add.at(points, (ib, ia), w * (1.0 - sa))
    games = games + games.T
    s = np.zeros(k)
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-(s[:, None] - s[None, :])))  # p[i, j] = P(i beats j)
        grad = points.sum(1) - (games * p).sum(1) - prior * s
        wpq = games * p * (1 - p)
        hess = np.diag(wpq.sum(1) + prior) - wpq  # negative Hessian: positive definite thanks to the prior
        step = np.linalg.solve(hess, grad)
        s += step
        if np.abs(step).max() < 1e-10:
            break
    return s


def _anchor(names: list[Hashable], s: np.ndarray, reference: Hashable | None, elo: bool) -> np.ndarray:
    if reference is not None:
        if reference not in names:
            raise ValueError(f"reference {reference!r} is not one of the compared items")
        s = s - s[names.index(reference)]
    else:
        s = s - s.mean()
    return ELO_SCALE * s + ELO_BASE if elo else s


def bradley_terry(
    comparisons: Sequence[Sequence[Any]],
    items: Sequence[Hashable] | None = None,
    reference: Hashable | None = None,
    prior: float = 0.01,
    elo: bool = False,
) -> dict[Hashable, float]:
    """Bradley–Terry strengths from pairwise comparisons (Chatbot-Arena style).

    comparisons: (winner, loser) pairs, or (a, b, score_of_a) with score 1 / 0.5 (tie) / 0.
    Strengths are natural-log odds: P(a beats b) = sigmoid(s_a - s_b). A tiny Gaussian prior (precision
    `prior`) makes the MLE unique even for an item that never lost. Anchored at `reference` = 0, or at
    mean 0 without one. `elo=True` maps to the Elo-like scale 400/ln(10)·s + 1000.
    """
    names, ia, ib, sa = _parse_comparisons(comparisons, items)
    if not names:
        return {}
    s = _bt_fit(len(names), ia, ib, sa, np.ones(ia.size), prior)
    return dict(zip(names, (float(v) for v in _anchor(names, s, reference, elo)), strict=True))


def bradley_terry_bootstrap(
    comparisons: Sequence[Sequence[Any]],
    items: Sequence[Hashable] | None = None,
    reference: Hashable | None = None,
    prior: float = 0.01,
    elo: bool = False,
    n_boot: int = 200,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[Hashable, dict[str, float]]:
    """Bradley–Terry strengths with percentile-bootstrap intervals from resampled comparisons.

    Returns {item: {"strength", "lo", "hi", "rank"}} (rank 1 = strongest, by the point estimate).
    """
    names, ia, ib, sa = _parse_comparisons(comparisons, items)
    if not names:
        return {}
    k, m = len(names), ia.size
    point = _anchor(names, _bt_fit(k, ia, ib, sa, np.ones(m), prior), reference, elo)
    rng = np.random.default_rng(seed)
    boots = np.empty((n_boot, k))
    for b in range(n_boot):
        # A bootstrap resample is a multinomial count per comparison: same thing, no index copies.
        w = rng.multinomial(m, np.full(m, 1.0 / m)).astype(float) if m else np.zeros(0)
        boots[b] = _anchor(names, _bt_fit(k, ia, ib, sa, w, prior), reference, elo)
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2], axis=0)
    order = np.argsort(-point, kind="stable")
    rank = np.empty(k, dtype=int)
    rank[order] = np.arange(1, k + 1)
    return {
        name: {"strength": float(point[i]), "lo": float(lo[i]), "hi": float(hi[i]), "rank": int(rank[i])}
        for i, name in enumerate(names)
    }
