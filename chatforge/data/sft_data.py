"""SFT batches: render conversations, truncate by whole turns, pack, and iterate resumably.

Rendering goes through `render_conversation` (the one renderer). Each example becomes
inputs = ids[:-1], targets = ids[1:] with -100 where the target is not an assistant token.

Truncation policy (`truncation`): a conversation longer than `seq_len + 1` tokens is never cut in
the middle of the template. With "turns" (default), trailing turns are dropped until it fits and
still ends with an assistant turn; if even the first exchange does not fit it is skipped. With
"drop", it is skipped. Skips are counted and reported.

Packing puts several examples in one row (first-fit decreasing); each keeps its own position ids
(restarting at 0) and a block-diagonal causal mask, so no token attends across examples and a
packed batch gives the same per-token loss as each example run alone.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from chatforge.core.io import UserError
from chatforge.core.tokenizer import IGNORE_INDEX, render_conversation
from chatforge.data.sampler import EpochLoader


@dataclass
class Row:
    """One training row: concatenated examples with per-example positions and segment ids."""

    inputs: list[int] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    segments: list[int] = field(default_factory=list)

    def add(self, inputs: list[int], targets: list[int]) -> None:
        seg = (self.segments[-1] + 1) if self.segments else 1
        self.inputs += inputs
        self.targets += targets
        self.positions += list(range(len(inputs)))
        self.segments += [seg] * len(inputs)


@dataclass
class RenderStats:
    conversations: int = 0
    truncated: int = 0
    skipped_too_long: int = 0
    skipped_no_target: int = 0
    tokens: int = 0
    target_tokens: int = 0


def load_conversations(specs: list[str]) -> list[dict]:
    """Conversation dicts from data specs: a JSONL path, `embedded:NAME[:N]` (the first N records), or
    `tasks:N` (N demos per family)."""
    from chatforge.data.convert import load_conversations as read_any

    convs: list[dict] = []
    for spec in specs:
        if spec.startswith("tasks:"):
            from chatforge.data.tasks import demonstrations

            try:
                n = int(spec.split(":", 1)[1])
            except ValueError:
                raise UserError(f"data spec '{spec}': expected tasks:N (demonstrations per family)") from None
            convs += demonstrations(n_per_family=n, seed=0, split="train")
            continue
        limit = None
        if spec.startswith("embedded:"):
            from chatforge.data.embedded import embedded_path

            name, _, n = spec.split(":", 1)[1].partition(":")
            if n and not n.isdigit():
                raise UserError(f"data spec '{spec}': expected embedded:NAME or embedded:NAME:N")
            path, limit = embedded_path(name), int(n) if n else None
        else:
            path = Path(spec)
        records, _ = read_any(path)  # chatforge, OpenAI, TRL, HH, OASST or self-instruct files
        convs += [c.to_dict() if hasattr(c, "to_dict") else c for c in records[:limit]]
    if not convs:
        raise UserError("no conversations to train on (give --data PATH, embedded:NAME or tasks:N)")
    return convs


def split_train_val(convs: list[dict], val_fraction: float) -> tuple[list[dict], list[dict]]:
    """Deterministic split by a hash of the conversation's messages."""
    def bucket(c: dict) -> float:
        h = hashlib.sha1(repr(c["messages"]).encode()).hexdigest()
        return int(h[:8], 16) / 0xFFFFFFFF

    train = [c for c in convs if bucket(c) >= val_fraction]
    val = [c for c in convs if bucket(c) < val_fraction]
    if not val and val_fraction > 0 and len(train) > 1:
        val, train = train[:1], train[1:]
    return train, val


def _fit_turns(tok: Any, messages: list[dict], seq_len: int) -> tuple[list[int], list[int]] | None:
    """Drop trailing turns until the rendering fits and still ends with an assistant turn."""
    ends = [i + 1 for i, m in enumerate(messages) if m["role"] == "assistant"]
    for end in reversed(ends[:-1]):
        ids, mask = render_conversation(tok, messages[:end])
        if len(ids) <= seq_len + 1:
            return ids, mask
    return None


