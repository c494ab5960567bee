"""Importers and exporters between public chat-data formats and chatforge's JSONL records.

    chatforge convert hh-rlhf/helpful-base/test.jsonl.gz --to comparison --out prefs.jsonl
    chatforge convert en_100_tree.jsonl --to chatforge --out sft.jsonl --opt mode=best

Format names (`FORMATS`): `chatforge` (conversation), `comparison`, `openai` ({"messages"}), `trl`
(conversational {"messages"}), `trl-pc` (prompt/completion), `trl-pref` ({prompt?, chosen, rejected}),
`hh` (Anthropic "\\n\\nHuman: ... \\n\\nAssistant: ..." strings), `oasst` (OpenAssistant message trees),
`self-instruct` (seed tasks). Every input is read either as conversations or as comparisons, and every
output is written from one of the two; `convert` picks the path from the target format:

    conversations from: chatforge openai trl trl-pc hh oasst self-instruct (+ any comparison source:
                        the best-ranked reply becomes a demonstration)
    comparisons from:   comparison hh trl-pref oasst
    write conversations as: chatforge openai trl trl-pc hh ({"text": hh string})
    write comparisons as:   comparison trl-pref (every implied pair) hh ({chosen, rejected} per pair) oasst

A bad record raises DataError(file:line) unless `on_error="skip"`; records that are valid but carry
nothing to keep (synthetic OASST trees, identical chosen/rejected) are skipped and counted by reason.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatforge.core.io import DataError, UserError, read_jsonl
from chatforge.core.log import warn
from chatforge.data.formats import (
    Comparison,
    Conversation,
    Message,
    Where,
    comparison_pairs,
    parse_messages,
    stable_id,
    write_jsonl_records,
)

FORMATS = {
    "chatforge": "chatforge conversations {id, messages, source, meta}",
    "comparison": "chatforge comparisons (ranking task + ranking)",
    "openai": "OpenAI chat fine-tuning JSONL {messages: [...]}",
    "trl": "TRL conversational language modeling {messages: [...]}",
    "trl-pc": "TRL prompt/completion {prompt, completion} (strings or messages)",
    "trl-pref": "TRL preference {prompt?, chosen, rejected} (explicit or implicit prompt)",
    "hh": "Anthropic HH-RLHF {chosen, rejected} dialogue strings",
    "oasst": "OpenAssistant message trees {message_tree_id, prompt: {..., replies}}",
    "self-instruct": "self-instruct seed tasks {instruction, instances: [{input, output}]}",
}
OPTIONS = {
    "mode": "oasst -> conversations: 'all' root-to-leaf paths (default) or 'best' (rank 0 at each level)",
    "include_synthetic": "oasst: keep model-written (synthetic) messages (default false)",
    "field": "hh -> conversations: which dialogue to keep, 'chosen' (default) or 'rejected'",
    "source": "the `source` tag of imported records (default: the format name; chatforge files keep theirs)",
    "policy": "hh, trl-pref: the `policy` of imported responses (default 'import:<source>')",
    "on_error": "'raise' (default) stops at the first bad record; 'skip' counts and skips it",
}
_BOOL_OPTS = {"include_synthetic"}


def _bad(where: Where, msg: str) -> DataError:
    return DataError(where[0] or "<record>", where[1], msg)


class Skip(Exception):
    """A valid record with nothing to keep; `str(e)` is the reason counted in the report."""


@dataclass
class ConvertReport:
    """Counts for one conversion: input records read, output records written, skips by reason."""

    from_format: str = ""
    to_format: str = ""
    read: int = 0
    written: int = 0
    skipped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        s = f"{self.from_format} -> {self.to_format}: {self.read} read, {self.written} written"
        if self.skipped:
            s += ", skipped " + ", ".join(f"{n} ({why})" for why, n in self.skipped.most_common())
        return s


# ----------------------------------------------------------------------------- Anthropic HH

HH_HUMAN, HH_ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLE = {"Human": "user", "Assistant": "assistant"}


def parse_hh(text: str, where: Where = (None, None)) -> list[Message]:
    """Parse an HH dialogue string into messages.

    Rule: a turn starts only at a blank line followed by "Human:" or "Assistant:"; the words
    elsewhere (after a single newline, mid-sentence, "Humans:") are text. A missing leading "\\n\\n"
    is tolerated. Text before the first turn becomes a system message (the legacy Anthropic prompt
    convention, and how `format_hh` writes one). Turn text is stripped; empty turns are dropped, and
    consecutive turns by one speaker (HH has a few dozen "Assistant: ...\\n\\nAssistant: ...") are
    merged with a blank line so roles alternate.
    """
    if text.startswith(("Human:", "Assistant:")):
        text = "\n\n" + text
    parts = _HH_TURN.split(text)
    msgs: list[Message] = []
    if parts[0].strip():
        msgs.append(Message("system", parts[0].strip()))
    for speaker, body in zip(parts[1::2], parts[2::2], strict=True):
        body = body.strip()
        if not body:
            continue
        role = _HH_ROLE[speaker]
        if msgs and msgs[-1].role == role:
            msgs[-1] = Message(role, msgs[-1].content + "\n\n" + body)
        else:
            msgs.append(Message(role, body))
    if not any(m.role != "system" for m in msgs):
        raise _bad(where, "no 'Human:'/'Assistant:' turns in the HH dialogue")
    return msgs


def format_hh(messages: list[Message] | list[dict]) -> str:
    """Messages -> HH string; a leading system message becomes text before the first turn."""
    out = []
    for m in messages:
        role, content = (m.role, m.content) if isinstance(m, Message) else (m["role"], m["content"])
        if role == "system":
            out.append(content)
        else:
            out.append(f"{HH_HUMAN if role == 'user' else HH_ASSISTANT} {content}")
    return "".join(out)


def hh_pair_to_comparison(chosen: str, rejected: str, where: Where = (None, None), source: str = "hh",
                          policy: str = "import:hh", meta: dict | None = None) -> Comparison:
    """An HH {chosen, rejected} pair -> a K=2 comparison.

    The prompt is the shared dialogue up to the first "Assistant:" after the last shared "Human:"
    turn; each response is the rest of its string, kept verbatim (stripped) even when it contains
    further turn markers, so `format_hh(prompt) + "\\n\\nAssistant: " + response` rebuilds it.
    """
    shared = len(os.path.commonprefix([chosen, rejected]))
    human = chosen.rfind(HH_HUMAN, 0, shared)
    cut = chosen.find(HH_ASSISTANT, human) if human >= 0 else -1
    if cut < 0 or cut + len(HH_ASSISTANT) > shared:
        raise _bad(where, "'chosen' and 'rejected' share no dialogue ending in a Human turn")
    prompt = parse_hh(chosen[:cut], where)
    tail = len(HH_ASSISTANT)
    return pair_comparison(prompt, chosen[cut + tail:].strip(), rejected[cut + tail:].strip(), where,
                           source=source, policy=policy, meta=meta)


def pair_comparison(prompt: list[Message], chosen: str, rejected: str, where: Where = (None, None),
                    source: str = "", policy: str = "", meta: dict | None = None,
                    task_id: str | None = None) -> Comparison:
    """A K=2 comparison from a prompt and two replies (chosen ranked first).

    Response ids are content hashes and responses are listed in id order, not chosen-first, so a
    labeler or judge shown the task never learns the answer from position.
    """
    if chosen == rejected:
        raise Skip("identical chosen and rejected")
    pdicts = [m.to_dict() for m in prompt]
    cid, rid = stable_id(chosen)[:8], stable_id(rejected)[:8]
    responses = sorted([{"response_id": cid, "content": chosen, "policy": policy},
                        {"response_id": rid, "content": rejected, "policy": policy}],
                       key=lambda r: r["response_id"])
    obj = {
        "task_id": task_id or stable_id(source, json.dumps(pdicts, ensure_ascii=False), chosen, rejected),
        "prompt": {"messages": pdicts}, "responses": responses, "ranking": [[cid], [rid]],
        "source": source, "meta": meta or {}, "labeler": f"import:{source}" if source else "import",
    }
    return Comparison.from_dict(obj, *where)


def comparison_to_hh_pairs(cmp: Comparison) -> list[dict]:
    """Every pair implied by the ranking as an HH {chosen, rejected} object."""
    prompt = format_hh(cmp.prompt)
    return [{"chosen": f"{prompt}{HH_ASSISTANT} {cmp.response(b).content}",
             "rejected": f"{prompt}{HH_ASSISTANT} {cmp.response(w).content}"} for b, w in comparison_pairs(cmp)]


# ----------------------------------------------------------------------------- TRL / OpenAI


def _messages(val: Any, where: Where, name: str, default_role: str) -> list[Message]:
    """A TRL/OpenAI field: a plain string (one message of `default_role`) or a message list."""
    if isinstance(val, str):
        if not val.strip():
            raise _bad(where, f"field '{name}' is empty")
        return [Message(default_role, val)]
    if isinstance(val, list):
        val = [{**m, "role": "system"} if isinstance(m, dict) and m.get("role") == "developer" else m for m in val]
    return parse_messages(val, where[0], where[1], name=name)


def _reply_text(val: Any, where: Where, name: str) -> str:
    """A preference reply: a string, or a list holding exactly one assistant message."""
    if isinstance(val, str):
        return val
    msgs = _messages(val, where, name, "assistant")
    if len(msgs) != 1 or msgs[0].role != "assistant":
        raise _bad(where, f"field '{name}' must be one assistant message")
    return msgs[0].content


def trl_pref_to_comparison(obj: dict, where: Where = (None, None), source: str = "trl-pref",
                           policy: str = "import:trl-pref") -> Comparison:
    """TRL preference -> K=2 comparison.

    Explicit prompt: `prompt` (string or messages) plus one reply each. Implicit prompt: the shared
    prefix of `chosen` and `rejected` (whole messages for conversational data; characters, backed off
    before a space, as TRL's `extract_prompt` does, for plain strings; HH-style strings are parsed
    as HH).
    """
    chosen, rejected = obj.get("chosen"), obj.get("rejected")
    for name, val in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(val, str | list):
            raise _bad(where, f"field '{name}' must be a string or messages")
    kw = {"source": source, "policy": policy}
    if obj.get("prompt") is not None:
        prompt = _messages(obj["prompt"], where, "prompt", "user")
        return pair_comparison(prompt, _reply_text(chosen, where, "chosen"),
                               _reply_text(rejected, where, "rejected"), where, **kw)
    if isinstance(chosen, str) and isinstance(rejected, str):
        if HH_HUMAN in chosen or chosen.startswith("Human:"):
            return hh_pair_to_comparison(chosen, rejected, where, **kw)
        k = len(os.path.commonprefix([chosen, rejected]))
        if 0 < k < len(chosen) and chosen[k - 1] == " ":
            k -= 1
        prompt = _messages(chosen[:k], where, "prompt (shared prefix of chosen/rejected)", "user")
        return pair_comparison(prompt, chosen[k:], rejected[k:], where, **kw)
    if isinstance(chosen, list) and isinstance(rejected, list):
        cm, rm = _messages(chosen, where, "chosen", "user"), _messages(rejected, where, "rejected", "user")
        k = 0
        while k < min(len(cm), len(rm)) and cm[k] == rm[k]:
            k += 1
        if k == len(cm) == len(rm):
            raise Skip("identical chosen and rejected")
        if k == 0:
            raise _bad(where, "'chosen' and 'rejected' share no prompt messages")
        return pair_comparison(cm[:k], _reply_text([m.to_dict() for m in cm[k:]], where, "chosen"),
                               _reply_text([m.to_dict() for m in rm[k:]], where, "rejected"), where, **kw)
    raise _bad(where, "'chosen' and 'rejected' must both be strings or both lists")


def comparison_to_trl_pairs(cmp: Comparison) -> list[dict]:
    """Every pair implied by the ranking as a conversational TRL {prompt, chosen, rejected}."""
    prompt = cmp.prompt_dicts()
    return [{"prompt": prompt,
             "chosen": [{"role": "assistant", "content": cmp.response(b).content}],
             "rejected": [{"role": "assistant", "content": cmp.response(w).content}]}
            for b, w in comparison_pairs(cmp)]


def comparison_to_demonstration(cmp: Comparison) -> Conversation:
    """The prompt plus the best-ranked reply (the first of a tied top group), as an SFT conversation."""
    best = cmp.response(cmp.ranking[0][0])
    if not best.content.strip():
        raise Skip("best response is empty")
    return Conversation(stable_id(cmp.task_id, best.response_id), [*cmp.prompt, Message("assistant", best.content)],
                        cmp.source, {"task_id": cmp.task_id, "response_id": best.response_id, "labeler": cmp.labeler})


def conversation_to_trl_pc(conv: Conversation) -> dict:
    """Conversation -> conversational TRL {prompt, completion}: the last assistant turn is the completion."""
    if conv.messages[-1].role != "assistant":
        raise Skip("does not end with an assistant turn")
    return {"prompt": [m.to_dict() for m in conv.messages[:-1]], "completion": [conv.messages[-1].to_dict()]}


# ----------------------------------------------------------------------------- OpenAssistant


def _oasst_children(node: dict, include_synthetic: bool) -> list[dict]:
    """Usable replies, best first: ranked by rank, then unranked in file order.

    Deleted, synthetic (unless asked for), review-rejected and empty messages are dropped with
    their whole subtree: a reply to a dropped message has no context left.
    """
    kids = [c for c in node.get("replies") or [] if _oasst_usable(c, include_synthetic)]
    return sorted(kids, key=lambda c: (c.get("rank") is None, c.get("rank") or 0))


def _oasst_usable(msg: Any, include_synthetic: bool) -> bool:
    return (isinstance(msg, dict) and not msg.get("deleted") and msg.get("review_result") is not False
            and (include_synthetic or not msg.get("synthetic")) and bool(str(msg.get("text") or "").strip()))


def _oasst_message(node: dict, where: Where) -> Message:
    role = {"prompter": "user", "assistant": "assistant"}.get(node.get("role"))
    if role is None:
        raise _bad(where, f"oasst message {node.get('message_id')}: role '{node.get('role')}' is not prompter/assistant")
    return Message(role, str(node["text"]).strip())


def _oasst_root(tree: Any, where: Where) -> dict:
    if not isinstance(tree, dict) or not isinstance(tree.get("prompt"), dict):
        raise _bad(where, "missing field 'prompt' (the oasst tree root message)")
    return tree["prompt"]


def oasst_tree_to_conversations(tree: dict, mode: str = "all", include_synthetic: bool = False,
                                where: Where = (None, None), source: str = "oasst") -> list[Conversation]:
    """One OASST tree -> conversations: every root-to-leaf path (`all`) or the rank-0 path (`best`).

    Paths are cut back to their last assistant turn; paths that become equal are kept once. The
    conversation id is its last message's id.
    """
    if mode not in ("all", "best"):
        raise UserError(f"oasst mode must be 'all' or 'best', got '{mode}'")
    root = _oasst_root(tree, where)
    if not _oasst_usable(root, include_synthetic):
        return []
    out, seen = [], set()
    stack = [[root]]
    while stack:
        path = stack.pop()
        kids = _oasst_children(path[-1], include_synthetic)
        if kids:
            chosen = kids[:1] if mode == "best" else kids
            stack.extend([*path, k] for k in reversed(chosen))
            continue
        while path and path[-1].get("role") != "assistant":
            path = path[:-1]
        if not path or path[-1]["message_id"] in seen:
            continue
        seen.add(path[-1]["message_id"])
        meta = {"message_tree_id": tree.get("message_tree_id", root.get("message_id")), "lang": root.get("lang")}
        out.append(Conversation(str(path[-1]["message_id"]), [_oasst_message(n, where) for n in path], source, meta))
    return out


def oasst_tree_to_comparisons(tree: dict, include_synthetic: bool = False, where: Where = (None, None),
                              source: str = "oasst") -> list[Comparison]:
    """One OASST tree -> a K-wise comparison per prompter message with >= 2 ranked assistant replies.

    rank 0 is best and equal ranks tie; unranked siblings are left out (a ranking covers every
    response). Human-written replies get policy "human", synthetic ones their model_name.
    """
    root = _oasst_root(tree, where)
    if not _oasst_usable(root, include_synthetic):
        return []
    out = []
    stack = [[root]]
    while stack:
        path = stack.pop()
        kids = _oasst_children(path[-1], include_synthetic)
        stack.extend([*path, k] for k in reversed(kids))
        ranked = [k for k in kids if k.get("role") == "assistant" and isinstance(k.get("rank"), int)]
        if path[-1].get("role") != "prompter" or len(ranked) < 2:
            continue
        groups: dict[int, list[str]] = {}
        for k in ranked:
            groups.setdefault(k["rank"], []).append(str(k["message_id"]))
        obj = {
            "task_id": str(path[-1]["message_id"]),
            "prompt": {"messages": [_oasst_message(n, where).to_dict() for n in path]},
            "responses": [{"response_id": str(k["message_id"]), "content": str(k["text"]).strip(),
                           "policy": (k.get("model_name") or "model") if k.get("synthetic") else "human"}
                          for k in ranked],
            "ranking": [groups[r] for r in sorted(groups)],
            "source": source, "labeler": f"import:{source}",
            "meta": {"message_tree_id": tree.get("message_tree_id", root.get("message_id"))},
        }
        out.append(Comparison.from_dict(obj, *where))
    return out


def comparison_to_oasst_tree(cmp: Comparison) -> list[dict]:
    """A comparison as an OpenAssistant message tree: the prompt turns as a chain (the user turns are
    `prompter`), the ranked replies as the last turn's `replies` with `rank` (0 best, ties share a rank),
    as oasst's exports carry them; `oasst_tree_to_comparisons` reads it back."""
    if any(m.role == "system" for m in cmp.prompt):
        raise Skip("oasst trees have no system message")
    rank = {rid: i for i, group in enumerate(cmp.ranking) for rid in group}
    replies = [{"message_id": r.response_id, "role": "assistant", "text": r.content, "rank": rank[r.response_id],
                "synthetic": r.policy != "human", "model_name": r.policy, "lang": cmp.meta.get("lang")}
               for r in cmp.responses if r.response_id in rank]
    node: dict[str, Any] | None = None
    turns = cmp.prompt
    for i in range(len(turns) - 1, -1, -1):  # build the chain from its last turn up
        m = turns[i]
        msg = {"message_id": stable_id(cmp.task_id, "turn", i) if i < len(turns) - 1 else cmp.task_id,
               "role": "prompter" if m.role == "user" else "assistant", "text": m.content,
               "replies": replies if node is None else [node]}
        node = msg
    return [{"message_tree_id": stable_id(cmp.task_id, "tree"), "prompt": node,
             "meta": {"labeler": cmp.labeler, "source": cmp.source, "created_at": cmp.created_at, **cmp.meta}}]


