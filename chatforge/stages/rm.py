"""Reward model from K-wise rankings: a scalar score head on any HF causal LM, trained on every implied pair.

    chatforge rm train --model runs/sft --data cmp.jsonl --out runs/rm
    chatforge rm train --model runs/sft --data embedded:prefs/hh --set train.max_steps=500 --out runs/rm
    torchrun --nproc-per-node 2 -m chatforge.cli rm train --model runs/sft --data cmp.jsonl --out runs/rm
    chatforge rm eval --model runs/rm --data heldout.jsonl --out runs/rm/eval      (stages/rm_eval.py)
    chatforge rm score --model runs/rm --data convs.jsonl --out scores.jsonl       (stages/rm_eval.py)

The model is `AutoModelForSequenceClassification(num_labels=1)` loaded from the SFT run (its LM head is
dropped, a fresh score head reads the last real token). Batches, the 1/C(K,2) weighting, ties, margins
and the truncation policy are in data/rm_data.py. The optimisation loop is core/train.py's.

After training, rewards are normalised: the replies of the training comparisons written by the most
common policy (the SFT samples in round 1; all replies when none is recorded) are scored and their
mean/std stored in `model/reward_norm.json`. `rm score` and `score_texts` subtract the mean (so SFT
replies score 0 on average, InstructGPT's bias); dividing by the std is off by default because PPO's
KL coefficient is tuned against the raw reward scale, and on by `norm.divide_std=true`.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from chatforge.config import RMConfig, to_dict
from chatforge.core.distributed import (
    DistInfo,
    all_reduce_sum,
    cleanup_distributed,
    init_distributed,
    rank_share,
)
from chatforge.core.io import UserError
from chatforge.core.log import print0, warn
from chatforge.core.model import apply_lora, count_params, resolve_model_path, save_model, unwrap
from chatforge.core.reward_model import REWARD_NORM_FILE, RewardNorm  # noqa: F401  (re-exported)
from chatforge.core.run import Run, parent_run_id
from chatforge.core.tokenizer import PAD, load_tokenizer, stop_token_ids
from chatforge.core.train import (
    lm_step_fn,
    prepare_training,
    set_threads,
    train_loop,
)
from chatforge.data.rm_data import (
    ComparisonLoader,
    RMExample,
    build_examples,
    collate_comparisons,
    load_comparisons,
    most_common_policy,
    pairwise_loss,
    rm_loss,
    score_sequences,
    sequence_rewards,
    split_comparisons,
)

# ----------------------------------------------------------------------------- model


def ensure_pad_token(model: Any, tok: Any) -> None:
    """Give the tokenizer a pad token that never ends a real sequence, and tell the model about it.

    HF sequence classifiers pool at the rightmost token != pad_token_id; with pad == eos or the
    end-of-turn token (common in chat models) a reply ending in that token would be scored one token early.
    """
    stops = set(stop_token_ids(tok))
    if tok.pad_token_id is None or tok.pad_token_id in stops:
        tok.add_special_tokens({"pad_token": PAD})
        if len(tok) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tok))
    model.config.pad_token_id = tok.pad_token_id
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().pad_token_id = tok.pad_token_id


def init_reward_model(spec: str, seed: int) -> tuple[Any, Any, Path]:
    """(model, tokenizer, source dir): a causal LM (or an existing RM) as a 1-label sequence classifier.

    A fresh head is drawn from N(0, 1/(d+1)) (Stiennon et al. 2020), seeded, so runs are reproducible.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = resolve_model_path(spec)
    tok = load_tokenizer(path)
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "score.weight newly initialised" report is expected here
    try:
        src = AutoConfig.from_pretrained(str(path))
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1, dtype=torch.float32)
    except Exception as e:  # transformers raises many types for an unsupported dir
        raise UserError(f"cannot load {path} as a reward model (AutoModelForSequenceClassification): {e}") from e
    finally:
        hf_logging.set_verbosity(verbosity)
    is_rm = getattr(src, "num_labels", 0) == 1 and any(
        a.endswith("ForSequenceClassification") for a in (getattr(src, "architectures", None) or []))
    head = getattr(model, "score", None)
    if not is_rm and isinstance(head, torch.nn.Linear):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            head.weight.copy_(torch.randn(head.weight.shape, generator=g) / math.sqrt(head.in_features + 1))
            if head.bias is not None:
                head.bias.zero_()
    ensure_pad_token(model, tok)
    model.config.id2label, model.config.label2id = {0: "reward"}, {"reward": 0}
    return model, tok, path


