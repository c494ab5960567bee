"""Simulated labelers: turn ranking tasks (K replies per prompt) into comparisons.

    chatforge label --tasks runs/tasks.jsonl --labeler rule --out runs/cmp.jsonl
    chatforge label --tasks tasks.jsonl --labeler "panel:rule*5:temperature=0.5" --per-task 2 --out cmp.jsonl
    chatforge label --tasks tasks.jsonl --labeler "judge:base_url=http://127.0.0.1:8000/v1,model=m" -o c.jsonl

Labeler kinds (spec `KIND[:key=value,...]`, or `panel:KIND*N[:key=value,...]` for N labelers with seeds
seed..seed+N-1):

- `rule`: utility from the task suite's checker (correctness), then format, then ending cleanly, then
  brevity (weights 4 / 1 / 0.5 / 0.25, so each criterion outweighs all the ones after it). Prompts that
  are not from the suite get a heuristic: non-empty, sane text, 3-200 words, little repetition, no
  echo of the prompt, ends cleanly, shorter is slightly better.
- `reference`: utility = 4 x token-F1 + 1 x exact match against `meta.reference` (or the suite's answer);
  prompts with no reference fall back to the `rule` utility.
- `judge`: an LLM behind any OpenAI-compatible `/chat/completions` endpoint ranks the replies (shown in
  a seeded random order, against position bias); bounded retries and timeouts, never hangs.

Noise, shared by all kinds, so a panel has a known expected agreement:
- `temperature` T (utility labelers): the ranking is sampled Plackett-Luce style, sorting u/T + Gumbel
  noise (for two replies, P(better first) = sigmoid(du/T), i.e. Bradley-Terry). T = 0 is deterministic
  and replies with equal utility are tied. For `judge`, T is the endpoint's sampling temperature.
- `flip_prob` p: one pass from the top swaps each adjacent pair of tiers with probability p.
Identical replies (same stripped text) are always tied by utility labelers.

Inter-labeler agreement is InstructGPT's measure: over (labeler pair, response pair) on the same task,
the fraction ordered the same way, pairs tied by either labeler excluded.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from chatforge.core.io import DataError, UserError, atomic_write, read_jsonl
from chatforge.core.log import warn
from chatforge.data import tasks as suite
from chatforge.data.utility import (  # noqa: F401  (re-exported: labelers and tests use them from here)
    W_BREVITY,
    W_CLEAN,
    W_CORRECT,
    W_FORMAT,
    brevity,
    ends_cleanly,
    generic_quality,
    rule_utility,
)

LABELER_KINDS = ("rule", "reference", "judge")
COMMON_OPTIONS = {"temperature": float, "flip_prob": float, "seed": int}
JUDGE_OPTIONS = {"base_url": str, "model": str, "api_key": str, "timeout": float, "retries": int}
SECRET_OPTIONS = ("api_key",)  # never written into a labeler name

EXPECTED_AGREEMENT_SAMPLES = 20_000  # simulated response pairs per Monte Carlo estimate


@dataclass
class Judgement:
    """A labeler's verdict on one ranking task: tiers of response ids (best first), optional 1-7 ratings."""

    ranking: list[list[str]]
    ratings: dict[str, int] | None = None


class Labeler(Protocol):
    """Anything that ranks the responses of a ranking task. Labelers may also define
    `judge(task) -> Judgement` to return ratings along with the ranking; `label` prefers it."""

    name: str

    def rank(self, task: dict) -> list[list[str]]: ...


# ----------------------------------------------------------------------------- noise model

