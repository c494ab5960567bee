"""Reward-model batches: K-wise comparisons rendered once per reply, every implied pair in one forward pass.

A comparison ranks K replies to one prompt. Each reply is rendered as the whole conversation (prompt +
assistant reply, the ids of `render_conversation`) and scored at its last real token. A K-wise batch holds
several comparisons; all their replies go through the model together and each reply is forwarded
once, however many pairs it takes part in (InstructGPT, section 3.5). The loss is

    loss = 1/P * sum_prompts 1/C(K,2) * sum_{(w,l) in pairs} -log sigmoid(r_w - r_l - margin)

with P prompts in the micro-batch and K the number of replies kept for that prompt.

Ties: tied replies form no pair. We keep the 1/C(K,2) weight rather than renormalising by the number
of pairs actually formed, so a prompt's weight is the share of its C(K,2) comparisons that carry an
ordering: a fully ranked prompt weighs 1, [[a, b], [c]] weighs 2/3, an all-tied prompt 0 (it is
skipped). Renormalising would give the one informative pair of a mostly-tied ranking the weight of a
whole ranking, and near-ties are where labelers disagree most. With `tie_weight > 0` each tied pair
adds tie_weight/C(K,2) * (r_a - r_b)^2, pulling tied rewards together (off by default).

Margin (Llama 2's idea, fed by Likert ratings): margin = margin_scale * (rating_w - rating_l) when both
replies are rated, clamped at 0 because the ranking, not the rating, decides which reply is better.

"Flat pairs" mode lays the same pairs out TRL-style (chosen half, rejected half): each reply is
forwarded once per pair it is in. Same loss, same weights, more compute; kept for the benchmark.

Too long for `seq_len`: the prompt is cut from the left by whole turns (a system message stays, the
kept prompt always starts with a user turn), the same cut for every reply of a comparison, as little
as the longest reply that can fit at all needs. A reply that does not fit even after the prompt's last user turn alone is
skipped; a comparison left with fewer than 2 replies or no pairs is skipped. Everything is counted.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from chatforge.core.io import UserError
from chatforge.core.tokenizer import _template_ids, assistant_turn_suffix, render_for_completion
from chatforge.data.formats import Comparison, assign_split, comparison_pairs, read_comparisons
from chatforge.data.sampler import EpochLoader


def render_ids(tok: Any, messages: list[dict]) -> list[int]:
    """Token ids of a whole conversation: the ids `render_conversation` returns, without its loss mask
    (which costs two more template renderings per assistant turn and is not needed to score a reply)."""
    return _template_ids(tok, messages, add_generation_prompt=False)


@dataclass
class RMExample:
    """One comparison, rendered: a token sequence per kept reply and the pairs among them (local indices)."""

    task_id: str
    source: str
    seqs: list[list[int]]
    reply_ids: list[str]
    reply_chars: list[int]
    policies: list[str]
    pairs: list[tuple[int, int, float]]  # (better, worse, margin)
    ties: list[tuple[int, int]]

    @property
    def k(self) -> int:
        return len(self.seqs)

    @property
    def weight(self) -> float:
        """InstructGPT's 1/C(K,2) per pair, K = replies kept."""
        return 1.0 / math.comb(self.k, 2)


@dataclass
class RMDataStats:
    comparisons: int = 0
    truncated_prompts: int = 0
    skipped_replies: int = 0
    skipped_comparisons: int = 0
    pairs: int = 0
    ties: int = 0
    by_k: dict[int, int] = field(default_factory=dict)


# ----------------------------------------------------------------------------- loading and splitting


def load_comparisons(specs: list[str], aggregate: str = "none") -> list[Comparison]:
    """Comparisons from JSONL paths or `embedded:NAME`; `aggregate` merges several labelers of one task."""
    cmps: list[Comparison] = []
    for spec in specs:
        if spec.startswith("embedded:"):
            from chatforge.data.embedded import embedded_path

            path = embedded_path(spec.split(":", 1)[1])
        else:
            path = Path(spec)
        cmps += read_comparisons(path)
    if not cmps:
        raise UserError("no comparisons to train on (give --data CMP.jsonl or embedded:prefs/hh)")
    if aggregate != "none":
        from chatforge.data.aggregate import aggregate as aggregate_fn

        cmps = aggregate_fn(cmps, method=aggregate)
    return cmps