def save_reward_model(model: Any, tok: Any, norm: RewardNorm, out_dir: Path, is_main: bool = True) -> None:
    """save_pretrained + tokenizer + reward_norm.json, swapped into place as one directory (every rank
    calls it: an FSDP2 model is gathered first)."""
    save_model(model, tok, out_dir, is_main, extra={REWARD_NORM_FILE: json.dumps(asdict(norm), indent=2) + "\n"})


def normalisation_sample(items: list, k: int, seed: int) -> list:
    """At most `k` items drawn at random over the whole list, in their order: the file's first rows
    would be the first prompt families only (prompts are generated family by family)."""
    if len(items) <= k:
        return list(items)
    return [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), k))]


def fit_normalisation(model: Any, examples: list[RMExample], pad_id: int, cfg: RMConfig, info: DistInfo
                      ) -> RewardNorm:
    """Mean/std of raw rewards on the chosen policy's distinct replies (sharded over ranks)."""
    known = {p for ex in examples for p in ex.policies if p}
    policy = cfg.norm.policy or most_common_policy(examples)
    if cfg.norm.policy and cfg.norm.policy not in known:
        raise UserError(f"norm.policy '{cfg.norm.policy}' wrote no training reply; policies in the data: "
                        f"{', '.join(sorted(known)) or 'none recorded'}")
    seen, seqs = set(), []
    for ex in examples:
        for rid, s, pol in zip(ex.reply_ids, ex.seqs, ex.policies):
            if (ex.task_id, rid) not in seen and (not policy or pol == policy):
                seen.add((ex.task_id, rid))
                seqs.append(s)
    seqs = normalisation_sample(seqs, cfg.norm.max_replies, cfg.train.seed)
    bare = unwrap(model)
    bare.eval()
    raw = score_sequences(bare, rank_share(seqs, info), pad_id, cfg.train.batch_size * 4, info.device)
    bare.train()
    t = torch.tensor([sum(raw), sum(r * r for r in raw), len(raw)], dtype=torch.float64, device=info.device)
    t = all_reduce_sum(t, info)
    s, ss, n = t.tolist()
    mean = s / max(1.0, n)
    std = math.sqrt(max(0.0, ss / max(1.0, n) - mean * mean))
    return RewardNorm(mean=mean, std=std, n=int(n), policy=policy, divide_std=cfg.norm.divide_std)


# ----------------------------------------------------------------------------- stage


def check_config(cfg: RMConfig) -> None:
    """RM-specific checks, collected and raised once."""
    problems = []
    if not cfg.model:
        problems.append("rm train needs a model: --model SFT_RUN|HF_DIR|NAME")
    if not cfg.data.paths:
        problems.append("rm train needs comparisons: --data CMP.jsonl (or embedded:prefs/hh)")
    if not 0 <= cfg.data.val_fraction < 1:
        problems.append("data.val_fraction must be in [0, 1)")
    if cfg.loss.margin_scale < 0 or cfg.loss.tie_weight < 0:
        problems.append("loss.margin_scale and loss.tie_weight must be >= 0")
    if cfg.norm.max_replies < 1:
        problems.append("norm.max_replies must be >= 1")
    if problems:
        raise UserError("; ".join(problems))


