"""GRPO: K replies per prompt, each scored, advantage = reward minus its group's mean (over its std).

    chatforge grpo --policy runs/sft --reward tasks --prompts tasks:50 --out runs/grpo
    chatforge grpo --policy runs/sft --reward runs/rm --prompts prompts.jsonl --set grpo.beta=0.04 --out runs/grpo
    torchrun --nproc-per-node 2 -m chatforge.cli grpo ...

What it really is (Shao et al. 2024, DeepSeekMath): PPO without a critic. The baseline is the mean reward of
the other replies to the same prompt, so every reply token shares one sequence-level advantage; the
clipped ratio objective allows grpo.epochs > 1 passes over a batch; an optional k3 KL penalty to a frozen
reference (beta, off by default as in TRL) is added to the loss rather than to the reward. The loss is a
masked mean over all reply tokens of a minibatch (token-level normalisation, as DAPO and nanochat).
With grpo.epochs=1 and one minibatch per batch the ratio is 1 and this is REINFORCE with a group baseline.

One iteration (one `train_loop` step):
    1. sample K replies per prompt of this rank (engine num_samples=K: each prompt is prefilled once)
    2. log-probs of the sampling policy (the "old" log-probs) and its entropy
    3. reference log-probs (only when grpo.beta > 0)
    4. rewards from the reward source; group advantages (core/rl.group_advantages)
    5. grpo.epochs passes over minibatches: clipped policy loss with the sequence advantages (+ beta * KL)
    6. metrics, reward-hacking guards
Shared plumbing (rollouts, log-probs, minibatches, guards) is core/rollout.py; the loop is core/train.py.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from chatforge.config import GRPOConfig, to_dict
from chatforge.core.distributed import (
    all_reduce_mean,
    cleanup_distributed,
    grad_sync,
    init_distributed,
    resolve_strategy,
    wrap_ddp,
    wrap_model,
)
from chatforge.core.io import UserError
from chatforge.core.log import print0
from chatforge.core.model import count_params, save_model, unwrap
from chatforge.core.rewards import make_reward_source, score_rollout
from chatforge.core.rl import get_kl_estimator, group_advantages, masked_mean, masked_sum, ppo_policy_loss
from chatforge.core.rollout import (
    GoldMonitor,
    HackingGuards,
    PromptStream,
    any_rank,
    disable_dropout,
    generate_rollouts,
    keep_scorable,
    load_policy,
    load_reference,
    minibatches,
    model_inputs,
    prepare_prompts,
    reference_logprobs,
    response_forward,
    rollout_logprobs,
    rollout_seed,
    shard_frozen,
    step_optimizers,
)
from chatforge.core.run import Run, parent_run_id
from chatforge.core.train import (
    autocast,
    autocast_dtype,
    make_optimizer,
    make_scheduler,
    set_threads,
    train_loop,
)


def grpo_loss(policy: Any, rows: tuple[torch.Tensor, ...], old_logprobs: torch.Tensor,
              ref_logprobs: torch.Tensor | None, advantages: torch.Tensor, cfg: GRPOConfig
              ) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate with per-sequence advantages [B] (+ beta · mean per-token KL to the reference)."""
    query_ids, query_mask, response_ids, mask = rows
    inputs = model_inputs(query_ids, query_mask, response_ids, mask)
    logprobs, _, _ = response_forward(policy, inputs, response_ids, mask, cfg.rollout.temperature)
    loss, st = ppo_policy_loss(logprobs, old_logprobs, advantages, mask, cfg.grpo.clip_range)
    stats = {"loss/policy": loss.item(), "policy/clipfrac": float(st["clipfrac"]),
             "policy/approxkl": float(st["approxkl"]), "policy/ratio": float(st["ratio"])}
    if cfg.grpo.beta > 0 and ref_logprobs is not None:
        kl = masked_mean(get_kl_estimator(cfg.grpo.kl_estimator)(logprobs, ref_logprobs), mask)
        loss = loss + cfg.grpo.beta * kl
        stats["loss/kl"] = kl.item()
    return loss, stats


def check_config(cfg: GRPOConfig) -> None:
    """GRPO-specific checks, collected and raised once."""
    problems = []
    for name in ("policy", "reward", "prompts"):
        if not getattr(cfg, name):
            problems.append(f"grpo needs --{name}")
    g, t = cfg.grpo, cfg.train
    rows = t.batch_size * g.group_size
    if g.group_size < 2:
        problems.append("grpo.group_size must be >= 2 (the baseline is the group mean)")
    if g.epochs < 1 or g.minibatch_size < 1:
        problems.append("grpo.epochs and grpo.minibatch_size must be >= 1")
    elif rows % g.minibatch_size:
        problems.append(f"grpo.minibatch_size={g.minibatch_size} must divide train.batch_size x grpo.group_size={rows}")
    elif g.minibatch_size % t.grad_accum:
        problems.append(f"train.grad_accum={t.grad_accum} must divide grpo.minibatch_size={g.minibatch_size}")
    if g.beta < 0 or g.clip_range <= 0:
        problems.append("grpo.beta must be >= 0 and grpo.clip_range > 0")
    if cfg.rollout.max_new_tokens < 1 or cfg.rollout.temperature <= 0:
        problems.append("rollout.max_new_tokens must be >= 1 and rollout.temperature > 0")
    if problems:
        raise UserError("invalid grpo config: " + "; ".join(problems))


