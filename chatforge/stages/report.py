"""`chatforge eval`: one report on a model, against one or more baselines.

    chatforge eval --model runs/ppo --baseline runs/sft --reward runs/rm --out runs/eval
    chatforge eval --model runs/ppo --baseline runs/sft --baseline runs/pretrain --judge "panel:rule*5:temperature=0.5" \\
        --comparisons heldout-cmp.jsonl --sft-data tasks:20 --prompts tasks-heldout:25 --out runs/eval
    chatforge eval --model runs/round-2/policy --baseline runs/sft --previous runs/round-1/eval --out runs/round-2/eval

Sections (each a number in report.json and a section of report.md / report.html):
1. held-out loss and perplexity on the pretraining val split (`--data-dir`, else found in the model's
   lineage manifests; skipped for a model whose tokenizer is not the data's) and on SFT validation
   conversations (`--sft-data`: `tasks:N` = N held-out demonstrations per family, or a conversation file);
2. task-suite accuracy per family on held-out prompts, Wilson 95 % intervals;
3. reward-model scores of every model's replies (`--reward`) and RM accuracy on held-out comparisons;
4. win rate of the model over each baseline judged by the RM and/or `--judge` (a simulated panel, or an
   OpenAI-compatible judge: any `chatforge label --labeler` spec), Wilson + bootstrap intervals, a
   length-controlled variant, and Bradley–Terry strengths when there are three or more models;
5. fluency proxies (distinct-n, repetition, length, end-of-turn rate);
6. bias probes (Winogender, BBQ, BOLD subsets; CrowS-Pairs on a CSV of yours with `--bias-file`) with the
   baseline → model change;
7. training curves along the model's lineage and the reward-hacking guards that fired; every RL model's KL
   to its reference, from the run and re-measured on the eval prompts;
8. eval prompts that also occur in training data (by hash of the normalised user message).

Everything compares text, so a baseline with another tokenizer works. Models are loaded one at a time.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chatforge.config import EvalConfig
from chatforge.core.io import UserError, atomic_dir, read_jsonl, write_json
from chatforge.core.log import print0, warn
from chatforge.core.run import read_manifest
from chatforge.core.tracking import read_metrics

# (spec, model, tok, prompts) -> (replies, finish reasons), or None: generate them as usual
ReplyFn = Callable[[str, Any, Any, list[dict]], tuple[list[str], list[str]] | None]
LINEAGE_MAX = 12  # run dirs followed back from a model


@dataclass
class Subject:
    """One model under evaluation."""

    label: str
    spec: str
    path: Path
    run_dir: Path | None
    lineage: list[Path] = field(default_factory=list)
    result: dict = field(default_factory=dict)
    replies: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    kl_reference: str | None = None
    kl_rows: list[tuple[list[int], list[int]]] = field(default_factory=list)
    kl_logps: Any = None
    kl_vocab: dict | None = None
    general_replies: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- lineage


def _run_dir_of(model_path: Path) -> Path | None:
    for d in (model_path, model_path.parent):
        if read_manifest(d):
            return d
    return None


def lineage_dirs(model_path: Path) -> list[Path]:
    """Run dirs behind a model, newest first, following each manifest's source model path."""
    out: list[Path] = []
    d = _run_dir_of(Path(model_path))
    while d is not None and d not in out and len(out) < LINEAGE_MAX:
        out.append(d)
        m = read_manifest(d) or {}
        inputs, cfg = m.get("inputs") or {}, m.get("config") or {}
        src = next((inputs[k]["path"] for k in ("policy", "model") if isinstance(inputs.get(k), dict)
                    and inputs[k].get("path")), None)
        if src is None and isinstance(cfg.get("model"), dict):
            src = cfg["model"].get("from")
        if not src or not Path(src).exists():
            break
        d = _run_dir_of(Path(src))
    return out


def find_data_dir(dirs: list[Path]) -> Path | None:
    """The pretraining data dir recorded in a lineage's manifests (pretrain writes `data_dir`)."""
    for d in dirs:
        m = read_manifest(d) or {}
        cand = m.get("data_dir") or (((m.get("inputs") or {}).get("data") or {}).get("path") if
                                      m.get("stage") == "pretrain" else None)
        if cand:
            p = Path(cand)
            p = p.parent if p.name == "meta.json" else p
            if (p / "meta.json").exists():
                return p
    return None


# ----------------------------------------------------------------------------- losses


def _same_vocab(tok: Any, data_dir: Path) -> bool:
    from chatforge.core.tokenizer import load_tokenizer

    meta = json.loads((data_dir / "meta.json").read_text(encoding="utf-8"))
    tdir = Path(meta.get("tokenizer", "tokenizer"))
    tdir = tdir if tdir.is_absolute() else data_dir / tdir
    if tdir.exists():
        return load_tokenizer(tdir).get_vocab() == tok.get_vocab()
    return meta.get("vocab_size") == len(tok)


