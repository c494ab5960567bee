"""chatforge's JSONL record types: conversations, prompts, ranking tasks and comparisons.

Every record is a small dataclass with `from_dict(obj, path, line)` (validates and raises
`DataError` naming file:line and the bad field) and `to_dict()` (the JSON object written to disk):

    conversation  {"id", "messages": [{"role": "system"|"user"|"assistant", "content"}], "source", "meta"}
    prompt        a conversation whose last message is from the user
    ranking task  {"task_id", "prompt": {"messages": [...]}, "responses": [{"response_id", "content",
                   "policy", "params", "finish_reason"?}], "source", "meta"}
    comparison    a ranking task plus "ranking": [[best ids, ties together], [next], ...], optional
                  "ratings": {id: 1-7}, "flags": {id: [str]}, "labeler", "created_at"

Rules worth knowing (the reasons are in the validators):
- a ranking names every response exactly once, as InstructGPT's labelers rank all K replies;
- a message's content must be non-empty, but a *response* may be empty: a policy can emit EOS at
  once, and a labeler must be able to rank that reply last;
- a system message may only come first;
- a response's optional "finish_reason" ("stop" | "length", as `sample` writes it) says whether the reply
  ended or was cut off at max_new_tokens: labelers see it, and the reward model scores an unfinished reply
  without the end-of-turn token (data/rm_data.py), so it can learn what the labelers saw.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatforge.core.io import DataError, atomic_write, read_jsonl

ROLES = ("system", "user", "assistant")
MIN_RATING, MAX_RATING = 1, 7

Where = tuple[str | Path | None, int | None]  # (file, line) for error messages


def stable_id(*parts: object) -> str:
    """A deterministic 16-hex-digit id (sha1) from `parts`; same inputs, same id, on any machine."""
    h = hashlib.sha1()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode("utf-8"))
        h.update(b"\x1f")  # unit separator: ("ab", "c") and ("a", "bc") differ
    return h.hexdigest()[:16]


def assign_split(key: str, test_fraction: float = 0.2) -> str:
    """'train' or 'test', fixed by a hash of `key` (use the prompt, so a prompt never straddles splits)."""
    bucket = int(stable_id("split", key), 16) % 10_000
    return "test" if bucket < round(test_fraction * 10_000) else "train"


def _err(where: Where, msg: str) -> DataError:
    path, line = where
    return DataError(path if path is not None else "<record>", line, msg)


def _require(obj: dict, key: str, kind: type | tuple[type, ...], where: Where, ctx: str = "") -> Any:
    name = f"{ctx}{key}"
    if not isinstance(obj, dict):
        raise _err(where, f"expected a JSON object{' for ' + ctx.rstrip('.') if ctx else ''}, got {type(obj).__name__}")
    if key not in obj:
        raise _err(where, f"missing field '{name}'")
    val = obj[key]
    if not isinstance(val, kind) or (isinstance(val, bool) and bool not in _as_tuple(kind)):
        want = " or ".join(t.__name__ for t in _as_tuple(kind))
        raise _err(where, f"field '{name}' must be {want}, got {type(val).__name__}")
    return val


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _optional(obj: dict, key: str, kind: type, default: Any, where: Where, ctx: str = "") -> Any:
    if obj.get(key) is None:
        return default() if callable(default) else default
    return _require(obj, key, kind, where, ctx)


def _content_text(val: Any, where: Where, name: str) -> str:
    """Message content: a string, or OpenAI-style text parts [{"type": "text", "text": ...}] joined."""
    if isinstance(val, str):
        return val
    if isinstance(val, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in val):
        return "".join(str(p.get("text", "")) for p in val)
    raise _err(where, f"field '{name}' must be a string (or a list of text parts), got {type(val).__name__}")


# ----------------------------------------------------------------------------- messages


@dataclass
class Message:
    role: str
    content: str

    @classmethod
    def from_dict(cls, obj: Any, path: str | Path | None = None, line: int | None = None,
                  ctx: str = "message.") -> Message:
        where = (path, line)
        role = _require(obj, "role", str, where, ctx)
        if role not in ROLES:
            raise _err(where, f"field '{ctx}role' is '{role}', expected one of {', '.join(ROLES)}")
        if "content" not in obj:
            raise _err(where, f"missing field '{ctx}content'")
        content = _content_text(obj["content"], where, f"{ctx}content")
        if not content.strip():
            raise _err(where, f"field '{ctx}content' is empty")
        return cls(role, content)

    def to_dict(self) -> dict:
        return {"role": self.role, "content": self.content}


def parse_messages(val: Any, path: str | Path | None = None, line: int | None = None,
                   name: str = "messages") -> list[Message]:
    """Validate a list of message objects; a system message may only come first."""
    where = (path, line)
    if not isinstance(val, list):
        raise _err(where, f"field '{name}' must be a list of messages, got {type(val).__name__}")
    if not val:
        raise _err(where, f"field '{name}' is empty")
    msgs = [Message.from_dict(m, path, line, ctx=f"{name}[{i}].") for i, m in enumerate(val)]
    for i, m in enumerate(msgs[1:], 1):
        if m.role == "system":
            raise _err(where, f"field '{name}[{i}].role': a system message may only be the first message")
    if all(m.role == "system" for m in msgs):
        raise _err(where, f"field '{name}' has only a system message")
    return msgs


def check_prompt(msgs: list[Message], where: Where, name: str = "prompt.messages") -> None:
    """A prompt is a conversation whose last message is from the user."""
    if msgs[-1].role != "user":
        raise _err(where, f"field '{name}': the last message must be from the user, got '{msgs[-1].role}'")


# ----------------------------------------------------------------------------- conversations


@dataclass
class Conversation:
    id: str
    messages: list[Message]
    source: str = ""
    meta: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, obj: Any, path: str | Path | None = None, line: int | None = None,
                  require_assistant: bool = True) -> Conversation:
        """Validate a conversation; a missing id is derived from the messages (stable across runs)."""
        where = (path, line)
        msgs = parse_messages(_require(obj, "messages", list, where), path, line)
        if require_assistant and not any(m.role == "assistant" for m in msgs):
            raise _err(where, "field 'messages' has no assistant turn (nothing to train on)")
        cid = obj.get("id")
        if cid is None:
            cid = stable_id(json.dumps([m.to_dict() for m in msgs], ensure_ascii=False))
        elif not isinstance(cid, str | int) or isinstance(cid, bool):
            raise _err(where, f"field 'id' must be a string, got {type(cid).__name__}")
        source = _optional(obj, "source", str, "", where)
        meta = _optional(obj, "meta", dict, dict, where)
        return cls(str(cid), msgs, source, meta)

    def to_dict(self) -> dict:
        return {"id": self.id, "messages": [m.to_dict() for m in self.messages], "source": self.source,
                "meta": self.meta}

    def dicts(self) -> list[dict]:
        """The messages as plain dicts, the shape `render_conversation` takes."""
        return [m.to_dict() for m in self.messages]


# ----------------------------------------------------------------------------- ranking tasks


@dataclass
class Response:
    response_id: str
    content: str
    policy: str = ""
    params: dict = field(default_factory=dict)
    finish_reason: str | None = None
    """Why generation stopped (OpenAI's values): "length" = cut off at max_new_tokens, unfinished."""

    @classmethod
    def from_dict(cls, obj: Any, path: str | Path | None = None, line: int | None = None,
                  ctx: str = "response.") -> Response:
        where = (path, line)
        rid = _require(obj, "response_id", (str, int), where, ctx)
        content = _content_text(_require(obj, "content", (str, list), where, ctx), where, f"{ctx}content")
        policy = _optional(obj, "policy", str, "", where, ctx)
        params = _optional(obj, "params", dict, dict, where, ctx)
        why = _optional(obj, "finish_reason", str, None, where, ctx)
        if why is None and isinstance(params.get("finish_reason"), str):  # older files kept it in params
            why = params["finish_reason"]
        return cls(str(rid), content, policy, params, why)

    @property
    def finished(self) -> bool:
        """False for a reply cut off by the length limit: labelers see that, so the reward model must too."""
        return self.finish_reason != "length"

    def to_dict(self) -> dict:
        return {"response_id": self.response_id, "content": self.content, "policy": self.policy,
                "params": self.params, **({"finish_reason": self.finish_reason} if self.finish_reason else {})}


def _parse_prompt_field(val: Any, where: Where) -> list[Message]:
    # The contract is {"messages": [...]}; a bare string or message list is accepted for convenience.
    if isinstance(val, str):
        val = [{"role": "user", "content": val}]
    if isinstance(val, dict):
        val = _require(val, "messages", list, where, "prompt.")
    msgs = parse_messages(val, where[0], where[1], name="prompt.messages")
    check_prompt(msgs, where)
    return msgs


@dataclass
class RankingTask:
    task_id: str
    prompt: list[Message]
    responses: list[Response]
    source: str = ""
    meta: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, obj: Any, path: str | Path | None = None, line: int | None = None) -> RankingTask:
        return cls(**_task_fields(obj, (path, line)))

    def to_dict(self) -> dict:
        return {
            "task_id": self.task_id,
            "prompt": {"messages": [m.to_dict() for m in self.prompt]},
            "responses": [r.to_dict() for r in self.responses],
            "source": self.source,
            "meta": self.meta,
        }

    def response_ids(self) -> list[str]:
        return [r.response_id for r in self.responses]

    def response(self, response_id: str) -> Response:
        for r in self.responses:
            if r.response_id == response_id:
                return r
        raise KeyError(response_id)

    def prompt_dicts(self) -> list[dict]:
        return [m.to_dict() for m in self.prompt]