def run(cfg: GRPOConfig, out: Path, resume: bool = True) -> dict:
    """Train a policy with GRPO into the run dir `out`; returns the summary (also in manifest.json)."""
    from chatforge.evals.text import near_duplicate_rate

    check_config(cfg)
    info = init_distributed(cfg.train.device)
    strategy = resolve_strategy(cfg.train, info)  # bad strategy: an error before any work
    set_threads(cfg.train)
    out = Path(out)
    try:
        # ---------------------------------------------------------------- models, reward, prompts
        policy, tok, src = load_policy(cfg.policy, cfg.lora, info.device)  # type: ignore[arg-type]
        disable_dropout(policy)
        use_ref = cfg.grpo.beta > 0
        ref_spec = cfg.reference or (None if cfg.lora.enabled else str(src))
        ref = load_reference(ref_spec, policy, tok, cfg.lora.enabled, info.device) if use_ref else None
        reward = make_reward_source(cfg.reward, info.device, cfg.rollout.forward_batch_size)  # type: ignore[arg-type]
        print0(f"policy: {count_params(policy) / 1e6:.2f}M params ({count_params(policy, True) / 1e6:.3f}M trainable)"
               f"; reward: {reward.name}; group size {cfg.grpo.group_size}; KL beta {cfg.grpo.beta}"
               + (f" to {'policy with adapters off' if ref is None else ref_spec}" if use_ref else ""))
        context = getattr(unwrap(policy).config.get_text_config(), "max_position_embeddings", None)
        prompts, prompt_ids, too_long = prepare_prompts(cfg.prompts, tok, cfg.rollout.max_new_tokens, context)  # type: ignore[arg-type]
        prompts, prompt_ids = keep_scorable(reward, prompts, prompt_ids)
        stream = PromptStream(len(prompts), cfg.train.batch_size, cfg.train.seed, info.rank, info.world_size)

        # ---------------------------------------------------------------- optimizer
        if strategy == "fsdp2":  # the policy sharded and trained; reference and RM by train.fsdp_frozen
            ddp_policy = wrap_model(policy, info, cfg.train)
            ref = shard_frozen(ref, reward, info, cfg.train)
        else:
            ddp_policy = wrap_ddp(policy, info)
        opt = make_optimizer(policy.parameters(), cfg.train, info.device)
        sched = make_scheduler(opt, cfg.train)
        params = [p for p in policy.parameters() if p.requires_grad]
        guards = HackingGuards(cfg.guards, "grpo")
        amp = autocast_dtype(cfg.train, info.device)
        gold = (GoldMonitor(cfg.gold.spec, reward, cfg.gold.prompts, tok, cfg.rollout.max_new_tokens, cfg.gold.every,
                            Path(out) / "best_gold", info.device, context, cfg.gold.samples,
                            cfg.gold.temperature) if cfg.gold.spec else None)
        ro_cfg, chunk, k = cfg.rollout, cfg.rollout.forward_batch_size, cfg.grpo.group_size

        def step_fn(step: int) -> dict:
            # over-optimisation: proxy vs gold on validation prompts, of the policy before this update
            gold_row = gold.before_update(policy, step, info.is_main) if gold is not None else {}
            # 1. K replies per prompt of this rank
            idx = next(stream)
            seeds = [rollout_seed(cfg.train.seed, step, info.rank, i) for i in range(len(idx))]
            ro = generate_rollouts(policy, tok, [prompts[i] for i in idx], [prompt_ids[i] for i in idx],
                                   max_new_tokens=ro_cfg.max_new_tokens, temperature=ro_cfg.temperature,
                                   top_k=ro_cfg.top_k, top_p=ro_cfg.top_p, seeds=seeds, compile=ro_cfg.compile, num_samples=k)
            rows = (ro.query_ids, ro.query_mask, ro.response_ids, ro.mask)
            with autocast(amp, info.device):
                # 2. sampling-policy log-probs and entropy
                old_logprobs, entropy = rollout_logprobs(policy, *rows, ro_cfg.temperature, chunk)
                # 3. reference log-probs, only when the KL term is on
                ref_logprobs = (reference_logprobs(ref, policy, *rows, ro_cfg.temperature, chunk)
                                if use_ref else None)
            # 4. rewards and group advantages
            rewards = torch.tensor(score_rollout(reward, tok, ro), dtype=torch.float32, device=info.device)
            advantages = group_advantages(rewards, k, cfg.grpo.scale)
            if any_rank(not bool(torch.isfinite(rewards).all() and torch.isfinite(old_logprobs).all()), info):
                return {"train/loss": float("nan"), "_ok": False}

            # 5. epochs over minibatches
            stats: dict[str, list[float]] = defaultdict(list)
            all_ok, n_micro = True, cfg.train.grad_accum
            for mb_rows in minibatches(len(ro), cfg.grpo.minibatch_size, cfg.grpo.epochs,
                                       rollout_seed(cfg.train.seed, step, info.rank, -1)):
                total = 0.0
                for j, m in enumerate(mb_rows.chunk(n_micro)):
                    with grad_sync([ddp_policy], j == n_micro - 1), autocast(amp, info.device):
                        loss, st = grpo_loss(ddp_policy, tuple(x[m] for x in rows), old_logprobs[m],
                                             ref_logprobs[m] if ref_logprobs is not None else None, advantages[m], cfg)
                        (loss / n_micro).backward()
                    total += loss.item() / n_micro
                    for key, v in st.items():
                        stats[key].append(v)
                ok, norms = step_optimizers([(params, opt)], cfg.train.grad_clip, total, info)
                all_ok &= ok
                stats["train/loss"].append(total)
                stats["train/grad_norm"].append(norms[0])
            lr = sched.get_last_lr()[0]
            sched.step()

            # 6. metrics and guards
            grouped = rewards.view(-1, k)
            metrics = {
                "objective/scores": float(rewards.mean()), "objective/entropy": entropy,
                "grpo/reward_std": float(grouped.std(dim=1).mean()),
                "grpo/frac_zero_std": float((grouped.std(dim=1) == 0).float().mean()),
                "grpo/reply_length": float(ro.mask.sum(1).float().mean()),
                "grpo/eot_rate": float(ro.ended.float().mean()),
                "grpo/duplicate_rate": near_duplicate_rate(ro.texts[::k]),  # one reply per prompt
                "train/lr": lr, "grpo/lr": lr,
                **{key: sum(v) / len(v) for key, v in stats.items()},
            }
            if ref_logprobs is not None:
                kl = get_kl_estimator(cfg.grpo.kl_estimator)(old_logprobs, ref_logprobs)
                metrics["objective/kl"] = float(masked_sum(kl, ro.mask, dim=1).mean())
            metrics = all_reduce_mean(metrics, info)
            if gold is not None:  # the final policy too, after this (last) update
                gold_row = gold.after_last_update(policy, step, cfg.train.max_steps, info.is_main) or gold_row
                metrics.update(gold_row)
            metrics.update(guards.update(metrics))
            return {**metrics, "_tokens": int(ro.mask.sum()), "_ok": all_ok}

        prompts_hash = hashlib.sha256(json.dumps([p["messages"] for p in prompts]).encode()).hexdigest()
        run_ = Run(out, "grpo", cfg, info, parent=parent_run_id(src))
        run_.inputs = {"policy": {"path": str(src)}, "reward": {"spec": cfg.reward},
                       "prompts": {"spec": cfg.prompts, "sha256": prompts_hash}}
        fingerprint = {"policy": str(src), "reward": cfg.reward, "prompts_sha256": prompts_hash[:16],
                       "prompts": len(prompts), "batch_size": cfg.train.batch_size, "group_size": k,
                       "world_size": info.world_size, "lora": cfg.lora.enabled}
        state = train_loop(run_, cfg.train, step_fn=step_fn, modules={"policy": policy},
                           stateful={"optimizer": opt, "scheduler": sched, "prompts": stream, "guards": guards,
                                     **({"gold": gold} if gold is not None else {})},
                           fingerprint=fingerprint, resume=resume, should_stop=guards.should_stop)

        summary = {"iterations": state.step, "reply_tokens": state.tokens, "final_loss": state.ema_loss,
                   "skipped_steps": state.skipped_steps, "prompts": len(prompts), "skipped_too_long": too_long,
                   "guards_fired": dict(guards.fired), "stopped_early": state.step < cfg.train.max_steps,
                   **({"gold_best": gold.best, "gold_best_step": gold.best_step} if gold is not None else {})}
        save_model(policy, tok, run_.model_dir, info.is_main)  # every rank: FSDP2 gathers
        run_.write_manifest("completed", summary)
        run_.close()
        print0(f"grpo done: {run_.model_dir}")
        return {"run_id": run_.run_id, "out": str(out), "config": to_dict(cfg), **summary}
    finally:
        cleanup_distributed()