def lm_val_loss(model: Any, tok: Any, data_dir: Path, seq_len: int, batch_size: int, n_batches: int) -> dict:
    """Mean next-token loss and perplexity on the first windows of the data dir's val split."""
    from chatforge.data.lm_loader import eval_batches, load_split

    if not _same_vocab(tok, data_dir):
        return {"skipped": f"the model's tokenizer is not the one {data_dir} was tokenized with"}
    ctx = model.config.max_position_embeddings
    shards = load_split(data_dir, "val")
    seq_len = min(seq_len, ctx, max(1, sum(len(s) for s in shards) - 1))
    total, n = 0.0, 0
    with torch.inference_mode():
        for x, y in eval_batches(shards, seq_len, batch_size, n_batches):
            logits = model(input_ids=x).logits.float()
            total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"))
            n += y.numel()
    loss = total / max(1, n)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": n, "data_dir": str(data_dir)}


def load_sft_eval(spec: str) -> list[dict]:
    """`tasks:N` -> N held-out demonstrations per family; anything else -> conversations from a file."""
    if spec.startswith("tasks:"):
        from chatforge.data.tasks import demonstrations

        try:
            n = int(spec.split(":", 1)[1])
        except ValueError:
            raise UserError(f"--sft-data '{spec}': expected tasks:N or a conversation file") from None
        return demonstrations(n, seed=0, split="heldout")
    from chatforge.data.sft_data import load_conversations

    return load_conversations([spec])


def sft_val_loss(model: Any, tok: Any, convs: list[dict], seq_len: int, batch_size: int) -> dict:
    """Mean loss over assistant tokens of held-out conversations (per token of this model's tokenizer)."""
    from chatforge.data.sft_data import collate, pack, render_examples, token_losses

    seq_len = min(seq_len, model.config.max_position_embeddings - 1)
    examples, st = render_examples(tok, convs, seq_len)
    rows = pack(examples, seq_len, packing=False)
    total, n = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(rows), batch_size):
            losses, valid = token_losses(model, collate(rows[i: i + batch_size], tok.pad_token_id))
            total, n = total + float(losses.sum()), n + int(valid.sum())
    if not n:
        return {"skipped": "no conversation fits the context", "conversations": len(convs)}
    return {"loss": total / n, "ppl": math.exp(min(total / n, 50.0)), "target_tokens": n,
            "conversations": len(examples), "skipped_too_long": st.skipped_too_long}


# ----------------------------------------------------------------------------- replies and scores


def task_scores(prompts: list[dict], replies: list[str]) -> dict[str, dict]:
    """Per family (and "all"): mean checker score, n and a Wilson 95 % interval (partial credit counts)."""
    from chatforge.data.tasks import check_conversation, find_family
    from chatforge.evals.stats import wilson_interval

    per: dict[str, list[float]] = {}
    for p, r in zip(prompts, replies, strict=True):
        s = check_conversation(p, r)
        if s is not None:
            per.setdefault(find_family(p).name, []).append(float(s))
    per["all"] = [x for v in per.values() for x in v]
    out = {}
    for fam, v in per.items():
        lo, hi = wilson_interval(sum(v), len(v))
        out[fam] = {"accuracy": sum(v) / len(v) if v else None, "n": len(v), "lo": lo, "hi": hi}
    return out


def judge_outcomes(prompts: list[dict], a: list[str], b: list[str], labelers: list[Any],
                   reasons_a: list[str] | None = None, reasons_b: list[str] | None = None) -> list[float]:
    """Per prompt 1 (A preferred by the panel majority), 0 (B) or 0.5 (tie); each labeler ranks [A, B].

    Finish reasons let rule labelers penalise a reply that was cut off at max_new_tokens.
    """
    out = []
    reasons_a = dict(enumerate(reasons_a)) if reasons_a else None
    reasons_b = dict(enumerate(reasons_b)) if reasons_b else None
    for i, p in enumerate(prompts):
        task = {"task_id": f"eval-{i}-{p.get('id', i)}", "prompt": {"messages": p["messages"]},
                "meta": p.get("meta", {}),
                "responses": [{"response_id": "a", "content": a[i], "finish_reason": (reasons_a or {}).get(i)},
                              {"response_id": "b", "content": b[i], "finish_reason": (reasons_b or {}).get(i)}]}
        votes = []
        for lab in labelers:
            ranking = lab.rank(task)
            votes.append(0.5 if len(ranking) == 1 else 1.0 if "a" in ranking[0] else 0.0)
        mean = sum(votes) / len(votes)
        out.append(1.0 if mean > 0.5 else 0.0 if mean < 0.5 else 0.5)
    return out


def rm_outcomes(scores_a: list[float], scores_b: list[float]) -> list[float]:
    """Higher reward wins; rewards equal up to batching noise tie.

    The same reply scored in two batches differs in the last float bits (padding changes the
    kernel's reduction order), which must not decide a comparison."""
    def outcome(x: float, y: float) -> float:
        if math.isclose(x, y, rel_tol=1e-4, abs_tol=1e-4):
            return 0.5
        return 1.0 if x > y else 0.0

    return [outcome(x, y) for x, y in zip(scores_a, scores_b, strict=True)]