def _task_fields(obj: Any, where: Where) -> dict:
    task_id = _require(obj, "task_id", (str, int), where)
    prompt = _parse_prompt_field(_require(obj, "prompt", (dict, list, str), where), where)
    raw = _require(obj, "responses", list, where)
    if not raw:
        raise _err(where, "field 'responses' is empty: a ranking task needs at least 2 responses")
    responses = [Response.from_dict(r, where[0], where[1], ctx=f"responses[{i}].") for i, r in enumerate(raw)]
    if len(responses) < 2:
        raise _err(where, f"field 'responses' has K={len(responses)}: a ranking task needs K >= 2")
    seen: set[str] = set()
    for i, r in enumerate(responses):
        if r.response_id in seen:
            raise _err(where, f"field 'responses[{i}].response_id': duplicate id '{r.response_id}'")
        seen.add(r.response_id)
    return {
        "task_id": str(task_id),
        "prompt": prompt,
        "responses": responses,
        "source": _optional(obj, "source", str, "", where),
        "meta": _optional(obj, "meta", dict, dict, where),
    }


# ----------------------------------------------------------------------------- comparisons


@dataclass
class Comparison(RankingTask):
    """A ranking task with a labeler's ranking: groups best first; ids in one group are tied."""

    ranking: list[list[str]] = field(default_factory=list)
    ratings: dict[str, int] = field(default_factory=dict)
    flags: dict[str, list[str]] = field(default_factory=dict)
    labeler: str = ""
    created_at: str = ""

    @classmethod
    def from_dict(cls, obj: Any, path: str | Path | None = None, line: int | None = None) -> Comparison:
        where = (path, line)
        base = _task_fields(obj, where)
        ids = [r.response_id for r in base["responses"]]
        ranking = _parse_ranking(_require(obj, "ranking", list, where), ids, where)
        ratings = _parse_ratings(_optional(obj, "ratings", dict, dict, where), ids, where)
        flags = _parse_flags(_optional(obj, "flags", dict, dict, where), ids, where)
        labeler = _optional(obj, "labeler", str, "", where)
        created_at = _optional(obj, "created_at", str, "", where)
        return cls(**base, ranking=ranking, ratings=ratings, flags=flags, labeler=labeler, created_at=created_at)

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["ranking"] = [list(g) for g in self.ranking]
        if self.ratings:
            d["ratings"] = dict(self.ratings)
        if self.flags:
            d["flags"] = {k: list(v) for k, v in self.flags.items()}
        d["labeler"] = self.labeler
        d["created_at"] = self.created_at
        return d

    def task(self) -> RankingTask:
        """The unlabeled ranking task behind this comparison."""
        return RankingTask(self.task_id, self.prompt, self.responses, self.source, dict(self.meta))

    def best_ids(self) -> list[str]:
        return list(self.ranking[0])

    def rank_of(self) -> dict[str, int]:
        """response_id -> group index (0 = best); tied ids share an index."""
        return {rid: g for g, group in enumerate(self.ranking) for rid in group}


