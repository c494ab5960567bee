"""Rollouts for RL stages (PPO, GRPO) and evaluation: prompts → sampled replies → padded tensors → log-probs.

The pieces PPO and GRPO share, so neither stage copies the other:

- loading the policy (optionally LoRA) and the frozen reference (a separate model, or the policy with its
  adapters switched off), with a clear error when the reference does not match the policy;
- prompts rendered once with `render_for_completion`, too-long ones skipped and counted, and a
  resumable `PromptStream` that gives each rank its own prompts;
- `generate_rollouts`: one engine call (KV cache, K samples per prompt) → a `Rollout` whose replies are
  laid out TRL-style: prompts left-padded to Q, replies right-padded to T, so reply token t of every row
  sits at column Q + t and its log-prob is read from the logits at Q + t − 1;
- `response_forward` / `rollout_logprobs` / `reference_logprobs`: log-probs of reply tokens on such a
  batch (logits divided by the sampling temperature, TRL's convention; top-k/top-p are not modelled);
- minibatch schedules, the optimizer step with a cross-rank non-finite check, and the reward-hacking guards.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from chatforge.config import LoraConfig
from chatforge.core.distributed import DistInfo, all_reduce_sum
from chatforge.core.io import UserError
from chatforge.core.log import warn
from chatforge.core.model import load_model_and_tokenizer, unwrap
from chatforge.core.rl import entropy_from_logits, logprobs_from_logits
from chatforge.core.tokenizer import IGNORE_INDEX, render_for_completion, stop_token_ids

# ----------------------------------------------------------------------------- models


def load_policy(spec: str, lora: LoraConfig, device: torch.device) -> tuple[Any, Any, Any]:
    """(policy, tokenizer, source dir): the model to train, LoRA-wrapped when `lora.enabled`, in train mode."""
    model, tok, src = load_model_and_tokenizer(spec)
    if lora.enabled:
        from chatforge.core.model import apply_lora

        model = apply_lora(model, lora)
    return model.to(device).train(), tok, src


_ARCH_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


def check_reference(policy: Any, tok: Any, ref: Any, ref_tok: Any, ref_spec: str) -> None:
    """Raise UserError unless `ref` has the policy's architecture and tokenizer (ids must mean the same)."""
    pc, rc = unwrap(policy).config, ref.config
    diffs = [f"{k}: reference={getattr(rc, k, None)!r} policy={getattr(pc, k, None)!r}"
             for k in _ARCH_KEYS if getattr(rc, k, None) != getattr(pc, k, None)]
    rows = ref.get_input_embeddings().weight.shape[0], unwrap(policy).get_input_embeddings().weight.shape[0]
    if rows[0] != rows[1]:
        diffs.append(f"vocab rows: reference={rows[0]} policy={rows[1]}")
    if diffs:
        raise UserError(f"reference model {ref_spec} does not match the policy ({'; '.join(diffs)}); the reference "
                        "must be the model the policy was fine-tuned from (usually the SFT run)")
    if ref_tok.get_vocab() != tok.get_vocab():
        raise UserError(f"reference model {ref_spec} has another tokenizer than the policy; KL needs the same token ids")


def load_reference(spec: str | None, policy: Any, tok: Any, lora: bool, device: torch.device) -> Any | None:
    """The frozen reference, or None when it is the LoRA policy with its adapters switched off."""
    if spec is None and lora:
        return None
    if spec is None:
        raise UserError("a reference model is required (defaults to the policy model)")
    ref, ref_tok, _ = load_model_and_tokenizer(spec)
    check_reference(policy, tok, ref, ref_tok, spec)
    return ref.to(device).eval().requires_grad_(False)


# ----------------------------------------------------------------------------- prompts


def prepare_prompts(spec: str, tok: Any, max_new_tokens: int, context: int | None) -> tuple[list[dict], list[list[int]], int]:
    """(prompts, their rendered ids, how many were skipped) — a prompt is skipped when it leaves no room
    for `max_new_tokens` in the model's context."""
    from chatforge.data.prompts import load_prompts

    prompts, ids, too_long = [], [], 0
    for p in load_prompts(spec):
        x = render_for_completion(tok, p["messages"])
        if context is not None and len(x) + max_new_tokens > context:
            too_long += 1
            continue
        prompts.append(p)
        ids.append(x)
    if too_long:
        warn(f"skipped {too_long} prompts that leave no room for {max_new_tokens} new tokens in the model's "
             f"{context}-token context")
    return prompts, ids, too_long