def _report_data(st: Any, vst: Any, seq_len: int) -> None:
    cut = st.truncated_prompts + vst.truncated_prompts
    skipped_r = st.skipped_replies + vst.skipped_replies
    skipped_c = st.skipped_comparisons + vst.skipped_comparisons
    if cut or skipped_r:
        warn(f"train.seq_len={seq_len}: {cut} prompts lost old turns, {skipped_r} replies did not fit and were "
             f"skipped (policy: cut the prompt by whole turns from the left, never the reply)")
    if skipped_c:
        warn(f"{skipped_c} comparisons skipped: fewer than 2 replies left or no ordered pair (all tied)")


def run(cfg: RMConfig, out: Path, resume: bool = True) -> dict:
    """Train a reward model into the run dir `out`; returns the summary (also in manifest.json)."""
    check_config(cfg)
    info = init_distributed(cfg.train.device)
    set_threads(cfg.train)
    out = Path(out)
    try:
        # ---------------------------------------------------------------- data (errors before anything is written)
        cmps = load_comparisons(cfg.data.paths, cfg.data.aggregate)
        model, tok, src = init_reward_model(cfg.model, cfg.train.seed)
        ctx = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        if ctx is not None and cfg.train.seq_len > ctx:
            raise UserError(f"train.seq_len {cfg.train.seq_len} exceeds the model's context {ctx}")
        train_c, val_c = split_comparisons(cmps, cfg.data.val_fraction)
        keep_ties = cfg.loss.tie_weight > 0
        train_ex, st = build_examples(tok, train_c, cfg.train.seq_len, cfg.loss.margin_scale, keep_ties)
        val_ex, vst = build_examples(tok, val_c, cfg.train.seq_len, cfg.loss.margin_scale, keep_ties)
        _report_data(st, vst, cfg.train.seq_len)
        print0(f"rm data: {len(train_ex)} train / {len(val_ex)} val comparisons, {st.pairs} train pairs, "
               f"K: {dict(sorted(st.by_k.items()))}, mode {cfg.loss.mode}")
        flat = cfg.loss.mode == "pairs"
        pad = tok.pad_token_id
        loader = ComparisonLoader(train_ex, cfg.train.batch_size, pad, cfg.train.seed, info.rank, info.world_size,
                                  info.device, flat)
        my_val = rank_share(val_ex, info)[: cfg.train.eval_batches * cfg.train.batch_size]
        val_batches = [collate_comparisons(my_val[i: i + cfg.train.batch_size], pad, info.device)
                       for i in range(0, len(my_val), cfg.train.batch_size)]
        has_val = bool(val_ex)  # the same on every rank: ranks without a val batch still join the reduce

        # ---------------------------------------------------------------- model and optimizer
        if cfg.lora.enabled:
            model = apply_lora(model, cfg.lora, task_type="SEQ_CLS")  # peft keeps `score` fully trainable
        model.to(info.device).train()
        print0(f"reward model: {count_params(model) / 1e6:.2f}M params ({count_params(model, True) / 1e6:.3f}M "
               f"trainable) from {src}{' (LoRA)' if cfg.lora.enabled else ''}")
        ddp_model, opt, sched, amp = prepare_training(model, cfg.train, info)

        micro_stats: list[dict] = []

        def loss_fn(m: Any, batch: dict) -> tuple[torch.Tensor, int]:
            loss, stats, n_tok = rm_loss(m, batch, cfg.loss.tie_weight)
            micro_stats.append(stats)
            return loss, n_tok

        lm_step = lm_step_fn(ddp_model, opt, sched, loader, loss_fn, cfg.train, info, amp)

        def step_fn(i: int) -> dict:
            res = lm_step(i)  # the shared step: grad accumulation, DDP sync, clipping, skip on non-finite
            for k in {k for s in micro_stats for k in s}:
                vals = [s[k] for s in micro_stats if k in s]
                res[k] = sum(vals) / len(vals)
            micro_stats.clear()
            return res

        last_val: dict[str, float] = {}

        def eval_fn() -> dict:
            # sums, reduced over ranks here, so the metrics are exact over the whole held-out set
            sums = torch.zeros(4, dtype=torch.float64)  # loss * prompts, prompts, correct pairs, pairs
            for b in val_batches:
                r = sequence_rewards(model, b)
                loss, _ = pairwise_loss(r, b, cfg.loss.tie_weight)
                d = r[b["better"]] - r[b["worse"]]
                sums += torch.tensor([float(loss) * b["n_prompts"], b["n_prompts"], int((d > 0).sum()), d.numel()],
                                     dtype=torch.float64)
            tot, n_prompts, correct, n_pairs = all_reduce_sum(sums.to(info.device), info).tolist()  # nccl: on GPU
            res = {"val/loss": tot / max(1, n_prompts), "val/accuracy": correct / max(1, n_pairs)}
            last_val.update(res)
            return res

        data_hash = hashlib.sha256(json.dumps([c.to_dict() for c in cmps], sort_keys=True).encode()).hexdigest()
        run_ = Run(out, "rm", cfg, info, parent=parent_run_id(src))
        run_.inputs = {"data": {"specs": cfg.data.paths, "sha256": data_hash}, "model": {"path": str(src)}}
        fingerprint = {"model": str(src), "data_sha256": data_hash[:16], "examples": len(train_ex),
                       "seq_len": cfg.train.seq_len, "batch_size": cfg.train.batch_size,
                       "world_size": info.world_size, "mode": cfg.loss.mode, "margin_scale": cfg.loss.margin_scale,
                       "tie_weight": cfg.loss.tie_weight, "lora": cfg.lora.enabled}
        state = train_loop(
            run_, cfg.train, step_fn=step_fn,
            modules={"model": model}, stateful={"optimizer": opt, "scheduler": sched, "data": loader},
            fingerprint=fingerprint, eval_fn=eval_fn if has_val else None, resume=resume,
        )

        # ---------------------------------------------------------------- normalise, save, summary
        from chatforge.stages.rm_eval import labeler_agreement

        agreement = labeler_agreement(val_c)  # what val/accuracy can hope for when labelers disagree
        val_agreement = agreement["agreement"] if agreement else None
        norm = fit_normalisation(model, train_ex, pad, cfg, info)
        print0(f"reward normalisation: mean {norm.mean:+.4f}, std {norm.std:.4f} over {norm.n} replies"
               f" of policy '{norm.policy or 'any'}'")
        summary = {"steps": state.step, "tokens": state.tokens, "final_loss": state.ema_loss,
                   "best_val_loss": state.best_val, "val_accuracy": last_val.get("val/accuracy"),
                   "val_loss": last_val.get("val/loss"), "train_comparisons": len(train_ex),
                   "val_comparisons": len(val_ex), "train_pairs": st.pairs,
                   "truncated_prompts": st.truncated_prompts + vst.truncated_prompts,
                   "skipped_replies": st.skipped_replies + vst.skipped_replies,
                   "skipped_comparisons": st.skipped_comparisons + vst.skipped_comparisons,
                   "skipped_steps": state.skipped_steps, "reward_norm": asdict(norm),
                   "val_labeler_agreement": val_agreement}
        save_reward_model(model, tok, norm, run_.model_dir, info.is_main)
        run_.write_manifest("completed", summary)
        run_.close()
        print0(f"rm done: {run_.model_dir}" + (f" (val accuracy {last_val['val/accuracy']:.3f}" if last_val else "")
               + (f"; labelers agree on {val_agreement:.3f} of the same tasks' pairs" if val_agreement and last_val
                  else "") + (")" if last_val else ""))
        return {"run_id": run_.run_id, "out": str(out), "config": to_dict(cfg), **summary}
    finally:
        cleanup_distributed()