def _parse_ranking(val: list, ids: list[str], where: Where) -> list[list[str]]:
    known, seen = set(ids), set()
    ranking: list[list[str]] = []
    for g, group in enumerate(val):
        # A bare id is a group of one: [["a"], ["b"]] and ["a", "b"] mean the same ranking.
        group = group if isinstance(group, list) else [group]
        if not group:
            raise _err(where, f"field 'ranking[{g}]' is an empty group")
        out = []
        for rid in group:
            if not isinstance(rid, str | int) or isinstance(rid, bool):
                raise _err(where, f"field 'ranking[{g}]' holds {type(rid).__name__}, expected response ids")
            rid = str(rid)
            if rid not in known:
                raise _err(where, f"field 'ranking' names unknown response id '{rid}'")
            if rid in seen:
                raise _err(where, f"field 'ranking' names response id '{rid}' twice")
            seen.add(rid)
            out.append(rid)
        ranking.append(out)
    missing = [r for r in ids if r not in seen]
    if missing:
        raise _err(where, f"field 'ranking' must rank every response; missing {', '.join(missing)}")
    # One group (all tied) is valid: an honest "can't tell" label that simply yields no pairs.
    return ranking


def _parse_ratings(val: dict, ids: list[str], where: Where) -> dict[str, int]:
    out = {}
    for rid, r in val.items():
        if rid not in ids:
            raise _err(where, f"field 'ratings' names unknown response id '{rid}'")
        if isinstance(r, bool) or not isinstance(r, int | float) or r != int(r) or not MIN_RATING <= r <= MAX_RATING:
            raise _err(where, f"field 'ratings.{rid}' is {r!r}, expected an integer {MIN_RATING}-{MAX_RATING}")
        out[rid] = int(r)
    return out