def split_comparisons(cmps: list[Comparison], val_fraction: float) -> tuple[list[Comparison], list[Comparison]]:
    """Deterministic held-out split by a hash of task_id: several labels of one task stay on one side."""
    if val_fraction <= 0:
        return list(cmps), []
    train = [c for c in cmps if assign_split(c.task_id, val_fraction) == "train"]
    val = [c for c in cmps if assign_split(c.task_id, val_fraction) == "test"]
    if not val and len(train) > 1:  # tiny data: still hold one task out so val metrics exist
        first = train[0].task_id
        val = [c for c in train if c.task_id == first]
        train = [c for c in train if c.task_id != first]
    return train, val


# ----------------------------------------------------------------------------- rendering


def _cut_points(prompt: list[dict]) -> tuple[list[dict], list[int]]:
    """(system head, start indices of the prompt body we may cut at: each user turn, oldest first)."""
    head = prompt[:1] if prompt and prompt[0]["role"] == "system" else []
    body_start = len(head)
    cuts = [i for i in range(body_start, len(prompt)) if prompt[i]["role"] == "user"]
    return head, cuts or [body_start]


def _with_reply(msgs: list[dict], reply: str) -> list[dict]:
    return msgs + [{"role": "assistant", "content": reply}]


def _render_reply(tok: Any, msgs: list[dict], reply: str, finished: bool) -> list[int]:
    """prompt + reply, closed by the template's end-of-turn tokens only when the reply ended: a reply cut off
    at max_new_tokens is scored as the policy left it (as TRL scores raw rollout ids), so a reward model can
    tell it from one that finished, as the labelers who saw its finish_reason could."""
    ids = render_ids(tok, _with_reply(msgs, reply))
    suffix = None if finished else assistant_turn_suffix(tok)
    return ids[: len(ids) - len(suffix)] if suffix and ids[len(ids) - len(suffix):] == suffix else ids


def render_replies(tok: Any, prompt: list[dict], replies: list[str], seq_len: int,
                   finished: list[bool] | None = None) -> tuple[list[list[int] | None], int]:
    """Render prompt + each reply; cut old prompt turns until the longest reply fits.

    Returns (ids or None for a reply that never fits, number of user turns dropped from the prompt).
    `finished[i]` False: reply i was cut off, rendered without the end-of-turn tokens (`_render_reply`).
    The renderer is prefix-stable (render_conversation checks it), so a reply adds the same number
    of tokens after any prompt: each cut costs one prompt rendering, not one per reply.
    """
    ended = finished if finished is not None else [True] * len(replies)
    if len(ended) != len(replies):
        raise ValueError(f"{len(replies)} replies but {len(ended)} finished flags")
    head, cuts = _cut_points(prompt)
    full = [_render_reply(tok, prompt, r, e) for r, e in zip(replies, ended)]
    p_len = len(render_for_completion(tok, prompt))
    suffix = [len(ids) - p_len for ids in full]
    if max(len(ids) for ids in full) <= seq_len or len(cuts) == 1:
        return [ids if len(ids) <= seq_len else None for ids in full], 0
    # cut only as far as the longest reply that can fit at all needs
    p_min = len(render_for_completion(tok, head + prompt[cuts[-1]:]))
    need = max((n for n in suffix if p_min + n <= seq_len), default=None)
    if need is None:
        return [None] * len(replies), len(cuts) - 1
    for dropped in range(1, len(cuts)):  # drop the oldest user turns one at a time
        msgs = head + prompt[cuts[dropped]:]
        p_len = p_min if dropped == len(cuts) - 1 else len(render_for_completion(tok, msgs))
        if p_len + need <= seq_len:
            break
    return [_render_reply(tok, msgs, r, e) if p_len + n <= seq_len else None
            for r, n, e in zip(replies, suffix, ended)], dropped


