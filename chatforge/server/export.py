"""`chatforge export feedback --db URL --out DIR`: what users said about served replies, as training data.

Writes (atomically, sorted, so the same database gives the same bytes):
  DIR/comparisons.jsonl     DESIGN comparisons with K=2 (`rm train --data`, `dpo --data`, a loop label source)
  DIR/demonstrations.jsonl  DESIGN conversations: the prompt plus the edited reply (`sft --data`)
  DIR/feedback.jsonl        every feedback event in DESIGN's format (conversation_id, message_id, rating,
                            reason, policy, created_at) plus its provenance
  DIR/report.json           counts: what was exported, dropped and why

Where pairs come from (replies to the same prompt messages only; text completions are not chat and skipped):
  - thumbs: a reply whose label is +1 beats a reply to the same prompt whose label is -1;
  - preferred: `preferred_completion_id` (a chosen regenerate) beats the rated reply;
  - edit: an edited reply beats the original it replaced (and is a demonstration).
Conflict rule (documented in README): per rater (key, app user, or the request's `user`) and reply only the
rater's latest rating counts; a reply's label is the sign of the sum over raters, and an even split gives no
label. For one pair of replies, explicit preferences are summed the same way and, when not tied, decide the
pair even against thumbs (a direct comparison beats two separate ratings); a tied pair is dropped. Each pair
is written once (de-duplicated), whatever number of signals produced it.
`max_policy_age=N` drops replies from versions older than N rounds: versions are ordered by when they first
served a completion in this database, the newest is age 0.
PII: emails and phone numbers are masked in every exported text by default (`scrub=None` turns it off, or
pass any `str -> str` function, e.g. `--scrub mypkg.pii:scrub` on the CLI).
"""

from __future__ import annotations

import importlib
import json
import re
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select

from chatforge.core.io import UserError, write_json
from chatforge.data.formats import Comparison, Conversation, stable_id, write_jsonl_records

EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
# International or national numbers with 7+ digits, separators allowed; not plain long integers in prose
# without a separator or a leading + (so "12345678" stays, "+1 415 555 0100" and "(415) 555-0100" go).
PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{1,4}\)[\s.-]?)?\d{2,4}(?:[\s.-]\d{2,4}){1,4}(?!\w)")
MIN_PHONE_DIGITS = 7


def scrub_pii(text: str) -> str:
    """Mask emails as [email] and phone numbers as [phone]."""
    text = EMAIL.sub("[email]", text)

    def phone(m: re.Match) -> str:
        s = m.group(0)
        digits = sum(ch.isdigit() for ch in s)
        return "[phone]" if digits >= MIN_PHONE_DIGITS and (s.startswith("+") or "(" in s or digits >= 9
                                                             or re.search(r"\d[\s.-]\d", s)) else s
    return PHONE.sub(phone, text)


def load_scrub(spec: str | None) -> Callable[[str], str] | None:
    """'default' -> scrub_pii, 'none' -> None, 'module:function' -> that function."""
    if spec in (None, "default"):
        return scrub_pii
    if spec == "none":
        return None
    mod, _, fn = spec.partition(":")
    try:
        return getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError, ValueError) as e:
        raise UserError(f"--scrub {spec!r}: expected default, none or module:function ({e})") from None


def _rater(f: Any) -> str:
    if f.user_id:
        return f"user:{f.user_id}"
    if f.api_key_id:
        return f"key:{f.api_key_id}" + (f"/{f.user}" if f.user else "")
    return f"anon:{f.user}" if f.user else "anon"


def _iso(dt: Any) -> str:
    return dt.isoformat() if dt is not None else ""


def policy_ages(completions: list[Any]) -> dict[str, int]:
    """Version -> age in rounds (0 = newest), versions ordered by their first served completion."""
    first: dict[str, Any] = {}
    for c in sorted(completions, key=lambda c: (c.created_at, c.id)):
        first.setdefault(c.run_id or c.model, c.created_at)
    order = sorted(first, key=lambda v: first[v], reverse=True)
    return {v: i for i, v in enumerate(order)}