# ----------------------------------------------------------------------------- self-instruct


def self_instruct_to_conversations(task: dict, where: Where = (None, None),
                                   source: str = "self-instruct") -> list[Conversation]:
    """A seed task -> one conversation per instance: instruction (+ blank line + input) -> output."""
    if not isinstance(task, dict) or not isinstance(task.get("instruction"), str):
        raise _bad(where, "missing field 'instruction'")
    instances = task.get("instances")
    if not isinstance(instances, list):
        raise _bad(where, "field 'instances' must be a list")
    tid = str(task.get("id") or stable_id(task["instruction"]))
    out = []
    for i, inst in enumerate(instances):
        if not isinstance(inst, dict):
            raise _bad(where, f"field 'instances[{i}]' must be an object")
        inp, output = str(inst.get("input") or "").strip(), str(inst.get("output") or "").strip()
        if not output:
            continue
        user = task["instruction"].strip() + (f"\n\n{inp}" if inp else "")
        meta = {"name": task.get("name"), "is_classification": task.get("is_classification")}
        cid = tid if len(instances) == 1 else f"{tid}-{i}"
        out.append(Conversation(cid, [Message("user", user), Message("assistant", output)], source, meta))
    if not out:
        raise Skip("no instance with an output")
    return out


# ----------------------------------------------------------------------------- dispatch


