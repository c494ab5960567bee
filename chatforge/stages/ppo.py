"""PPO(-ptx) with a per-token KL penalty to a frozen reference: InstructGPT's RL stage.

    chatforge ppo --policy runs/sft --reward runs/rm --prompts prompts.jsonl --out runs/ppo
    chatforge ppo --policy runs/sft --reward tasks --prompts tasks:50 --out runs/ppo-tasks
    chatforge ppo ... --set ptx.coef=1.0 --set ptx.data=runs/data        # PPO-ptx
    chatforge ppo ... --set lora.enabled=true                             # LoRA policy + critic; reference = adapters off
    torchrun --nproc-per-node 2 -m chatforge.cli ppo ...                  # each rank rolls out its own prompts; DDP

One iteration (one `train_loop` step), written as in torchtune's PPO recipe:

  rollout
    1. sample ppo.samples_per_prompt = K replies per prompt with the KV-cache engine (this rank's
       train.batch_size / K prompts; rows prompt-major, each prompt prefilled once)
    2. log-probs of the rollout policy (the PPO "old" log-probs): the engine's own, recorded while sampling,
       when it sampled the unmodified distribution (temperature 1, no top-k/top-p, no autocast); else a forward
    3. log-probs of the frozen reference (the SFT model; with LoRA, the policy with adapters off)
    4. values of the critic at every reply token
    5. scores from the reward source (RM normalised with its stored offset, task checkers, ...), minus
       ppo.missing_eot_penalty for replies that hit the length limit without ending their turn; an RM that
       shares the policy's tokenizer scores the sampled token ids directly (rewards.score_rollout)
    6. the advantages, by ppo.baseline:
       critic  per-token reward = -beta * KL_t (k1 by default) plus the score at the last token;
               GAE(gamma, lambda) on the critic's values; whitened advantages (InstructGPT)
       both    as critic, after subtracting from each score the leave-one-out mean of its prompt's other
               K - 1 scores, so the critic and GAE see only "this reply beats its siblings", not the
               per-prompt offset a Bradley-Terry RM leaves free
       rloo    no critic at all: RLOO (Ahmadian et al. 2024), i.e. REINFORCE with a leave-one-out baseline
               on the sequence reward score - beta * KL, one advantage for every token of a reply (not
               whitened); with ppo.epochs=1 and one minibatch the ratio is 1 and this is plain REINFORCE
  PPO epochs
    7. ppo.epochs passes over minibatches: clipped policy loss + vf_coef * clipped value loss
       (+ ptx.coef * LM loss on a pretraining batch), one optimizer step per minibatch; during the first
       ppo.critic_warmup_iters iterations only the value loss, and only the critic steps
  bookkeeping
    8. KL controller update (fixed beta, or adaptive toward ppo.kl_target), metrics (TRL names), guards

`objective/entropy` is the mean per-token entropy of the policy on the rollout replies. When step 2 reuses
the engine's log-probs there is no rollout forward to read it from, so it comes from the first PPO epoch's
minibatch forwards (the first minibatch sees exactly the rollout policy, later ones the policy after up to
minibatches − 1 small updates). Where the profile went (6.3M policy, batch 8, 32 tokens, CPU): sampling
~25%, PPO backward ~25%, PPO forwards ~15%, the reference, critic and RM forwards ~7% each, Adam ~8%, and
the old-log-prob forward ~7% (now skipped).

The critic is a separate value model initialised from the reward model (InstructGPT), or from the policy
with a zero-initialised value head when the reward is not an RM (or its tokenizer differs); critic.shared
puts a value head on the policy's own trunk instead. The math lives in core/rl.py, the rollout plumbing in
core/rollout.py, and the loop (resume, checkpoints, logging) in core/train.py.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from chatforge.config import PPOConfig, PTXConfig, to_dict
from chatforge.core.distributed import (
    DistInfo,
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
from chatforge.core.model import apply_lora, count_params, save_model, unwrap
from chatforge.core.rewards import (
    RewardSource,
    RMReward,
    divide_by_sft_std,
    make_reward_source,
    same_token_ids,
    score_rollout,
)
from chatforge.core.rl import (
    AdaptiveKLController,
    FixedKLController,
    KLController,
    Trajectory,
    entropy_from_logits,
    eot_penalty,
    explained_variance,
    gae,
    leave_one_out_baseline,
    masked_mean,
    masked_sum,
    per_token_rewards,
    ppo_policy_loss,
    ppo_value_loss,
    rloo_advantages,
)
from chatforge.core.rollout import (
    GoldMonitor,
    HackingGuards,
    PromptStream,
    any_rank,
    disable_dropout,
    engine_logprobs_usable,
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
from chatforge.stages.rm import RewardNorm

# ----------------------------------------------------------------------------- critic


class TokenValueModel(torch.nn.Module):
    """A separate critic: a sequence classifier's trunk and 1-output score head, read at every position.

    HF *ForSequenceClassification computes `score(hidden)` for every position before pooling the last
    one; we call the trunk and the head ourselves to keep all positions. Works with a peft wrapper.
    A critic started from the RM applies the RM's reward normalisation, so that its first values are
    on the scale of the (normalised) rewards it must predict rather than off by the RM's raw offset.
    """

    def __init__(self, classifier: Any, norm: RewardNorm | None = None):
        super().__init__()
        self.classifier = classifier
        self.norm = norm or RewardNorm()

    def forward(self, inputs: dict[str, torch.Tensor], n_response: int) -> torch.Tensor:
        """Values [B, T] at the positions that predict the T reply tokens (same alignment as log-probs)."""
        bare = self.classifier.get_base_model() if hasattr(self.classifier, "get_base_model") else self.classifier
        trunk = getattr(bare, bare.base_model_prefix)
        hidden = trunk(**inputs, use_cache=False).last_hidden_state[:, -(n_response + 1): -1]
        return self.norm.apply(bare.score(hidden).squeeze(-1).float())


class ValueHead(torch.nn.Module):
    """critic.shared: a zero-initialised linear value head on the policy's last hidden states."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.score = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.score.weight)
        torch.nn.init.zeros_(self.score.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.score(hidden.to(self.score.weight.dtype)).squeeze(-1).float()


def _critic_source(cfg: PPOConfig, tok: Any, reward: RewardSource) -> str:
    """'reward' or 'policy': where the separate critic starts (see CriticConfig.init)."""
    is_rm = isinstance(reward, RMReward)
    compatible = is_rm and same_token_ids(tok, reward.tok)
    if cfg.critic.init == "reward" and not compatible:
        why = "the reward is not a reward model" if not is_rm else "the RM's tokenizer differs from the policy's"
        raise UserError(f"critic.init=reward, but {why}; use critic.init=policy (or auto)")
    if cfg.critic.init == "auto":
        return "reward" if compatible else "policy"
    return cfg.critic.init


def load_critic(cfg: PPOConfig, policy: Any, tok: Any, src: Path, reward: RewardSource,
                device: torch.device) -> tuple[torch.nn.Module, str]:
    """(critic, description). RM-initialised as InstructGPT did, else the policy's trunk with a zero head."""
    if cfg.critic.shared:
        return ValueHead(unwrap(policy).config.get_text_config().hidden_size).to(device), "shared value head"
    from transformers import AutoModelForSequenceClassification

    source = _critic_source(cfg, tok, reward)
    path = reward.path if source == "reward" else src  # type: ignore[union-attr]
    try:
        model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1, dtype=torch.float32)
    except Exception as e:  # transformers raises many types for an unsupported dir
        raise UserError(f"cannot load {path} as a value model (AutoModelForSequenceClassification): {e}") from e
    if not isinstance(getattr(model, "score", None), torch.nn.Linear):
        raise UserError(f"{path}: its sequence classifier has no `score` head; use critic.shared=true")
    if len(tok) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tok))
    if source == "policy":
        torch.nn.init.zeros_(model.score.weight)
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora, task_type="SEQ_CLS")
    norm = reward.norm if source == "reward" else None  # type: ignore[union-attr]
    return TokenValueModel(model, norm).to(device).train(), f"separate critic from the {source} ({path})"