class _Export:
    def __init__(self, scrub: Callable[[str], str] | None):
        self.scrub = scrub or (lambda s: s)
        self.counts: dict[str, int] = defaultdict(int)

    def prompt(self, c: Any) -> list[dict] | None:
        msgs = []
        for m in c.prompt:
            role = "system" if m.get("role") == "developer" else m.get("role")
            msgs.append({"role": role, "content": self.scrub(str(m.get("content") or ""))})
        return msgs

    def response(self, c: Any, index: int, rid: str | None = None) -> dict:
        choice = next((ch for ch in c.choices if ch["index"] == index), {})
        params = {k: v for k, v in (c.params or {}).items() if k != "user"}
        return {"response_id": rid or f"{c.id}:{index}", "content": self.scrub(choice.get("content") or ""),
                "policy": c.run_id or c.model, "params": params,
                **({"finish_reason": choice["finish_reason"]} if choice.get("finish_reason") else {})}


def export_feedback(db: Any, out: str | Path, max_policy_age: int | None = None,
                    scrub: Callable[[str], str] | None = scrub_pii) -> dict:
    """Export the database's feedback into `out` (see the module docstring); returns the report."""
    from chatforge.server.db.models import Completion, Feedback

    out = Path(out)
    with db.session() as s:
        fbs = list(s.scalars(select(Feedback).order_by(Feedback.created_at, Feedback.id)))
        ids = {f.completion_id for f in fbs} | {f.preferred_completion_id for f in fbs if f.preferred_completion_id}
        comps = {c.id: c for c in s.scalars(select(Completion).where(Completion.id.in_(ids)))} if ids else {}
        all_versions = list(s.execute(select(Completion.id, Completion.run_id, Completion.model,
                                             Completion.created_at)))
    ex = _Export(scrub)
    ages = policy_ages(all_versions)

    def too_old(c: Any) -> bool:
        return max_policy_age is not None and ages.get(c.run_id or c.model, 0) > max_policy_age

    events, latest, prefs, edits = [], {}, {}, {}
    for f in fbs:
        c = comps[f.completion_id]
        events.append({"conversation_id": c.conversation_id or c.id,
                       "message_id": f.message_id or f"{c.id}:{f.choice_index}", "rating": f.rating,
                       "reason": ex.scrub(f.reason) if f.reason else None, "policy": f.policy,
                       "created_at": _iso(f.created_at), "feedback_id": f.id, "completion_id": c.id,
                       "choice_index": f.choice_index, "rater": _rater(f)})
        if c.kind != "chat":
            ex.counts["skipped_text_completions"] += 1
            continue
        reply = (c.id, f.choice_index)
        latest[(reply, _rater(f))] = f  # later rows replace earlier ones: the rater's latest word counts
        if f.preferred_completion_id:
            win = (f.preferred_completion_id, f.preferred_choice_index or 0)
            prefs[(frozenset((win, reply)), _rater(f))] = (win, reply, f)
        if f.edited_content:
            edits[(reply, _rater(f))] = f

    # Labels per reply (sum over raters of their latest rating), grouped by prompt.
    score: dict[tuple, int] = defaultdict(int)
    when: dict[tuple, list] = defaultdict(list)
    for (reply, _), f in latest.items():
        score[reply] += f.rating
        when[reply].append(f)
    ex.counts["conflicting_replies"] = sum(1 for r in score if score[r] == 0)
    by_prompt: dict[str, list[tuple]] = defaultdict(list)
    for reply, v in score.items():
        if v != 0:
            by_prompt[json.dumps(comps[reply[0]].prompt, sort_keys=True)].append(reply)

    pairs: dict[frozenset, dict] = {}  # {a, b} -> {"win", "lose", "source", "feedback": [...]}
    for replies in by_prompt.values():
        liked = [r for r in replies if score[r] > 0]
        disliked = [r for r in replies if score[r] < 0]
        for w in liked:
            for lo in disliked:
                pairs[frozenset((w, lo))] = {"win": w, "lose": lo, "source": "thumbs", "feedback": when[w] + when[lo]}
    votes: dict[frozenset, list] = defaultdict(list)
    for (pair, _), (win, lose, f) in prefs.items():
        votes[pair].append((win, lose, f))
    for pair, vs in votes.items():
        a = min(pair)
        net = sum(1 if win == a else -1 for win, _, _ in vs)
        if net == 0:
            ex.counts["tied_preferences"] += 1
            pairs.pop(pair, None)
            continue
        win = a if net > 0 else max(pair)
        lose = max(pair) if net > 0 else a
        old = pairs.get(pair)
        if old is not None and old["win"] != win:
            ex.counts["thumbs_overridden_by_preference"] += 1
        pairs[pair] = {"win": win, "lose": lose, "source": "preferred", "feedback": [f for *_, f in vs]}

    comparisons = []
    for p in pairs.values():
        cw, cl = comps[p["win"][0]], comps[p["lose"][0]]
        if too_old(cw) or too_old(cl):
            ex.counts["dropped_policy_age"] += 1
            continue
        rw, rl = ex.response(cw, p["win"][1]), ex.response(cl, p["lose"][1])
        comparisons.append(_comparison(ex, cw, [rw, rl], [[rw["response_id"]], [rl["response_id"]]], p["source"],
                                       p["feedback"]))
    demos, seen = [], set()
    for (reply, _), f in edits.items():
        c = comps[reply[0]]
        if too_old(c):
            ex.counts["dropped_policy_age"] += 1
            continue
        prompt, edited = ex.prompt(c), ex.scrub(f.edited_content)
        dedup = (json.dumps(prompt, sort_keys=True), edited)
        if dedup in seen:
            ex.counts["duplicate_edits"] += 1
            continue
        seen.add(dedup)
        orig = ex.response(c, reply[1])
        meta = {"completion_id": c.id, "choice_index": reply[1], "policy": orig["policy"], "feedback_id": f.id,
                "rater": _rater(f), "created_at": _iso(f.created_at), "original": orig["content"]}
        conv = {"id": stable_id("edit", *dedup), "messages": [*prompt, {"role": "assistant", "content": edited}],
                "source": "feedback-edit", "meta": meta}
        if _valid(ex, Conversation.from_dict, conv, "demonstration"):
            demos.append(conv)
        if edited != orig["content"]:
            mine = {"response_id": f"{f.id}:edit", "content": edited, "policy": "human-edit", "params": {}}
            comparisons.append(_comparison(ex, c, [mine, orig], [[mine["response_id"]], [orig["response_id"]]],
                                           "edit", [f]))
    comparisons = [c for c in comparisons if c is not None and _valid(ex, Comparison.from_dict, c, "comparison")]
    comparisons.sort(key=lambda c: c["task_id"])
    demos.sort(key=lambda c: c["id"])
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl_records(out / "comparisons.jsonl", comparisons)
    write_jsonl_records(out / "demonstrations.jsonl", demos)
    write_jsonl_records(out / "feedback.jsonl", events)
    by_source: dict[str, int] = defaultdict(int)
    for c in comparisons:
        by_source[c["meta"]["signal"]] += 1
    report = {"db": db.url, "feedback_events": len(events), "comparisons": len(comparisons),
              "comparisons_by_signal": dict(sorted(by_source.items())), "demonstrations": len(demos),
              "max_policy_age": max_policy_age, "policy_ages": ages, "scrubbed": scrub is not None,
              **dict(sorted(ex.counts.items()))}
    write_json(out / "report.json", report)
    return report


def _comparison(ex: _Export, c: Any, responses: list[dict], ranking: list[list[str]], signal: str,
                feedback: list[Any]) -> dict:
    ids = sorted(r["response_id"] for r in responses)
    raters = sorted({_rater(f) for f in feedback})
    return {"task_id": stable_id("feedback", *ids), "prompt": {"messages": ex.prompt(c)}, "responses": responses,
            "ranking": ranking, "source": "feedback", "labeler": ",".join(raters),
            "created_at": max(_iso(f.created_at) for f in feedback),
            "meta": {"signal": signal, "feedback_ids": sorted(f.id for f in feedback), "raters": raters}}


def _valid(ex: _Export, parse: Callable, obj: dict, what: str) -> bool:
    """Keep only records the training stages will read (e.g. a stored prompt ending with an assistant turn)."""
    try:
        parse(obj)
        return True
    except UserError:
        ex.counts[f"invalid_{what}s"] += 1
        return False