def detect_format(obj: Any, where: Where = (None, None)) -> str:
    """Guess the format of one record (the first line of a file)."""
    def has_hh(s: Any) -> bool:
        return isinstance(s, str) and (HH_HUMAN in s or s.startswith("Human:"))

    if isinstance(obj, str) and has_hh(obj):
        return "hh"
    if isinstance(obj, dict):
        if "ranking" in obj and "responses" in obj:
            return "comparison"
        if "message_tree_id" in obj or (isinstance(obj.get("prompt"), dict) and "replies" in obj["prompt"]):
            return "oasst"
        if "instruction" in obj and "instances" in obj:
            return "self-instruct"
        if "chosen" in obj and "rejected" in obj:
            return "hh" if "prompt" not in obj and has_hh(obj["chosen"]) else "trl-pref"
        if "prompt" in obj and "completion" in obj:
            return "trl-pc"
        if "messages" in obj:
            return "chatforge" if "id" in obj else "openai"
        if has_hh(obj.get("text")):
            return "hh"
    keys = ", ".join(sorted(obj)) if isinstance(obj, dict) else type(obj).__name__
    raise _bad(where, f"cannot detect the format ({keys}); name it with --from "
                    f"({', '.join(FORMATS)})")


def hh_to_conversation(text: str, where: Where = (None, None), source: str = "hh",
                       meta: dict | None = None) -> Conversation:
    """An HH dialogue string -> a conversation for SFT, cut back to its last non-empty Assistant turn."""
    msgs = parse_hh(text, where)
    while msgs and msgs[-1].role != "assistant":
        msgs.pop()
    if not msgs:
        raise Skip("HH dialogue without a non-empty Assistant turn")
    return Conversation(stable_id(text), msgs, source, meta or {})