def noisy_ranking(utilities: Sequence[float], temperature: float = 0.0, flip_prob: float = 0.0,
                  rng: random.Random | None = None) -> list[list[int]]:
    """Tiers of indices, best first: Plackett-Luce sample at temperature T, then adjacent flips."""
    rng = rng or random.Random(0)
    n = len(utilities)
    if temperature > 0:
        keys = [u / temperature - math.log(-math.log(rng.random() or 1e-300)) for u in utilities]
        tiers = [[i] for i in sorted(range(n), key=lambda i: -keys[i])]
    else:
        by_value: dict[float, list[int]] = {}
        for i, u in enumerate(utilities):
            by_value.setdefault(round(u, 9), []).append(i)
        tiers = [by_value[v] for v in sorted(by_value, reverse=True)]
    return flip_adjacent(tiers, flip_prob, rng)


def flip_adjacent(tiers: list[list[Any]], flip_prob: float, rng: random.Random) -> list[list[Any]]:
    """One pass from the top: swap each adjacent pair of tiers with probability `flip_prob`."""
    tiers = list(tiers)
    if flip_prob > 0:
        for i in range(len(tiers) - 1):
            if rng.random() < flip_prob:
                tiers[i], tiers[i + 1] = tiers[i + 1], tiers[i]
    return tiers


def _positions(ranking: Sequence[Sequence[Any]]) -> dict[Any, int]:
    return {x: t for t, tier in enumerate(ranking) for x in tier}


def pairwise_agreement(rank_a: Sequence[Sequence[Any]], rank_b: Sequence[Sequence[Any]],
                       weights: dict[Any, int] | None = None) -> tuple[int, int]:
    """(agreeing, compared) response pairs between two rankings of the same items; ties excluded.

    `weights[x]` counts item x as that many responses (used for tied duplicate groups)."""
    pa, pb = _positions(rank_a), _positions(rank_b)
    items = [x for x in pa if x in pb]
    agree = total = 0
    for i, x in enumerate(items):
        for y in items[i + 1:]:
            if pa[x] == pa[y] or pb[x] == pb[y]:
                continue
            w = (weights or {}).get(x, 1) * (weights or {}).get(y, 1)
            total += w
            agree += w if (pa[x] < pa[y]) == (pb[x] < pb[y]) else 0
    return agree, total


Ranking = Sequence[Sequence[str]]


def panel_agreement(rankings_per_task: Sequence[Sequence[Ranking]]) -> tuple[float | None, int]:
    """Pooled agreement over every labeler pair on every task with >= 2 labels: (fraction, pairs)."""
    agree = total = 0
    for ranks in rankings_per_task:
        for i in range(len(ranks)):
            for j in range(i + 1, len(ranks)):
                a, t = pairwise_agreement(ranks[i], ranks[j])
                agree, total = agree + a, total + t
    return (agree / total if total else None), total


