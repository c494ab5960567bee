"""The agreement dashboard's figures against hand cases: pairwise agreement, Kendall's tau, Krippendorff's
alpha, each labeler against the rest, and the too-fast and first-position flags."""

from __future__ import annotations

import math

import pytest

from chatforge.data.formats import Comparison
from chatforge.server.web.agreement import campaign_agreement


def cmp(task: str, labeler: str, ranking: list[list[str]], shown: list[str] | None = None,
        seconds: float | None = 30.0) -> Comparison:
    ids = sorted(r for g in ranking for r in g)
    return Comparison.from_dict({
        "task_id": task, "prompt": {"messages": [{"role": "user", "content": "q"}]},
        "responses": [{"response_id": r, "content": r} for r in ids], "ranking": ranking, "labeler": labeler,
        "meta": {"seconds": seconds, "shown_order": shown or ids}})


def test_hand_case_agreement_tau_and_alpha():
    # task t1: ann a>b>c, bob a>c>b -> pairs (a,b) agree, (a,c) agree, (b,c) disagree: 2/3
    rows = [cmp("t1", "ann", [["a"], ["b"], ["c"]]), cmp("t1", "bob", [["a"], ["c"], ["b"]])]
    d = campaign_agreement(rows)
    assert d["pairwise_agreement"] == pytest.approx(2 / 3)
    assert d["kendall_tau"] == pytest.approx(1 / 3)  # (concordant 2 - discordant 1) / 3
    assert d["labelers"]["ann"]["agreement"] == pytest.approx(2 / 3)
    assert d["tasks_with_overlap"] == 1 and d["rankings"] == 2
    perfect = campaign_agreement([cmp("t1", n, [["a"], ["b"], ["c"]]) for n in ("ann", "bob")]
                                 + [cmp("t2", n, [["c"], ["a"], ["b"]]) for n in ("ann", "bob")])
    assert perfect["pairwise_agreement"] == 1.0 and perfect["krippendorff_alpha"] == pytest.approx(1.0)
    opposite = campaign_agreement([cmp("t1", "ann", [["a"], ["b"], ["c"]]), cmp("t1", "bob", [["c"], ["b"], ["a"]])])
    assert opposite["pairwise_agreement"] == 0.0 and opposite["kendall_tau"] == pytest.approx(-1.0)
    assert opposite["krippendorff_alpha"] < 0
    assert math.isnan(campaign_agreement([cmp("t1", "ann", [["a"], ["b"]])])["kendall_tau"])  # no overlap


def test_flags_too_fast_and_first_position():
    rows = []
    for i in range(6):
        shown = ["c", "a", "b"] if i % 2 else ["b", "c", "a"]
        # eve always puts the first-shown reply best, in 2 s; ann ranks by content (a best), in 40 s
        rows.append(cmp(f"t{i}", "eve", [[shown[0]], [shown[1]], [shown[2]]], shown=shown, seconds=2.0))
        rows.append(cmp(f"t{i}", "ann", [["a"], ["b"], ["c"]], shown=shown, seconds=40.0))
    lab = campaign_agreement(rows)["labelers"]
    assert lab["eve"]["flags"] == ["too fast", "favours the first position"]
    assert lab["eve"]["first_shown_best"] == 1.0 and lab["eve"]["median_seconds"] == 2.0
    assert lab["ann"]["flags"] == [] and lab["ann"]["first_shown_best"] == 0.0
    few = campaign_agreement(rows[:8])["labelers"]["eve"]  # 4 tasks: too few to call a position bias
    assert few["flags"] == ["too fast"]
