"""Direct preference optimisation on comparisons (sigmoid DPO; IPO and hinge as options).

    chatforge dpo --policy runs/sft --data cmp.jsonl --out runs/dpo
    chatforge dpo --policy runs/sft --data embedded:prefs/hh --set loss.type=ipo --set loss.beta=0.5 --out runs/dpo
    chatforge dpo --policy smollm2-135m-instruct --data cmp.jsonl --set lora.enabled=true --out runs/dpo
    torchrun --nproc-per-node 2 -m chatforge.cli dpo --policy runs/sft --data cmp.jsonl --out runs/dpo

What it is: for every (chosen, rejected) pair implied by a K-wise ranking, push the policy's log-prob
ratio against the frozen reference up on the chosen reply and down on the rejected one,

    loss = −log σ(β · [(log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r))])      (loss.type=sigmoid)

with log-probs summed over reply tokens (IPO: averaged, see core/rl.py). The losses are the pure
functions in core/rl.py, picked by name. The reference is the starting policy: its log-probs are
computed once, before training, before LoRA adapters are added (so "adapters off") and before any
checkpoint is loaded, and stored in OUT/ref_logps.pt keyed by a hash of the weights and the pairs; a
resumed run reads the same numbers back instead of recomputing them, and no reference copy of the
model is kept in memory. Dropout is switched off (as TRL does) so the policy and the reference score
a sequence the same way at step 0.

Batches follow TRL's collator (chosen half, rejected half, one forward pass) unless
data.layout=packed (prompt forwarded once, pairs packed without padding); see data/pref_data.py, which
also has the truncation policy. The loop (resume, eval, checkpoints, metrics) is core/train.py's.
Metrics use TRL's names: train/loss, rewards/{chosen,rejected,accuracies,margins},
logps/{chosen,rejected}; with a held-out split val/loss, val/rewards/accuracies, ...
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from chatforge.config import DPOConfig, DPOLossConfig, to_dict
from chatforge.core.distributed import (
    DistInfo,
    all_reduce_mean,
    barrier,
    broadcast_object,
    cleanup_distributed,
    init_distributed,
    rank_share,
)
from chatforge.core.io import UserError, atomic_write
from chatforge.core.log import print0, warn
from chatforge.core.model import apply_lora, count_params, load_model_and_tokenizer, save_model
from chatforge.core.rl import DPO_AVERAGE_LOGPS, DPOLossFn, get_dpo_loss
from chatforge.core.run import Run, parent_run_id
from chatforge.core.train import (
    autocast_dtype,
    lm_step_fn,
    prepare_training,
    set_threads,
    train_loop,
)
from chatforge.data.pref_data import (
    PairLoader,
    PrefDataStats,
    PrefPair,
    build_pairs,
    collate,
    compute_reference,
    policy_logps,
    reference_logps,
)
from chatforge.data.rm_data import load_comparisons, split_comparisons

REF_FILE = "ref_logps.pt"


# ----------------------------------------------------------------------------- loss


def make_loss(cfg: DPOLossConfig) -> tuple[DPOLossFn, bool]:
    """(loss function from core/rl.py, whether it wants length-averaged log-probs)."""
    fn = get_dpo_loss(cfg.type)
    if cfg.label_smoothing:
        fn = functools.partial(fn, label_smoothing=cfg.label_smoothing)
    return fn, DPO_AVERAGE_LOGPS[cfg.type]


def dpo_loss(model: Any, batch: dict[str, Any], loss_fn: DPOLossFn, beta: float, average: bool
             ) -> tuple[torch.Tensor, dict[str, float], int]:
    """One forward over the micro-batch: (mean loss over pairs, TRL-named stats, tokens processed)."""
    chosen, rejected = policy_logps(model, batch, average)
    ref_chosen, ref_rejected = reference_logps(batch, average)
    losses, chosen_rewards, rejected_rewards = loss_fn(chosen, rejected, ref_chosen, ref_rejected, beta)
    with torch.no_grad():
        stats = {"rewards/chosen": float(chosen_rewards.mean()), "rewards/rejected": float(rejected_rewards.mean()),
                 "rewards/accuracies": float((chosen_rewards > rejected_rewards).float().mean()),
                 "rewards/margins": float((chosen_rewards - rejected_rewards).mean()),
                 "logps/chosen": float(chosen.mean()), "logps/rejected": float(rejected.mean())}
    return losses.mean(), stats, batch["n_tokens"]


# ----------------------------------------------------------------------------- reference log-probs


def disable_dropout(model: torch.nn.Module) -> None:
    """p = 0 in every dropout layer: the reference (eval mode) and the policy (train mode) must agree."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    for name in ("attention_dropout", "hidden_dropout", "dropout"):
        if isinstance(getattr(model.config, name, None), float):
            setattr(model.config, name, 0.0)


