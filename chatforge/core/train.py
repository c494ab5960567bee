"""The one training-loop skeleton every stage uses (pretrain, SFT, RM, PPO, DPO, GRPO).

A stage builds its model(s), optimizer(s) and data, then hands `train_loop` a `step_fn(step)` that
does one whole optimizer step and returns metrics. The loop owns everything else, once:
resume from the latest checkpoint (exact: weights, optimizer, scheduler, RNG, data position),
periodic eval, checkpoints, metrics to JSONL/TensorBoard, the progress bar and the per-step line,
non-finite-loss skips, and the final summary.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch

from chatforge.config import TrainConfig
from chatforge.core.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from chatforge.core.distributed import DistInfo, all_reduce_mean
from chatforge.core.io import UserError
from chatforge.core.log import console, is_interactive, print0, warn
from chatforge.core.run import Run

MAX_CONSECUTIVE_NONFINITE = 5


@dataclass
class LoopState:
    """Loop bookkeeping saved with every checkpoint (nanochat's meta loop state)."""

    step: int = 0
    tokens: int = 0
    elapsed: float = 0.0
    ema_loss: float | None = None
    best_val: float | None = None
    skipped_steps: int = 0


# ----------------------------------------------------------------------------- building blocks


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return None


def autocast(dtype: torch.dtype | None, device: torch.device) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_optimizer(params: list[torch.nn.Parameter] | Any, cfg: TrainConfig, device: torch.device,
                   lr: float | None = None) -> torch.optim.Optimizer:
    """AdamW, fused where the device supports it; no weight decay on 1-D params (norms, biases)."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type in ("cuda", "cpu")  # fused AdamW exists on CPU too (one kernel, not a loop per tensor)
    return torch.optim.AdamW(groups, lr=lr or cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine to min_lr_ratio, WSD (flat then linear decay), or constant."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    lo = cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "wsd":
        decay_start = int(cfg.max_steps * (1 - cfg.decay_fraction))
        if step < decay_start:
            return 1.0
        frac = (step - decay_start) / max(1, cfg.max_steps - decay_start)
        return 1.0 - (1.0 - lo) * min(1.0, frac)
    frac = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(s, cfg))


def prepare_training(model: torch.nn.Module, cfg: TrainConfig, info: DistInfo
                     ) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any, torch.dtype | None]:
    """The usual set-up of a one-model stage: (the model wrapped for train.strategy - itself, DDP, or FSDP2
    sharded in place - optionally compiled; AdamW over the (sharded) parameters; LR schedule; autocast dtype).
    Under FSDP2 with bf16 the mixed-precision policy casts instead of autocast."""
    from chatforge.core.distributed import is_sharded, wrap_model

    wrapped = wrap_model(model, info, cfg)
    if cfg.compile:
        wrapped = torch.compile(wrapped)
    opt = make_optimizer(model.parameters(), cfg, info.device)
    amp = None if is_sharded(model) else autocast_dtype(cfg, info.device)
    return wrapped, opt, make_scheduler(opt, cfg), amp


def set_threads(cfg: TrainConfig) -> None:
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)


def optimizer_step(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any, grad_clip: float,
                   loss_value: float) -> tuple[bool, float]:
    """Clip, step and zero grads; skip the update when the loss or grad norm is not finite."""
    params = [p for p in model.parameters() if p.requires_grad]
    gnorm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    if hasattr(gnorm, "full_tensor"):  # FSDP2: the norm of sharded grads is a DTensor
        gnorm = gnorm.full_tensor()
    ok = math.isfinite(loss_value) and bool(torch.isfinite(gnorm))
    if ok:
        opt.step()
    opt.zero_grad(set_to_none=True)
    sched.step()
    return ok, float(gnorm)


def lm_step_fn(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any, batches: Iterator,
               loss_fn: Callable[[torch.nn.Module, Any], tuple[torch.Tensor, int]], cfg: TrainConfig,
               info: DistInfo, amp: torch.dtype | None,
               targets_fn: Callable[[Any], int] | None = None) -> Callable[[int], dict]:
    """One optimizer step of a loss over `grad_accum` micro-batches (pretrain, SFT, RM, DPO).

    `loss_fn(model, batch) -> (mean loss, tokens)`; the gradient all-reduce (DDP) or reduce-scatter (FSDP2)
    happens on the last micro-batch only. With `targets_fn(batch) -> number of target tokens`, the loss is
    the mean over every target token of the global batch (all micro-batches, all ranks: one scalar
    all-reduce per step), so a step does not depend on how the batch is split over ranks and micro-batches;
    without it, each micro-batch's mean counts equally (right when every batch has as many targets).
    """
    from chatforge.core.distributed import all_reduce_sum, grad_sync

    def step(_: int) -> dict:
        total, tokens = 0.0, 0
        micro_batches = [next(batches) for _ in range(cfg.grad_accum)]
        if targets_fn is not None:
            counts = [targets_fn(b) for b in micro_batches]
            world_targets = float(all_reduce_sum(torch.tensor(float(sum(counts))), info))
            # gradients are averaged over ranks, so each rank's share is scaled by world_size
            weights = [c * info.world_size / max(1.0, world_targets) for c in counts]
        else:
            weights = [1.0 / cfg.grad_accum] * cfg.grad_accum
        for micro, batch in enumerate(micro_batches):
            sync = micro == cfg.grad_accum - 1 or not info.enabled
            with grad_sync([model], sync), autocast(amp, info.device):
                loss, n = loss_fn(model, batch)
                (loss * weights[micro]).backward()
            total += float(loss.detach()) * weights[micro]
            tokens += n
        ok, gnorm = optimizer_step(model, opt, sched, cfg.grad_clip, total)
        return {"train/loss": total, "train/grad_norm": gnorm, "train/lr": sched.get_last_lr()[0],
                "_tokens": tokens, "_ok": ok}

    return step


# ----------------------------------------------------------------------------- the loop


def _progress(total: int, start: int, enabled: bool) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    p = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"), TimeRemainingColumn(),
        console=console, disable=not enabled, transient=False,
    )
    task = p.add_task("train", total=total, completed=start, loss="-", tps="-")
    return p, task


def train_loop(
    run: Run,
    cfg: TrainConfig,
    *,
    step_fn: Callable[[int], dict],
    modules: dict[str, torch.nn.Module],
    stateful: dict[str, Any],
    fingerprint: dict,
    eval_fn: Callable[[], dict] | None = None,
    flops_per_token: float | None = None,
    peak_flops: float | None = None,
    resume: bool = True,
    should_stop: Callable[[dict], str | None] | None = None,
) -> LoopState:
    """Run `step_fn` from the resumed step to `cfg.max_steps`; returns the final loop state.

    `modules` are checkpointed as safetensors, `stateful` objects through their state dicts.
    """
    info = run.info
    state = LoopState()
    ckpt = latest_checkpoint(run.ckpt_dir) if resume else None
    if ckpt is not None:
        meta = load_checkpoint(ckpt, modules, stateful, info, fingerprint)
        state = LoopState(**meta["loop"])
        print0(f"resumed from {ckpt} (step {state.step})")
    elif not resume and run.ckpt_dir.exists() and info.is_main:
        import shutil

        shutil.rmtree(run.ckpt_dir)
    run.open_sinks(state.step)
    run.write_manifest("running")

    def save() -> None:
        save_checkpoint(run.ckpt_dir, state.step, modules, stateful,
                        {"loop": asdict(state), "fingerprint": fingerprint}, info, keep=cfg.keep_checkpoints)

    def evaluate() -> dict:
        if eval_fn is None:
            return {}
        for m in modules.values():
            m.eval()
        with torch.no_grad():
            res = all_reduce_mean(eval_fn(), info)
        for m in modules.values():
            m.train()
        if "val/loss" in res and (state.best_val is None or res["val/loss"] < state.best_val):
            state.best_val = res["val/loss"]
        return res

    progress, task = _progress(cfg.max_steps, state.step, info.is_main and is_interactive())
    nonfinite_run = 0
    last_log = time.perf_counter()
    tokens_since = 0
    with progress:
        while state.step < cfg.max_steps:
            t0 = time.perf_counter()
            out = step_fn(state.step)
            ok = out.pop("_ok", True)
            n_tok = out.pop("_tokens", 0)
            dt = time.perf_counter() - t0
            state.elapsed += dt
            state.step += 1
            if not ok:
                state.skipped_steps += 1
                nonfinite_run += 1
                warn(f"step {state.step}: non-finite loss or gradient; update skipped ({state.skipped_steps} so far)")
                if nonfinite_run >= MAX_CONSECUTIVE_NONFINITE:
                    raise UserError(f"{nonfinite_run} consecutive non-finite steps at step {state.step}; stopping "
                                    "(lower train.lr or check the data). The last good checkpoint is kept.")
            else:
                nonfinite_run = 0
            n_tok_global = n_tok * info.world_size
            state.tokens += n_tok_global
            tokens_since += n_tok_global
            loss = out.get("train/loss", out.get("loss"))
            if loss is not None and math.isfinite(loss):
                state.ema_loss = loss if state.ema_loss is None else 0.9 * state.ema_loss + 0.1 * loss
            last = state.step == cfg.max_steps
            metrics = dict(out)
            if cfg.log_every and (state.step % cfg.log_every == 0 or last):
                now = time.perf_counter()
                tps = tokens_since / max(1e-9, now - last_log)
                metrics = all_reduce_mean(metrics, info)
                metrics["perf/tokens_per_sec"] = tps
                if flops_per_token and peak_flops:
                    metrics["perf/mfu"] = tps * flops_per_token / (peak_flops * info.world_size)
                last_log, tokens_since = now, 0
                remaining = (cfg.max_steps - state.step) * state.elapsed / max(1, state.step)
                lstr = f"{loss:.4f}" if loss is not None else "-"
                line = (f"step {state.step:>6}/{cfg.max_steps} | loss {lstr} | lr "
                        f"{out.get('train/lr', float('nan')):.2e} | dt {dt * 1000:.0f}ms | {tps:,.0f} tok/s")
                if "perf/mfu" in metrics:
                    line += f" | mfu {100 * metrics['perf/mfu']:.1f}%"
                line += f" | eta {remaining / 60:.1f}m"
                if info.is_main:
                    if is_interactive():
                        progress.update(task, loss=lstr, tps=f"{tps:,.0f}")
                    else:
                        console.print(line)
                run.sink.log(state.step, metrics)
            if eval_fn is not None and ((cfg.eval_every and state.step % cfg.eval_every == 0) or last):
                res = evaluate()
                if res and info.is_main:
                    run.sink.log(state.step, res)
                    console.print("  " + "  ".join(f"{k} {v:.4f}" for k, v in res.items()))
            progress.update(task, completed=state.step)
            if (cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0) or last:
                save()
            reason = should_stop(metrics) if should_stop else None
            if reason:
                warn(f"stopping early at step {state.step}: {reason}")
                save()
                break
    return state
