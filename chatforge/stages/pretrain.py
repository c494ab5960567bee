"""Next-token pretraining, from scratch (a Llama sized by `model.depth`) or continuing any HF model.

    chatforge pretrain --out runs/base                        # embedded corpus, default config
    chatforge pretrain --config cfg.yaml --set model.depth=6 --set train.max_steps=2000 --out runs/base
    torchrun --nproc-per-node 2 -m chatforge.cli pretrain --out runs/base   # DDP, gloo on CPU

Writes a run dir (DESIGN.md): model/ (save_pretrained), checkpoints/, metrics.jsonl, tb/, manifest.json.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from chatforge.config import PretrainConfig, to_dict
from chatforge.core.distributed import barrier, cleanup_distributed, init_distributed
from chatforge.core.io import UserError
from chatforge.core.log import print0, warn
from chatforge.core.model import (
    build_model,
    count_params,
    flops_per_token,
    load_model,
    resolve_model_path,
    save_model,
)
from chatforge.core.run import Run, parent_run_id
from chatforge.core.tokenizer import load_tokenizer
from chatforge.core.train import (
    lm_step_fn,
    prepare_training,
    set_threads,
    train_loop,
)
from chatforge.data.lm_loader import WindowLoader, eval_batches, load_split


def prepare_default_data(data_dir: Path, vocab_size: int, is_main: bool) -> Path:
    """Prepare the embedded corpus once (rank 0), so `chatforge pretrain` works with no input."""
    if is_main and not (data_dir / "meta.json").exists():
        from chatforge.data.corpus import PrepareConfig, prepare

        print0(f"no data.dir given: preparing the embedded corpus into {data_dir}")
        prepare(None, data_dir, PrepareConfig(vocab_size=vocab_size))
    barrier()
    return data_dir


def lm_loss(model: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int]:
    x, y = batch
    logits = model(input_ids=x).logits
    loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))
    return loss, y.numel()


def config_fingerprint(model: Any, cfg: PretrainConfig, world_size: int, n_windows: int) -> dict:
    arch = json.dumps(model.config.to_dict(), sort_keys=True, default=str)
    return {
        "model_config": hashlib.sha1(arch.encode()).hexdigest()[:12],
        "seq_len": cfg.train.seq_len,
        # the global batch, not its split over ranks: a checkpoint resumes on another world size with the same
        # global batch (FSDP2 checkpoints reshard; the data cursor counts global windows)
        "global_batch": cfg.train.batch_size * world_size,
        "grad_accum": cfg.train.grad_accum,
        "train_windows": n_windows,
        "seed": cfg.train.seed,
    }


def run(cfg: PretrainConfig, out: Path, resume: bool = True) -> dict:
    info = init_distributed(cfg.train.device)
    set_threads(cfg.train)
    out = Path(out)
    try:
        data_dir = Path(cfg.data.dir) if cfg.data.dir else prepare_default_data(out / "data", cfg.data.vocab_size,
                                                                                info.is_main)
        if not (data_dir / "meta.json").exists():
            raise UserError(f"data.dir {data_dir} is not a prepared data dir (run `chatforge data prepare`)")
        meta = json.loads((data_dir / "meta.json").read_text(encoding="utf-8"))

        # ---------------------------------------------------------------- model and tokenizer
        parent = None
        if cfg.model.from_:
            src = resolve_model_path(cfg.model.from_)
            tok = load_tokenizer(src)
            model = load_model(str(src))
            parent = parent_run_id(src)
            if meta.get("vocab_size", 0) > model.get_input_embeddings().weight.shape[0]:
                raise UserError(f"{data_dir} was tokenized with a larger vocabulary ({meta['vocab_size']}) than "
                                f"the model's; prepare the data with --tokenizer {src}")
            tok_dir = Path(meta.get("tokenizer", data_dir / "tokenizer"))
            if not tok_dir.is_absolute():
                tok_dir = data_dir / tok_dir
            if tok_dir.exists() and load_tokenizer(tok_dir).get_vocab() != tok.get_vocab():
                raise UserError(f"{data_dir} was tokenized with another tokenizer than {src}'s; "
                                f"prepare it with --tokenizer {src}")
        else:
            tok_dir = Path(meta.get("tokenizer", "tokenizer"))
            tok = load_tokenizer(tok_dir if tok_dir.is_absolute() else data_dir / tok_dir)
            model = build_model(cfg.model, tok, cfg.train.seed)
        if cfg.train.seq_len > model.config.max_position_embeddings:
            raise UserError(f"train.seq_len {cfg.train.seq_len} exceeds the model's context "
                            f"{model.config.max_position_embeddings}")
        model.to(info.device).train()
        n_params = count_params(model)
        print0(f"model: {n_params / 1e6:.2f}M params, {model.config.num_hidden_layers} layers, "
               f"width {model.config.hidden_size}, vocab {model.config.vocab_size}")

        # ---------------------------------------------------------------- data
        torch.manual_seed(cfg.train.seed)
        train_loader = WindowLoader(load_split(data_dir, "train"), cfg.train.seq_len, cfg.train.batch_size,
                                    cfg.train.seed, info.rank, info.world_size, device=info.device)
        val_shards = load_split(data_dir, "val")
        val = eval_batches(val_shards, cfg.train.seq_len, cfg.train.batch_size, cfg.train.eval_batches,
                           info.rank, info.world_size, info.device) if sum(len(s) for s in val_shards) > \
            cfg.train.seq_len + 1 else []
        if not val:
            warn("validation split is smaller than one window; no validation loss")

        # ---------------------------------------------------------------- optimizer and loop
        ddp_model, opt, sched, amp = prepare_training(model, cfg.train, info)

        def eval_fn() -> dict:
            losses = [lm_loss(ddp_model, b)[0].item() for b in val]
            loss = sum(losses) / len(losses)
            return {"val/loss": loss, "val/ppl": float(torch.exp(torch.tensor(min(loss, 50.0))))}

        run_ = Run(out, "pretrain", cfg, info, inputs={"data": data_dir / "meta.json"}, parent=parent)
        state = train_loop(
            run_, cfg.train,
            step_fn=lm_step_fn(ddp_model, opt, sched, train_loader, lm_loss, cfg.train, info, amp),
            modules={"model": model},
            stateful={"optimizer": opt, "scheduler": sched, "data": train_loader},
            fingerprint=config_fingerprint(model, cfg, info.world_size, train_loader.n_windows),
            eval_fn=eval_fn if val else None,
            flops_per_token=flops_per_token(model, cfg.train.seq_len),
            resume=resume,
        )
        summary = {"steps": state.step, "tokens": state.tokens, "params": n_params,
                   "final_loss": state.ema_loss, "best_val_loss": state.best_val,
                   "skipped_steps": state.skipped_steps, "train_seconds": round(state.elapsed, 1)}
        save_model(model, tok, run_.model_dir, info.is_main)  # every rank: FSDP2 gathers
        run_.write_manifest("completed", summary, extra={"data_dir": str(data_dir)})
        run_.close()
        print0(f"pretrain done: {run_.model_dir} ({state.step} steps, {state.tokens:,} tokens)")
        return {"run_id": run_.run_id, "out": str(out), "config": to_dict(cfg), **summary}
    finally:
        cleanup_distributed()