def reference_key(model: torch.nn.Module, train: list[PrefPair], val: list[PrefPair], layout: str) -> str:
    """sha256 over the starting weights, the pairs' token ids and the batch layout."""
    h = hashlib.sha256(layout.encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    for split in (train, val):
        h.update(json.dumps([[p.prompt, p.chosen, p.rejected] for p in split]).encode())
    return h.hexdigest()


def attach_reference(model: torch.nn.Module, train: list[PrefPair], val: list[PrefPair], out: Path,
                     cfg: DPOConfig, info: DistInfo, pad_id: int) -> str:
    """Fill ref_chosen / ref_rejected on every pair: from OUT/ref_logps.pt when its key matches, else computed
    (each rank a shard, then gathered) and stored. Returns "cached" or "computed"."""
    pairs = train + val
    key = reference_key(model, train, val, cfg.data.layout) if info.is_main else ""
    cached = None
    path = out / REF_FILE
    if info.is_main and path.exists():
        try:
            saved = torch.load(path, weights_only=True)
        except Exception as e:  # unreadable cache: recompute rather than fail
            warn(f"{path}: unreadable ({type(e).__name__}); recomputing the reference log-probs")
            saved = {}
        stored = saved.get("logps") if isinstance(saved, dict) else None
        if isinstance(stored, torch.Tensor) and saved["key"] == key and stored.shape == (len(pairs), 2):
            cached = stored.tolist()
    cached = broadcast_object(cached, info)
    if cached is None:
        print0(f"reference log-probs: {len(pairs)} pairs, one forward each (computed once, stored in {path})")
        mine = list(range(info.rank, len(pairs), info.world_size))
        model.eval()
        values = compute_reference(model, [pairs[i] for i in mine], pad_id, cfg.data.ref_batch_size,
                                   cfg.data.layout, info.device, autocast_dtype(cfg.train, info.device))
        model.train()
        shards: list[Any] = [list(zip(mine, values))]
        if info.enabled:
            shards = [None] * info.world_size
            torch.distributed.all_gather_object(shards, list(zip(mine, values)))
        logps = [(0.0, 0.0)] * len(pairs)
        for shard in shards:
            for i, v in shard:
                logps[i] = v
        if info.is_main:
            with atomic_write(path, mode="wb") as f:
                torch.save({"key": key, "logps": torch.tensor(logps, dtype=torch.float64)}, f)
        barrier()
    for p, (c, r) in zip(pairs, cached if cached is not None else logps):
        p.ref_chosen, p.ref_rejected = float(c), float(r)
    return "cached" if cached is not None else "computed"


# ----------------------------------------------------------------------------- stage


def check_config(cfg: DPOConfig) -> None:
    """DPO-specific checks, collected and raised once."""
    problems = []
    if not cfg.policy:
        problems.append("dpo needs a policy: --policy SFT_RUN|HF_DIR|NAME")
    if not cfg.data.paths:
        problems.append("dpo needs comparisons: --data CMP.jsonl (or embedded:prefs/hh)")
    if not 0 <= cfg.data.val_fraction < 1:
        problems.append("data.val_fraction must be in [0, 1)")
    if cfg.loss.beta <= 0:
        problems.append("loss.beta must be > 0")
    if not 0 <= cfg.loss.label_smoothing < 0.5:
        problems.append("loss.label_smoothing must be in [0, 0.5)")
    if cfg.loss.label_smoothing and cfg.loss.type != "sigmoid":
        problems.append("loss.label_smoothing only applies to loss.type=sigmoid")
    if cfg.data.ref_batch_size < 1:
        problems.append("data.ref_batch_size must be >= 1")
    if problems:
        raise UserError("; ".join(problems))


def _report_data(st: PrefDataStats, vst: PrefDataStats, seq_len: int) -> None:
    if st.truncated_pairs + vst.truncated_pairs or st.skipped_too_long + vst.skipped_too_long:
        warn(f"train.seq_len={seq_len}: {st.truncated_pairs + vst.truncated_pairs} pairs lost old prompt turns, "
             f"{st.skipped_too_long + vst.skipped_too_long} pairs skipped because a reply did not fit (policy: cut "
             "the prompt by whole turns from the left, never the reply)")
    if st.no_pairs + vst.no_pairs:
        warn(f"{st.no_pairs + vst.no_pairs} comparisons gave no pair (all replies tied)")


def _mean_stats(stats: list[dict[str, float]]) -> dict[str, float]:
    return {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]} if stats else {}


