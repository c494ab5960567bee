"""Inter-labeler agreement on a campaign: pairwise agreement (InstructGPT's figure), Kendall's tau-b,
Krippendorff's alpha (ordinal, `krippendorff` package), per-labeler agreement with the rest, and flags
for labelers who are too fast or favour one shown position."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from itertools import combinations
from typing import Any

import numpy as np

from chatforge.data.aggregate import group_by_task, pairwise_agreement
from chatforge.data.formats import Comparison

TOO_FAST_S = 5.0  # median seconds per task below this is flagged
POSITION_BIAS = 0.6  # first-shown reply ranked best this often (with >= 5 tasks, K >= 3) is flagged


def _pair_counts(c1: Comparison, c2: Comparison) -> tuple[int, int]:
    r1, r2 = c1.rank_of(), c2.rank_of()
    agree = total = 0
    for a, b in combinations(c1.response_ids(), 2):
        d1, d2 = r1[a] - r1[b], r2.get(a, 0) - r2.get(b, 0)
        if d1 and d2:
            total += 1
            agree += (d1 > 0) == (d2 > 0)
    return agree, total


def kendall_tau(comparisons: list[Comparison]) -> float:
    """Mean Kendall tau-b over (task, labeler pair); NaN when no task has two labels."""
    from scipy.stats import kendalltau

    taus = []
    for cmps in group_by_task(comparisons).values():
        for c1, c2 in combinations(cmps, 2):
            ids = c1.response_ids()
            r1, r2 = c1.rank_of(), c2.rank_of()
            tau = kendalltau([r1[i] for i in ids], [r2[i] for i in ids]).statistic
            if not math.isnan(tau):
                taus.append(tau)
    return float(np.mean(taus)) if taus else float("nan")


def krippendorff_alpha(comparisons: list[Comparison]) -> float:
    """Ordinal alpha over units (task, reply) with each labeler's rank group as the value."""
    import krippendorff

    labelers = sorted({c.labeler for c in comparisons})
    units = sorted({(c.task_id, rid) for c in comparisons for rid in c.response_ids()})
    if len(labelers) < 2 or not units:
        return float("nan")
    li, ui = {name: i for i, name in enumerate(labelers)}, {u: i for i, u in enumerate(units)}
    data = np.full((len(labelers), len(units)), np.nan)
    for c in comparisons:
        for rid, g in c.rank_of().items():
            data[li[c.labeler], ui[(c.task_id, rid)]] = g
    if np.sum(~np.isnan(data).all(axis=0) & (np.sum(~np.isnan(data), axis=0) >= 2)) == 0:
        return float("nan")
    if len(np.unique(data[~np.isnan(data)])) < 2:
        return float("nan")  # a single value everywhere: alpha is undefined
    return float(krippendorff.alpha(reliability_data=data, level_of_measurement="ordinal"))


def per_labeler(comparisons: list[Comparison]) -> dict[str, dict[str, Any]]:
    """Per labeler: tasks, agreement with the others, median seconds, how often the first-shown reply won."""
    stats: dict[str, dict[str, Any]] = defaultdict(lambda: {"tasks": 0, "agree": 0, "pairs": 0, "seconds": [],
                                                            "first_best": 0, "k3": 0})
    for cmps in group_by_task(comparisons).values():
        for c1, c2 in combinations(cmps, 2):
            a, t = _pair_counts(c1, c2)
            for name in (c1.labeler, c2.labeler):
                stats[name]["agree"] += a
                stats[name]["pairs"] += t
    for c in comparisons:
        s = stats[c.labeler]
        s["tasks"] += 1
        if c.meta.get("seconds") is not None:
            s["seconds"].append(float(c.meta["seconds"]))
        shown = c.meta.get("shown_order") or []
        if len(shown) >= 3:
            s["k3"] += 1
            s["first_best"] += shown[0] in c.ranking[0]
    out = {}
    for name, s in sorted(stats.items()):
        med = statistics.median(s["seconds"]) if s["seconds"] else None
        first = s["first_best"] / s["k3"] if s["k3"] else None
        flags = []
        if med is not None and med < TOO_FAST_S:
            flags.append("too fast")
        if first is not None and s["k3"] >= 5 and first >= POSITION_BIAS:
            flags.append("favours the first position")
        out[name] = {"tasks": s["tasks"], "agreement": s["agree"] / s["pairs"] if s["pairs"] else None,
                     "median_seconds": med, "first_shown_best": first, "flags": flags}
    return out


def campaign_agreement(comparisons: list[Comparison]) -> dict[str, Any]:
    """Every figure of the dashboard, from per-labeler comparisons."""
    multi = sum(1 for cmps in group_by_task(comparisons).values() if len(cmps) >= 2)
    return {"rankings": len(comparisons), "tasks_with_overlap": multi,
            "pairwise_agreement": pairwise_agreement(comparisons), "kendall_tau": kendall_tau(comparisons),
            "krippendorff_alpha": krippendorff_alpha(comparisons), "labelers": per_labeler(comparisons)}
