"""Evaluation building blocks: replies to held-out prompts and task-suite accuracy per family.

(The full `chatforge eval` report — win rates, bias probes, curves — builds on these.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from chatforge.core.tokenizer import render_for_completion, stop_token_ids


def generate_replies(model: Any, tok: Any, prompts: list[dict], max_new_tokens: int = 48, temperature: float = 0.0,
                     seed: int = 0, batch_size: int = 32) -> tuple[list[str], list[str]]:
    """One reply per prompt (greedy by default) with the engine; returns (texts, finish reasons)."""
    return sample_replies(model, tok, prompts, max_new_tokens, temperature, seed, 1, batch_size)[0]


def sample_replies(model: Any, tok: Any, prompts: list[dict], max_new_tokens: int, temperature: float, seed: int,
                   num_samples: int, batch_size: int = 32) -> list[tuple[list[str], list[str]]]:
    """`num_samples` draws of one reply per prompt: draw j = (texts, finish reasons) with seed `seed + j`.

    Each prompt is prefilled once for all its draws (the engine repeats its KV cache; on 60-token task prompts
    and 32-token replies the prefill is most of the compute), and draw j equals a one-draw call with seed
    seed + j. The engine runs `batch_size` prompts at a time, grouped by length (held-out conversations range
    from 30 to 700 tokens: batched in file order, most of a batch's prefill is padding); every row has its own
    seed, so the replies do not depend on the grouping."""
    from chatforge.core.generation import SamplingParams, generate

    context = model.config.max_position_embeddings
    ids = [render_for_completion(tok, p["messages"])[-(context - max_new_tokens):] for p in prompts]
    params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
    with torch.inference_mode():
        gens = generate(model, ids, params, stop_token_ids=stop_token_ids(tok), pad_id=tok.pad_token_id,
                        tokenizer=tok, batch_size=batch_size, num_samples=num_samples)
    return [([g[j].text.strip() for g in gens], [g[j].finish_reason for g in gens]) for j in range(num_samples)]


def task_accuracy(prompts: list[dict], replies: list[str]) -> dict[str, dict]:
    """Mean checker score per task family (and overall) with counts."""
    from chatforge.data.tasks import check_conversation, find_family

    per: dict[str, list[float]] = {}
    for p, r in zip(prompts, replies):
        s = check_conversation(p, r)
        if s is None:
            continue
        per.setdefault(find_family(p).name, []).append(float(s))
    out = {f: {"accuracy": sum(v) / len(v), "n": len(v)} for f, v in sorted(per.items())}
    allv = [x for v in per.values() for x in v]
    out["all"] = {"accuracy": sum(allv) / max(1, len(allv)), "n": len(allv)}
    return out


def make_loglik_fn(model: Any, tok: Any, batch_size: int = 16) -> Callable[[list[str]], list[float]]:
    """Sum of token log-probs of each text after BOS (right-padded batches, no grad)."""
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ctx = model.config.max_position_embeddings

    def loglik(texts: list[str]) -> list[float]:
        out: list[float] = []
        for i in range(0, len(texts), batch_size):
            seqs = [(bos + tok.encode(t, add_special_tokens=False))[:ctx] for t in texts[i: i + batch_size]]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), pad, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for r, s in enumerate(seqs):
                ids[r, : len(s)] = torch.tensor(s)
                mask[r, : len(s)] = 1
            with torch.inference_mode():
                logits = model(input_ids=ids, attention_mask=mask).logits.float()
            lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            out += (lp * mask[:, 1:]).sum(1).tolist()
        return out

    return loglik


def make_continue_fn(model: Any, tok: Any, max_new_tokens: int = 32) -> Callable[[list[str]], list[str]]:
    """Greedy plain-text continuation (no chat template) with the engine, continuation only."""
    from chatforge.core.generation import SamplingParams, generate
    from chatforge.core.tokenizer import stop_token_ids

    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    ctx = model.config.max_position_embeddings

    def cont(prompts: list[str]) -> list[str]:
        ids = [(bos + tok.encode(p, add_special_tokens=False))[-(ctx - max_new_tokens):] for p in prompts]
        params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, seed=0)
        with torch.inference_mode():
            gens = generate(model, ids, params, stop_token_ids=stop_token_ids(tok), pad_id=tok.pad_token_id,
                            tokenizer=tok)
        return [g[0].text or "" for g in gens]

    return cont