def run(cfg: DPOConfig, out: Path, resume: bool = True) -> dict:
    """Train the policy with DPO into the run dir `out`; returns the summary (also in manifest.json)."""
    check_config(cfg)
    info = init_distributed(cfg.train.device)
    set_threads(cfg.train)
    out = Path(out)
    try:
        # ---------------------------------------------------------------- data (errors before anything is written)
        cmps = load_comparisons(cfg.data.paths, cfg.data.aggregate)
        model, tok, src = load_model_and_tokenizer(cfg.policy)
        ctx = getattr(model.config, "max_position_embeddings", None)
        if ctx is not None and cfg.train.seq_len > ctx:
            raise UserError(f"train.seq_len {cfg.train.seq_len} exceeds the model's context {ctx}")
        train_c, val_c = split_comparisons(cmps, cfg.data.val_fraction)
        train_pairs, st = build_pairs(tok, train_c, cfg.train.seq_len)
        val_pairs, vst = build_pairs(tok, val_c, cfg.train.seq_len)
        _report_data(st, vst, cfg.train.seq_len)
        print0(f"dpo data: {len(train_pairs)} train / {len(val_pairs)} val pairs from {st.comparisons} / "
               f"{vst.comparisons} comparisons, K: {dict(sorted(st.by_k.items()))}, layout {cfg.data.layout}")
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        loader = PairLoader(train_pairs, cfg.train.batch_size, pad, cfg.train.seed, info.rank, info.world_size,
                            info.device, cfg.data.layout)

        data_hash = hashlib.sha256(json.dumps([c.to_dict() for c in cmps], sort_keys=True).encode()).hexdigest()
        run_ = Run(out, "dpo", cfg, info, parent=parent_run_id(src))  # refuses another stage's dir; writes nothing
        run_.inputs = {"data": {"specs": cfg.data.paths, "sha256": data_hash}, "policy": {"path": str(src)}}

        # ---------------------------------------------------------------- reference, model and optimizer
        disable_dropout(model)
        model.to(info.device)
        ref_source = attach_reference(model, train_pairs, val_pairs, out, cfg, info, pad)
        # every rank must hold val pairs, or the ranks that do would wait forever in the metric all-reduce
        my_val = rank_share(val_pairs, info)[: cfg.train.eval_batches * cfg.train.batch_size]
        if len(val_pairs) < info.world_size:
            my_val = []
        val_batches = [collate(my_val[i: i + cfg.train.batch_size], pad, cfg.data.layout, info.device)
                       for i in range(0, len(my_val), cfg.train.batch_size)]
        if cfg.lora.enabled:

            model = apply_lora(model, cfg.lora)
        model.train()
        n_train = count_params(model, trainable_only=True)
        print0(f"policy: {count_params(model) / 1e6:.2f}M params, {n_train / 1e6:.3f}M trainable"
               f"{' (LoRA)' if cfg.lora.enabled else ''}, loss {cfg.loss.type}, beta {cfg.loss.beta}")
        ddp_model, opt, sched, amp = prepare_training(model, cfg.train, info)
        loss_fn, average = make_loss(cfg.loss)

        micro_stats: list[dict[str, float]] = []

        def micro_loss(m: Any, batch: dict) -> tuple[torch.Tensor, int]:
            loss, stats, n_tok = dpo_loss(m, batch, loss_fn, cfg.loss.beta, average)
            micro_stats.append(stats)
            return loss, n_tok

        lm_step = lm_step_fn(ddp_model, opt, sched, loader, micro_loss, cfg.train, info, amp)

        def step_fn(i: int) -> dict:
            res = lm_step(i)  # the shared step: grad accumulation, DDP sync, clipping, skip on non-finite
            res.update(_mean_stats(micro_stats))
            micro_stats.clear()
            return res

        last_val: dict[str, float] = {}

        def eval_fn() -> dict:
            tot, n, sums = 0.0, 0, {}
            for b in val_batches:
                loss, stats, _ = dpo_loss(model, b, loss_fn, cfg.loss.beta, average)
                k = b["ref_chosen"].shape[0]
                tot, n = tot + float(loss) * k, n + k
                for key, v in stats.items():
                    sums[key] = sums.get(key, 0.0) + v * k
            res = {"val/loss": tot / max(1, n), **{f"val/{k}": v / max(1, n) for k, v in sums.items()}}
            last_val.update(res)
            return res

        fingerprint = {"policy": str(src), "data_sha256": data_hash[:16], "pairs": len(train_pairs),
                       "seq_len": cfg.train.seq_len, "batch_size": cfg.train.batch_size,
                       "world_size": info.world_size, "lora": cfg.lora.enabled, "layout": cfg.data.layout,
                       "loss": cfg.loss.type, "beta": cfg.loss.beta}
        state = train_loop(
            run_, cfg.train, step_fn=step_fn,
            modules={"model": model}, stateful={"optimizer": opt, "scheduler": sched, "data": loader},
            fingerprint=fingerprint, eval_fn=eval_fn if val_batches else None, resume=resume,
        )

        # ---------------------------------------------------------------- save and summary
        last_val = all_reduce_mean(last_val, info)  # eval_fn saw this rank's share only
        summary = {"steps": state.step, "tokens": state.tokens, "final_loss": state.ema_loss,
                   "best_val_loss": state.best_val, "val_loss": last_val.get("val/loss"),
                   "val_accuracy": last_val.get("val/rewards/accuracies"),
                   "val_margin": last_val.get("val/rewards/margins"),
                   "train_pairs": len(train_pairs), "val_pairs": len(val_pairs),
                   "train_comparisons": st.comparisons, "val_comparisons": vst.comparisons,
                   "truncated_pairs": st.truncated_pairs + vst.truncated_pairs,
                   "skipped_too_long": st.skipped_too_long + vst.skipped_too_long,
                   "comparisons_without_pairs": st.no_pairs + vst.no_pairs,
                   "reference_logps": ref_source, "skipped_steps": state.skipped_steps}
        save_model(model, tok, run_.model_dir, info.is_main)  # every rank: FSDP2 gathers
        run_.write_manifest("completed", summary)
        run_.close()
        acc = last_val.get("val/rewards/accuracies")
        print0(f"dpo done: {run_.model_dir}" + (f" (val reward accuracy {acc:.3f})" if acc is not None else ""))
        return {"run_id": run_.run_id, "out": str(out), "config": to_dict(cfg), **summary}
    finally:
        cleanup_distributed()