def _conv_hh(obj: Any, where: Where, o: dict) -> list[Conversation]:
    fld = o.get("field", "chosen")
    text = obj if isinstance(obj, str) else obj.get(fld, obj.get("text")) if isinstance(obj, dict) else None
    if not isinstance(text, str):
        raise _bad(where, f"missing field '{fld}' (an HH dialogue string)")
    return [hh_to_conversation(text, where, o.get("source", "hh"))]


def _conv_from(obj: Any, msgs: list[Message], where: Where, o: dict) -> list[Conversation]:
    d = {"id": obj.get("id"), "messages": [m.to_dict() for m in msgs],
         "source": obj.get("source") or o.get("source", ""), "meta": obj.get("meta")}
    return [Conversation.from_dict(d, *where)]


def _conv_messages(obj: Any, where: Where, o: dict) -> list[Conversation]:
    if not isinstance(obj, dict) or "messages" not in obj:
        raise _bad(where, "missing field 'messages'")
    return _conv_from(obj, _messages(obj["messages"], where, "messages", "user"), where, o)


def _conv_trl_pc(obj: Any, where: Where, o: dict) -> list[Conversation]:
    for k in ("prompt", "completion"):
        if not isinstance(obj, dict) or k not in obj:
            raise _bad(where, f"missing field '{k}'")
    msgs = _messages(obj["prompt"], where, "prompt", "user") + _messages(obj["completion"], where, "completion",
                                                                        "assistant")
    return _conv_from(obj, msgs, where, o)


