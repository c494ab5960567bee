"""Sample K replies per prompt into ranking tasks (the input to people or simulated labelers).

    chatforge sample --model runs/sft --prompts prompts.jsonl --k 4 --out tasks.jsonl
    chatforge sample --model runs/sft --prompts tasks:50 --k 4 --out tasks.jsonl   # task-suite prompts

Each prompt is prefilled once and its KV cache repeated K times (core/generation.py). Identical
replies are collapsed. A prompt's seed is derived from (seed, prompt id), so the output does not
depend on batching, and a partial output file is resumed: finished prompts are skipped and new
tasks are appended (a torn last line from a killed run is dropped first), never duplicated.
Prompts that do not leave room for `max_new_tokens` in the context are skipped and counted.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from chatforge.core.io import UserError
from chatforge.core.log import console, is_interactive, print0, warn
from chatforge.core.model import load_model_and_tokenizer
from chatforge.core.run import parent_run_id
from chatforge.core.tokenizer import render_for_completion, stop_token_ids
from chatforge.data.formats import make_task  # noqa: F401 (re-exported)
from chatforge.data.prompts import load_prompts  # noqa: F401  (re-exported: stages take prompt specs from here)


@dataclass
class SampleConfig:
    k: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64
    seed: int = 0
    batch_size: int = 8
    """Prompts per engine call (each expands to K rows)."""
    stop: list[str] = field(default_factory=list)
    compile: bool = False
    """Decode with the engine's compile=True (one compiled step per batch shape; pays off on long jobs)."""


def prompt_seed(seed: int, prompt_id: str) -> int:
    return int(hashlib.sha256(f"{seed}:{prompt_id}".encode()).hexdigest()[:8], 16)


def _done_ids(out: Path) -> set[str]:
    """Task ids already in a partial output; drops a torn last line left by a killed run."""
    if not out.exists():
        return set()
    raw = out.read_bytes()
    lines = raw.split(b"\n")
    good, done = [], set()
    for ln in lines:
        if not ln.strip():
            continue
        try:
            done.add(json.loads(ln)["task_id"])
            good.append(ln)
        except (json.JSONDecodeError, KeyError):
            warn(f"{out}: dropping a torn line from an interrupted run")
    fixed = b"".join(g + b"\n" for g in good)
    if fixed != raw:
        out.write_bytes(fixed)
    return done


def sample_replies(model: Any, tok: Any, prompts: list[dict], cfg: SampleConfig) -> list[list[Any]]:
    """K generations per prompt (engine), seeds derived per prompt; prompts must already fit."""
    from chatforge.core.generation import SamplingParams, generate

    ids = [render_for_completion(tok, p["messages"]) for p in prompts]
    params = [SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                             max_new_tokens=cfg.max_new_tokens, seed=prompt_seed(cfg.seed, p["id"]),
                             stop=list(cfg.stop)) for p in prompts]
    return generate(model, ids, params, stop_token_ids=stop_token_ids(tok), pad_id=tok.pad_token_id,
                    tokenizer=tok, num_samples=cfg.k, compile=cfg.compile)


def run(model_spec: str, prompts_spec: str, out: Path, cfg: SampleConfig) -> dict:
    if cfg.k < 1:
        raise UserError("--k must be >= 1")
    out = Path(out)
    model, tok, src = load_model_and_tokenizer(model_spec)
    model.eval()
    policy = parent_run_id(src) or str(src)
    prompts = load_prompts(prompts_spec)
    context = model.config.max_position_embeddings
    done = _done_ids(out)
    todo, too_long = [], 0
    for p in prompts:
        if p["id"] in done:
            continue
        if len(render_for_completion(tok, p["messages"])) + cfg.max_new_tokens > context:
            too_long += 1
            continue
        todo.append(p)
    if too_long:
        warn(f"skipped {too_long} prompts that leave no room for {cfg.max_new_tokens} new tokens in the "
             f"model's {context}-token context")
    print0(f"sampling {cfg.k} replies for {len(todo)} prompts ({len(done)} already in {out})")
    params = {k: v for k, v in asdict(cfg).items() if k not in ("batch_size",)}
    out.parent.mkdir(parents=True, exist_ok=True)
    from rich.progress import Progress

    written, collapsed = 0, 0
    with Progress(console=console, disable=not is_interactive()) as progress, open(out, "a", encoding="utf-8") as f:
        bar = progress.add_task("sample", total=len(todo))
        for i in range(0, len(todo), cfg.batch_size):
            chunk = todo[i: i + cfg.batch_size]
            with torch.inference_mode():
                gens = sample_replies(model, tok, chunk, cfg)
            for p, g in zip(chunk, gens):
                task = make_task(p, [x.text for x in g], policy, {**params, "seed": prompt_seed(cfg.seed, p["id"])},
                                 [x.finish_reason for x in g])
                collapsed += len(g) - len(task["responses"])
                f.write(json.dumps(task, ensure_ascii=False) + "\n")
                written += 1
            f.flush()
            os.fsync(f.fileno())
            progress.update(bar, advance=len(chunk))
    stats = {"prompts": len(prompts), "written": written, "resumed_skipped": len(done),
             "too_long": too_long, "collapsed_duplicates": collapsed, "policy": policy}
    print0(f"wrote {written} ranking tasks to {out} ({collapsed} identical replies collapsed)")
    return stats
