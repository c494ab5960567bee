"""DPO data: preference pairs from K-wise comparisons, batched TRL-style, with reference log-probs.

A comparison ranks K replies to one prompt; `comparison_pairs` expands it into every (better, worse)
pair the ranking implies (ties give none), and each pair is one DPO example. A pair is stored as
token ids: the prompt rendered for completion, then each reply's tokens up to and including the
end-of-turn token (what `render_conversation` masks for the final assistant turn). Every reply token
is scored; the template's tail after end-of-turn is not part of the sequence.

Too long for `seq_len` (prompt + longer reply): the prompt is cut from the left by whole turns (a
system message stays, the kept prompt starts with a user turn), as little as this pair needs. A
pair whose replies do not fit even after the prompt's last user turn alone is skipped. Counted.

Two batch layouts, same loss (the test checks both against a by-hand computation):

- "pairs" (TRL's `DataCollatorForPreference`): rows [chosen_1..chosen_B, rejected_1..rejected_B],
  each prompt + reply. We pad on the left, so every reply ends at the last column and the forward
  asks the model for logits of the last R+1 columns only (`logits_to_keep`), never the prompt's.
- "packed": the prompt is forwarded once per pair and several pairs share a row with no padding
  between them (TRL 1.16 has no working padding-free mode for DPO). Each reply segment starts with a
  copy of the prompt's last token, so all scored logits sit at the right end of the row; a block mask
  keeps pairs, and a pair's two replies, from seeing each other. See `collate_packed`.

Reference log-probs (the sum over reply tokens under the starting policy) are computed once before
training and kept on each pair (`ref_chosen`, `ref_rejected`); the stage also stores them in the
run dir so a resumed run uses the very same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from chatforge.core.io import UserError
from chatforge.core.rl import logprobs_from_logits, sequence_logps
from chatforge.core.tokenizer import IGNORE_INDEX, render_conversation
from chatforge.data.formats import Comparison, comparison_pairs
from chatforge.data.sampler import EpochLoader


@dataclass
class PrefPair:
    """One preference pair as token ids; ref_* are reference log-prob sums over the reply tokens."""

    task_id: str
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    ref_chosen: float = math.nan
    ref_rejected: float = math.nan

    @property
    def tokens(self) -> int:
        """Tokens in the TRL layout (prompt counted twice)."""
        return 2 * len(self.prompt) + len(self.chosen) + len(self.rejected)


@dataclass
class PrefDataStats:
    comparisons: int = 0
    pairs: int = 0
    truncated_pairs: int = 0
    """Pairs whose prompt lost old turns to fit seq_len."""
    skipped_too_long: int = 0
    """Pairs skipped: a reply does not fit even after the prompt's last user turn alone."""
    no_pairs: int = 0
    """Comparisons with no ordered pair (all replies tied)."""
    by_k: dict[int, int] = field(default_factory=dict)


# ----------------------------------------------------------------------------- rendering


def split_reply(tok: Any, prompt: list[dict], reply: str) -> tuple[list[int], list[int]]:
    """(prompt ids, reply ids): the rendering of prompt + reply, split where the final assistant turn starts.

    The reply ids are the final turn's masked span (content + end-of-turn). `render_conversation` has
    checked that the prompt part equals `render_for_completion(prompt)`, so the model sees at training
    time exactly the context it continues at sampling time.
    """
    ids, mask = render_conversation(tok, prompt + [{"role": "assistant", "content": reply}])
    end = max(i for i, m in enumerate(mask) if m) + 1
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    return ids[:start], ids[start:end]


def _cut_points(prompt: list[dict]) -> tuple[list[dict], list[int]]:
    """(system head, start indices we may cut the prompt body at: each user turn, oldest first)."""
    head = prompt[:1] if prompt and prompt[0]["role"] == "system" else []
    cuts = [i for i in range(len(head), len(prompt)) if prompt[i]["role"] == "user"]
    return head, cuts or [len(head)]