CONV_READERS: dict[str, Callable[[Any, Where, dict], list]] = {
    "chatforge": lambda obj, w, o: [Conversation.from_dict(obj, *w)],
    "openai": _conv_messages,
    "trl": _conv_messages,
    "trl-pc": _conv_trl_pc,
    "hh": _conv_hh,
    "oasst": lambda obj, w, o: oasst_tree_to_conversations(obj, o.get("mode", "all"), o.get("include_synthetic", False),
                                                           w, o.get("source", "oasst")),
    "self-instruct": lambda obj, w, o: self_instruct_to_conversations(obj, w, o.get("source", "self-instruct")),
}


def _cmp_hh(obj: Any, where: Where, o: dict) -> list[Comparison]:
    if not isinstance(obj, dict) or not isinstance(obj.get("chosen"), str) or not isinstance(obj.get("rejected"), str):
        raise _bad(where, "expected {chosen, rejected} HH dialogue strings")
    src = o.get("source", "hh")
    return [hh_pair_to_comparison(obj["chosen"], obj["rejected"], where, src, o.get("policy", f"import:{src}"))]


CMP_READERS: dict[str, Callable[[Any, Where, dict], list]] = {
    "comparison": lambda obj, w, o: [Comparison.from_dict(obj, *w)],
    "hh": _cmp_hh,
    "trl-pref": lambda obj, w, o: [trl_pref_to_comparison(obj, w, o.get("source", "trl-pref"),
                                                          o.get("policy", f"import:{o.get('source', 'trl-pref')}"))],
    "oasst": lambda obj, w, o: oasst_tree_to_comparisons(obj, o.get("include_synthetic", False), w,
                                                         o.get("source", "oasst")),
}