def _parse_flags(val: dict, ids: list[str], where: Where) -> dict[str, list[str]]:
    out = {}
    for rid, fl in val.items():
        if rid not in ids:
            raise _err(where, f"field 'flags' names unknown response id '{rid}'")
        if not isinstance(fl, list) or not all(isinstance(x, str) for x in fl):
            raise _err(where, f"field 'flags.{rid}' must be a list of strings")
        out[rid] = list(fl)
    return out


def comparison_pairs(cmp: Comparison) -> list[tuple[str, str]]:
    """Every (better_id, worse_id) implied by the ranking; tied ids give no pair.

    A ranking of K replies in distinct groups gives K*(K-1)/2 pairs, the InstructGPT batch.
    """
    pairs = []
    for i, better in enumerate(cmp.ranking):
        for worse in cmp.ranking[i + 1:]:
            pairs.extend((b, w) for b in better for w in worse)
    return pairs


# ----------------------------------------------------------------------------- readers / writers


def read_conversations(path: str | Path, require_assistant: bool = True) -> list[Conversation]:
    """Read a chatforge conversation JSONL (.gz ok); a bad line raises DataError(file:line)."""
    return [Conversation.from_dict(obj, path, n, require_assistant) for n, obj in read_jsonl(path)]


def read_prompts(path: str | Path, strip_assistant: bool = False) -> list[Conversation]:
    """Read prompts: conversation objects, {"prompt": str | messages}, or a bare JSON string a line.

    With `strip_assistant`, trailing assistant turns are dropped, so SFT conversations work as prompts.
    """
    return [_prompt_of(obj, (path, n), strip_assistant) for n, obj in read_jsonl(path)]