def _pairs_of(tok: Any, c: Comparison, seq_len: int, st: PrefDataStats) -> list[PrefPair]:
    """The pairs of one comparison; each prompt is cut only as far as its own pair needs."""
    prompt = c.prompt_dicts()
    head, cuts = _cut_points(prompt)
    content = {r.response_id: r.content for r in c.responses}
    cache: dict[tuple[int, str], tuple[list[int], list[int]]] = {}

    def render(cut: int, rid: str) -> tuple[list[int], list[int]]:
        if (cut, rid) not in cache:
            cache[(cut, rid)] = split_reply(tok, head + prompt[cuts[cut]:], content[rid])
        return cache[(cut, rid)]

    out = []
    for better, worse in comparison_pairs(c):
        for cut in range(len(cuts)):
            p, chosen = render(cut, better)
            _, rejected = render(cut, worse)
            if len(p) + max(len(chosen), len(rejected)) <= seq_len:
                out.append(PrefPair(c.task_id, p, chosen, rejected))
                st.truncated_pairs += cut > 0
                break
        else:
            st.skipped_too_long += 1
    return out


def build_pairs(tok: Any, cmps: list[Comparison], seq_len: int) -> tuple[list[PrefPair], PrefDataStats]:
    """Every ordered pair of every comparison, rendered under the truncation policy above; counted."""
    out: list[PrefPair] = []
    st = PrefDataStats()
    for c in cmps:
        st.comparisons += 1
        st.by_k[len(c.responses)] = st.by_k.get(len(c.responses), 0) + 1
        if not comparison_pairs(c):
            st.no_pairs += 1
            continue
        out += _pairs_of(tok, c, seq_len, st)
    st.pairs = len(out)
    return out, st


# ----------------------------------------------------------------------------- batches


def _ref_tensors(pairs: list[PrefPair]) -> dict[str, torch.Tensor]:
    return {
        "ref_chosen": torch.tensor([p.ref_chosen for p in pairs], dtype=torch.float32),
        "ref_rejected": torch.tensor([p.ref_rejected for p in pairs], dtype=torch.float32),
        "chosen_len": torch.tensor([len(p.chosen) for p in pairs], dtype=torch.float32),
        "rejected_len": torch.tensor([len(p.rejected) for p in pairs], dtype=torch.float32),
    }


def collate_pairs(pairs: list[PrefPair], pad_id: int) -> dict[str, Any]:
    """TRL layout, left-padded: rows [chosen..., rejected...]; labels cover the last R columns (R = longest reply)."""
    seqs = [p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs]
    replies = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    T, R = max(len(s) for s in seqs), max(len(r) for r in replies)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    pos = torch.zeros((len(seqs), T), dtype=torch.long)
    labels = torch.full((len(seqs), R), IGNORE_INDEX, dtype=torch.long)
    for i, (s, r) in enumerate(zip(seqs, replies)):
        ids[i, T - len(s):] = torch.tensor(s)
        mask[i, T - len(s):] = 1
        pos[i, T - len(s):] = torch.arange(len(s))
        labels[i, R - len(r):] = torch.tensor(r)
    return {"layout": "pairs", "input_ids": ids, "attention_mask": mask, "position_ids": pos, "labels": labels,
            "n_tokens": sum(len(s) for s in seqs), **_ref_tensors(pairs)}


def _pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: pair indices per row, each row's total length <= capacity."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        slot = next((r for r, f in enumerate(free) if f >= lengths[i]), None)
        if slot is None:
            rows.append([])
            free.append(capacity)
            slot = len(rows) - 1
        rows[slot].append(i)
        free[slot] -= lengths[i]
    return rows