CONV_WRITERS: dict[str, Callable[[Conversation], list[dict]]] = {
    "chatforge": lambda c: [c.to_dict()],
    "openai": lambda c: [{"messages": c.dicts()}],
    "trl": lambda c: [{"messages": c.dicts()}],
    "trl-pc": lambda c: [conversation_to_trl_pc(c)],
    "hh": lambda c: [{"text": format_hh(c.messages)}],
}
CMP_WRITERS: dict[str, Callable[[Comparison], list[dict]]] = {
    "comparison": lambda c: [c.to_dict()],
    "trl-pref": comparison_to_trl_pairs,
    "hh": comparison_to_hh_pairs,
    "oasst": comparison_to_oasst_tree,
}


def _check_opts(opts: dict) -> dict:
    unknown = sorted(set(opts) - set(OPTIONS))
    if unknown:
        raise UserError(f"unknown convert option(s) {', '.join(unknown)}; known: {', '.join(OPTIONS)}")
    o = dict(opts)
    for k in _BOOL_OPTS & set(o):
        if isinstance(o[k], str):
            o[k] = o[k].strip().lower() in ("1", "true", "yes", "on")
    if o.get("on_error", "raise") not in ("raise", "skip"):
        raise UserError(f"on_error must be 'raise' or 'skip', got '{o['on_error']}'")
    return o


