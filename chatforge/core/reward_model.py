"""Reward models as frozen scorers: load one, its stored normalisation, and score texts or token ids.

Shared by the RM stages (stages/rm.py trains and fits the normalisation, stages/rm_eval.py evaluates)
and by the RL reward sources (core/rewards.py), so it sits below both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from chatforge.core.distributed import pick_device
from chatforge.core.io import UserError
from chatforge.core.model import resolve_model_path
from chatforge.core.tokenizer import load_tokenizer
from chatforge.data.rm_data import render_scored, score_sequences

DEFAULT_BATCH = 16

REWARD_NORM_FILE = "reward_norm.json"


@dataclass
class RewardNorm:
    """Affine normalisation of raw rewards, fitted on the SFT policy's replies after training."""

    mean: float = 0.0
    std: float = 1.0
    n: int = 0
    policy: str = ""
    divide_std: bool = False

    def apply(self, raw: float | torch.Tensor) -> float | torch.Tensor:
        r = raw - self.mean
        return r / self.std if self.divide_std and self.std > 0 else r

    @classmethod
    def load(cls, model_dir: Path) -> RewardNorm:
        """The stored normalisation, or the identity for an RM without one (e.g. trained elsewhere)."""
        p = Path(model_dir) / REWARD_NORM_FILE
        if not p.exists():
            return cls()
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
            return cls(**{k: d[k] for k in ("mean", "std", "n", "policy", "divide_std") if k in d})
        except (json.JSONDecodeError, TypeError) as e:
            raise UserError(f"{p}: corrupt reward normalisation ({e})") from None


def load_reward_model(spec: str, device: str | torch.device = "auto") -> tuple[Any, Any, RewardNorm]:
    """(model in eval mode, tokenizer, normalisation) from a run dir, HF dir or name."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    if isinstance(device, str):
        device = pick_device(device)
    path = resolve_model_path(spec)
    cfg = AutoConfig.from_pretrained(str(path))
    archs = getattr(cfg, "architectures", None) or []
    if getattr(cfg, "num_labels", 0) != 1 or not any(a.endswith("ForSequenceClassification") for a in archs):
        raise UserError(f"{path} is not a reward model (expected a 1-label *ForSequenceClassification, got "
                        f"{', '.join(archs) or 'no architecture'}); train one with `chatforge rm train`")
    model = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=torch.float32)
    tok = load_tokenizer(path)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    return model.to(device).eval(), tok, RewardNorm.load(path)


def score_length(model: Any, seq_len: int | None) -> int:
    """Tokens a reward model scores: `seq_len` capped at its context (the context when None)."""
    ctx = getattr(model.config.get_text_config(), "max_position_embeddings", None) or 2048
    return min(seq_len or ctx, ctx)


def score_texts(model: Any, tok: Any, prompts: list[list[dict]], replies: list[str], norm: RewardNorm | None,
                batch_size: int = DEFAULT_BATCH, seq_len: int | None = None, stats: dict | None = None,
                finished: list[bool] | None = None) -> list[float]:
    """Normalised reward of each (prompt messages, reply text); batched, no grad.

    `finished[i]` False marks reply i as cut off at the length limit (scored without the end-of-turn tokens,
    as the RM was trained; data/rm_data.py). `stats`, if given, receives counts of truncated prompts and
    clipped replies.
    """
    if len(prompts) != len(replies):
        raise ValueError(f"{len(prompts)} prompts but {len(replies)} replies")
    ended = finished if finished is not None else [True] * len(replies)
    if len(ended) != len(replies):
        raise ValueError(f"{len(replies)} replies but {len(ended)} finished flags")
    limit = score_length(model, seq_len)
    seqs, truncated, clipped = [], 0, 0
    for p, r, e in zip(prompts, replies, ended):
        ids, cut, clip = render_scored(tok, p, r, limit, e)
        seqs.append(ids)
        truncated, clipped = truncated + cut, clipped + clip
    if stats is not None:
        stats.update(truncated=stats.get("truncated", 0) + truncated, clipped=stats.get("clipped", 0) + clipped)
    device = next(model.parameters()).device
    raw = score_sequences(model, seqs, model.config.pad_token_id, batch_size, device)
    norm = norm or RewardNorm()
    return [norm.apply(x) for x in raw]


def score_token_ids(model: Any, seqs: list[list[int]], norm: RewardNorm | None,
                    batch_size: int = DEFAULT_BATCH) -> list[float]:
    """Normalised reward of already-rendered conversations (the RM's token ids, within its context); no grad."""
    device = next(model.parameters()).device
    with torch.no_grad():
        raw = score_sequences(model, seqs, model.config.pad_token_id, batch_size, device)
    norm = norm or RewardNorm()
    return [norm.apply(x) for x in raw]