def read_prompts_text(text: str, source: str = "upload", strip_assistant: bool = False) -> list[Conversation]:
    """`read_prompts` of JSONL text (an upload); errors name `source` and the line."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise _err((source, n), f"not valid JSON ({e.msg})") from None
        out.append(_prompt_of(obj, (source, n), strip_assistant))
    if not out:
        raise _err((source, None), "no prompts in the file")
    return out


def _prompt_of(obj: Any, where: Where, strip_assistant: bool) -> Conversation:
    path, n = where
    if isinstance(obj, str):
        obj = {"messages": [{"role": "user", "content": obj}]}
    elif isinstance(obj, dict) and "messages" not in obj and "prompt" in obj:
        p = obj["prompt"]
        msgs = [{"role": "user", "content": p}] if isinstance(p, str) else p.get("messages") if isinstance(p, dict) else p
        obj = {**{k: v for k, v in obj.items() if k != "prompt"}, "messages": msgs}
    elif not isinstance(obj, dict):
        raise _err(where, f"expected a prompt object or string, got {type(obj).__name__}")
    conv = Conversation.from_dict(obj, path, n, require_assistant=False)
    if strip_assistant:
        while conv.messages and conv.messages[-1].role == "assistant":
            conv.messages.pop()
        if not conv.messages or conv.messages[-1].role != "user":
            raise _err(where, "no user message left after dropping the final assistant turns")
    check_prompt(conv.messages, where, name="messages")
    return conv


def read_tasks(path: str | Path) -> list[RankingTask]:
    """Read ranking tasks (comparison lines are accepted; their ranking is ignored)."""
    return [RankingTask.from_dict(obj, path, n) for n, obj in read_jsonl(path)]


def read_comparisons(path: str | Path) -> list[Comparison]:
    return [Comparison.from_dict(obj, path, n) for n, obj in read_jsonl(path)]


def write_jsonl_records(path: str | Path, records: Iterable[Any]) -> int:
    """Atomically write records (dataclasses with to_dict, or dicts) as JSONL; `.gz` is gzipped.

    Gzip output has mtime 0 so the same records always give the same bytes. Returns the count.
    """
    import gzip

    path = Path(path)
    n = 0
    with atomic_write(path, mode="wb") as raw:
        gz = gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) if path.suffix == ".gz" else None
        out = gz if gz is not None else raw
        for rec in records:
            d = rec.to_dict() if hasattr(rec, "to_dict") else rec
            out.write((json.dumps(d, ensure_ascii=False) + "\n").encode("utf-8"))
            n += 1
        if gz is not None:
            gz.close()
    return n


def make_task(prompt: dict, replies: list[str], policy: str, params: dict,
              finish_reasons: list[str] | None = None) -> dict:
    """A ranking task (DESIGN.md); identical replies (after stripping) are collapsed."""
    seen, responses = set(), []
    reasons = finish_reasons or [None] * len(replies)
    for r, why in zip(replies, reasons):
        key = r.strip()
        if key in seen:
            continue
        seen.add(key)
        rid = hashlib.sha1(f"{prompt['id']}\x00{key}".encode()).hexdigest()[:12]
        resp = {"response_id": rid, "content": r, "policy": policy, "params": params}
        if why is not None:
            resp["finish_reason"] = why
        responses.append(resp)
    return {"task_id": f"{prompt['id']}", "prompt": {"messages": prompt["messages"]}, "responses": responses,
            "meta": prompt.get("meta", {}), "source": prompt.get("source", "")}