def render_examples(tok: Any, convs: list[dict], seq_len: int, truncation: str = "turns"
                    ) -> tuple[list[tuple[list[int], list[int]]], RenderStats]:
    """(inputs, targets) per conversation, with the truncation policy above applied and counted."""
    out, st = [], RenderStats()
    for c in convs:
        st.conversations += 1
        ids, mask = render_conversation(tok, c["messages"])
        if len(ids) > seq_len + 1:
            fitted = _fit_turns(tok, c["messages"], seq_len) if truncation == "turns" else None
            if fitted is None:
                st.skipped_too_long += 1
                continue
            ids, mask = fitted
            st.truncated += 1
        targets = [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])]
        n_target = sum(1 for t in targets if t != IGNORE_INDEX)
        if n_target == 0:
            st.skipped_no_target += 1
            continue
        st.tokens += len(ids) - 1
        st.target_tokens += n_target
        out.append((ids[:-1], targets))
    return out, st


def pack(examples: list[tuple[list[int], list[int]]], seq_len: int, packing: bool = True) -> list[Row]:
    """First-fit decreasing into rows of at most seq_len tokens (one example per row without packing)."""
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i][0]), i))
    rows: list[Row] = []
    free: list[int] = []
    for i in order:
        inputs, targets = examples[i]
        slot = next((r for r, f in enumerate(free) if f >= len(inputs)), None) if packing else None
        if slot is None:
            rows.append(Row())
            free.append(seq_len)
            slot = len(rows) - 1
        rows[slot].add(inputs, targets)
        free[slot] -= len(inputs)
    return rows


def collate(rows: list[Row], pad_id: int, device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """Right-pad rows; build position ids and a [B, 1, T, T] block-diagonal causal mask."""
    T = max(len(r.inputs) for r in rows)
    B = len(rows)
    inputs = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((B, T), dtype=torch.long)
    segments = torch.zeros((B, T), dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r.inputs)
        inputs[b, :n] = torch.tensor(r.inputs)
        targets[b, :n] = torch.tensor(r.targets)
        positions[b, :n] = torch.tensor(r.positions)
        segments[b, :n] = torch.tensor(r.segments)
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    same = segments[:, :, None] == segments[:, None, :]
    mask = (causal[None] & same & (segments[:, None, :] > 0))[:, None]
    # padded query rows would attend to nothing (NaN in softmax): let them see themselves
    mask = mask | torch.eye(T, dtype=torch.bool)[None, None]
    batch = {"input_ids": inputs, "targets": targets, "position_ids": positions, "attention_mask": mask,
             "num_tokens": torch.tensor(sum(len(r.inputs) for r in rows))}
    return {k: v.to(device) for k, v in batch.items()} if device is not None else batch


class RowLoader(EpochLoader):
    """Batches of packed SFT rows, resumable (data/sampler.py)."""

    def __init__(self, rows: list[Row], batch_size: int, pad_id: int, seed: int, rank: int = 0,
                 world_size: int = 1, device: torch.device | None = None):
        self.rows = rows
        super().__init__(len(rows), batch_size, lambda idx: collate([rows[int(i)] for i in idx], pad_id, device),
                         seed, rank, world_size, what="training rows")


def token_losses(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy [B, T] (0 where target is ignored) and the target mask."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"]).logits.float()
    t = batch["targets"]
    valid = t != IGNORE_INDEX
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), t.clamp_min(0), reduction="none")
    return losses * valid, valid


def target_count(batch: dict[str, torch.Tensor]) -> int:
    """Assistant target tokens in a batch (the SFT loss is their mean over the global batch)."""
    return int((batch["targets"] != IGNORE_INDEX).sum())


def sft_loss(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over assistant target tokens; the count returned is all tokens processed
    (what throughput is measured in), not only the assistant targets."""
    losses, valid = token_losses(model, batch)
    return losses.sum() / max(1, int(valid.sum())), int(batch["num_tokens"])