def collate_packed(pairs: list[PrefPair], pad_id: int) -> dict[str, Any]:
    """Prompt once per pair, several pairs per row, no padding between them.

    A row holds, for each of its pairs, the prompt body (all prompt tokens but the last) on the left and,
    on the right, two reply segments [last prompt token, chosen...] and [last prompt token, rejected...];
    rows are left-padded so every row's reply region ends at the last column and only those columns need
    logits. A [rows, 1, T, T] mask lets a token see its own pair's prompt body and the earlier tokens of
    its own segment; position ids continue from the prompt in both segments. `gather` maps the kept
    logits to a [2B, R] grid (chosen rows, then rejected rows) for `sequence_logps`.
    """
    B = len(pairs)
    lengths = [len(p.prompt) + len(p.chosen) + len(p.rejected) + 1 for p in pairs]
    capacity = 2 * max(len(p.prompt) + max(len(p.chosen), len(p.rejected)) for p in pairs)
    rows = _pack_rows(lengths, capacity)
    T = max(sum(lengths[i] for i in row) for row in rows)
    W = max(sum(len(pairs[i].chosen) + len(pairs[i].rejected) + 2 for i in row) for row in rows)
    R = max(max(len(p.chosen), len(p.rejected)) for p in pairs)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), T), dtype=torch.long)
    owner = torch.zeros((len(rows), T), dtype=torch.long)  # pair index + 1 (0 = pad)
    seg = torch.zeros((len(rows), T), dtype=torch.long)  # 1 prompt body, 2 chosen segment, 3 rejected segment
    labels = torch.full((len(rows), W), IGNORE_INDEX, dtype=torch.long)
    gather_row = torch.zeros((2 * B, R), dtype=torch.long)
    gather_col = torch.zeros((2 * B, R), dtype=torch.long)
    for r, row in enumerate(rows):
        n_body = sum(len(pairs[i].prompt) - 1 for i in row)
        col = T - sum(lengths[i] for i in row)
        reply_col = col + n_body
        for i in row:
            p = pairs[i]
            body = p.prompt[:-1]
            ids[r, col: col + len(body)] = torch.tensor(body, dtype=torch.long)
            pos[r, col: col + len(body)] = torch.arange(len(body))
            owner[r, col: col + len(body)], seg[r, col: col + len(body)] = i + 1, 1
            col += len(body)
            for s, reply, out_row in ((2, p.chosen, i), (3, p.rejected, B + i)):
                toks = [p.prompt[-1]] + reply
                ids[r, reply_col: reply_col + len(toks)] = torch.tensor(toks, dtype=torch.long)
                pos[r, reply_col: reply_col + len(toks)] = torch.arange(len(body), len(body) + len(toks))
                owner[r, reply_col: reply_col + len(toks)], seg[r, reply_col: reply_col + len(toks)] = i + 1, s
                # the logit at column c scores the token at c + 1 (same segment); kept columns start at T - W
                k = reply_col - (T - W)
                labels[r, k: k + len(reply)] = torch.tensor(reply, dtype=torch.long)
                gather_row[out_row, : len(reply)] = r
                gather_col[out_row, : len(reply)] = torch.arange(k, k + len(reply))
                reply_col += len(toks)
    same = owner[:, :, None] == owner[:, None, :]
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    sk, sq = seg[:, None, :], seg[:, :, None]
    visible = causal[None] & same & (owner[:, :, None] > 0) & ((sk == 1) | (sk == sq))
    visible = (visible | torch.eye(T, dtype=torch.bool)[None])[:, None]  # pad rows see themselves (no NaN)
    reply_len = torch.tensor([len(p.chosen) for p in pairs] + [len(p.rejected) for p in pairs])
    valid = torch.arange(R)[None, :] < reply_len[:, None]
    return {"layout": "packed", "input_ids": ids, "attention_mask": visible, "position_ids": pos, "labels": labels,
            "gather_row": gather_row, "gather_col": gather_col, "gather_valid": valid,
            "n_tokens": sum(lengths), **_ref_tensors(pairs)}


COLLATE: dict[str, Callable[[list[PrefPair], int], dict[str, Any]]] = {
    "pairs": collate_pairs,
    "packed": collate_packed,
}