def compare(outcomes: list[float], a: list[str], b: list[str], n_boot: int, seed: int) -> dict:
    """Win rate (Wilson + bootstrap) and the length-controlled win rate (lengths in words)."""
    from chatforge.evals.stats import length_controlled_win_rate, win_rate
    from chatforge.evals.text import words

    res = win_rate(outcomes, n_boot=n_boot, seed=seed)
    res["length_controlled"] = length_controlled_win_rate(outcomes, [len(words(x)) for x in a],
                                                          [len(words(x)) for x in b], n_boot=min(n_boot, 500),
                                                          seed=seed)
    return res


# ----------------------------------------------------------------------------- bias probes


def _subsample(items: list, k: int, seed: int) -> list:
    if k <= 0 or len(items) <= k:
        return items
    idx = sorted(np.random.default_rng(seed).choice(len(items), size=k, replace=False).tolist())
    return [items[i] for i in idx]


def bias_report(model: Any, tok: Any, cfg: EvalConfig) -> dict[str, dict]:
    """Winogender + BBQ (likelihood) and BOLD (generation) on deterministic subsets of the embedded data."""
    from chatforge.evals import bias
    from chatforge.stages.evaluate import make_continue_fn, make_loglik_fn

    loglik = make_loglik_fn(model, tok, cfg.batch_size)
    triples, stats = bias.load_winogender()
    bbq = _subsample(bias.load_bbq(), cfg.bias_max_examples, cfg.seed)
    out = {"winogender": bias.winogender_probe(loglik, (_subsample(triples, cfg.bias_max_examples, cfg.seed), stats),
                                               n_boot=cfg.n_boot, seed=cfg.seed),
           "bbq": bias.bbq_probe(bias.choice_fn_from_loglik(loglik), bbq, n_boot=cfg.n_boot, seed=cfg.seed)}
    if cfg.bias_bold_per_group > 0:
        rows = bias.load_bold(max_per_group=cfg.bias_bold_per_group)
        out["bold"] = bias.bold_probe(make_continue_fn(model, tok, cfg.bias_new_tokens), rows, n_boot=cfg.n_boot,
                                      seed=cfg.seed, batch_size=cfg.batch_size)
    if cfg.bias_file:
        out["crows_pairs"] = bias.crows_pairs_probe(loglik, bias.load_crows_pairs(cfg.bias_file), cfg.batch_size)
    return out


# ----------------------------------------------------------------------------- KL to the reference

RL_STAGES = ("ppo", "grpo", "dpo", "bon")
KL_TEMPERATURE = 1.0  # KL(pi || ref) is an expectation under pi: sample at the rollouts' temperature