class PromptStream:
    """Which prompts each RL iteration uses: an exact, resumable position (state_dict) over epochs.

    Each epoch visits the prompts in a (seed, epoch) permutation; an iteration takes batch_size × world
    consecutive prompts of it and rank r takes its own slice, so ranks never share prompts.
    """

    def __init__(self, n_prompts: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if n_prompts < batch_size * world_size:
            raise UserError(f"{n_prompts} usable prompts, but one iteration needs train.batch_size × ranks = "
                            f"{batch_size * world_size}; add prompts or lower train.batch_size")
        self.n, self.batch_size, self.seed, self.rank, self.world = n_prompts, batch_size, seed, rank, world_size
        self.epoch, self.cursor = 0, 0

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)

    def __iter__(self) -> PromptStream:
        return self

    def __next__(self) -> list[int]:
        per_step = self.batch_size * self.world
        if self.cursor + per_step > self.n:
            self.epoch, self.cursor = self.epoch + 1, 0
        start = self.cursor + self.rank * self.batch_size
        self.cursor += per_step
        return [int(i) for i in self._order()[start: start + self.batch_size]]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "n": self.n}

    def load_state_dict(self, state: dict) -> None:
        if state["n"] != self.n:
            raise UserError(f"checkpoint was made with {state['n']} prompts, now there are {self.n}")
        self.epoch, self.cursor = state["epoch"], state["cursor"]


def rollout_seed(seed: int, step: int, rank: int, index: int) -> int:
    """Sampling seed of prompt `index` at iteration `step` on `rank`: a pure function, so resume is exact."""
    return int(hashlib.sha256(f"{seed}:{step}:{rank}:{index}".encode()).hexdigest()[:12], 16)


# ----------------------------------------------------------------------------- rollouts


@dataclass
class Rollout:
    """R sampled replies (rows prompt-major: prompt i, sample j → row i·K + j).

    Shapes (Q = longest prompt, T = longest reply):
        query_ids    [R, Q] long  left-padded prompt ids        query_mask [R, Q] long  1 on real tokens
        response_ids [R, T] long  right-padded reply ids        mask       [R, T] bool  1 up to and incl. the stop token
        ended        [R]    bool  the reply emitted a stop token before max_new_tokens
        logprobs     [R, T] float the engine's raw-model log-probs of the reply tokens (0 on padding); the PPO
                                  "old" log-probs when sampling was plain (`engine_logprobs_usable`)
    `prompt_ids` / `token_ids` are the same rows as unpadded lists (reply ids include the stop token).
    """

    prompts: list[dict]
    texts: list[str]
    query_ids: torch.Tensor
    query_mask: torch.Tensor
    response_ids: torch.Tensor
    mask: torch.Tensor
    ended: torch.Tensor
    logprobs: torch.Tensor
    prompt_ids: list[list[int]]
    token_ids: list[list[int]]

    def __len__(self) -> int:
        return len(self.texts)