def build_examples(tok: Any, cmps: list[Comparison], seq_len: int, margin_scale: float = 0.0,
                   keep_ties: bool = False) -> tuple[list[RMExample], RMDataStats]:
    """Render comparisons into examples under the truncation policy above; count what was cut or skipped."""
    out, st = [], RMDataStats()
    for c in cmps:
        st.comparisons += 1
        seqs, dropped = render_replies(tok, c.prompt_dicts(), [r.content for r in c.responses], seq_len,
                                       [r.finished for r in c.responses])
        st.truncated_prompts += dropped > 0
        kept = {r.response_id: i for i, r in enumerate(c.responses) if seqs[i] is not None}
        st.skipped_replies += len(c.responses) - len(kept)
        local = {rid: j for j, rid in enumerate(kept)}
        pairs = []
        for b, w in comparison_pairs(c):
            if b in local and w in local:
                m = 0.0
                if margin_scale and b in c.ratings and w in c.ratings:
                    m = max(0.0, margin_scale * (c.ratings[b] - c.ratings[w]))
                pairs.append((local[b], local[w], m))
        ties = [(local[a], local[b]) for g in c.ranking for i, a in enumerate(g) for b in g[i + 1:]
                if a in local and b in local] if keep_ties else []
        if len(kept) < 2 or not (pairs or ties):
            st.skipped_comparisons += 1
            continue
        resp = [c.responses[i] for i in kept.values()]
        ex = RMExample(c.task_id, c.source, [seqs[i] for i in kept.values()], list(kept),
                       [len(r.content) for r in resp], [r.policy for r in resp], pairs, ties)
        st.pairs += len(pairs)
        st.ties += len(ties)
        st.by_k[ex.k] = st.by_k.get(ex.k, 0) + 1
        out.append(ex)
    return out, st


def render_scored(tok: Any, prompt: list[dict], reply: str, seq_len: int, finished: bool = True
                  ) -> tuple[list[int], bool, bool]:
    """One (prompt, reply) for scoring: (ids, prompt truncated, hard-clipped).

    Same policy as training (an unfinished reply has no end-of-turn tokens); a reply too long even then is
    kept as its last `seq_len` tokens (scoring must return a number, e.g. for a PPO rollout) and reported
    as clipped.
    """
    (ids,), dropped = render_replies(tok, prompt, [reply], seq_len, [finished])
    if ids is not None:
        return ids, dropped > 0, False
    head, cuts = _cut_points(prompt)
    return _render_reply(tok, head + prompt[cuts[-1]:], reply, finished)[-seq_len:], dropped > 0, True


# ----------------------------------------------------------------------------- batches