def sample_rows(model: Any, tok: Any, prompts: list[dict], max_new_tokens: int, temperature: float, seed: int,
                batch_size: int = 16) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, sampled reply ids incl. its stop token) per prompt, with the generation engine."""
    from chatforge.core.generation import SamplingParams, generate
    from chatforge.core.tokenizer import render_for_completion, stop_token_ids

    context = model.config.max_position_embeddings
    rows = []
    for i in range(0, len(prompts), batch_size):
        ids = [render_for_completion(tok, p["messages"])[-(context - max_new_tokens):] for p in prompts[i: i + batch_size]]
        params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed + i)
        with torch.inference_mode():
            gens = generate(model, ids, params, stop_token_ids=stop_token_ids(tok), pad_id=tok.pad_token_id)
        rows += [(g[0].prompt_ids, g[0].token_ids) for g in gens]
    return rows


def reply_logps(model: Any, rows: list[tuple[list[int], list[int]]], pad_id: int = 0, batch_size: int = 16) -> np.ndarray:
    """Sum of log p(reply ids | prompt ids) under `model` for each (prompt ids, reply ids) row."""
    from chatforge.core.rl import logprobs_from_logits

    out = np.zeros(len(rows))
    dev = next(model.parameters()).device
    for i in range(0, len(rows), batch_size):
        chunk = rows[i: i + batch_size]
        width = max(len(q) + len(a) for q, a in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        att = torch.zeros_like(ids)
        mask = torch.zeros_like(ids, dtype=torch.bool)
        for j, (q, a) in enumerate(chunk):
            ids[j, :len(q) + len(a)] = torch.tensor(list(q) + list(a))
            att[j, :len(q) + len(a)] = 1
            mask[j, len(q):len(q) + len(a)] = True
        with torch.inference_mode():
            logits = model(input_ids=ids.to(dev), attention_mask=att.to(dev)).logits[:, :-1].float()
        lp = logprobs_from_logits(logits, ids[:, 1:].to(dev)).cpu()
        out[i: i + len(chunk)] = (lp * mask[:, 1:]).sum(1).numpy()
    return out


def kl_reference(s: Subject) -> str | None:
    """The KL reference of an RL run (its `reference`, else the policy it started from), or None."""
    m = read_manifest(s.run_dir) if s.run_dir else None
    if not m or m.get("stage") not in RL_STAGES:
        return None
    cfg = m.get("config") or {}
    return cfg.get("reference") or cfg.get("policy")


def measure_kl(s: Subject, prompts: list[dict], cfg: EvalConfig) -> dict | None:
    """Mean KL(model || reference) per reply on the eval prompts (replies sampled from the model at
    KL_TEMPERATURE; Monte-Carlo estimate sum log pi - log ref, bootstrap interval), next to the run's own
    `objective/kl` (mean of its last iterations)."""
    from chatforge.core.model import load_model_and_tokenizer
    from chatforge.core.tracking import final_mean
    from chatforge.evals.stats import bootstrap_ci

    ref_spec = s.kl_reference
    if ref_spec is None or s.kl_logps is None or not s.kl_rows:
        return None
    out = {"reference": ref_spec, "run": final_mean(s.run_dir, "objective/kl") if s.run_dir else None,
           "temperature": KL_TEMPERATURE}
    try:
        ref, rtok, _ = load_model_and_tokenizer(ref_spec)
    except (UserError, OSError) as e:
        return {**out, "skipped": f"reference not loadable: {e}"}
    if rtok.get_vocab() != s.kl_vocab:
        return {**out, "skipped": "the reference has another tokenizer"}
    ref.eval()
    kl = s.kl_logps - reply_logps(ref, s.kl_rows, rtok.pad_token_id or 0, cfg.batch_size)
    del ref
    lo, hi = bootstrap_ci(kl, n_boot=cfg.n_boot, seed=cfg.seed)
    return {**out, "eval": float(kl.mean()), "lo": lo, "hi": hi, "n": len(kl)}


# ----------------------------------------------------------------------------- general chat (the alignment tax)


def load_general(specs: list[str], n: int, exclude: set[str]) -> list[dict]:
    """Up to `n` human-written conversations that end in an assistant turn, taken in turn from each spec, none of
    whose user turns occurs in `exclude` (prompt keys of the models' training data) and one per opening prompt
    (OASST paths of one tree share it): the held-out set on which the alignment tax is measured."""
    from chatforge.data.sft_data import load_conversations

    pools, seen = [], set()
    for spec in specs:
        pool = []
        for c in load_conversations([spec]):
            msgs = c["messages"]
            keys = [prompt_key(m["content"]) for m in msgs if m["role"] == "user"]
            if msgs and msgs[-1]["role"] == "assistant" and keys and keys[0] not in seen \
                    and not any(k in exclude for k in keys):
                seen.add(keys[0])
                pool.append(c)
        pools.append(pool)
    mixed = [pool[i] for i in range(max(map(len, pools), default=0)) for pool in pools if i < len(pool)]
    return mixed[:n]


GENERAL_BATCH_TOKENS = 2048
GENERAL_CONTEXT = 512  # tokens of each held-out conversation scored (human replies run long; the start is kept)


def conversation_losses(model: Any, tok: Any, convs: list[dict], batch_size: int) -> list[float | None]:
    """Mean next-token loss over each conversation's assistant tokens within its first GENERAL_CONTEXT tokens
    (None where no assistant token falls inside them)."""
    from chatforge.core.tokenizer import IGNORE_INDEX, render_conversation
    from chatforge.data.sft_data import Row, collate, token_losses

    window = min(GENERAL_CONTEXT, model.config.max_position_embeddings - 1)
    rows: list[tuple[int, Row]] = []
    for i, c in enumerate(convs):
        ids, mask = render_conversation(tok, c["messages"])
        ids, mask = ids[: window + 1], mask[: window + 1]
        targets = [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:], strict=True)]
        if any(t != IGNORE_INDEX for t in targets):
            row = Row()
            row.add(ids[:-1], targets)
            rows.append((i, row))
    # batched by length, at most GENERAL_BATCH_TOKENS padded tokens a batch: conversations run from 50 to 1,000
    # tokens, and on a CPU a batch of 16 padded to 512 took twice as long as the same rows 4 at a time
    rows.sort(key=lambda r: len(r[1].inputs))
    chunks: list[list[tuple[int, Row]]] = []
    for row in rows:
        if chunks and len(chunks[-1]) < batch_size and \
                (len(chunks[-1]) + 1) * len(row[1].inputs) <= GENERAL_BATCH_TOKENS:
            chunks[-1].append(row)
        else:
            chunks.append([row])
    out: list[float | None] = [None] * len(convs)
    with torch.inference_mode():
        for chunk in chunks:
            losses, valid = token_losses(model, collate([r for _, r in chunk], tok.pad_token_id))
            for (i, _), total, count in zip(chunk, losses.sum(1).tolist(), valid.sum(1).tolist(), strict=True):
                out[i] = total / count
    return out


def general_report(model: Any, tok: Any, convs: list[dict], replies: list[str], reasons: list[str],
                   cfg: EvalConfig) -> dict:
    """Held-out loss on human-written replies, and the rule labeler's general-quality utility, distinct-n and
    repetition of this model's own replies to the same conversations' prompts; 95 % bootstrap intervals."""
    from chatforge.data.utility import rule_utility
    from chatforge.evals.stats import bootstrap_ci, jackknife_ci
    from chatforge.evals.text import distinct_n, repetition_rate

    losses = conversation_losses(model, tok, convs, cfg.batch_size)
    util = [rule_utility({"messages": c["messages"][:-1]}, r, truncated=why == "length")
            for c, r, why in zip(convs, replies, reasons, strict=True)]
    known = [x for x in losses if x is not None]

    def stat(values: list[float] | np.ndarray, fn: Callable = np.mean) -> dict:
        lo, hi = bootstrap_ci(values, stat=fn, n_boot=cfg.n_boot, seed=cfg.seed)
        return {"mean": float(fn(np.asarray(values, dtype=float))) if len(values) else None, "lo": lo, "hi": hi}

    def pooled(fn: Callable[[list[str]], float]) -> dict:  # a text measure over all replies: jackknife interval
        def on(idx: np.ndarray) -> float:
            return fn([replies[int(i)] for i in idx])

        lo, hi = jackknife_ci(len(replies), on)
        return {"mean": on(np.arange(len(replies))) if replies else None, "lo": lo, "hi": hi}

    vocab = hashlib.sha256(json.dumps(sorted(tok.get_vocab().items())).encode()).hexdigest()
    return {"n": len(convs), "vocab": vocab,
            "loss": {**stat(known), "per": losses, "n": len(known)}, "utility": {**stat(util), "per": util},
            "distinct_2": pooled(lambda r: distinct_n(r, 2)),
            "repetition": stat([repetition_rate([r]) for r in replies]),  # a share of replies: bootstrap is fine
            "end_of_turn": float(np.mean([why != "length" for why in reasons])) if reasons else None}


def general_delta(model: dict, baseline: dict, n_boot: int, seed: int) -> dict:
    """Paired change model - baseline per conversation (loss only when both share a tokenizer), bootstrap 95 %."""
    from chatforge.evals.stats import bootstrap_ci

    out = {}
    pairs = {"utility": list(zip(model["utility"]["per"], baseline["utility"]["per"], strict=True))}
    if model["vocab"] == baseline["vocab"]:
        pairs["loss"] = [(a, b) for a, b in zip(model["loss"]["per"], baseline["loss"]["per"], strict=True)
                         if a is not None and b is not None]
    for key, ab in pairs.items():
        d = np.asarray([a - b for a, b in ab], dtype=float)
        lo, hi = bootstrap_ci(d, n_boot=n_boot, seed=seed)
        out[key] = {"delta": float(d.mean()) if d.size else None, "lo": lo, "hi": hi, "n": int(d.size)}
    return out


# ----------------------------------------------------------------------------- history and overlap

CURVE_KEYS = ("train/loss", "loss", "val/loss", "val/accuracy", "objective/scores", "objective/rlhf_reward",
              "rewards/margins", "rewards/accuracies", "objective/kl", "objective/entropy")


def training_history(dirs: list[Path]) -> tuple[list[dict], list[str]]:
    """Metric rows per lineage run (oldest first) and the reward-hacking warnings they recorded."""
    runs, warnings = [], []
    for d in reversed(dirs):
        m = read_manifest(d) or {}
        rows = read_metrics(d / "metrics.jsonl")
        rid = m.get("run_id", d.name)
        runs.append({"run_id": rid, "stage": m.get("stage"), "dir": str(d), "rows": rows})
        fired: dict[str, int] = {}
        for r in rows:
            for k, v in r.items():
                if k.startswith("guards/") and isinstance(v, (int, float)) and v > 0:
                    fired[k.removeprefix("guards/")] = fired.get(k.removeprefix("guards/"), 0) + 1
        for k, v in ((m.get("metrics") or {}).get("guards_fired") or {}).items():
            fired[k] = max(fired.get(k, 0), int(v))
        warnings += [f"{m.get('stage', 'run')} {rid}: reward-hacking guard '{k}' fired in {n} logged iteration(s)"
                     for k, n in sorted(fired.items()) if n]
        warnings += [f"{m.get('stage', 'run')} {rid}: {w}" for w in m.get("warnings") or []]
    return runs, warnings


def prompt_key(text: str) -> str:
    from chatforge.data.tasks import normalize_prompt

    return hashlib.sha256(normalize_prompt(text).encode()).hexdigest()


def _user_texts(spec: str) -> list[str]:
    """User messages of every conversation / prompt / comparison a data spec names."""
    if spec.startswith(("tasks:", "tasks-heldout:")):
        from chatforge.stages.sample import load_prompts

        return [m["content"] for p in load_prompts(spec) for m in p["messages"] if m["role"] == "user"]
    path, limit = Path(spec), None
    if spec.startswith("embedded:"):  # embedded:NAME[:N], the first N records as training reads them
        from chatforge.data.embedded import embedded_path

        name, _, n = spec.split(":", 1)[1].partition(":")
        path, limit = Path(embedded_path(name)), int(n) if n.isdigit() else None
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    texts = []
    for f in files:
        for _, obj in list(read_jsonl(f))[:limit]:
            msgs = obj.get("messages") or (obj.get("prompt") or {}).get("messages") or []
            texts += [m.get("content", "") for m in msgs if isinstance(m, dict) and m.get("role") == "user"]
    return texts


def training_specs(dirs: list[Path]) -> list[str]:
    """Training data specs recorded in lineage manifests (SFT/RM/DPO data paths, RL prompts, PPO-ptx demos)."""
    specs = []
    for d in dirs:
        cfg = (read_manifest(d) or {}).get("config") or {}
        data = cfg.get("data") if isinstance(cfg.get("data"), dict) else {}
        ptx = cfg.get("ptx") if isinstance(cfg.get("ptx"), dict) else {}
        specs += [s for s in [*(data.get("paths") or []), *(ptx.get("demos") or [])] if isinstance(s, str)]
        if isinstance(cfg.get("prompts"), str):
            specs.append(cfg["prompts"])
    return list(dict.fromkeys(specs))


def _training_key_sets(specs: list[str]) -> tuple[dict[str, set[str]], list[str]]:
    """Prompt keys of every user turn per readable training data spec, and the specs that could not be read."""
    sets: dict[str, set[str]] = {}
    unreadable = []
    for spec in dict.fromkeys(specs):
        try:
            sets[spec] = {prompt_key(t) for t in _user_texts(spec)}
        except (UserError, OSError, ValueError, KeyError, AttributeError) as e:
            unreadable.append(f"{spec}: {e}")
    return sets, unreadable


def prompt_overlap(prompts: list[dict], specs: list[str]) -> dict:
    """How many eval prompts' last user message also occurs (normalised, hashed) in training data."""
    keys = [prompt_key(next((m["content"] for m in reversed(p["messages"]) if m["role"] == "user"), ""))
            for p in prompts]
    found: dict[str, int] = {}
    seen: set[int] = set()
    sets, unreadable = _training_key_sets(specs)
    for spec, train in sets.items():
        hits = {i for i, k in enumerate(keys) if k in train}
        found[spec] = len(hits)
        seen |= hits
    return {"n_prompts": len(prompts), "overlapping": len(seen), "overlapping_ids": sorted(seen),
            "by_spec": found, "unreadable": unreadable}


# ----------------------------------------------------------------------------- the stage


def _clean(obj: Any) -> Any:
    """JSON-safe: tuples -> lists, numpy -> Python, NaN/inf -> None."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _subjects(cfg: EvalConfig) -> list[Subject]:
    from chatforge.core.model import resolve_model_path

    out: list[Subject] = []
    for spec in [cfg.model, *cfg.baselines]:
        path = resolve_model_path(spec)
        run_dir = _run_dir_of(path)
        m = read_manifest(run_dir) if run_dir else None
        base = m["run_id"] if m and m.get("run_id") else (path.parent.name if path.name == "model" else path.name)
        label, i = base, 2
        while label in {s.label for s in out}:
            label, i = f"{base}#{i}", i + 1
        out.append(Subject(label, spec, path, run_dir, lineage_dirs(path)))
    return out


def _replies(reply_fn: ReplyFn | None, spec: str, model: Any, tok: Any, prompts: list[dict], max_new_tokens: int,
             cfg: EvalConfig) -> tuple[list[str], list[str]]:
    """reply_fn's replies where it has them, else generated (greedy by default, cfg.temperature)."""
    from chatforge.stages.evaluate import generate_replies

    given = reply_fn(spec, model, tok, prompts) if reply_fn is not None else None
    return given if given is not None else generate_replies(model, tok, prompts, max_new_tokens, cfg.temperature,
                                                            cfg.seed, cfg.batch_size)


def _evaluate_subject(s: Subject, prompts: list[dict], cfg: EvalConfig, data_dir: Path | None,
                      sft_convs: list[dict] | None, reply_fn: ReplyFn | None, rm: tuple | None,
                      general: list[dict]) -> None:
    """Everything that needs this model in memory: replies, losses, bias probes; RM scores of its replies."""
    from chatforge.core.model import count_params, load_model_and_tokenizer
    from chatforge.evals.text import text_report

    print0(f"eval: {s.label} ({s.path})")
    model, tok, _ = load_model_and_tokenizer(str(s.path))
    model.eval()
    s.replies, s.reasons = _replies(reply_fn, s.spec, model, tok, prompts, cfg.max_new_tokens, cfg)
    m = read_manifest(s.run_dir) if s.run_dir else None
    r = s.result
    r.update(spec=s.spec, path=str(s.path), run_id=(m or {}).get("run_id"), stage=(m or {}).get("stage"),
             params=count_params(model), vocab_size=len(tok), lineage=[str(d) for d in s.lineage])
    r["tasks"] = task_scores(prompts, s.replies)
    r["text"] = text_report(s.replies, s.reasons)
    dd = data_dir or find_data_dir(s.lineage)
    r["lm"] = lm_val_loss(model, tok, dd, cfg.seq_len, cfg.batch_size, cfg.lm_batches) if dd else None
    r["sft_val"] = sft_val_loss(model, tok, sft_convs, cfg.seq_len, cfg.batch_size) if sft_convs else None
    r["bias"] = bias_report(model, tok, cfg) if cfg.bias else None
    if general:
        open_prompts = [{"messages": c["messages"][:-1]} for c in general]
        s.general_replies, why = _replies(reply_fn, s.spec, model, tok, open_prompts, cfg.general_max_new_tokens,
                                          cfg)
        r["general"] = general_report(model, tok, general, s.general_replies, why, cfg)
    s.kl_reference = kl_reference(s) if cfg.kl else None
    if s.kl_reference is not None:  # sampled replies and their log-probs now; the reference is loaded later
        s.kl_rows = sample_rows(model, tok, prompts, cfg.max_new_tokens, KL_TEMPERATURE, cfg.seed + 1, cfg.batch_size)
        s.kl_logps = reply_logps(model, s.kl_rows, tok.pad_token_id or 0, cfg.batch_size)
        s.kl_vocab = tok.get_vocab()
    if rm is not None:
        from chatforge.evals.stats import bootstrap_ci
        from chatforge.stages.rm_eval import score_texts

        scores = score_texts(rm[0], rm[1], [p["messages"] for p in prompts], s.replies, rm[2], cfg.batch_size,
                             finished=[why != "length" for why in s.reasons] if s.reasons else None)
        lo, hi = bootstrap_ci(scores, n_boot=cfg.n_boot, seed=cfg.seed)
        r["rm"] = {"mean": float(np.mean(scores)), "lo": lo, "hi": hi, "n": len(scores), "scores": scores}
    del model


def _judges(cfg: EvalConfig, subjects: list[Subject], prompts: list[dict]) -> dict[str, Callable]:
    """name -> fn(A, B) giving per-prompt outcomes of A over B."""
    judges: dict[str, Callable] = {}
    if cfg.judge not in ("rm", "none", ""):
        from chatforge.stages.label import parse_labeler_spec

        labelers = parse_labeler_spec(cfg.judge, seed=cfg.seed)
        judges[cfg.judge] = lambda a, b: judge_outcomes(prompts, a.replies, b.replies, labelers, a.reasons, b.reasons)
    if cfg.reward:
        judges["rm"] = lambda a, b: rm_outcomes(a.result["rm"]["scores"], b.result["rm"]["scores"])
    return judges


def _pairwise(cfg: EvalConfig, subjects: list[Subject], judges: dict[str, Callable]) -> tuple[list[dict], dict | None]:
    """Win rates of the model over each baseline per judge; Bradley–Terry over all pairs with 3+ models."""
    from chatforge.evals.stats import bradley_terry_bootstrap

    m, rows = subjects[0], []
    for b in subjects[1:]:
        for name, fn in judges.items():
            outcomes = fn(m, b)
            rows.append({"model": m.label, "baseline": b.label, "judge": name,
                         **compare(outcomes, m.replies, b.replies, cfg.n_boot, cfg.seed), "outcomes": outcomes})
    bt = None
    if len(subjects) >= 3 and judges:
        name, fn = next(iter(judges.items()))
        comps = [(a.label, b.label, o) for i, a in enumerate(subjects) for b in subjects[i + 1:] for o in fn(a, b)]
        bt = {"judge": name, "elo": True,
              "strengths": bradley_terry_bootstrap(comps, items=[s.label for s in subjects], elo=True,
                                                   n_boot=200, seed=cfg.seed)}
    return rows, bt


def _previous(prev: str | None, out: Path) -> dict | None:
    if not prev:
        return None
    p = Path(prev)
    p = p.parent if p.name in ("report.json", "report.html", "report.md") else p
    rep = p / "report.json"
    if not rep.exists():
        warn(f"--previous {prev}: no report.json there; linking only")
        return {"dir": str(p), "link": str(Path(_relpath(p / "report.html", out))), "headline": None}
    old = json.loads(rep.read_text(encoding="utf-8"))
    return {"dir": str(p), "link": _relpath(p / "report.html", out), "headline": old.get("headline"),
            "model": old.get("model"), "created_at": old.get("created_at")}


def _relpath(target: Path, start: Path) -> str:
    import os

    return os.path.relpath(Path(target).resolve(), Path(start).resolve())


def _headline(subjects: list[Subject], win_rates: list[dict]) -> dict:
    m = subjects[0].result
    wr = win_rates[0] if win_rates else None
    return {"model": subjects[0].label, "accuracy": m["tasks"]["all"]["accuracy"],
            "win_rate": wr["win_rate"] if wr else None, "win_rate_vs": wr["baseline"] if wr else None,
            "win_rate_judge": wr["judge"] if wr else None, "rm_mean": (m.get("rm") or {}).get("mean"),
            "lm_loss": (m.get("lm") or {}).get("loss"), "sft_val_loss": (m.get("sft_val") or {}).get("loss")}


def run(cfg: EvalConfig, out: str | Path, reply_fn: ReplyFn | None = None) -> dict:
    """Evaluate cfg.model (vs cfg.baselines) and write report.md / report.html / report.json / *.png to `out`.

    `reply_fn(spec, model, tok, prompts) -> (replies, finish_reasons)` replaces generation (tests, or
    replies produced elsewhere); where it returns None the report generates. Returns the report dict (what report.json holds).
    """
    from chatforge.evals.bias import delta
    from chatforge.stages import report_render as render
    from chatforge.stages.sample import load_prompts

    if not cfg.model:
        raise UserError("eval needs --model")
    if cfg.judge == "rm" and not cfg.reward:
        raise UserError("--judge rm needs --reward RM")
    if cfg.comparisons and not cfg.reward:
        raise UserError("--comparisons (RM accuracy) needs --reward RM")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / "report.json").exists():
        raise UserError(f"{out} exists and is not a report dir; choose another --out")
    if cfg.data_dir and not (Path(cfg.data_dir) / "meta.json").exists():
        raise UserError(f"--data-dir {cfg.data_dir} is not a prepared data dir (no meta.json)")
    if cfg.bias_file:  # a bad CSV fails here, naming its line, before any model is loaded
        from chatforge.evals.bias import load_crows_pairs

        if not cfg.bias:
            raise UserError("--bias-file needs the bias probes on (drop --no-bias)")
        load_crows_pairs(cfg.bias_file)
    prompts = load_prompts(cfg.prompts)
    if not prompts:
        raise UserError(f"--prompts {cfg.prompts}: no prompts")
    subjects = _subjects(cfg)
    sft_convs = load_sft_eval(cfg.sft_data) if cfg.sft_data else None
    data_dir = Path(cfg.data_dir) if cfg.data_dir else next(
        (d for s in subjects if (d := find_data_dir(s.lineage))), None)
    rm = None
    if cfg.reward:
        from chatforge.stages.rm_eval import load_reward_model

        rm = load_reward_model(cfg.reward)
    general = load_general(cfg.general, cfg.general_n, set().union(*_training_key_sets(
        [*cfg.train_prompts, *(spec for s in subjects for spec in training_specs(s.lineage))])[0].values())
        ) if cfg.general else []
    for s in subjects:
        _evaluate_subject(s, prompts, cfg, data_dir, sft_convs, reply_fn, rm, general)
    del rm
    for s in subjects:
        s.result["kl"] = measure_kl(s, prompts, cfg)
    win_rates, bt = _pairwise(cfg, subjects, _judges(cfg, subjects, prompts))
    rm_acc = None
    if cfg.comparisons:
        from chatforge.stages.rm_eval import evaluate as rm_evaluate

        rm_acc = rm_evaluate(cfg.reward, list(cfg.comparisons), None, split=cfg.comparisons_split,
                             batch_size=cfg.batch_size)
    history, hack_warnings = training_history(subjects[0].lineage)
    overlap = prompt_overlap(prompts, list(dict.fromkeys([*cfg.train_prompts,
                                                           *training_specs(subjects[0].lineage)])))
    warnings = list(hack_warnings)
    if overlap["overlapping"]:
        warnings.append(f"{overlap['overlapping']} of {len(prompts)} eval prompts also occur in training data "
                        f"({', '.join(k for k, v in overlap['by_spec'].items() if v)}): scores may be inflated")
    for w in warnings:
        warn(w)
    report = {
        "created_at": datetime.now(timezone.utc).isoformat(),
        "model": subjects[0].label, "baselines": [s.label for s in subjects[1:]],
        "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
        "prompts": {"spec": cfg.prompts, "n": len(prompts), "overlap": overlap},
        "models": {s.label: s.result for s in subjects},
        "win_rates": win_rates, "bradley_terry": bt, "rm_accuracy": rm_acc,
        "bias_delta": {s.label: delta(s.result["bias"], subjects[0].result["bias"]) for s in subjects[1:]
                       if cfg.bias},
        "samples": [{"prompt": p["messages"][-1]["content"], "replies": {s.label: s.replies[i] for s in subjects}}
                    for i, p in enumerate(prompts[: cfg.samples])],
        "general": {"sources": cfg.general, "n": len(general), "delta": {
            s.label: general_delta(subjects[0].result["general"], s.result["general"], cfg.n_boot, cfg.seed)
            for s in subjects[1:]} if general else {}, "samples": [
            {"prompt": c["messages"][-2]["content"], "replies": {s.label: s.general_replies[i] for s in subjects}}
            for i, c in enumerate(general[: cfg.samples])]},
        "warnings": warnings,
        "previous": _previous(cfg.previous, out),
    }
    report["headline"] = _headline(subjects, win_rates)
    with atomic_dir(out) as tmp:
        report["plots"] = render.write_plots(report, history, tmp)
        report = _clean(report)
        write_json(tmp / "report.json", report)
        (tmp / "report.md").write_text(render.render_markdown(report), encoding="utf-8")
        (tmp / "report.html").write_text(render.render_html(report, tmp), encoding="utf-8")
    h = report["headline"]
    acc = "n/a (no task-suite prompts)" if h["accuracy"] is None else f"{h['accuracy']:.3f}"
    print0(f"eval: {h['model']} accuracy {acc}"
           + (f", win rate {h['win_rate']:.2f} vs {h['win_rate_vs']} ({h['win_rate_judge']})" if h["win_rate"]
              is not None else "") + f" -> {out / 'report.html'}")
    return report