def expected_agreement(utilities: Sequence[Sequence[float]], temperature: float = 0.0, flip_prob: float = 0.0,
                       samples: int = EXPECTED_AGREEMENT_SAMPLES, seed: int = 0,
                       sizes: Sequence[Sequence[int]] | None = None) -> float | None:
    """Monte Carlo agreement of two independent labelers with this noise, on tasks with these utilities.

    `utilities[t]` holds one utility per distinct reply of task t; `sizes[t]` how many responses share
    each one (they are tied). Every task is simulated equally often, pooled like `panel_agreement`.
    For K=2 and flip_prob p alone the answer is p^2 + (1-p)^2; for temperature T and a utility gap d it is
    s^2 + (1-s)^2 with s = sigmoid(d/T). None when every pair is tied."""
    tasks = [(list(u), list(sizes[t]) if sizes else [1] * len(u))
             for t, u in enumerate(utilities) if len(u) >= 2]
    if not tasks:
        return None
    rng = random.Random(f"expected-agreement|{seed}")
    rounds = max(1, math.ceil(samples / sum(len(u) * (len(u) - 1) // 2 for u, _ in tasks)))
    agree = total = 0
    for _ in range(rounds):
        for u, w in tasks:
            a, t = pairwise_agreement(noisy_ranking(u, temperature, flip_prob, rng),
                                      noisy_ranking(u, temperature, flip_prob, rng), dict(enumerate(w)))
            agree, total = agree + a, total + t
    return agree / total if total else None


# ----------------------------------------------------------------------------- utilities

def rule_rating(prompt: dict, reply: str) -> int:
    """1-7 Likert rating: 1 + 6 x correctness (or heuristic quality), one point off for bad format."""
    score = suite.check_conversation(prompt, reply)
    ok = suite.format_ok(prompt, reply)
    base = 1 + round(6 * (generic_quality(prompt, reply) if score is None else score))
    return max(1, min(7, base - (0 if ok else 1)))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1 after normalizing case, punctuation and articles."""
    p, r = suite.normalize_answer(prediction).split(), suite.normalize_answer(reference).split()
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def reference_utility(prompt: dict, reply: str, truncated: bool = False) -> float:
    ref = suite.reference_of(prompt)
    if ref is None:
        return rule_utility(prompt, reply, truncated)
    exact = suite.normalize_answer(reply) == suite.normalize_answer(ref)
    return W_CORRECT * token_f1(reply, ref) + W_FORMAT * exact


def reference_rating(prompt: dict, reply: str) -> int:
    ref = suite.reference_of(prompt)
    return rule_rating(prompt, reply) if ref is None else 1 + round(6 * token_f1(reply, ref))


# ----------------------------------------------------------------------------- utility labelers

def _truncated(response: dict) -> bool:
    params = response.get("params") if isinstance(response.get("params"), dict) else {}
    return "length" in (response.get("finish_reason"), params.get("finish_reason"))


@dataclass
class UtilityLabeler:
    """Ranks by a utility function of (prompt, reply) plus the noise model; rates 1-7 without noise."""

    name: str
    kind: str
    utility: Callable[[dict, str, bool], float]
    rating: Callable[[dict, str], int]
    temperature: float = 0.0
    flip_prob: float = 0.0
    seed: int = 0

    def groups(self, task: dict) -> tuple[list[list[str]], list[float]]:
        """Response ids grouped by identical text, and each group's utility."""
        by_text: dict[str, list[dict]] = {}
        for r in task["responses"]:
            by_text.setdefault(r["content"].strip(), []).append(r)
        groups = list(by_text.values())
        utils = [max(self.utility(task["prompt"], g[0]["content"], _truncated(r)) for r in g) for g in groups]
        return [[r["response_id"] for r in g] for g in groups], utils

    def judge(self, task: dict) -> Judgement:
        ids, utils = self.groups(task)
        # Noise keyed by (seed, task id): a labeler's verdict on a task does not depend on file order.
        rng = random.Random(f"{self.kind}|{self.seed}|{task['task_id']}")
        tiers = noisy_ranking(utils, self.temperature, self.flip_prob, rng)
        ranking = [[rid for g in tier for rid in ids[g]] for tier in tiers]
        ratings = {r["response_id"]: self.rating(task["prompt"], r["content"]) for r in task["responses"]}
        return Judgement(ranking, ratings)

    def rank(self, task: dict) -> list[list[str]]:
        return self.judge(task).ranking


# ----------------------------------------------------------------------------- judge labeler

JUDGE_SYSTEM = (
    "You are a careful annotator comparing assistant replies to the same conversation. Rank the replies "
    "from best to worst for correctness, helpfulness and following the user's instructions. Answer with "
    "only a JSON list of reply numbers, best first, for example [2, 1, 3]. Put replies of equal quality "
    "together in an inner list, for example [[1, 3], 2]."
)


def parse_judge_ranking(text: str, k: int) -> list[list[int]] | None:
    """Tiers of 0-based reply indices from a judge's answer, or None if it is not a full ranking of 1..k."""
    candidates = []
    for start in (i for i, c in enumerate(text) if c == "["):
        depth = 0
        for end in range(start, len(text)):
            depth += {"[": 1, "]": -1}.get(text[end], 0)
            if depth == 0:
                candidates.append(text[start:end + 1])
                break
    for cand in reversed(candidates):  # the final answer usually comes last
        try:
            obj = json.loads(cand)
        except json.JSONDecodeError:
            continue
        if not isinstance(obj, list):
            continue
        tiers = [x if isinstance(x, list) else [x] for x in obj]
        flat = [x for t in tiers for x in t]
        if tiers and all(isinstance(x, int) and not isinstance(x, bool) for x in flat) \
                and all(tiers) and sorted(flat) == list(range(1, k + 1)):
            return [[x - 1 for x in t] for t in tiers]
    # Fallback: "2 > 1 > 3" or "Reply 2, then reply 1": the numbers in order, if they are exactly 1..k.
    nums = [int(x) for x in re.findall(r"\d+", text)]
    if len(nums) == k and sorted(nums) == list(range(1, k + 1)):
        return [[x - 1] for x in nums]
    return None


def _opener(url: str) -> urllib.request.OpenerDirector:
    # Loopback endpoints (local servers, tests) must not be sent through an HTTP proxy from the env.
    if urlparse(url).hostname in ("localhost", "127.0.0.1", "::1"):
        return urllib.request.build_opener(urllib.request.ProxyHandler({}))
    return urllib.request.build_opener()


@dataclass
class JudgeLabeler:
    """Asks an OpenAI-compatible chat endpoint to rank the replies."""

    name: str
    base_url: str
    model: str
    api_key: str | None = field(default=None, repr=False)
    temperature: float = 0.0
    flip_prob: float = 0.0
    seed: int = 0
    timeout: float = 30.0
    retries: int = 3
    backoff: float = 1.0  # seconds before the 2nd try after a network error; doubles each try

    @property
    def url(self) -> str:
        base = self.base_url.rstrip("/")
        return base if base.endswith("/chat/completions") else base + "/chat/completions"

    def _messages(self, task: dict, shown: list[dict]) -> list[dict]:
        convo = "\n".join(f"{m['role']}: {m['content']}" for m in task["prompt"]["messages"])
        replies = "\n\n".join(f"[Reply {i + 1}]\n{r['content']}" for i, r in enumerate(shown))
        user = (f"Conversation:\n{convo}\n\nReplies:\n\n{replies}\n\n"
                f"Ranking (a JSON list of the numbers 1 to {len(shown)}, best first):")
        return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]

    def _ask(self, messages: list[dict]) -> str:
        """One request; returns the reply text. Raises UserError for a non-retryable HTTP error."""
        payload = {"model": self.model, "messages": messages, "temperature": self.temperature,
                   "max_tokens": 200}
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=json.dumps(payload).encode(), headers=headers,
                                     method="POST")
        try:
            with _opener(self.url).open(req, timeout=self.timeout) as resp:
                body = json.loads(resp.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            if e.code in (408, 429) or e.code >= 500:
                raise ConnectionError(f"HTTP {e.code}") from None
            raise UserError(f"judge labeler: {self.url} answered HTTP {e.code} ({e.reason}); "
                            "check base_url, model and api_key") from None
        return body["choices"][0]["message"]["content"]

    def judge(self, task: dict) -> Judgement:
        responses = task["responses"]
        rng = random.Random(f"judge|{self.seed}|{task['task_id']}")
        order = list(range(len(responses)))
        rng.shuffle(order)  # shown position j holds response order[j]: averages out position bias
        messages = self._messages(task, [responses[i] for i in order])
        last, problem = "", ""
        for attempt in range(self.retries):
            try:
                last = self._ask(messages)
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
                problem = f"cannot reach it ({getattr(e, 'reason', e)})"
                if attempt + 1 < self.retries:
                    time.sleep(self.backoff * 2**attempt)
                continue
            except (ValueError, KeyError, IndexError, TypeError):
                problem, last = "it did not send an OpenAI chat completion", ""
                continue
            tiers = parse_judge_ranking(str(last), len(responses))
            if tiers is not None:
                tiers = flip_adjacent(tiers, self.flip_prob, rng)
                return Judgement([[responses[order[j]]["response_id"] for j in t] for t in tiers])
            problem = f"no valid ranking of {len(responses)} replies in its answer {str(last)[:200]!r}"
        raise UserError(f"judge labeler: {self.url} failed for task {task['task_id']} after "
                        f"{self.retries} tries: {problem}")

    def rank(self, task: dict) -> list[list[str]]:
        return self.judge(task).ranking


# ----------------------------------------------------------------------------- spec strings

def _valid_options(kind: str) -> dict[str, type]:
    return {**COMMON_OPTIONS, **(JUDGE_OPTIONS if kind == "judge" else {})}


def _parse_options(kind: str, text: str, spec: str) -> dict[str, Any]:
    valid = _valid_options(kind)
    opts: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, eq, value = part.partition("=")
        key = key.strip()
        if not eq or key not in valid:
            raise UserError(f"labeler spec {spec!r}: unknown option {part!r} for {kind}; "
                            f"valid options: {', '.join(valid)}")
        try:
            opts[key] = valid[key](value.strip())
        except ValueError:
            kind_of = "an integer" if valid[key] is int else "a number"
            raise UserError(f"labeler spec {spec!r}: {key} must be {kind_of}, got {value!r}") from None
    if opts.get("temperature", 0.0) < 0 or not 0.0 <= opts.get("flip_prob", 0.0) <= 1.0:
        raise UserError(f"labeler spec {spec!r}: need temperature >= 0 and 0 <= flip_prob <= 1")
    if kind == "judge":
        missing = [k for k in ("base_url", "model") if not opts.get(k)]
        if missing:
            raise UserError(f"labeler spec {spec!r}: judge needs {' and '.join(missing)} "
                            "(e.g. judge:base_url=http://localhost:8000/v1,model=NAME)")
        if opts.get("retries", 1) < 1 or opts.get("timeout", 1.0) <= 0:
            raise UserError(f"labeler spec {spec!r}: need retries >= 1 and timeout > 0")
    return opts


def _options_label(text: str) -> str:
    """The option string as written, minus secrets (labeler names land in output files)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    shown = [p for p in parts if p.partition("=")[0].strip() not in SECRET_OPTIONS]
    return f":{','.join(shown)}" if shown else ""


def make_labeler(kind: str, name: str, opts: dict[str, Any], seed: int) -> Labeler:
    """Build one labeler of `kind` from parsed options (`opts['seed']`, if given, wins over `seed`)."""
    noise = {"temperature": opts.get("temperature", 0.0), "flip_prob": opts.get("flip_prob", 0.0),
             "seed": opts.get("seed", seed)}
    if kind == "rule":
        return UtilityLabeler(name, "rule", rule_utility, rule_rating, **noise)
    if kind == "reference":
        return UtilityLabeler(name, "reference", reference_utility, reference_rating, **noise)
    extra = {k: opts[k] for k in ("timeout", "retries") if k in opts}
    api_key = opts.get("api_key") or os.environ.get("OPENAI_API_KEY")
    return JudgeLabeler(name, opts["base_url"], opts["model"], api_key, **noise, **extra)


def parse_labeler_spec(spec: str, seed: int = 0) -> list[Labeler]:
    """`rule`, `rule:temperature=0.5,seed=3`, `reference:flip_prob=0.1`, `judge:base_url=URL,model=M`,
    or `panel:KIND*N[:options]` (N labelers, seeds seed..seed+N-1) -> the labelers."""
    spec = spec.strip()
    head, _, rest = spec.partition(":")
    head = head.strip()
    usage = (f"valid kinds: {', '.join(LABELER_KINDS)}, or panel:KIND*N[:options]; options: "
             f"{', '.join(COMMON_OPTIONS)} (judge also: {', '.join(JUDGE_OPTIONS)})")
    if head == "panel":
        member, _, text = rest.partition(":")
        kind, star, count = (x.strip() for x in member.partition("*"))
        if kind not in LABELER_KINDS or not star or not count.isdigit() or int(count) < 1:
            raise UserError(f"labeler spec {spec!r}: a panel is panel:KIND*N[:options] with N >= 1; {usage}")
        opts = _parse_options(kind, text, spec)
        base = opts.pop("seed", seed)
        shown = _options_label(text)
        return [make_labeler(kind, f"{kind}#{i}{shown}", opts, base + i) for i in range(int(count))]
    if head not in LABELER_KINDS:
        raise UserError(f"unknown labeler {head!r} in spec {spec!r}; {usage}")
    return [make_labeler(head, f"{head}{_options_label(rest)}", _parse_options(head, rest, spec), seed)]


# ----------------------------------------------------------------------------- the label stage

def validate_task(task: Any, path: str | Path, line: int) -> None:
    """Minimal ranking-task checks; a bad record raises DataError naming file and line."""
    if not isinstance(task, dict):
        raise DataError(path, line, "a ranking task must be a JSON object")
    if not isinstance(task.get("task_id"), str | int):
        raise DataError(path, line, "missing task_id")
    prompt = task.get("prompt")
    msgs = prompt.get("messages") if isinstance(prompt, dict) else None
    def is_message(m: Any) -> bool:
        return isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)

    if not isinstance(msgs, list) or not msgs or not all(is_message(m) for m in msgs):
        raise DataError(path, line, "prompt.messages must be a non-empty list of {role, content} strings")
    responses = task.get("responses")
    if not isinstance(responses, list) or len(responses) < 1:
        raise DataError(path, line, "responses must be a non-empty list of replies to rank")
    ids = []
    for i, r in enumerate(responses):
        if not isinstance(r, dict) or not all(isinstance(r.get(k), str) for k in ("response_id", "content")):
            raise DataError(path, line, f"responses[{i}] needs string response_id and content")
        ids.append(r["response_id"])
    if len(set(ids)) != len(ids):
        raise DataError(path, line, "duplicate response_id in responses")


def _judge(labeler: Labeler, task: dict) -> Judgement:
    judge = getattr(labeler, "judge", None)
    verdict = judge(task) if callable(judge) else Judgement(labeler.rank(task))
    flat = [rid for tier in verdict.ranking for rid in tier]
    if sorted(flat) != sorted(r["response_id"] for r in task["responses"]):
        raise ValueError(f"labeler {labeler.name} returned a ranking that does not partition the responses")
    return verdict


def _suite_scores(task: dict) -> dict[str, float] | None:
    if suite.find_family(task["prompt"]) is None:
        return None
    return {r["response_id"]: suite.check(task["prompt"], r["content"]) for r in task["responses"]}


def label(tasks_path: str | Path, out_path: str | Path, spec: str | Sequence[Labeler], per_task: int = 1,
          seed: int = 0) -> dict:
    """Label every ranking task in `tasks_path`, writing comparisons (one per labeler per task) atomically.

    `per_task` labelers of the panel, drawn per task with `seed`, label each task (0 or >= panel size:
    all of them). Returns stats: counts, measured and expected inter-labeler agreement, and how good
    the top-ranked replies are on suite prompts."""
    t0 = time.time()
    labelers = parse_labeler_spec(spec, seed) if isinstance(spec, str) else list(spec)
    if not labelers:
        raise UserError("no labelers")
    k = len(labelers) if per_task <= 0 or per_task >= len(labelers) else per_task
    rankings_per_task: list[list[list[list[str]]]] = []
    utilities: list[list[float]] = []
    sizes: list[list[int]] = []
    counts: Counter[str] = Counter()
    top_scores: list[float] = []
    all_scores: list[float] = []
    best_on_top = 0
    single = 0
    with atomic_write(out_path) as f:
        for line, task in read_jsonl(tasks_path):
            validate_task(task, tasks_path, line)
            if len(task["responses"]) < 2:  # all K samples were identical: nothing to rank
                single += 1
                continue
            task["task_id"] = str(task["task_id"])
            chosen = labelers
            if k < len(labelers):  # drawn per task: who labels a task does not depend on file order
                chosen = random.Random(f"pick|{seed}|{task['task_id']}").sample(labelers, k)
            scores = _suite_scores(task)
            ranks = []
            for lab in chosen:
                verdict = _judge(lab, task)
                record = {**task, "ranking": verdict.ranking, "labeler": lab.name,
                          "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
                if verdict.ratings is not None:
                    record["ratings"] = verdict.ratings
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                ranks.append(verdict.ranking)
                counts[lab.name] += 1
                if scores is not None:
                    top = [scores[rid] for rid in verdict.ranking[0]]
                    top_scores.append(sum(top) / len(top))
                    best_on_top += max(top) == max(scores.values())
            if scores is not None:
                all_scores.extend(scores.values())
            rankings_per_task.append(ranks)
            if k >= 2 and isinstance(labelers[0], UtilityLabeler):
                groups, utils = labelers[0].groups(task)
                utilities.append(utils)
                sizes.append([len(g) for g in groups])
        if not rankings_per_task:
            raise DataError(tasks_path, None, "no ranking tasks in file")
    if single:
        warn(f"{tasks_path}: skipped {single} tasks whose K replies were all identical (nothing to rank)")
    agreement, pairs = panel_agreement(rankings_per_task)
    return {
        "tasks": len(rankings_per_task), "skipped_single_reply": single, "comparisons": sum(counts.values()),
        "labelers": dict(counts),
        "labels_per_task": k, "agreement": agreement, "agreement_pairs": pairs,
        "expected_agreement": _expected_for_panel(labelers, k, utilities, sizes, seed),
        "suite_labels": len(top_scores),
        "suite_score_top": sum(top_scores) / len(top_scores) if top_scores else None,
        "suite_score_mean": sum(all_scores) / len(all_scores) if all_scores else None,
        "best_on_top": best_on_top / len(top_scores) if top_scores else None,
        "out": str(out_path), "seconds": round(time.time() - t0, 3),
    }


def _expected_for_panel(labelers: Sequence[Labeler], k: int, utilities: list[list[float]],
                        sizes: list[list[int]], seed: int) -> float | None:
    """Expected agreement when the panel is homogeneous utility labelers (same kind and noise)."""
    if k < 2 or not all(isinstance(lab, UtilityLabeler) for lab in labelers):
        return None
    noise = {(lab.kind, lab.temperature, lab.flip_prob) for lab in labelers}  # type: ignore[attr-defined]
    if len(noise) != 1:
        return None
    _, temperature, flip_prob = noise.pop()
    return expected_agreement(utilities, temperature, flip_prob, seed=seed, sizes=sizes)


def format_stats(stats: dict) -> str:
    """A few human-readable lines for the CLI."""
    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.1f}%"

    lines = [f"labeled {stats['tasks']} tasks -> {stats['comparisons']} comparisons "
             f"({len(stats['labelers'])} labelers, {stats['labels_per_task']} per task) "
             f"in {stats['seconds']}s"]
    if stats["agreement_pairs"]:
        lines.append(f"inter-labeler agreement {pct(stats['agreement'])} over {stats['agreement_pairs']} "
                     f"response pairs (expected {pct(stats['expected_agreement'])})")
    if stats["suite_labels"]:
        lines.append(f"task-suite score of top-ranked replies {stats['suite_score_top']:.3f} vs all replies "
                     f"{stats['suite_score_mean']:.3f}; best reply on top {pct(stats['best_on_top'])}")
    lines.append(f"wrote {stats['out']}")
    return "\n".join(lines)