def _records(path: Path, from_format: str | None, kind: str, opts: dict, report: ConvertReport
             ) -> Iterator[Any]:
    """Yield Conversation or Comparison records (by `kind`) read from `path`, counting into `report`."""
    rows = read_jsonl(path)
    first = next(rows, None)
    if first is None:
        raise DataError(path, None, "no records")
    fmt = from_format or detect_format(first[1], (path, first[0]))
    if fmt not in FORMATS:
        raise UserError(f"unknown format '{fmt}'; known: {', '.join(FORMATS)}")
    report.from_format = fmt
    opts = {"source": fmt, **opts}
    demos = kind == "conversation" and fmt not in CONV_READERS
    readers = CMP_READERS if kind == "comparison" or demos else CONV_READERS
    if fmt not in readers:
        raise UserError(f"{path}: {fmt} holds conversations, not comparisons; preference formats: "
                        f"{', '.join(CMP_READERS)}")
    for line, obj in itertools.chain([first], rows):
        report.read += 1
        try:
            recs = readers[fmt](obj, (path, line), opts)
            for rec in recs:
                yield comparison_to_demonstration(rec) if demos else rec
        except Skip as e:
            report.skipped[str(e)] += 1
        except DataError as e:
            if opts.get("on_error", "raise") == "raise":
                raise
            if report.skipped["invalid record"] < 3:  # show a few, count the rest
                warn(f"skipping {e}")
            report.skipped["invalid record"] += 1


