"""DPO data: preference pairs from K-wise comparisons, batched TRL-style, with reference log-probs.

A comparison ranks K replies to one prompt; `comparison_pairs` expands it into every (better, worse)
pair the ranking implies (ties give none), and each pair is one DPO example. A pair is stored as
token ids: the prompt rendered for completion, then each reply's tokens up to and including the
end-of-turn token (what `render_conversation` masks for the final assistant turn). Every reply token
is scored; the template's tail after end-of-turn is not part of the sequence.

Too long for `seq_len` (prompt + longer reply): the prompt is cut from the left by whole turns (a
system message stays, the kept prompt starts with a user turn), as little as this pair needs. A
pair whose replies do not fit even after the prompt's last user turn alone is skipped. Counted.

Two batch layouts, same loss (the test checks they agree):

- "pairs" (TRL's `DataCollatorForPreference`): rows [chosen_1..chosen_B, rejected_1..rejected_B],
  each prompt + reply. We pad on the left, so every reply ends at the last column and the forward
  asks the model for logits of the last R+1 columns only (`logits_to_keep`), never the prompt's.
- "shared_prompt": one row per pair, [prompt | chosen | rejected], each region padded to its batch
  maximum; a block mask lets rejected tokens see the prompt but not the chosen reply, and position
  ids restart after the prompt, so each reply is scored exactly as if it followed the prompt alone.
  The prompt is forwarded once instead of twice.

Reference log-probs (the sum over reply tokens under the starting policy) are computed once before
training and kept on each pair (`ref_chosen`, `ref_rejected`); the stage also stores them in the
run dir so a resumed run uses the very same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from chatforge.core.io import UserError
from chatforge.core.rl import logprobs_from_logits, sequence_logps
from chatforge.core.tokenizer import IGNORE_INDEX, render_conversation
from chatforge.data.formats import Comparison, comparison_pairs


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


def collate_shared_prompt(pairs: list[PrefPair], pad_id: int) -> dict[str, Any]:
    """One row per pair: [prompt (right-aligned) | chosen | rejected] with a [B, 1, T, T] block-causal mask."""
    A = max(len(p.prompt) for p in pairs)
    C = max(len(p.chosen) for p in pairs)
    R = max(len(p.rejected) for p in pairs)
    B, T = len(pairs), A + C + R
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    seg = torch.zeros((B, T), dtype=torch.long)  # 0 pad, 1 prompt, 2 chosen, 3 rejected
    labels_c = torch.full((B, C), IGNORE_INDEX, dtype=torch.long)
    labels_r = torch.full((B, R), IGNORE_INDEX, dtype=torch.long)
    for b, p in enumerate(pairs):
        n, c, r = len(p.prompt), len(p.chosen), len(p.rejected)
        for start, toks, s, first_pos in ((A - n, p.prompt, 1, 0), (A, p.chosen, 2, n), (A + C, p.rejected, 3, n)):
            ids[b, start: start + len(toks)] = torch.tensor(toks)
            pos[b, start: start + len(toks)] = torch.arange(first_pos, first_pos + len(toks))
            seg[b, start: start + len(toks)] = s
        labels_c[b, :c] = torch.tensor(p.chosen)
        labels_r[b, :r] = torch.tensor(p.rejected)
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    sq, sk = seg[:, :, None], seg[:, None, :]
    visible = causal[None] & (sq > 0) & ((sk == 1) | (sk == sq))
    # padded query rows would attend to nothing (NaN in softmax): let them see themselves
    visible = (visible | torch.eye(T, dtype=torch.bool)[None])[:, None]
    return {"layout": "shared_prompt", "input_ids": ids, "attention_mask": visible, "position_ids": pos,
            "labels_chosen": labels_c, "labels_rejected": labels_r, "prompt_width": A,
            "n_tokens": int((seg > 0).sum()), **_ref_tensors(pairs)}


COLLATE: dict[str, Callable[[list[PrefPair], int], dict[str, Any]]] = {
    "pairs": collate_pairs,
    "shared_prompt": collate_shared_prompt,
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


def _logps_shared_prompt(model: Any, batch: dict[str, Any], average: bool) -> tuple[torch.Tensor, torch.Tensor]:
    lc, lr = batch["labels_chosen"], batch["labels_rejected"]
    C, A = lc.shape[1], batch["prompt_width"]
    # keep columns A-1 .. T-2: the last prompt column predicts the first token of *both* replies
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], logits_to_keep=batch["input_ids"].shape[1] - A + 1,
                use_cache=False)
    logits = out.logits[:, :-1]
    chosen = logprobs_from_logits(logits[:, :C], lc)
    rejected = logprobs_from_logits(torch.cat([logits[:, :1], logits[:, C + 1:]], dim=1), lr)
    return (sequence_logps(chosen, lc != IGNORE_INDEX, average),
            sequence_logps(rejected, lr != IGNORE_INDEX, average))


LOGPS: dict[str, Callable[[Any, dict[str, Any], bool], tuple[torch.Tensor, torch.Tensor]]] = {
    "pairs": _logps_pairs,
    "shared_prompt": _logps_shared_prompt,
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


class PairLoader:
    """Micro-batches of pairs in a per-epoch order drawn from (seed, epoch); rank r takes its own slice."""

    def __init__(self, pairs: list[PrefPair], batch_size: int, pad_id: int, seed: int, rank: int = 0,
                 world_size: int = 1, device: torch.device | None = None, layout: str = "pairs"):
        if len(pairs) < batch_size * world_size:
            raise UserError(f"only {len(pairs)} usable training pairs for a global batch of "
                            f"{batch_size * world_size}; add data or lower train.batch_size")
        self.pairs, self.batch_size, self.pad_id, self.seed = pairs, batch_size, pad_id, seed
        self.rank, self.world, self.device, self.layout = rank, world_size, device, layout
        self.epoch, self.cursor = 0, 0
        self._order = self._make_order()

    def _make_order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.pairs))

    def __iter__(self) -> PairLoader:
        return self

    def __next__(self) -> dict[str, Any]:
        per_step = self.batch_size * self.world
        if self.cursor + per_step > len(self.pairs):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._make_order()
        start = self.cursor + self.rank * self.batch_size
        idx = self._order[start: start + self.batch_size]
        self.cursor += per_step
        return collate([self.pairs[int(i)] for i in idx], self.pad_id, self.layout, self.device)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "n": len(self.pairs)}

    def load_state_dict(self, state: dict) -> None:
        if state["n"] != len(self.pairs):
            raise UserError("checkpoint was made on different preference data (pair count differs)")
        self.epoch, self.cursor, self.seed = state["epoch"], state["cursor"], state["seed"]
        self._order = self._make_order()
