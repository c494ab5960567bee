"""Tests for chatforge.evals: statistics, text metrics and bias probes (model access faked with callables)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from chatforge.core.io import DataError
from chatforge.evals import bias, stats, text

FIXTURES = Path(__file__).parent / "fixtures"
# A 6-row, clearly synthetic CrowS-Pairs-format file (made-up groups); we do not ship the real data.
CROWS = FIXTURES / "crows_pairs_synthetic.csv"


# ---------------------------------------------------------------- stats


def test_wilson_known_values():
    lo, hi = stats.wilson_interval(7, 10)
    assert lo == pytest.approx(0.3968, abs=1e-3) and hi == pytest.approx(0.8922, abs=1e-3)
    lo, hi = stats.wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-3)
    assert stats.wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        stats.wilson_interval(11, 10)


def test_bootstrap_ci_covers_true_mean():
    rng = np.random.default_rng(123)
    covered = 0
    for rep in range(20):
        x = rng.normal(2.0, 1.0, size=200)
        lo, hi = stats.bootstrap_ci(x, np.mean, n_boot=1000, seed=rep)
        assert lo < x.mean() < hi and hi - lo < 0.4
        covered += lo <= 2.0 <= hi
    assert covered >= 16  # nominal 95%
    # a generic statistic goes through the per-resample path and agrees in spirit
    lo, hi = stats.bootstrap_ci(x, lambda a: float(np.percentile(a, 50)), n_boot=300)
    assert lo < np.median(x) < hi


def test_jackknife_interval_of_a_mean_is_the_standard_error_and_a_pooled_distinct_n_is_covered():
    x = np.array([1.0, 4.0, 2.0, 8.0, 5.0])
    lo, hi = stats.jackknife_ci(len(x), lambda idx: float(x[idx].mean()))
    se = x.std(ddof=1) / math.sqrt(len(x))  # the jackknife SE of a mean is exactly s / sqrt(n)
    assert (lo, hi) == pytest.approx((x.mean() - 1.96 * se, x.mean() + 1.96 * se))
    # pooled distinct-2 of replies that never share a bigram is 1.0: a bootstrap resample repeats replies, so its
    # percentile interval lies wholly below the estimate; the jackknife's contains it
    replies = [f"w{i} v{i} u{i}" for i in range(30)]
    pooled = lambda idx: text.distinct_n([replies[int(i)] for i in idx], 2)  # noqa: E731
    assert pooled(np.arange(30)) == 1.0
    assert stats.bootstrap_ci(np.arange(30), pooled, n_boot=200)[1] < 1.0
    assert stats.jackknife_ci(30, pooled) == pytest.approx((1.0, 1.0))
    assert math.isnan(stats.jackknife_ci(1, pooled)[0])


def test_win_rate_counts_ties_half():
    r = stats.win_rate([1, 1, 0, 0.5, 0.5, 1, 0, 1])
    assert (r["wins"], r["losses"], r["ties"], r["n"]) == (4, 2, 2, 8)
    assert r["win_rate"] == pytest.approx(5 / 8)
    assert r["ci_wilson"] == pytest.approx(stats.wilson_interval(5, 8))
    lo, hi = r["ci_bootstrap"]
    assert lo < 5 / 8 < hi
    with pytest.raises(ValueError, match="outcome #1"):
        stats.win_rate([1, 2])


def _simulate_length_effect(n, intercept, seed=0):
    rng = np.random.default_rng(seed)
    len_b = rng.integers(50, 300, size=n).astype(float)
    len_m = len_b + rng.normal(60, 80, size=n)  # M is longer on ~77% of prompts
    d = len_m - len_b
    p = 1 / (1 + np.exp(-(intercept + 2.5 * np.tanh(d / d.std()))))
    return (rng.random(n) < p).astype(float), len_m, len_b


def test_length_controlled_win_rate_removes_planted_length_effect():
    y, lm, lb = _simulate_length_effect(3000, intercept=0.0)
    r = stats.length_controlled_win_rate(y, lm, lb, n_boot=200)
    assert r["win_rate"] > 0.68  # raw win rate is inflated by length alone
    assert r["lc_win_rate"] == pytest.approx(0.5, abs=0.05)
    assert r["length_coef"] > 1.5
    lo, hi = r["ci_bootstrap"]
    assert lo <= 0.5 <= hi
    # a genuine quality edge survives length control
    y, lm, lb = _simulate_length_effect(3000, intercept=1.0, seed=1)
    r = stats.length_controlled_win_rate(y, lm, lb, n_boot=100)
    assert r["lc_win_rate"] == pytest.approx(1 / (1 + math.exp(-1.0)), abs=0.05)


def _simulate_bt(true, n, seed=0, tie_band=0.0):
    rng = np.random.default_rng(seed)
    names = list(true)
    comps = []
    for _ in range(n):
        a, b = rng.choice(len(names), size=2, replace=False)
        p = 1 / (1 + math.exp(-(true[names[a]] - true[names[b]])))
        u = rng.random()
        if abs(u - p) < tie_band:
            comps.append((names[a], names[b], 0.5))
        else:
            comps.append((names[a], names[b]) if u < p else (names[b], names[a]))
    return comps


def test_bradley_terry_recovers_known_strengths():
    true = {"ref": 0.0, "good": 0.8, "best": 1.5, "bad": -0.7}
    comps = _simulate_bt(true, 6000)
    est = stats.bradley_terry(comps, reference="ref")
    assert est["ref"] == 0.0
    for k, v in true.items():
        assert est[k] == pytest.approx(v, abs=0.12), k
    assert sorted(est, key=est.get) == sorted(true, key=true.get)
    elo = stats.bradley_terry(comps, reference="ref", elo=True)
    assert elo["ref"] == pytest.approx(1000.0)
    assert elo["best"] - elo["ref"] == pytest.approx(400 / math.log(10) * est["best"])
    centered = stats.bradley_terry(comps)
    assert sum(centered.values()) == pytest.approx(0.0, abs=1e-9)


def test_bradley_terry_ties_prior_and_bootstrap():
    true = {"a": 0.0, "b": 1.0, "c": -1.0}
    comps = _simulate_bt(true, 3000, seed=3, tie_band=0.1)
    assert any(len(c) == 3 for c in comps)
    boot = stats.bradley_terry_bootstrap(comps, reference="a", n_boot=100)
    for k, v in true.items():
        assert boot[k]["lo"] <= v <= boot[k]["hi"], (k, boot[k])
    assert [k for k in sorted(boot, key=lambda k: boot[k]["rank"])] == ["b", "a", "c"]
    # an item that never lost still gets a finite strength thanks to the prior
    est = stats.bradley_terry([("x", "y")] * 10 + [("y", "z")] * 5, items=["x", "y", "z", "w"])
    assert all(math.isfinite(v) for v in est.values()) and est["x"] > est["y"] > est["z"]
    with pytest.raises(ValueError, match="unknown item"):
        stats.bradley_terry([("x", "q")], items=["x"])


# ---------------------------------------------------------------- text


def test_distinct_and_repetition_on_hand_examples():
    replies = ["a b a", "b c"]
    assert text.distinct_n(replies, 1) == pytest.approx(3 / 5)
    assert text.distinct_n(replies, 2) == pytest.approx(1.0)
    assert text.distinct_n([""], 1) == 0.0
    loopy = ["go go go go go", "hello there friend"]
    assert text.repetition_rate(loopy, n=3, min_count=3) == 0.5
    assert text.repetition_rate(["go go go go"], n=3, min_count=3) == 0.0  # only 2 occurrences
    # seq-rep-4: "go"*5 has 2 identical 4-grams -> 1 - 1/2; the other reply has no 4-gram
    assert text.rep_n(loopy, 4) == pytest.approx((0.5 + 0.0) / 2)
    assert text.words("Hello, World!") == ["hello", ",", "world", "!"]


def test_length_eot_and_near_duplicates():
    ls = text.length_stats(["one two three", "x", "a b c d e"])
    assert ls["mean_words"] == 3.0 and ls["median_words"] == 3.0 and ls["mean_chars"] == pytest.approx(23 / 3)
    assert text.end_of_turn_rate(["stop", "length", "STOP", "eos"]) == 0.75
    replies = ["the cat sat on the mat", "the cat sat on the mat", "completely different words are here now"]
    assert text.near_duplicate_rate(replies) == pytest.approx(1 / 3)
    assert text.near_duplicate_rate(["ok", "ok", "ok"]) == 1.0
    assert text.near_duplicate_rate(["only one"]) == 0.0
    many = [f"reply number {i} talks about topic {i % 7} today" for i in range(60)]
    exact = text.near_duplicate_rate(many, threshold=0.3)
    sampled = text.near_duplicate_rate(many, threshold=0.3, max_pairs=500)
    assert abs(exact - sampled) < 0.1
    rep = text.text_report(replies, finish_reasons=["stop", "stop", "length"])
    assert rep["end_of_turn_rate"] == pytest.approx(2 / 3) and rep["n"] == 3
    assert 0 < rep["end_of_turn_ci"][0] < 2 / 3 < rep["end_of_turn_ci"][1]


# ---------------------------------------------------------------- Winogender


def _gender(sentence: str) -> str:
    if re.search(r"\b(she|her|hers)\b", sentence, re.I):
        return "female"
    if re.search(r"\b(he|his|him)\b", sentence, re.I):
        return "male"
    return "neutral"


def test_winogender_embedded_data_loads():
    triples, occ = bias.load_winogender()
    assert len(triples) == 240 and len(occ) == 60
    assert all(_gender(t["sentences"][g]) == g for t in triples for g in ("male", "female", "neutral"))


def test_winogender_male_preferring_fake():
    data = bias.load_winogender()
    male = bias.winogender_probe(lambda ts: [0.0 if _gender(t) == "male" else -3.0 for t in ts], data, n_boot=200)
    m = male["metrics"]
    assert m["male_over_female"]["value"] == 1.0 and m["male_over_female"]["n"] == 240
    assert m["male_over_female"]["lo"] > 0.98
    assert m["female_minus_male"]["value"] == pytest.approx(-3.0)
    assert m["stereotype_corr"]["value"] is None  # constant preference: correlation undefined
    female = bias.winogender_probe(lambda ts: [0.0 if _gender(t) == "female" else -1.0 for t in ts], data)
    assert female["metrics"]["male_over_female"]["value"] == 0.0
    neutral = bias.winogender_probe(lambda ts: [-1.0 if _gender(t) != "neutral" else 0.0 for t in ts], data)
    assert neutral["metrics"]["neutral_preferred"]["value"] == 1.0
    assert neutral["metrics"]["male_over_female"]["value"] == 0.5  # all ties


def test_winogender_stereotype_alignment_fake():
    triples, occ = bias.load_winogender()
    occ_of = {t["sentences"][g]: t["occupation"] for t in triples for g in t["sentences"]}

    def stereotyped(ts):  # prefers "she" for female-dominated occupations, "he" otherwise
        out = []
        for t in ts:
            lean = (occ[occ_of[t]] - 50) / 50
            out.append({"female": lean, "male": -lean, "neutral": 0.0}[_gender(t)])
        return out

    r = bias.winogender_probe(stereotyped, (triples, occ), n_boot=300)
    corr = r["metrics"]["stereotype_corr"]
    assert corr["value"] > 0.99 and corr["lo"] > 0.9 and corr["n"] == 60
    share_f = np.mean([v > 50 for v in occ.values()])
    assert r["metrics"]["male_over_female"]["value"] == pytest.approx(1 - share_f, abs=0.02)


# ---------------------------------------------------------------- BBQ


def _bbq_fake(examples, policy):
    by_prompt = {f"{e['context']}\n{e['question']}": e for e in examples}

    def choose(prompt, options):
        e = by_prompt[prompt]
        assert options == [e["ans0"], e["ans1"], e["ans2"]]
        unknown, target = bias.bbq_answer_roles(e)
        other = next(i for i in range(3) if i not in (unknown, target))
        return policy(e, unknown, target, other)

    return choose


def test_bbq_answer_roles_on_embedded_subset():
    exs = bias.load_bbq()
    assert len(exs) == 360 and len({e["category"] for e in exs}) == 6
    roles = [bias.bbq_answer_roles(e) for e in exs]
    assert all(u is not None and t is not None and u != t for u, t in roles)
    assert sum(e["context_condition"] == "ambig" for e in exs) == 180
    # ambiguous contexts are always answered by "unknown"
    assert all(e["label"] == r[0] for e, r in zip(exs, roles, strict=True) if e["context_condition"] == "ambig")


def test_bbq_stereotyped_fake_scores_one():
    exs = bias.load_bbq()
    biased = _bbq_fake(exs, lambda e, u, t, o: t if e["question_polarity"] == "neg" else o)
    r = bias.bbq_probe(biased, exs, n_boot=200)
    m = r["metrics"]
    assert m["bias_disambig"]["value"] == pytest.approx(1.0)
    assert m["acc_ambig"]["value"] == 0.0
    assert m["bias_ambig"]["value"] == pytest.approx(1.0)
    assert m["bias_disambig"]["lo"] == pytest.approx(1.0)
    assert all(c["bias_disambig"]["value"] == pytest.approx(1.0) for c in r["by_category"].values())
    anti = bias.bbq_probe(_bbq_fake(exs, lambda e, u, t, o: o if e["question_polarity"] == "neg" else t), exs)
    assert anti["metrics"]["bias_disambig"]["value"] == pytest.approx(-1.0)
    # always naming the target group is not "biased" by BBQ's definition: neg and non-neg cancel out
    target = bias.bbq_probe(_bbq_fake(exs, lambda e, u, t, o: t), exs)
    assert target["metrics"]["bias_disambig"]["value"] == pytest.approx(0.0, abs=0.05)


def test_bbq_oracle_and_unknown_fakes():
    exs = bias.load_bbq()
    oracle = bias.bbq_probe(_bbq_fake(exs, lambda e, u, t, o: e["label"]), exs)
    assert oracle["metrics"]["acc_ambig"]["value"] == 1.0 and oracle["metrics"]["acc_disambig"]["value"] == 1.0
    assert oracle["metrics"]["bias_ambig"]["value"] == 0.0
    unk = bias.bbq_probe(_bbq_fake(exs, lambda e, u, t, o: u), exs)
    assert unk["metrics"]["acc_ambig"]["value"] == 1.0 and unk["metrics"]["acc_disambig"]["value"] == 0.0
    assert unk["metrics"]["bias_disambig"] == {"value": 0.0, "lo": 0.0, "hi": 0.0, "n": 0}


def test_choice_fn_from_loglik_and_bbq_loader_errors(tmp_path):
    # a fake LM that likes texts ending in "unknown"-style answers, and dislikes long options
    def loglik(ts):
        return [(5.0 if t.endswith(("Can't answer", "Unknown")) else 0.0) - 0.01 * len(t) for t in ts]

    choose = bias.choice_fn_from_loglik(loglik)
    assert choose("Q?", ["The tall one", "Can't answer", "The short one"]) == 1
    assert bias.choice_fn_from_loglik(lambda ts: [-float(len(t)) for t in ts])("Q?", ["aaaa", "a", "aa"]) == 1
    norm = bias.choice_fn_from_loglik(lambda ts: [-float(len(t)) for t in ts], normalize=True)
    assert norm("Q?", ["aaaa", "a", "aa"]) in (0, 1, 2)
    bad = tmp_path / "Bad.jsonl"
    ok = bias.load_bbq()[0]
    broken = {k: v for k, v in ok.items() if k != "answer_info"}
    bad.write_text(json.dumps(ok) + "\n" + json.dumps(broken) + "\n")
    with pytest.raises(DataError, match=r"Bad\.jsonl:2: .*answer_info"):
        bias.load_bbq(bad)


# ---------------------------------------------------------------- BOLD


def test_bold_gender_gap_with_vader():
    pytest.importorskip("vaderSentiment")
    rows = bias.load_bold(domains=["gender"], max_per_group=10)
    assert {r["group"] for r in rows} == {"American_actors", "American_actresses"} and len(rows) == 20

    def gen(prompts):
        actors = {r["prompt"] for r in rows if r["group"] == "American_actors"}
        return ["a wonderful, brilliant and beloved performer." if p in actors else
                "a terrible, awful and hated failure." for p in prompts]

    r = bias.bold_probe(gen, rows, n_boot=200)
    g = r["by_group"]["gender"]
    assert g["American_actors"]["sentiment"]["value"] > 0.5 > -0.5 > g["American_actresses"]["sentiment"]["value"]
    assert g["American_actors"]["positive"]["value"] == 1.0 and g["American_actresses"]["negative"]["value"] == 1.0
    gap = r["metrics"]["gender_gap"]
    assert gap["value"] > 1.5 and gap["lo"] > 1.4
    assert r["metrics"]["negative_rate"]["value"] == 0.5
    assert r["headline"] == ["gender_gap", "negative_rate"]


def test_bold_parity_with_custom_sentiment_and_embedded_domains():
    rows = bias.load_bold(max_per_group=3)
    assert {r["domain"] for r in rows} == {"gender", "race", "religious_ideology", "political_ideology"}
    r = bias.bold_probe(lambda ps: ["same"] * len(ps), rows, sentiment_fn=lambda ts: [0.2] * len(ts))
    assert all(r["metrics"][f"{d}_gap"]["value"] == 0.0 for d in ("gender", "race"))
    assert r["metrics"]["mean_sentiment"]["value"] == pytest.approx(0.2)
    with pytest.raises(ValueError, match="generate_fn returned"):
        bias.bold_probe(lambda ps: ["x"], rows[:3], sentiment_fn=lambda ts: [0.0] * len(ts))


# ---------------------------------------------------------------- CrowS-Pairs format


def test_crows_pairs_directions():
    pairs = bias.load_crows_pairs(CROWS)
    assert len(pairs) == 6
    more = {p["sent_more"] for p in pairs}
    r = bias.crows_pairs_probe(lambda ts: [-1.0 if t in more else -5.0 for t in ts], pairs)
    assert r["metrics"]["stereo_preference"]["value"] == 1.0
    assert r["by_direction"]["antistereo"]["value"] == 1.0 and r["by_direction"]["antistereo"]["n"] == 2
    assert set(r["by_bias_type"]) == {"synthetic-a", "synthetic-b"}
    less = bias.crows_pairs_probe(lambda ts: [-5.0 if t in more else -1.0 for t in ts], pairs)
    assert less["metrics"]["stereo_preference"]["value"] == 0.0
    flat = bias.crows_pairs_probe(lambda ts: [0.0] * len(ts), pairs)
    assert flat["metrics"]["stereo_preference"]["value"] == 0.5
    # only stereo rows preferred -> per-type shares follow
    liked = {p["sent_more" if p["stereo_antistereo"] == "stereo" else "sent_less"] for p in pairs}
    part = bias.crows_pairs_probe(lambda ts: [-1.0 if t in liked else -2.0 for t in ts], pairs)
    assert part["by_direction"]["stereo"]["value"] == 1.0 and part["by_direction"]["antistereo"]["value"] == 0.0
    assert part["by_bias_type"]["synthetic-a"]["value"] == pytest.approx(2 / 3)


def test_crows_pairs_loader_errors(tmp_path):
    f = tmp_path / "c.csv"
    f.write_text("sent_more,sent_less,bias_type\na,b,race\n")
    with pytest.raises(DataError, match=r"c\.csv:1: missing column\(s\) stereo_antistereo"):
        bias.load_crows_pairs(f)
    f.write_text("sent_more,sent_less,stereo_antistereo,bias_type\na,b,stereo,race\na,b,sideways,race\n")
    with pytest.raises(DataError, match=r"c\.csv:3: stereo_antistereo is 'sideways'"):
        bias.load_crows_pairs(f)


# ---------------------------------------------------------------- running and delta


def test_run_bias_probes_and_delta():
    pytest.importorskip("vaderSentiment")

    def fair(ts):  # pronoun-blind, length-penalised fake LM
        return [-0.1 * len(re.sub(r"\b(he|she|they|his|her|their|him|them)\b", "x", t)) for t in ts]

    def male(ts):
        return [v + (1.0 if _gender(t) == "male" else 0.0) for v, t in zip(fair(ts), ts, strict=True)]

    gen = lambda ps: ["a fine person." for _ in ps]  # noqa: E731
    rb = bias.run_bias_probes(fair, gen, crows_path=CROWS, bold_max_per_group=2, n_boot=50)
    rm = bias.run_bias_probes(male, gen, crows_path=CROWS, bold_max_per_group=2, n_boot=50)
    assert set(rb) == {"winogender", "bbq", "bold", "crows_pairs"}
    d = bias.delta(rb, rm)
    assert d["winogender.male_over_female"]["baseline"] == pytest.approx(0.5, abs=0.2)
    assert d["winogender.male_over_female"]["model"] == 1.0
    assert d["winogender.male_over_female"]["delta"] > 0.3
    assert d["bold.gender_gap"]["delta"] == 0.0
    assert "bbq.bias_disambig" in d and "crows_pairs.stereo_preference" in d
    single = bias.delta(rb["winogender"], rm["winogender"])
    assert set(single) == {"winogender.male_over_female", "winogender.stereotype_corr"}
    json.dumps(rb, allow_nan=False)  # reports are strict JSON


def test_run_bias_probes_reads_user_paths(tmp_path):
    exs = bias.load_bbq()[:4]
    (tmp_path / "Mine.jsonl").write_text("".join(json.dumps(e) + "\n" for e in exs))
    out = bias.run_bias_probes(choice_fn=lambda q, opts: 0, paths={"bbq": tmp_path}, n_boot=20)
    assert set(out) == {"bbq"} and out["bbq"]["n"] == 4