def pad_rows(queries: list[list[int]], responses: list[list[int]], pad_id: int,
             device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(query_ids, query_mask, response_ids, mask): queries left-padded, responses right-padded."""
    n, q, t = len(queries), max(map(len, queries)), max(1, max(map(len, responses)))
    query_ids = torch.full((n, q), pad_id, dtype=torch.long)
    query_mask = torch.zeros(n, q, dtype=torch.long)
    response_ids = torch.full((n, t), pad_id, dtype=torch.long)
    mask = torch.zeros(n, t, dtype=torch.bool)
    for i, (a, b) in enumerate(zip(queries, responses, strict=True)):
        query_ids[i, q - len(a):] = torch.tensor(a, dtype=torch.long)
        query_mask[i, q - len(a):] = 1
        response_ids[i, : len(b)] = torch.tensor(b, dtype=torch.long)
        mask[i, : len(b)] = True
    return query_ids.to(device), query_mask.to(device), response_ids.to(device), mask.to(device)


@torch.no_grad()
def generate_rollouts(model: Any, tok: Any, prompts: list[dict], prompt_ids: list[list[int]], *,
                      max_new_tokens: int, temperature: float, top_k: int, top_p: float, seeds: list[int],
                      num_samples: int = 1, compile: bool = False) -> Rollout:
    """Sample `num_samples` replies per prompt with the KV-cache engine and pad them into a Rollout."""
    from chatforge.core.generation import SamplingParams, generate

    bare = unwrap(model)
    device = next(bare.parameters()).device
    params = [SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
                             seed=s) for s in seeds]
    groups = generate(bare, prompt_ids, params, stop_token_ids=stop_token_ids(tok), pad_id=tok.pad_token_id,
                      tokenizer=tok, num_samples=num_samples, compile=compile)
    gens = [g for group in groups for g in group]
    rows = [p for p in prompts for _ in range(num_samples)]
    tensors = pad_rows([g.prompt_ids for g in gens], [g.token_ids for g in gens], tok.pad_token_id, device)
    ended = torch.tensor([g.finish_reason == "stop" for g in gens], dtype=torch.bool, device=device)
    logprobs = torch.zeros(tensors[2].shape, dtype=torch.float32)
    for i, g in enumerate(gens):
        logprobs[i, : len(g.logprobs)] = torch.tensor(g.logprobs, dtype=torch.float32)
    return Rollout(rows, [g.text or "" for g in gens], *tensors, ended, logprobs.to(device),
                   [g.prompt_ids for g in gens], [g.token_ids for g in gens])


def engine_logprobs_usable(temperature: float, top_k: int, top_p: float, amp: torch.dtype | None) -> bool:
    """True when `Rollout.logprobs` equal what `rollout_logprobs` would compute, so its forward can be skipped.

    The engine records log-probs under the unmodified model distribution; they are the sampling (and the
    PPO ratio's) distribution only at temperature 1 without top-k/top-p. Under autocast the training
    forwards run in bf16 while the engine ran in the weights' dtype, so the ratio would start off 1 by
    rounding noise: keep the separate forward there. (Same values up to float noise, ~1e-6 in fp32; tested.)
    """
    return temperature == 1.0 and top_k == 0 and top_p == 1.0 and amp is None


def model_inputs(query_ids: torch.Tensor, query_mask: torch.Tensor, response_ids: torch.Tensor,
                 mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """input_ids / attention_mask / position_ids of prompt + reply (positions count real tokens from 0)."""
    attention = torch.cat([query_mask.long(), mask.long()], dim=1)
    return {"input_ids": torch.cat([query_ids, response_ids], dim=1), "attention_mask": attention,
            "position_ids": (attention.cumsum(1) - 1).clamp(min=0)}


def response_forward(model: Any, inputs: dict[str, torch.Tensor], response_ids: torch.Tensor, mask: torch.Tensor,
                     temperature: float = 1.0, hidden: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One forward over prompt + reply → (logprobs [B, T], logits [B, T, V], last hidden [B, T, H] or None).

    logits[:, t] is the (temperature-scaled) distribution that produced reply token t; only the last T + 1
    positions' logits are computed. Differentiable.
    """
    t = response_ids.shape[1]
    out = model(**inputs, use_cache=False, logits_to_keep=t + 1, output_hidden_states=hidden)
    logits = out.logits[:, :-1]
    if temperature != 1.0:
        logits = logits / temperature
    logprobs = logprobs_from_logits(logits, response_ids.masked_fill(~mask.bool(), IGNORE_INDEX))
    h = out.hidden_states[-1][:, -(t + 1): -1] if hidden else None
    return logprobs, logits, h


@torch.no_grad()
def rollout_logprobs(model: Any, query_ids: torch.Tensor, query_mask: torch.Tensor, response_ids: torch.Tensor,
                     mask: torch.Tensor, temperature: float, chunk: int) -> tuple[torch.Tensor, float]:
    """(logprobs [R, T], mean per-token entropy over valid tokens), `chunk` rows per forward, no grad."""
    parts, ent_sum = [], 0.0
    for i in range(0, len(query_ids), chunk):
        s = slice(i, i + chunk)
        inputs = model_inputs(query_ids[s], query_mask[s], response_ids[s], mask[s])
        lp, logits, _ = response_forward(model, inputs, response_ids[s], mask[s], temperature)
        parts.append(lp)
        ent_sum += float(entropy_from_logits(logits, mask[s])) * int(mask[s].sum())
    return torch.cat(parts), ent_sum / max(1, int(mask.sum()))


@torch.no_grad()
def reference_logprobs(ref: Any | None, policy: Any, query_ids: torch.Tensor, query_mask: torch.Tensor,
                       response_ids: torch.Tensor, mask: torch.Tensor, temperature: float, chunk: int) -> torch.Tensor:
    """Reference log-probs of the replies; `ref=None` means the LoRA policy with its adapters switched off."""
    if ref is None:
        bare = unwrap(policy)
        with bare.disable_adapter():
            return rollout_logprobs(bare, query_ids, query_mask, response_ids, mask, temperature, chunk)[0]
    return rollout_logprobs(ref, query_ids, query_mask, response_ids, mask, temperature, chunk)[0]


# ----------------------------------------------------------------------------- optimisation


def minibatches(n_rows: int, size: int, epochs: int, seed: int) -> Iterator[torch.Tensor]:
    """Row indices of each minibatch: `epochs` passes, each a fresh permutation from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(n_rows, generator=g)
        for i in range(0, n_rows, size):
            yield perm[i: i + size]


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True if `flag` is true on any rank (all ranks then take the same branch)."""
    if not info.enabled:
        return flag
    return bool(all_reduce_sum(torch.tensor([float(flag)], device=info.device), info).item() > 0)


def shard_frozen(ref: Any, reward: Any, info: DistInfo, cfg: Any) -> Any:
    """Under FSDP2, the frozen models of an RL stage by `train.fsdp_frozen`: shard the reference (returned) and an
    RM reward's model in place, or leave both whole replicas. Their forwards then are collectives too, which holds
    because every rank scores as many rows in as many batches."""
    from chatforge.core.distributed import wrap_model
    from chatforge.core.rewards import reward_models

    if cfg.fsdp_frozen != "shard":
        return ref
    for rm in reward_models(reward):  # every member of an ensemble
        rm.model = wrap_model(rm.model, info, cfg, trainable=False)
    return wrap_model(ref, info, cfg, trainable=False) if ref is not None else None


def _full(norm: torch.Tensor) -> float:
    """A grad norm as a float; under FSDP2 the norm of sharded grads is a DTensor (reduced over ranks)."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def step_optimizers(groups: list[tuple[list[torch.nn.Parameter], torch.optim.Optimizer]], grad_clip: float,
                    loss: float, info: DistInfo) -> tuple[bool, list[float]]:
    """Clip each group's grads, then step all optimizers — or none, if the loss or any grad norm is
    non-finite on any rank. Grads are zeroed either way. Returns (stepped, grad norms)."""
    norms = [_full(torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf")))
             for params, _ in groups]
    bad = any_rank(not math.isfinite(loss) or not all(math.isfinite(n) for n in norms), info)
    for _, opt in groups:
        if not bad:
            opt.step()
        opt.zero_grad(set_to_none=True)
    return not bad, norms


# ----------------------------------------------------------------------------- reward-hacking guards


class HackingGuards:
    """Warn (and optionally stop) on the usual signs of over-optimisation, saying what was seen.

    Reads from each iteration's metrics: `objective/kl` (mean KL per reply, nats), `objective/entropy`
    (mean per-token entropy), `objective/scores`, `<prefix>/reply_length`, `<prefix>/duplicate_rate`.
    `cfg` is an RLGuardConfig. A guard that fired stays quiet for `cfg.window` iterations. Stateful
    (state_dict), so a resumed run continues the same windows.
    """

    def __init__(self, cfg: Any, prefix: str):
        self.cfg, self.prefix = cfg, prefix
        self.history: list[tuple[float, float]] = []
        self.step = 0
        self.last_fired: dict[str, int] = {}
        self.fired: dict[str, int] = {}
        self.reason: str | None = None

    def _checks(self, m: dict) -> dict[str, str]:
        c, out = self.cfg, {}
        kl, ent = m.get("objective/kl"), m.get("objective/entropy")
        if c.max_kl > 0 and kl is not None and kl > c.max_kl:
            out["kl"] = (f"KL to the reference is {kl:.2f} nats per reply (> guards.max_kl={c.max_kl}); the policy is "
                         "drifting far from the reference: raise the KL coefficient or lower train.lr")
        if c.min_entropy > 0 and ent is not None and ent < c.min_entropy:
            out["entropy"] = (f"policy entropy collapsed to {ent:.3f} nats per token (< guards.min_entropy="
                              f"{c.min_entropy}); replies are becoming deterministic")
        dup = m.get(f"{self.prefix}/duplicate_rate")
        if c.max_duplicate_rate < 1 and dup is not None and dup > c.max_duplicate_rate:
            out["duplicates"] = (f"{100 * dup:.0f}% of reply pairs to different prompts are near duplicates (> "
                                 f"guards.max_duplicate_rate={c.max_duplicate_rate}); the policy may say one thing "
                                 "the reward likes everywhere")
        if c.length_growth > 0 and len(self.history) >= c.window >= 2:
            half = c.window // 2
            (s1, l1), (s2, l2) = (np.mean(x, axis=0) for x in (self.history[:half], self.history[-half:]))
            if s2 > s1 and l1 > 0 and l2 / l1 >= c.length_growth:
                out["length"] = (f"score rose from {s1:.3f} to {s2:.3f} while mean reply length grew from {l1:.1f} to "
                                 f"{l2:.1f} tokens (x{l2 / l1:.2f} >= guards.length_growth={c.length_growth}) over the "
                                 f"last {c.window} iterations: the reward may be paying for length")
        return out

    def update(self, m: dict) -> dict[str, float]:
        """Check one iteration's metrics; warn; return guard metrics (1 where a guard fired this iteration)."""
        self.step += 1
        score, length = m.get("objective/scores"), m.get(f"{self.prefix}/reply_length")
        if score is not None and length is not None:
            self.history = (self.history + [(float(score), float(length))])[-max(2, self.cfg.window):]
        found = self._checks(m)
        self.reason = None
        for name, msg in found.items():
            self.fired[name] = self.fired.get(name, 0) + 1
            if self.step - self.last_fired.get(name, -10**9) >= self.cfg.window:
                warn(f"iteration {self.step}: {msg}")
                self.last_fired[name] = self.step
            if self.cfg.stop:
                self.reason = msg
        return {f"guards/{k}": float(k in found) for k in ("kl", "entropy", "duplicates", "length")}

    def should_stop(self, _: dict) -> str | None:
        """For train_loop: the reason to stop, when guards.stop is set and a guard fired this iteration."""
        return self.reason

    def state_dict(self) -> dict:
        return {"history": self.history, "step": self.step, "last_fired": self.last_fired, "fired": self.fired}

    def load_state_dict(self, state: dict) -> None:
        self.history = [tuple(x) for x in state["history"]]
        self.step, self.last_fired, self.fired = state["step"], dict(state["last_fired"]), dict(state["fired"])


# ----------------------------------------------------------------------------- stage helpers


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout to p=0 (TRL's disable_dropout): rollout and training forwards must agree exactly."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def keep_scorable(reward: Any, prompts: list[dict], ids: list[list[int]]) -> tuple[list[dict], list[list[int]]]:
    """With the task-suite reward, drop (with a warning) the prompts no checker can score."""
    from chatforge.core.rewards import TaskReward
    from chatforge.data.tasks import find_family

    if not isinstance(reward, TaskReward):
        return prompts, ids
    keep = [i for i, p in enumerate(prompts) if find_family(p) is not None]
    if len(keep) < len(prompts):
        warn(f"--reward tasks: dropped {len(prompts) - len(keep)} prompts that are not task-suite prompts")
    if not keep:
        raise UserError("--reward tasks needs task-suite prompts (e.g. --prompts tasks:50); none of the prompts is one")
    return [prompts[i] for i in keep], [ids[i] for i in keep]


class GoldMonitor:
    """Over-optimisation check (Gao et al. 2022) inside an RL run: every `every` iterations the policy's
    replies to a fixed validation prompt set (greedy, or `samples` per prompt at `temperature` with the same
    seeds at every measurement, so two checkpoints are compared on paired draws) are scored by the proxy
    (the reward being optimised)
    and by the gold (a judge the policy never sees), logged as `objective/proxy` and `objective/gold`
    beside `objective/kl`; the policy with the best validation gold so far is saved to `best_dir`. The first
    measurement is the start model (iteration 0, before any update) and the last the final policy, so a
    `best_step` of 0 says no update beat the start.

    The validation prompts are a separate draw (a seed no test set uses), so the kept checkpoint is
    chosen without looking at the test prompts. `state_dict` carries the best score across resumes.
    """

    def __init__(self, gold: str, proxy: Any, prompts: str, tok: Any, max_new_tokens: int, every: int,
                 best_dir: Any, device: torch.device | str = "cpu", context: int | None = None,
                 samples: int = 1, temperature: float = 0.0):
        from chatforge.core.rewards import TaskReward, make_reward_source

        self.gold = make_reward_source(gold, device)
        self.proxy, self.tok, self.every, self.best_dir = proxy, tok, every, best_dir
        self.max_new_tokens, self.samples, self.temperature = max_new_tokens, samples, temperature
        if samples < 1 or temperature < 0 or (samples > 1 and temperature == 0):
            raise UserError(f"gold.samples={samples}, gold.temperature={temperature}: samples >= 1, and more than "
                            "one sample per prompt needs a temperature > 0 (greedy replies would repeat)")
        self.prompts, self.ids, _ = prepare_prompts(prompts, tok, max_new_tokens, context)
        if isinstance(self.gold, TaskReward) or isinstance(proxy, TaskReward):
            from chatforge.data.tasks import find_family

            if any(find_family(p) is None for p in self.prompts):
                raise UserError(f"gold.spec={gold}: the task-suite checker cannot score the validation prompts "
                                f"'{prompts}' (use gold.prompts=tasks-heldout:N:SEED)")
        if not self.prompts:
            raise UserError(f"gold.prompts='{prompts}': no validation prompt fits the model's context")
        self.best = -math.inf
        self.best_step = -1

    def before_update(self, policy: Any, step: int, is_main: bool = True) -> dict[str, float]:
        """Every `every` iterations from 0, the policy that samples iteration `step`'s rollouts (the row's KL is
        theirs), so the curve starts at the start model itself; {} when not due."""
        return self.measure(policy, step, is_main) if self.every > 0 and step % self.every == 0 else {}

    def after_last_update(self, policy: Any, step: int, max_steps: int, is_main: bool = True) -> dict[str, float]:
        """After the update of the last iteration, the final policy (kept as best at `max_steps` if it is)."""
        return self.measure(policy, max_steps, is_main) if self.every > 0 and step + 1 == max_steps else {}

    def measure(self, policy: Any, step: int, is_main: bool = True) -> dict[str, float]:
        """Score the validation replies; save the policy if its gold is the best so far."""
        from chatforge.core.model import save_model
        from chatforge.core.rewards import score_rollout

        bare = unwrap(policy)
        was_training = bare.training
        bare.eval()
        with torch.no_grad():
            ro = generate_rollouts(bare, self.tok, self.prompts, self.ids, max_new_tokens=self.max_new_tokens,
                                   temperature=self.temperature, top_k=0, top_p=1.0,
                                   seeds=list(range(len(self.prompts))), num_samples=self.samples)
        bare.train(was_training)
        gold = float(np.mean(score_rollout(self.gold, self.tok, ro)))  # sees which replies were cut off
        proxy = float(np.mean(score_rollout(self.proxy, self.tok, ro)))
        out = {"objective/gold": gold, "objective/proxy": proxy, "objective/gold_best": max(gold, self.best)}
        if gold > self.best:
            self.best, self.best_step = gold, step
            save_model(bare, self.tok, self.best_dir, is_main)  # every rank: a sharded policy is gathered
        return out

    def state_dict(self) -> dict:
        return {"best": self.best, "best_step": self.best_step}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_step = state["best"], state["best_step"]
