"""Supervised fine-tuning on demonstrations: loss on assistant tokens only, packed, optionally LoRA.

    chatforge sft --model runs/base --data convs.jsonl --out runs/sft
    chatforge sft --model runs/base --data tasks:200 --data embedded:sft/oasst-best --out runs/sft
    chatforge sft --model smollm2-135m-instruct --data convs.jsonl --set lora.enabled=true --out runs/sft
    torchrun --nproc-per-node 2 -m chatforge.cli sft ...

The chat template comes from the model's tokenizer; the renderer decides the loss mask
(see data/sft_data.py for truncation and packing). Reuses the training skeleton in core/train.py.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from chatforge.config import SFTConfig, to_dict
from chatforge.core.distributed import cleanup_distributed, init_distributed, rank_share
from chatforge.core.io import UserError
from chatforge.core.log import print0, warn
from chatforge.core.model import apply_lora, count_params, load_model_and_tokenizer, save_model
from chatforge.core.run import Run, parent_run_id
from chatforge.core.train import (
    lm_step_fn,
    prepare_training,
    set_threads,
    train_loop,
)
from chatforge.data.sft_data import (
    RowLoader,
    collate,
    load_conversations,
    pack,
    render_examples,
    sft_loss,
    split_train_val,
    target_count,
    token_losses,
)

# The embedded demonstrations `sft` trains on when no --data is given (task suite + human-written oasst).
DEFAULT_DATA = ("tasks:200", "embedded:sft/oasst-best")


def run(cfg: SFTConfig, out: Path, resume: bool = True) -> dict:
    if not cfg.model:
        raise UserError("sft needs a model: --model RUN_DIR|HF_DIR|NAME")
    if not cfg.data.paths:
        # Like `pretrain` and `data prepare`, which default to the embedded corpus.
        cfg.data.paths = list(DEFAULT_DATA)
        print0(f"no --data given: the embedded demonstrations ({', '.join(DEFAULT_DATA)})")
    info = init_distributed(cfg.train.device)
    set_threads(cfg.train)
    out = Path(out)
    try:
        model, tok, src = load_model_and_tokenizer(cfg.model)
        if cfg.train.seq_len > model.config.max_position_embeddings:
            raise UserError(f"train.seq_len {cfg.train.seq_len} exceeds the model's context "
                            f"{model.config.max_position_embeddings}")

        # ---------------------------------------------------------------- data
        convs = load_conversations(cfg.data.paths)
        train_convs, val_convs = split_train_val(convs, cfg.data.val_fraction)
        train_ex, st = render_examples(tok, train_convs, cfg.train.seq_len, cfg.data.truncation)
        val_ex, _ = render_examples(tok, val_convs, cfg.train.seq_len, cfg.data.truncation)
        if st.skipped_too_long or st.truncated:
            warn(f"{st.truncated} conversations truncated by whole turns and {st.skipped_too_long} skipped: "
                 f"longer than train.seq_len={cfg.train.seq_len} (policy: data.truncation={cfg.data.truncation})")
        train_rows = pack(train_ex, cfg.train.seq_len, cfg.data.packing)
        val_rows = pack(val_ex, cfg.train.seq_len, cfg.data.packing)
        print0(f"sft data: {len(train_convs)} train / {len(val_convs)} val conversations, {len(train_rows)} "
               f"rows of <= {cfg.train.seq_len} tokens, {st.target_tokens:,} assistant tokens")
        loader = RowLoader(train_rows, cfg.train.batch_size, tok.pad_token_id, cfg.train.seed, info.rank,
                           info.world_size, info.device)
        my_val = rank_share(val_rows, info)
        val_batches = [collate(my_val[i: i + cfg.train.batch_size], tok.pad_token_id, info.device)
                       for i in range(0, min(len(my_val), cfg.train.eval_batches * cfg.train.batch_size),
                                      cfg.train.batch_size)]

        # ---------------------------------------------------------------- model and optimizer
        if cfg.lora.enabled:
            model = apply_lora(model, cfg.lora)
        model.to(info.device).train()
        n_train = count_params(model, trainable_only=True)
        print0(f"model: {count_params(model) / 1e6:.2f}M params, {n_train / 1e6:.3f}M trainable"
               f"{' (LoRA)' if cfg.lora.enabled else ''}")
        ddp_model, opt, sched, amp = prepare_training(model, cfg.train, info)

        def eval_fn() -> dict:
            tot, n = 0.0, 0
            for b in val_batches:
                losses, valid = token_losses(ddp_model, b)
                tot, n = tot + float(losses.sum()), n + int(valid.sum())
            return {"val/loss": tot / max(1, n)} if n else {}

        data_hash = hashlib.sha256(json.dumps([c["messages"] for c in convs]).encode()).hexdigest()
        run_ = Run(out, "sft", cfg, info, parent=parent_run_id(src))
        run_.inputs = {"data": {"specs": cfg.data.paths, "sha256": data_hash}, "model": {"path": str(src)}}
        fingerprint = {"model": str(src), "data_sha256": data_hash[:16], "rows": len(train_rows),
                       "seq_len": cfg.train.seq_len, "batch_size": cfg.train.batch_size,
                       "world_size": info.world_size, "lora": cfg.lora.enabled}
        state = train_loop(
            run_, cfg.train,
            step_fn=lm_step_fn(ddp_model, opt, sched, loader, sft_loss, cfg.train, info, amp, target_count),
            modules={"model": model}, stateful={"optimizer": opt, "scheduler": sched, "data": loader},
            fingerprint=fingerprint, eval_fn=eval_fn if val_batches else None, resume=resume,
        )
        summary = {"steps": state.step, "tokens": state.tokens, "final_loss": state.ema_loss,
                   "best_val_loss": state.best_val, "train_conversations": len(train_convs),
                   "val_conversations": len(val_convs), "truncated": st.truncated,
                   "skipped_too_long": st.skipped_too_long, "skipped_steps": state.skipped_steps}
        save_model(model, tok, run_.model_dir, info.is_main)  # every rank: FSDP2 gathers
        run_.write_manifest("completed", summary)
        run_.close()
        print0(f"sft done: {run_.model_dir}")
        return {"run_id": run_.run_id, "out": str(out), "config": to_dict(cfg), **summary}
    finally:
        cleanup_distributed()
