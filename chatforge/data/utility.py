"""The `rule` labeler's utility: correctness, then format, then clean ending, then brevity, as one scalar.

Lives beside the task-suite checkers because both the simulated labelers (stages/label.py) and the
RL reward sources (core/rewards.py, `--reward rule`) score replies with it.
"""

from __future__ import annotations

from chatforge.data import tasks as suite

# Utility weights: each criterion outweighs the sum of all later ones (approximately lexicographic).
W_CORRECT, W_FORMAT, W_CLEAN, W_BREVITY = 4.0, 1.0, 0.5, 0.25


def ends_cleanly(reply: str, truncated: bool = False) -> bool:
    """Not cut off: no length-truncation flag, no dangling comma/colon/opening bracket, balanced brackets."""
    s = reply.rstrip()
    if truncated or not s or s[-1] in ",:;-([{<\\":
        return False
    return all(s.count(a) == s.count(b) for a, b in ("()", "[]", "{}")) and s.count('"') % 2 == 0


def brevity(reply: str, scale: int) -> float:
    """1 for an empty string down to 0 at `scale` characters or more."""
    return 1.0 - min(len(reply.strip()), scale) / scale


def _repetition(words: list[str]) -> float:
    """Fraction of word trigrams that repeat an earlier trigram."""
    grams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def generic_quality(prompt: dict, reply: str) -> float:
    """Heuristic quality in [0, 1] for prompts outside the task suite."""
    words = reply.lower().split()
    if not words:
        return 0.0
    n = len(words)
    length_fit = n / 3 if n < 3 else (200 / n if n > 200 else 1.0)
    echo = suite.normalize_prompt(reply) == suite.normalize_prompt(suite.prompt_text(prompt) or "")
    return 0.0 if echo else length_fit * (1.0 - _repetition(words))


def rule_utility(prompt: dict, reply: str, truncated: bool = False) -> float:
    """Correctness, then format, then clean ending, then brevity, as one scalar (see module docstring)."""
    score = suite.check_conversation(prompt, reply)
    if score is None:
        if not reply.strip():
            return 0.0
        return (W_CORRECT * generic_quality(prompt, reply) + W_FORMAT * suite.sane(reply, 4000)
                + W_CLEAN * ends_cleanly(reply, truncated) + W_BREVITY * brevity(reply, 2000))
    return (W_CORRECT * score + W_FORMAT * suite.format_ok(prompt, reply)
            + W_CLEAN * ends_cleanly(reply, truncated) + W_BREVITY * brevity(reply, 200))