def pad_batch(seqs: list[list[int]], pad_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """input_ids, attention_mask and position_ids (0 at each sequence's first real token)."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    pos = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if padding_side == "right" else slice(T - len(s), T)
        ids[i, sl] = torch.tensor(s, dtype=torch.long)
        mask[i, sl] = 1
        pos[i, sl] = torch.arange(len(s))
    return {"input_ids": ids, "attention_mask": mask, "position_ids": pos}


def collate_comparisons(examples: list[RMExample], pad_id: int, device: torch.device | None = None,
                        flat: bool = False) -> dict[str, Any]:
    """One micro-batch: sequences plus (better, worse, margin, weight) index tensors over them.

    K-wise (default): each reply once. Flat: TRL's layout, [chosen of every pair..., rejected of every pair...].
    """
    seqs: list[list[int]] = []
    better, worse, margin, weight, tie_a, tie_b, tie_w = [], [], [], [], [], [], []
    if not flat:
        for ex in examples:
            off = len(seqs)
            seqs += ex.seqs
            for b, w, m in ex.pairs:
                better += [off + b]
                worse += [off + w]
                margin += [m]
                weight += [ex.weight]
            for a, b in ex.ties:
                tie_a += [off + a]
                tie_b += [off + b]
                tie_w += [ex.weight]
    else:
        chosen, rejected = [], []
        for ex in examples:
            for b, w, m in ex.pairs:
                chosen += [ex.seqs[b]]
                rejected += [ex.seqs[w]]
                margin += [m]
                weight += [ex.weight]
        for ex in examples:  # tied pairs after all ordered pairs, so better/worse stay aranges
            for a, b in ex.ties:
                chosen += [ex.seqs[a]]
                rejected += [ex.seqs[b]]
                tie_w += [ex.weight]
        n_pairs, n = len(margin), len(chosen)
        seqs = chosen + rejected
        better, worse = list(range(n_pairs)), [n + i for i in range(n_pairs)]
        tie_a, tie_b = list(range(n_pairs, n)), [n + i for i in range(n_pairs, n)]
    batch: dict[str, Any] = pad_batch(seqs, pad_id)
    batch.update({
        "better": torch.tensor(better, dtype=torch.long), "worse": torch.tensor(worse, dtype=torch.long),
        "margin": torch.tensor(margin, dtype=torch.float32), "weight": torch.tensor(weight, dtype=torch.float32),
        "tie_a": torch.tensor(tie_a, dtype=torch.long), "tie_b": torch.tensor(tie_b, dtype=torch.long),
        "tie_weight": torch.tensor(tie_w, dtype=torch.float32),
    })
    if device is not None:
        batch = {k: v.to(device) for k, v in batch.items()}
    batch["n_prompts"] = len(examples)
    return batch


class ComparisonLoader(EpochLoader):
    """Micro-batches of comparisons (all K replies of each), resumable (data/sampler.py)."""

    def __init__(self, examples: list[RMExample], batch_size: int, pad_id: int, seed: int, rank: int = 0,
                 world_size: int = 1, device: torch.device | None = None, flat: bool = False):
        self.examples = examples
        super().__init__(len(examples), batch_size, lambda idx: collate_comparisons(
            [examples[int(i)] for i in idx], pad_id, device, flat), seed, rank, world_size,
            what="usable training comparisons")


# ----------------------------------------------------------------------------- rewards and loss


def sequence_rewards(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """One scalar per sequence: the score head at the last real token ([N] float32).

    HF's *ForSequenceClassification pools at the rightmost token that is not `config.pad_token_id`, which is
    the last real token for right or left padding as long as the pad id never ends a real sequence
    (`rm.ensure_pad_token` guarantees that).
    """
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], use_cache=False)
    return out.logits[:, 0].float()


def pairwise_loss(rewards: torch.Tensor, batch: dict[str, Any], tie_weight: float = 0.0
                  ) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted K-wise loss from rewards (module docstring) and TRL-named stats."""
    d = rewards[batch["better"]] - rewards[batch["worse"]]
    losses = -F.logsigmoid(d - batch["margin"])
    loss = (losses * batch["weight"]).sum() / batch["n_prompts"]
    if tie_weight > 0 and batch["tie_a"].numel():
        gap = rewards[batch["tie_a"]] - rewards[batch["tie_b"]]
        loss = loss + tie_weight * (gap.pow(2) * batch["tie_weight"]).sum() / batch["n_prompts"]
    with torch.no_grad():
        stats = {"rewards/chosen": float(rewards[batch["better"]].mean()),
                 "rewards/rejected": float(rewards[batch["worse"]].mean()),
                 "rewards/accuracies": float((d > 0).float().mean()),
                 "rewards/margins": float(d.mean())} if d.numel() else {}
    return loss, stats


def rm_loss(model: Any, batch: dict[str, Any], tie_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, float], int]:
    """Forward the micro-batch once; (loss, stats, real tokens)."""
    rewards = sequence_rewards(model, batch)
    loss, stats = pairwise_loss(rewards, batch, tie_weight)
    return loss, stats, int(batch["attention_mask"].sum())


@torch.no_grad()
def score_sequences(model: Any, seqs: list[list[int]], pad_id: int, batch_size: int,
                    device: torch.device | str = "cpu") -> list[float]:
    """Raw rewards of token sequences, batched by length (less padding), returned in input order. Each distinct
    sequence is scored once (a panel's comparisons repeat the same K replies once per labeler)."""
    first: dict[tuple[int, ...], int] = {}
    slot = [first.setdefault(tuple(s), len(first)) for s in seqs]
    unique = [list(k) for k in first]
    order = sorted(range(len(unique)), key=lambda i: len(unique[i]))
    scores = [0.0] * len(unique)
    for s in range(0, len(order), max(1, batch_size)):
        idx = order[s: s + batch_size]
        batch = {k: v.to(device) for k, v in pad_batch([unique[i] for i in idx], pad_id).items()}
        for i, r in zip(idx, sequence_rewards(model, batch).tolist()):
            scores[i] = r
    return [scores[j] for j in slot]


def most_common_policy(examples: list[RMExample]) -> str:
    """The policy that produced most replies (the SFT samples in round 1); '' if none is recorded."""
    counts = Counter(p for ex in examples for p in ex.policies if p)
    return counts.most_common(1)[0][0] if counts else ""