def load_conversations(path: str | Path, from_format: str | None = None, **opts: Any
                       ) -> tuple[list[Conversation], ConvertReport]:
    """Read conversations from any supported format (auto-detected when `from_format` is None)."""
    report = ConvertReport(to_format="chatforge")
    recs = list(_records(Path(path), from_format, "conversation", _check_opts(opts), report))
    report.written = len(recs)
    return recs, report


def load_comparisons(path: str | Path, from_format: str | None = None, **opts: Any
                     ) -> tuple[list[Comparison], ConvertReport]:
    """Read comparisons from any supported preference format (auto-detected when None)."""
    report = ConvertReport(to_format="comparison")
    recs = list(_records(Path(path), from_format, "comparison", _check_opts(opts), report))
    report.written = len(recs)
    return recs, report


def convert(in_path: str | Path, to_format: str, out_path: str | Path, from_format: str | None = None,
            **opts: Any) -> ConvertReport:
    """Convert `in_path` to `to_format` at `out_path` (atomic; `.gz` output is gzipped).

    `opts` are the keys of `OPTIONS`. Returns the counts; `report.written` is the number of records.
    """
    if to_format not in FORMATS:
        raise UserError(f"unknown target format '{to_format}'; known: {', '.join(FORMATS)}")
    if from_format is not None and from_format not in FORMATS:
        raise UserError(f"unknown source format '{from_format}'; known: {', '.join(FORMATS)}")
    o = _check_opts(opts)
    report = ConvertReport(to_format=to_format)
    src = from_format
    if src is None:
        first = next(read_jsonl(in_path), None)
        if first is None:
            raise DataError(in_path, None, "no records")
        src = detect_format(first[1], (in_path, first[0]))
    # Comparisons when both ends can carry a ranking (hh -> hh keeps pairs); else conversations.
    kind = "comparison" if to_format in CMP_WRITERS and src in CMP_READERS else "conversation"
    writers: dict[str, Callable[[Any], list[dict]]] = CMP_WRITERS if kind == "comparison" else CONV_WRITERS
    if to_format not in writers:
        raise UserError(f"cannot convert {src} to {to_format}: {src} holds "
                        f"{'conversations' if src not in CMP_READERS else 'comparisons'}, and {to_format} "
                        f"holds {'comparisons' if to_format in CMP_WRITERS else 'conversations'}")

    def rows() -> Iterator[dict]:
        for rec in _records(Path(in_path), src, kind, o, report):
            try:
                yield from writers[to_format](rec)
            except Skip as e:
                report.skipped[str(e)] += 1

    report.written = write_jsonl_records(out_path, rows())
    return report
