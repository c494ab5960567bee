"""Cheap fluency / coherence proxies over a list of generated replies.

None of these needs a model; they catch the usual failure modes of small or over-optimised policies:
degenerate loops (repetition), bland mode collapse (low distinct-n, many near-duplicates across prompts,
a classic reward-hacking symptom), replies that never end (end-of-turn rate) and length drift.

Tokenisation is deliberately simple and model-independent so numbers compare across tokenizers:
lower-cased words and single punctuation marks (`\\w+|[^\\w\\s]`).
"""

from __future__ import annotations

import re
import statistics
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from chatforge.evals.stats import wilson_interval

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")
# Finish reasons that mean "the model ended its turn itself" (OpenAI uses "stop"; "length" means cut off).
EOT_REASONS = frozenset({"stop", "eos", "eot", "end_of_turn", "stop_token", "stop_sequence"})


def words(text: str) -> list[str]:
    """Lower-cased word and punctuation tokens of `text`."""
    return _TOKEN_RE.findall(text.lower())


def _ngrams(toks: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(toks[i : i + n]) for i in range(len(toks) - n + 1)]


def distinct_n(replies: Sequence[str], n: int = 1) -> float:
    """Distinct-n (Li et al. 2016): unique n-grams / total n-grams, pooled over all replies.

    1.0 means no n-gram is ever reused; a policy that says the same thing to every prompt tends to 0.
    Returns 0.0 when there are no n-grams at all.
    """
    total, unique = 0, set()
    for r in replies:
        grams = _ngrams(words(r), n)
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else 0.0


def repetition_rate(replies: Sequence[str], n: int = 3, min_count: int = 3) -> float:
    """Share of replies in which some n-gram occurs at least `min_count` times (a degenerate loop)."""
    if not replies:
        return 0.0
    hits = 0
    for r in replies:
        counts = Counter(_ngrams(words(r), n))
        hits += bool(counts) and max(counts.values()) >= min_count
    return hits / len(replies)


def rep_n(replies: Sequence[str], n: int = 4) -> float:
    """Mean within-reply repeated n-gram share, 1 - unique/total (seq-rep-n, Welleck et al. 2019).

    Replies shorter than n tokens count as 0 (nothing can repeat).
    """
    if not replies:
        return 0.0
    vals = []
    for r in replies:
        grams = _ngrams(words(r), n)
        vals.append(1.0 - len(set(grams)) / len(grams) if grams else 0.0)
    return float(np.mean(vals))


def length_stats(replies: Sequence[str]) -> dict[str, float]:
    """Mean and median reply length in words (tokens as in `words`) and in characters."""
    if not replies:
        return {"mean_words": 0.0, "median_words": 0.0, "mean_chars": 0.0, "median_chars": 0.0}
    nw = [len(words(r)) for r in replies]
    nc = [len(r) for r in replies]
    return {
        "mean_words": float(np.mean(nw)),
        "median_words": float(statistics.median(nw)),
        "mean_chars": float(np.mean(nc)),
        "median_chars": float(statistics.median(nc)),
    }


def end_of_turn_rate(finish_reasons: Sequence[str], eot_reasons: frozenset[str] = EOT_REASONS) -> float:
    """Share of generations that ended with an end-of-turn / stop token rather than hitting max tokens."""
    if not finish_reasons:
        return 0.0
    return sum(str(f).lower() in eot_reasons for f in finish_reasons) / len(finish_reasons)


def _shingles(text: str, k: int) -> frozenset[tuple[str, ...]]:
    toks = words(text)
    # A reply shorter than k words is one shingle, so two identical short replies still match.
    return frozenset(_ngrams(toks, k)) if len(toks) >= k else frozenset({tuple(toks)})


def jaccard(a: frozenset, b: frozenset) -> float:
    """Jaccard overlap |a ∩ b| / |a ∪ b| (1.0 for two empty sets)."""
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def near_duplicate_rate(
    replies: Sequence[str],
    threshold: float = 0.8,
    shingle: int = 3,
    max_pairs: int = 200_000,
    seed: int = 0,
) -> float:
    """Share of reply pairs whose word-`shingle`-gram Jaccard overlap is >= `threshold`.

    Over replies to *different* prompts this should be near 0; a rising value means the policy found one
    answer the reward model likes and says it everywhere (reward hacking / mode collapse). All pairs are
    compared when there are at most `max_pairs` of them, otherwise a fixed-seed random sample of pairs.
    """
    m = len(replies)
    n_pairs = m * (m - 1) // 2
    if n_pairs == 0:
        return 0.0
    sh = [_shingles(r, shingle) for r in replies]
    if n_pairs <= max_pairs:
        pairs = ((i, j) for i in range(m) for j in range(i + 1, m))
        total = n_pairs
    else:
        rng = np.random.default_rng(seed)
        i = rng.integers(0, m, size=max_pairs)
        j = (i + rng.integers(1, m, size=max_pairs)) % m  # j != i
        pairs = zip(i.tolist(), j.tolist(), strict=True)
        total = max_pairs
    dup = sum(jaccard(sh[a], sh[b]) >= threshold for a, b in pairs)
    return dup / total


def text_report(replies: Sequence[str], finish_reasons: Sequence[str] | None = None) -> dict[str, Any]:
    """All text metrics for one set of replies, in the flat shape the eval report prints."""
    out: dict[str, Any] = {
        "n": len(replies),
        "distinct_1": distinct_n(replies, 1),
        "distinct_2": distinct_n(replies, 2),
        "repetition_rate": repetition_rate(replies),
        "rep_4": rep_n(replies, 4),
        "near_duplicate_rate": near_duplicate_rate(replies),
        **length_stats(replies),
    }
    if finish_reasons is not None:
        k = sum(str(f).lower() in EOT_REASONS for f in finish_reasons)
        out["end_of_turn_rate"] = end_of_turn_rate(finish_reasons)
        out["end_of_turn_ci"] = wilson_interval(k, len(finish_reasons))
    return out