def collate(pairs: list[PrefPair], pad_id: int, layout: str = "pairs", device: torch.device | None = None
            ) -> dict[str, Any]:
    """A micro-batch in `layout`, tensors moved to `device`."""
    if layout not in COLLATE:
        raise UserError(f"unknown DPO batch layout '{layout}'; choose one of {', '.join(COLLATE)}")
    batch = COLLATE[layout](pairs, pad_id)
    return {k: v.to(device) if isinstance(v, torch.Tensor) and device is not None else v for k, v in batch.items()}


# ----------------------------------------------------------------------------- log-probs


def _logps_pairs(model: Any, batch: dict[str, Any], average: bool) -> tuple[torch.Tensor, torch.Tensor]:
    labels = batch["labels"]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], logits_to_keep=labels.shape[1] + 1, use_cache=False)
    logps = logprobs_from_logits(out.logits[:, :-1], labels)  # logits of column t score the token at t + 1
    seq = sequence_logps(logps, labels != IGNORE_INDEX, average)
    return seq.chunk(2)


def _logps_packed(model: Any, batch: dict[str, Any], average: bool) -> tuple[torch.Tensor, torch.Tensor]:
    labels = batch["labels"]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], logits_to_keep=labels.shape[1], use_cache=False)
    grid = logprobs_from_logits(out.logits, labels)  # labels are already aligned with the kept logits
    logps = grid[batch["gather_row"], batch["gather_col"]]  # [2B, R]: chosen rows, then rejected rows
    return sequence_logps(logps, batch["gather_valid"], average).chunk(2)


LOGPS: dict[str, Callable[[Any, dict[str, Any], bool], tuple[torch.Tensor, torch.Tensor]]] = {
    "pairs": _logps_pairs,
    "packed": _logps_packed,
}


def policy_logps(model: Any, batch: dict[str, Any], average: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen [B], rejected [B]) sequence log-probs of the replies: sums over reply tokens, or means."""
    return LOGPS[batch["layout"]](model, batch, average)


def reference_logps(batch: dict[str, Any], average: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The precomputed reference sums from the batch, divided by reply length when `average`."""
    if average:
        return batch["ref_chosen"] / batch["chosen_len"], batch["ref_rejected"] / batch["rejected_len"]
    return batch["ref_chosen"], batch["ref_rejected"]


@torch.no_grad()
def compute_reference(model: Any, pairs: list[PrefPair], pad_id: int, batch_size: int, layout: str,
                      device: torch.device, amp: torch.dtype | None = None) -> list[tuple[float, float]]:
    """Reference log-prob sums (chosen, rejected) for each pair, in input order; batched by length.

    Call it on the starting policy in eval mode (with LoRA, inside `disable_adapter()`).
    """
    from chatforge.core.train import autocast

    order = sorted(range(len(pairs)), key=lambda i: pairs[i].tokens)
    out: list[tuple[float, float]] = [(math.nan, math.nan)] * len(pairs)
    for s in range(0, len(order), max(1, batch_size)):
        idx = order[s: s + batch_size]
        batch = collate([pairs[i] for i in idx], pad_id, layout, device)
        with autocast(amp, device):
            c, r = policy_logps(model, batch)
        for i, a, b in zip(idx, c.tolist(), r.tolist()):
            out[i] = (a, b)
    return out


# ----------------------------------------------------------------------------- loader


class PairLoader(EpochLoader):
    """Micro-batches of preference pairs, resumable (data/sampler.py)."""

    def __init__(self, pairs: list[PrefPair], batch_size: int, pad_id: int, seed: int, rank: int = 0,
                 world_size: int = 1, device: torch.device | None = None, layout: str = "pairs"):
        self.pairs = pairs
        super().__init__(len(pairs), batch_size, lambda idx: collate(
            [pairs[int(i)] for i in idx], pad_id, layout, device), seed, rank, world_size,
            what="usable training pairs")