def critic_values(critic: torch.nn.Module, inputs: dict[str, torch.Tensor], n_response: int,
                  hidden: torch.Tensor | None) -> torch.Tensor:
    """Values [B, T] from either critic kind (a shared head reads the policy's hidden states)."""
    return critic(hidden) if hidden is not None else critic(inputs, n_response)


@torch.no_grad()
def rollout_values(critic: torch.nn.Module, policy: Any, traj_rows: tuple[torch.Tensor, ...], shared: bool,
                   chunk: int) -> torch.Tensor:
    """Critic values [R, T] of the rollout replies, `chunk` rows per forward."""
    query_ids, query_mask, response_ids, mask = traj_rows
    parts = []
    for i in range(0, len(query_ids), chunk):
        s = slice(i, i + chunk)
        inputs = model_inputs(query_ids[s], query_mask[s], response_ids[s], mask[s])
        hidden = response_forward(policy, inputs, response_ids[s], mask[s], hidden=True)[2] if shared else None
        parts.append(critic_values(critic, inputs, response_ids.shape[1], hidden))
    return torch.cat(parts)


# ----------------------------------------------------------------------------- loss


def ppo_loss(policy: Any, critic: torch.nn.Module | None, mb: Trajectory, advantages: torch.Tensor,
             returns: torch.Tensor, cfg: PPOConfig, ptx_batch: Any = None,
             ptx_model: Any = None, update_policy: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped policy loss + vf_coef · clipped value loss (+ ptx.coef · LM loss on `ptx_batch`) on one minibatch.

    `ptx_batch`: (inputs, targets) windows of a prepared corpus, or a packed SFT batch (dict) from `ptx.demos`.

    `ptx_model` is the module the LM loss runs through (the bare policy under DDP; default `policy`).
    `critic=None` (ppo.baseline=rloo): no value loss. `update_policy=False` (critic warm-up): the value loss only.
    """
    from chatforge.data.sft_data import sft_loss
    from chatforge.stages.pretrain import lm_loss

    inputs = model_inputs(mb.query_ids, mb.query_mask, mb.response_ids, mb.mask)
    logprobs, logits, hidden = response_forward(policy, inputs, mb.response_ids, mb.mask, cfg.rollout.temperature,
                                                hidden=cfg.critic.shared)
    pg_loss, pg = ppo_policy_loss(logprobs, mb.logprobs, advantages, mb.mask, cfg.ppo.clip_range)
    if critic is not None:
        values = critic_values(critic, inputs, mb.response_ids.shape[1], hidden)
        vf_loss, vf = ppo_value_loss(values, mb.values, returns, mb.mask, cfg.ppo.clip_range_value)
    else:
        vf_loss, vf = torch.zeros((), device=logprobs.device), {"clipfrac": 0.0}
    loss = (pg_loss if update_policy else 0.0 * pg_loss) + cfg.ppo.vf_coef * vf_loss
    with torch.no_grad():
        entropy = float(entropy_from_logits(logits.detach(), mb.mask))
    stats = {"loss/policy": pg_loss.item(), "loss/value": vf_loss.item(), "policy/clipfrac": float(pg["clipfrac"]),
             "policy/approxkl": float(pg["approxkl"]), "policy/ratio": float(pg["ratio"]),
             "policy/entropy": entropy, "val/clipfrac": float(vf["clipfrac"])}
    if cfg.ptx.coef > 0 and ptx_batch is not None and update_policy:
        ptx_loss, _ = (sft_loss if isinstance(ptx_batch, dict) else lm_loss)(
            ptx_model if ptx_model is not None else policy, ptx_batch)
        loss = loss + cfg.ptx.coef * ptx_loss
        stats["ppo/ptx_loss"] = ptx_loss.item()
    return loss, stats


# ----------------------------------------------------------------------------- setup


def check_config(cfg: PPOConfig) -> None:
    """PPO-specific checks, collected and raised once."""
    problems = []
    for name in ("policy", "reward", "prompts"):
        if not getattr(cfg, name):
            problems.append(f"ppo needs --{name}")
    p, t = cfg.ppo, cfg.train
    if p.epochs < 1 or p.minibatch_size < 1:
        problems.append("ppo.epochs and ppo.minibatch_size must be >= 1")
    elif t.batch_size % p.minibatch_size:
        problems.append(f"ppo.minibatch_size={p.minibatch_size} must divide train.batch_size={t.batch_size}")
    elif p.minibatch_size % t.grad_accum:
        problems.append(f"train.grad_accum={t.grad_accum} must divide ppo.minibatch_size={p.minibatch_size}")
    if p.kl_coef < 0 or p.clip_range <= 0 or p.clip_range_value <= 0:
        problems.append("ppo.kl_coef must be >= 0 and the clip ranges > 0")
    if not (0 <= p.gamma <= 1 and 0 <= p.lam <= 1):
        problems.append("ppo.gamma and ppo.lam must be in [0, 1]")
    if p.kl_target is not None and p.kl_target <= 0:
        problems.append("ppo.kl_target must be > 0 (or none for a fixed KL coefficient)")
    if cfg.rollout.max_new_tokens < 1 or cfg.rollout.temperature <= 0:
        problems.append("rollout.max_new_tokens must be >= 1 and rollout.temperature > 0")
    if p.baseline == "rloo" and (cfg.critic.adapter or cfg.critic.shared):
        problems.append("ppo.baseline=rloo trains no critic; drop critic.adapter / critic.shared")
    if cfg.ptx.coef < 0:
        problems.append("ptx.coef must be >= 0")
    elif cfg.ptx.coef > 0 and bool(cfg.ptx.data) == bool(cfg.ptx.demos):
        problems.append("ptx.coef > 0 needs one of ptx.data (a `chatforge data prepare` dir) or ptx.demos "
                        "(demonstrations, as `sft --data` takes them)")
    if problems:
        raise UserError("invalid ppo config: " + "; ".join(problems))


def make_kl_controller(cfg: PPOConfig) -> KLController:
    p = cfg.ppo
    return AdaptiveKLController(p.kl_coef, p.kl_target, p.kl_horizon) if p.kl_target else FixedKLController(p.kl_coef)


def make_ptx_loader(cfg: PTXConfig, tok: Any, seed: int, info: DistInfo) -> Any:
    """A resumable WindowLoader over the pretraining data, after checking it was tokenised like the policy; or,
    with `ptx.demos`, a RowLoader over the demonstrations packed as SFT packs them."""
    from chatforge.core.tokenizer import load_tokenizer
    from chatforge.data.lm_loader import WindowLoader, load_split

    if cfg.demos:
        from chatforge.data.sft_data import RowLoader, load_conversations, pack, render_examples

        examples, _ = render_examples(tok, load_conversations(cfg.demos), cfg.seq_len)
        rows = pack(examples, cfg.seq_len)
        if not rows:
            raise UserError(f"ptx.demos {', '.join(cfg.demos)}: no conversation fits ptx.seq_len={cfg.seq_len}")
        print0(f"ptx: {len(rows)} packed rows of <= {cfg.seq_len} tokens from {len(examples)} demonstrations")
        return RowLoader(rows, cfg.batch_size, tok.pad_token_id, seed, info.rank, info.world_size, info.device)
    data = Path(cfg.data or "")
    meta_path = data / "meta.json"
    if not meta_path.exists():
        raise UserError(f"ptx.data {data} is not a prepared data dir (no meta.json); run `chatforge data prepare`")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    tok_dir = data / str(meta.get("tokenizer", "tokenizer"))
    if tok_dir.exists() and load_tokenizer(tok_dir).get_vocab() != tok.get_vocab():
        raise UserError(f"ptx.data {data} was tokenised with another tokenizer than the policy's; re-run "
                        "`chatforge data prepare --tokenizer POLICY_DIR`")
    return WindowLoader(load_split(data, "train"), cfg.seq_len, cfg.batch_size, seed, info.rank, info.world_size,
                        device=info.device)


# ----------------------------------------------------------------------------- stage


def load_shared_base(cfg: PPOConfig, info: Any) -> tuple[Any, Any, Path]:
    """One frozen base with a "policy" and a "critic" LoRA adapter (core/adapters.py); single process."""
    from chatforge.core.adapters import SharedBase
    from chatforge.core.model import load_model_and_tokenizer

    if not cfg.lora.enabled:
        raise UserError("critic.adapter=true needs lora.enabled=true (the critic is a LoRA adapter)")
    if info.enabled:
        raise UserError("critic.adapter=true runs in a single process; drop torchrun or critic.adapter")
    if cfg.reference:
        raise UserError("critic.adapter=true uses the base with adapters off as the reference; drop --reference")
    base, tok, src = load_model_and_tokenizer(cfg.policy)  # type: ignore[arg-type]
    shared = SharedBase(base, cfg.lora, adapters=("policy", "critic"), trainable=("policy", "critic"),
                        seed=cfg.train.seed)
    return shared.to(info.device), tok, src


def run(cfg: PPOConfig, out: Path, resume: bool = True) -> dict:
    """Train a policy with PPO into the run dir `out`; returns the summary (also in manifest.json)."""
    from chatforge.evals.text import near_duplicate_rate

    check_config(cfg)
    info = init_distributed(cfg.train.device)
    strategy = resolve_strategy(cfg.train, info)  # bad strategy: an error before any work
    set_threads(cfg.train)
    out = Path(out)
    try:
        # ---------------------------------------------------------------- models and reward
        reward = make_reward_source(cfg.reward, info.device, cfg.rollout.forward_batch_size)  # type: ignore[arg-type]
        if cfg.ppo.normalise_scores:
            divide_by_sft_std(reward)  # scores (and an RM critic) in SFT stds
        uses_critic = cfg.ppo.baseline != "rloo"
        k = cfg.ppo.samples_per_prompt
        if cfg.critic.adapter:  # one frozen base: policy adapter, reference = adapters off, critic adapter + head
            shared_base, tok, src = load_shared_base(cfg, info)
            policy, critic, ref, ref_spec = shared_base.model, shared_base.critic_module(), None, None
            critic_desc = "LoRA adapter + value head on the policy's frozen base"
            modules: dict[str, torch.nn.Module] = {"shared": shared_base}
            policy_params, critic_params = shared_base.parameters_of("policy"), shared_base.parameters_of("critic")
            disable_dropout(shared_base)
        else:
            policy, tok, src = load_policy(cfg.policy, cfg.lora, info.device)  # type: ignore[arg-type]
            ref_spec = cfg.reference or (None if cfg.lora.enabled else str(src))
            ref = load_reference(ref_spec, policy, tok, cfg.lora.enabled, info.device)
            critic, critic_desc = (load_critic(cfg, policy, tok, src, reward, info.device) if uses_critic
                                   else (None, "none (RLOO: leave-one-out baseline)"))
            modules = {"policy": policy} if critic is None else {"policy": policy, "critic": critic}
            policy_params = [p for p in policy.parameters() if p.requires_grad]
            critic_params = [p for p in critic.parameters() if p.requires_grad] if critic is not None else []
            disable_dropout(policy)
            if critic is not None:
                disable_dropout(critic)
        print0(f"policy: {count_params(policy) / 1e6:.2f}M params ({count_params(policy, True) / 1e6:.3f}M trainable)"
               f"; reference: {'policy with adapters off' if ref is None else ref_spec}; reward: {reward.name}; "
               f"critic: {critic_desc}")

        # ---------------------------------------------------------------- prompts
        context = getattr(unwrap(policy).config.get_text_config(), "max_position_embeddings", None)
        prompts, prompt_ids, too_long = prepare_prompts(cfg.prompts, tok, cfg.rollout.max_new_tokens, context)  # type: ignore[arg-type]
        prompts, prompt_ids = keep_scorable(reward, prompts, prompt_ids)
        stream = PromptStream(len(prompts), cfg.train.batch_size // k, cfg.train.seed, info.rank, info.world_size)

        # ---------------------------------------------------------------- strategy, optimizers, KL controller, ptx
        if strategy == "fsdp2":  # policy and critic sharded and trained; reference and RM by train.fsdp_frozen
            ddp_policy = wrap_model(policy, info, cfg.train)
            ddp_critic = wrap_model(critic, info, cfg.train) if critic is not None else None
            ref = shard_frozen(ref, reward, info, cfg.train)
            # fully_shard swaps each parameter for a sharded DTensor: the optimizers take the new ones
            policy_params = [p for p in policy.parameters() if p.requires_grad]
            critic_params = [p for p in critic.parameters() if p.requires_grad] if critic is not None else []
        else:
            ddp_policy = wrap_ddp(policy, info)
            ddp_critic = wrap_ddp(critic, info) if critic is not None else None
        policy_opt = make_optimizer(policy_params, cfg.train, info.device)
        policy_sched = make_scheduler(policy_opt, cfg.train)
        groups = [(policy_params, policy_opt)]
        critic_opt = critic_sched = None
        if critic is not None:
            critic_opt = make_optimizer(critic_params, cfg.train, info.device, lr=cfg.critic.lr)
            critic_sched = make_scheduler(critic_opt, cfg.train)
            groups.append((critic_params, critic_opt))
        kl_ctl = make_kl_controller(cfg)
        guards = HackingGuards(cfg.guards, "ppo")
        ptx = make_ptx_loader(cfg.ptx, tok, cfg.train.seed, info) if cfg.ptx.coef > 0 else None
        amp = autocast_dtype(cfg.train, info.device)
        ro_cfg, chunk, shared = cfg.rollout, cfg.rollout.forward_batch_size, cfg.critic.shared
        gold = (GoldMonitor(cfg.gold.spec, reward, cfg.gold.prompts, tok, ro_cfg.max_new_tokens, cfg.gold.every,
                            Path(out) / "best_gold", info.device, context, cfg.gold.samples,
                            cfg.gold.temperature) if cfg.gold.spec else None)
        reuse_logprobs = engine_logprobs_usable(ro_cfg.temperature, ro_cfg.top_k, ro_cfg.top_p, amp)

        def step_fn(step: int) -> dict:
            # over-optimisation: proxy vs gold on validation prompts, of the policy before this update
            gold_row = gold.before_update(policy, step, info.is_main) if gold is not None else {}
            # ---- rollout. 1. sample K replies per prompt of this rank (rows prompt-major)
            idx = next(stream)
            seeds = [rollout_seed(cfg.train.seed, step, info.rank, i) for i in range(len(idx))]
            ro = generate_rollouts(policy, tok, [prompts[i] for i in idx], [prompt_ids[i] for i in idx],
                                   max_new_tokens=ro_cfg.max_new_tokens, temperature=ro_cfg.temperature,
                                   top_k=ro_cfg.top_k, top_p=ro_cfg.top_p, seeds=seeds, compile=ro_cfg.compile,
                                   num_samples=k)
            rows = (ro.query_ids, ro.query_mask, ro.response_ids, ro.mask)
            with autocast(amp, info.device):
                # 2. rollout-policy log-probs (the "old" log-probs): the engine's, or one more forward
                entropy: float | None = None  # None: read from the first PPO epoch's forwards (step 7)
                if reuse_logprobs:
                    logprobs = ro.logprobs
                else:
                    logprobs, entropy = rollout_logprobs(policy, *rows, ro_cfg.temperature, chunk)
                # 3. reference log-probs
                ref_logprobs = reference_logprobs(ref, policy, *rows, ro_cfg.temperature, chunk)
                # 4. values at every reply token (none without a critic)
                values = (rollout_values(critic, policy, rows, shared, chunk) if critic is not None
                          else torch.zeros_like(logprobs))
            # 5. scores, minus the penalty for replies cut off before their end of turn
            raw = torch.tensor(score_rollout(reward, tok, ro), dtype=torch.float32, device=info.device)
            scores = eot_penalty(raw, ro.ended, cfg.ppo.missing_eot_penalty)
            traj = Trajectory(*rows, logprobs, ref_logprobs, values, scores, ro.ended)
            finite = all(bool(torch.isfinite(x).all()) for x in (logprobs, ref_logprobs, values, scores))
            if any_rank(not finite, info):
                return {"train/loss": float("nan"), "_ok": False}
            # 6. advantages by ppo.baseline: per-token rewards (-beta * KL, the score, minus its siblings' mean
            #    for `both`, at the last token) and GAE, or RLOO's sequence advantages
            kl_coef = kl_ctl.value
            shaped = scores - leave_one_out_baseline(scores, k) if cfg.ppo.baseline == "both" else scores
            rewards, kl = per_token_rewards(shaped, logprobs, ref_logprobs, ro.mask, kl_coef, cfg.ppo.kl_estimator)
            if uses_critic:
                advantages, returns = gae(rewards, values, ro.mask, cfg.ppo.gamma, cfg.ppo.lam,
                                          whiten=cfg.ppo.whiten_advantages)
            else:  # RLOO: the sequence reward minus its siblings' mean, on every token; no critic, no returns
                advantages = rloo_advantages(scores, kl, ro.mask, kl_coef, k)
                returns = torch.zeros_like(advantages)
            warmup = step < cfg.ppo.critic_warmup_iters  # value-only iterations (steps count from 0)
            step_groups = groups[1:] if warmup else groups

            # ---- 7. PPO epochs over minibatches
            stats: dict[str, list[float]] = defaultdict(list)
            all_ok, n_micro = True, cfg.train.grad_accum
            per_epoch = len(traj) // cfg.ppo.minibatch_size
            for n_mb, mb_rows in enumerate(minibatches(len(traj), cfg.ppo.minibatch_size, cfg.ppo.epochs,
                                                    rollout_seed(cfg.train.seed, step, info.rank, -1))):
                total = 0.0
                for j, m in enumerate(mb_rows.chunk(n_micro)):
                    with grad_sync([ddp_policy, ddp_critic], j == n_micro - 1), autocast(amp, info.device):
                        loss, st = ppo_loss(ddp_policy, ddp_critic, traj.select(m), advantages[m], returns[m], cfg,
                                            next(ptx) if ptx is not None and not warmup else None,
                                            ptx_model=policy, update_policy=not warmup)
                        (loss / n_micro).backward()
                    total += loss.item() / n_micro
                    for name, v in st.items():
                        stats[name].append(v)
                    if n_mb < per_epoch:
                        stats["_first_epoch_entropy"].append(st["policy/entropy"])
                if warmup:  # the policy's grads (zero: its loss term is off) are dropped, its optimizer untouched
                    policy_opt.zero_grad(set_to_none=True)
                ok, norms = step_optimizers(step_groups, cfg.train.grad_clip, total, info)
                norms = [0.0, *norms] if warmup else norms
                all_ok &= ok
                stats["train/loss"].append(total)
                stats["train/grad_norm"].append(norms[0])
                stats["val/grad_norm"].append(norms[1] if len(norms) > 1 else 0.0)
            lr = policy_sched.get_last_lr()[0]
            policy_sched.step()
            if critic_sched is not None:
                critic_sched.step()

            # ---- 8. KL controller, metrics, guards
            first_epoch_entropy = stats.pop("_first_epoch_entropy")
            if entropy is None:
                entropy = sum(first_epoch_entropy) / len(first_epoch_entropy)
            seq_kl = masked_sum(kl, ro.mask, dim=1)
            non_score = -kl_coef * seq_kl
            ev = float(explained_variance(values, returns, ro.mask))
            metrics = {
                "objective/kl": float(seq_kl.mean()), "objective/entropy": entropy,
                "objective/non_score_reward": float(non_score.mean()),
                "objective/rlhf_reward": float((scores + non_score).mean()),
                "objective/scores": float(scores.mean()), "objective/raw_scores": float(raw.mean()),
                "val/explained_variance": ev if ev == ev else 0.0,
                "val/values": float(masked_mean(values, ro.mask)),
                "ppo/lr": lr, "train/lr": lr, "ppo/kl_coef": kl_coef,
                "ppo/reply_length": float(ro.mask.sum(1).float().mean()),
                "ppo/eot_rate": float(ro.ended.float().mean()),
                "ppo/duplicate_rate": near_duplicate_rate(ro.texts[::k]),  # one reply per prompt
                "ppo/within_prompt_std": float(scores.view(-1, k).std(dim=1).mean()) if k > 1 else 0.0,
                "ppo/critic_warmup": float(warmup),
                **{name: sum(v) / len(v) for name, v in stats.items()},
            }
            if cfg.ptx.coef == 0:
                metrics["ppo/ptx_loss"] = 0.0
            metrics = all_reduce_mean(metrics, info)  # every rank takes the same KL and guard decisions
            if gold is not None:  # the final policy too, after this (last) update
                gold_row = gold.after_last_update(policy, step, cfg.train.max_steps, info.is_main) or gold_row
                metrics.update(gold_row)
            kl_ctl.update(metrics["objective/kl"], n_steps=len(traj) * info.world_size)
            metrics.update(guards.update(metrics))
            return {**metrics, "_tokens": int(ro.mask.sum()), "_ok": all_ok}

        prompts_hash = hashlib.sha256(json.dumps([p["messages"] for p in prompts]).encode()).hexdigest()
        run_ = Run(out, "ppo", cfg, info, parent=parent_run_id(src))
        run_.inputs = {"policy": {"path": str(src)}, "reward": {"spec": cfg.reward},
                       "prompts": {"spec": cfg.prompts, "sha256": prompts_hash},
                       "reference": {"spec": ref_spec or "policy with adapters off"}}
        fingerprint = {"policy": str(src), "reward": cfg.reward, "prompts_sha256": prompts_hash[:16],
                       "prompts": len(prompts), "batch_size": cfg.train.batch_size, "world_size": info.world_size,
                       "lora": cfg.lora.enabled, "critic": critic_desc, "ptx": cfg.ptx.coef > 0,
                       "samples_per_prompt": k, "baseline": cfg.ppo.baseline}
        stateful = {"policy_opt": policy_opt, "policy_sched": policy_sched, "kl_ctl": kl_ctl, "prompts": stream,
                    "guards": guards}
        if critic_opt is not None:
            stateful.update(critic_opt=critic_opt, critic_sched=critic_sched)
        if gold is not None:
            stateful["gold"] = gold
        if ptx is not None:
            stateful["ptx"] = ptx
        state = train_loop(run_, cfg.train, step_fn=step_fn, modules=modules,
                           stateful=stateful, fingerprint=fingerprint, resume=resume, should_stop=guards.should_stop)

        summary = {"iterations": state.step, "reply_tokens": state.tokens, "final_loss": state.ema_loss,
                   "skipped_steps": state.skipped_steps, "prompts": len(prompts), "skipped_too_long": too_long,
                   "kl_coef": kl_ctl.value, "guards_fired": dict(guards.fired),
                   "stopped_early": state.step < cfg.train.max_steps,
                   **({"gold_best": gold.best, "gold_best_step": gold.best_step} if gold is not None else {})}
        save_model(policy, tok, run_.model_dir, info.is_main)  # every rank: FSDP2 gathers
        run_.write_manifest("completed", summary)
        run_.close()
        print0(f"ppo done: {run_.model_dir}")
        return {"run_id": run_.run_id, "out": str(out), "config": to_dict(cfg), **summary}
    finally:
        cleanup_distributed()
