"""The RL math for PPO, DPO and GRPO as small pure functions (torchtune's `rlhf/rewards.py` shape).

Everything works on padded batches of reply tokens, shape [B, T], with a `mask` that is 1 on real
reply tokens and 0 on the padding after the end (bool, int or float masks are all accepted).
Names follow the PPO stage: `logprobs` (current policy), `old_logprobs` (policy at rollout time),
`ref_logprobs` (frozen reference), `values`, `old_values`, `returns`, `advantages`, `scores` ([B],
one reward-model score per reply).

One PPO step, as the stage calls it::

    scores = eot_penalty(scores, traj.ended, cfg.missing_eot_penalty)
    rewards, kl = per_token_rewards(scores, traj.logprobs, traj.ref_logprobs, traj.mask, kl_ctl.value)
    advantages, returns = gae(rewards, traj.values, traj.mask, gamma, lam, whiten=True)
    ... for each minibatch: ppo_policy_loss(...) + vf_coef * ppo_value_loss(...)
    kl_ctl.update(masked_sum(kl, traj.mask, dim=1).mean().item(), n_steps=batch_size)

Variants (KL estimators, DPO losses) are separate functions chosen by dict lookup, not string
branches inside one function.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal, Protocol

import torch
import torch.nn.functional as F

from chatforge.core.tokenizer import IGNORE_INDEX

Stats = dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------
# Masked reductions


def _as_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.to(dtype=like.dtype, device=like.device)


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(x · mask) over `dim` (all elements when None)."""
    m = _as_mask(mask, x)
    return (x * m).sum() if dim is None else (x * m).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(x · mask) / sum(mask) over `dim` (all elements when None).

    A row with no valid element gives 0 rather than NaN (the count is clamped to ≥ 1).
    """
    m = _as_mask(mask, x)
    if dim is None:
        return (x * m).sum() / m.sum().clamp(min=1)
    return (x * m).sum(dim) / m.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the valid elements of x: mean((x − mean)²), times n/(n − 1) when unbiased.

    Raises ValueError if no element is valid. With a single valid element the unbiased
    correction is undefined and the biased value (0) is returned.
    """
    m = _as_mask(mask, x)
    n = m.sum()
    if n.item() == 0:
        raise ValueError("masked_var: the mask has no valid elements")
    mean = (x * m).sum() / n
    var = (((x - mean) ** 2) * m).sum() / n
    if unbiased and n.item() > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """(x − mean) / sqrt(var + eps) over the valid elements; padding is set to 0.

    With shift_mean=False the mean is added back (only the scale changes), as TRL does for rewards.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask.bool(), out, torch.zeros_like(out))


# ---------------------------------------------------------------------------------------------
# KL estimators (Schulman, http://joschu.net/blog/kl-approx.html). Tokens are sampled from the
# policy, so each is a per-token estimate of KL(policy ‖ ref) = E_policy[logp − ref_logp].


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 = logp − ref_logp: unbiased, high variance, can be negative."""
    return logprobs - ref_logprobs


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k2 = ½(logp − ref_logp)²: biased but low variance, always ≥ 0."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 = exp(ref − logp) − (ref − logp) − 1: unbiased and always ≥ 0 (GRPO's estimator)."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1


def kl_abs(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """|logp − ref_logp| (TRL's "abs" penalty); not an estimator of KL, a robust penalty."""
    return (logprobs - ref_logprobs).abs()


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
    "abs": kl_abs,
}


def get_kl_estimator(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Look up a KL estimator by name, with a clear error listing the choices."""
    try:
        return KL_ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"unknown KL estimator {name!r}; choose one of {sorted(KL_ESTIMATORS)}") from None


# ---------------------------------------------------------------------------------------------
# Rewards and advantages


def last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of mask [B, T] → [B] (long). Rows must have one valid token."""
    valid = mask.bool()
    if not valid.any(dim=1).all():
        raise ValueError("every reply needs at least one valid token (a row of the mask is all 0)")
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(valid)
    return torch.where(valid, positions, -1).amax(dim=1)


def per_token_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float | torch.Tensor,
    estimator: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's shaped reward: −kl_coef · KL_t at every valid token, plus the score at the last one.

    scores [B]; logprobs, ref_logprobs, mask [B, T] → (rewards [B, T], kl [B, T]); both are 0 on
    padding. `kl` is the per-token estimate, for logging and for the adaptive KL controller
    (sequence KL = masked_sum(kl, mask, dim=1)).
    """
    kl = get_kl_estimator(estimator)(logprobs, ref_logprobs) * _as_mask(mask, logprobs)
    rewards = -kl_coef * kl
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_valid_index(mask)] += scores.to(rewards.dtype)
    return rewards, kl


def eot_penalty(scores: torch.Tensor, ended: torch.Tensor, penalty: float) -> torch.Tensor:
    """Subtract `penalty` from the score of each reply that hit the length limit before ending its turn.

    scores [B] float, ended [B] bool (True when the reply emitted an end-of-turn/stop token).
    Same rule as TRL's `missing_eos_penalty` (scores[~ended] -= penalty); torchtune instead
    replaces such scores with a fixed value. Returns a new tensor.
    """
    return scores - penalty * (~ended.bool()).to(scores.dtype)


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
    whiten: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016) over the valid tokens of each row.

        δ_t = r_t + γ · V_{t+1} − V_t,      A_t = δ_t + γλ · A_{t+1},      returns_t = A_t + V_t

    rewards, values, mask [B, T] → (advantages [B, T], returns [B, T]), both 0 on padding.
    Masked positions are not timesteps: the recursion skips them, so the value after the last
    valid token is 0 and padding (or a masked hole) never leaks into the valid tokens. With
    whiten=True the advantages are whitened over the mask after the returns are computed.
    """
    valid = mask.bool()
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = delta + gamma * lam * next_adv
        m = valid[:, t]
        advantages[:, t] = torch.where(m, adv_t, torch.zeros_like(adv_t))
        next_adv = torch.where(m, adv_t, next_adv)
        next_value = torch.where(m, values[:, t], next_value)
    returns = torch.where(valid, advantages + values, torch.zeros_like(values))
    if whiten:
        advantages = masked_whiten(advantages, mask)
    return advantages, returns


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    scale: Literal["group", "batch", "none"] = "group",
    eps: float = 1e-4,
) -> torch.Tensor:
    """GRPO advantages: each reward minus the mean of its group, optionally divided by a std.

    rewards [N] holds N/K groups of K = group_size consecutive samples of the same prompt.
    scale="group" divides by the group's std (GRPO paper), "batch" by the std of all N rewards
    (TRL's scale_rewards="batch"), "none" leaves the centred reward (Dr. GRPO). Stds are unbiased,
    as torch.std; `eps` keeps an all-equal group at advantage 0. Returns [N].
    """
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"group_size must be ≥ 2 and divide the {rewards.numel()} rewards, got {group_size}")
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "group":
        return (centred / (grouped.std(dim=1, keepdim=True) + eps)).view(-1)
    if scale == "batch":
        return centred.view(-1) / (rewards.std() + eps)
    if scale == "none":
        return centred.view(-1)
    raise ValueError(f"unknown advantage scale {scale!r}; choose group, batch or none")


def leave_one_out_baseline(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Each sample's baseline: the mean score of the *other* K − 1 samples of its prompt (RLOO).

    scores [N] holds N/K prompts × K consecutive samples (prompt-major: prompt i, sample j → i·K + j).
    Returns [N]. `scores - leave_one_out_baseline(scores, k)` sums to 0 over each prompt's samples and is
    K/(K − 1) times the group-mean-centred score; unlike the group mean, a sample's baseline does not
    depend on its own score, so the policy gradient stays unbiased (Kool et al. 2019; Ahmadian et al. 2024).
    K = 1 has no other sample: the baseline is 0 (scores unchanged).
    """
    if k < 1 or scores.numel() % k:
        raise ValueError(f"k must be >= 1 and divide the {scores.numel()} scores, got {k}")
    if k == 1:
        return torch.zeros_like(scores)
    grouped = scores.view(-1, k)
    return ((grouped.sum(dim=1, keepdim=True) - grouped) / (k - 1)).reshape(scores.shape)


def rloo_advantages(
    scores: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float | torch.Tensor,
    k: int,
) -> torch.Tensor:
    """RLOO advantages [B, T]: the whole reply is one action (Ahmadian et al. 2024, "Back to Basics").

    Sequence reward R_i = score_i − kl_coef · Σ_t KL_t (kl [B, T] the per-token estimate, 0 on padding);
    advantage A_i = R_i − mean of the other K − 1 replies to the same prompt, given to every valid token of
    reply i (0 on padding). No critic, no GAE: REINFORCE with a leave-one-out baseline.
    """
    seq = scores.to(kl.dtype) - kl_coef * masked_sum(kl, mask, dim=1)
    adv = seq - leave_one_out_baseline(seq, k)
    return adv[:, None] * _as_mask(mask, kl)


# ---------------------------------------------------------------------------------------------
# PPO losses


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, Stats]:
    """Clipped surrogate, masked mean over all valid tokens of the batch.

        r = exp(logp − old_logp),   loss = mean(max(−A·r, −A·clip(r, 1 − ε, 1 + ε)))

    All inputs [B, T]; advantages [B, 1] or [B] broadcast ([B] is unsqueezed) for GRPO's
    per-sequence advantages. Stats (detached scalars): clipfrac (share of tokens where the clipped
    term binds), approxkl = ½·mean((logp − old)²), ratio (mean r).
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(logprobs.dtype), mask),
            "approxkl": 0.5 * masked_mean(log_ratio**2, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float,
) -> tuple[torch.Tensor, Stats]:
    """Clipped value loss, masked mean over valid tokens.

        v_clip = old + clip(v − old, −ε, ε),   loss = ½·mean(max((v − R)², (v_clip − R)²))

    All inputs [B, T]. Stats (detached): clipfrac (share of tokens where the clipped term is larger).
    """
    v_clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    err = (values - returns) ** 2
    err_clipped = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((err_clipped > err).to(values.dtype), mask)}
    return loss, stats


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 − Var(R − V) / Var(R) over valid tokens: 1 is a perfect critic, ≤ 0 no better than a constant.

    NaN when the returns have zero variance.
    """
    var_returns = masked_var(returns, mask, unbiased=False)
    var_residual = masked_var(returns - values, mask, unbiased=False)
    return 1.0 - var_residual / var_returns


# ---------------------------------------------------------------------------------------------
# Log-probs and entropy from logits


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, chunk_rows: int = 4) -> torch.Tensor:
    """log softmax(logits)[label] per position: logits [B, T, V], labels [B, T] → [B, T] float32.

    Logits must already be aligned with labels (logits[:, t] scores labels[:, t]; shift and divide
    by the sampling temperature before calling). Computed as logit[label] − logsumexp(logits), in
    float32, `chunk_rows` rows at a time, so the full [B, T, V] log_softmax (and its float32 copy
    of bf16 logits) is never materialised at once. Positions labelled IGNORE_INDEX give 0.
    Differentiable.
    """
    ignore = labels == IGNORE_INDEX
    safe = labels.masked_fill(ignore, 0).unsqueeze(-1)
    chunks = []
    for i in range(0, logits.shape[0], chunk_rows):
        rows = logits[i : i + chunk_rows].float()
        picked = rows.gather(-1, safe[i : i + chunk_rows]).squeeze(-1)
        chunks.append(picked - torch.logsumexp(rows, dim=-1))
    out = torch.cat(chunks, dim=0)
    return out.masked_fill(ignore, 0.0)


def entropy_from_logits(logits: torch.Tensor, mask: torch.Tensor, chunk_rows: int = 4) -> torch.Tensor:
    """Mean per-token entropy H = logsumexp(l) − Σ softmax(l)·l over valid tokens → scalar.

    logits [B, T, V], mask [B, T]; computed in float32, `chunk_rows` rows at a time.
    """
    chunks = []
    for i in range(0, logits.shape[0], chunk_rows):
        rows = logits[i : i + chunk_rows].float()
        chunks.append(torch.logsumexp(rows, dim=-1) - (F.softmax(rows, dim=-1) * rows).sum(-1))
    return masked_mean(torch.cat(chunks, dim=0), mask)


def sequence_logps(token_logprobs: torch.Tensor, mask: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Sequence log-prob from per-token log-probs [B, T] → [B]: the sum over valid tokens.

    average=True divides by the number of valid tokens (the IPO paper's and TRL's choice for IPO).
    """
    total = masked_sum(token_logprobs, mask, dim=1)
    return total / _as_mask(mask, token_logprobs).sum(1).clamp(min=1) if average else total


# ---------------------------------------------------------------------------------------------
# KL coefficient controllers


class KLController(Protocol):
    """What the PPO stage needs from a KL coefficient schedule."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> None: ...
    def state_dict(self) -> dict[str, float]: ...
    def load_state_dict(self, state: dict[str, float]) -> None: ...


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: the coefficient never changes."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Ziegler et al. 2019 (arXiv:1909.08593, §2.2): steer the measured KL toward `target`.

        e = clip(current_kl / target − 1, −0.2, 0.2),   value ← value · (1 + e · n_steps / horizon)

    `current_kl` is the mean per-sequence KL of the last batch; `n_steps` the samples it held.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL needs target > 0 and horizon > 0, got {target}, {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
        self.target = float(state.get("target", self.target))
        self.horizon = float(state.get("horizon", self.horizon))


# ---------------------------------------------------------------------------------------------
# DPO losses. Each takes sequence log-probs [B] (sums over reply tokens unless noted; see
# sequence_logps) and returns (losses [B], chosen_rewards [B], rejected_rewards [B]); the implicit
# rewards are β·(π − ref), detached, for logging accuracy and margins.


class DPOLossFn(Protocol):
    def __call__(
        self,
        policy_chosen_logps: torch.Tensor,
        policy_rejected_logps: torch.Tensor,
        ref_chosen_logps: torch.Tensor,
        ref_rejected_logps: torch.Tensor,
        beta: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


def _dpo_margin(
    pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """h = (πc − rc) − (πr − rr), plus the detached implicit rewards."""
    chosen, rejected = pc - rc, pr - rr
    return chosen - rejected, beta * chosen.detach(), beta * rejected.detach()


def dpo_sigmoid_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO (Rafailov et al. 2023): −logσ(β·h), h = (πc − rc) − (πr − rr); sums over reply tokens.

    label_smoothing ε (conservative DPO, cDPO) assumes labels flip with probability ε:
    −(1 − ε)·logσ(β·h) − ε·logσ(−β·h).
    """
    h, chosen_rewards, rejected_rewards = _dpo_margin(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return losses, chosen_rewards, rejected_rewards


def dpo_ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IPO (Azar et al. 2023): (h − 1/(2β))², h = (πc − rc) − (πr − rr).

    The paper (and TRL) use log-probs averaged over reply tokens: pass sequence_logps(...,
    average=True) to match; this function itself just uses what it is given. β here is the
    paper's τ (a regulariser: larger β, smaller target margin 1/(2β)).
    """
    h, chosen_rewards, rejected_rewards = _dpo_margin(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    return (h - 1.0 / (2.0 * beta)) ** 2, chosen_rewards, rejected_rewards


def dpo_hinge_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SLiC-HF hinge (Zhao et al. 2023): relu(1 − β·h), h = (πc − rc) − (πr − rr); sums over tokens."""
    h, chosen_rewards, rejected_rewards = _dpo_margin(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    return torch.relu(1.0 - beta * h), chosen_rewards, rejected_rewards


DPO_LOSSES: dict[str, DPOLossFn] = {
    "sigmoid": dpo_sigmoid_loss,
    "ipo": dpo_ipo_loss,
    "hinge": dpo_hinge_loss,
}

# Which DPO losses expect length-averaged sequence log-probs (sequence_logps(..., average=True)).
DPO_AVERAGE_LOGPS: dict[str, bool] = {"sigmoid": False, "ipo": True, "hinge": False}


def get_dpo_loss(name: str) -> DPOLossFn:
    """Look up a DPO loss by name, with a clear error listing the choices."""
    try:
        return DPO_LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown DPO loss {name!r}; choose one of {sorted(DPO_LOSSES)}") from None


# ---------------------------------------------------------------------------------------------
# Rollout record


@dataclasses.dataclass
class Trajectory:
    """One PPO rollout batch of B prompts, each with one sampled reply.

    Shapes (Q = longest prompt, T = longest reply):
        query_ids     [B, Q] long   prompt token ids, left-padded (pad_token_id)
        query_mask    [B, Q] long   1 on real prompt tokens, 0 on left padding
        response_ids  [B, T] long   sampled reply ids, right-padded after the end of turn
        mask          [B, T] bool   1 on reply tokens up to and including the end-of-turn token
        logprobs      [B, T] float  rollout policy log-probs of response_ids (the PPO "old_logprobs")
        ref_logprobs  [B, T] float  frozen reference log-probs of response_ids
        values        [B, T] float  value head outputs at each reply token (the PPO "old_values")
        scores        [B]    float  reward-model score of the whole reply (before any penalty)
        ended         [B]    bool   True if the reply emitted an end-of-turn token before the limit
    """

    query_ids: torch.Tensor
    query_mask: torch.Tensor
    response_ids: torch.Tensor
    mask: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor
    ended: torch.Tensor

    def __len__(self) -> int:
        return self.query_ids.shape[0]

    def select(self, rows: torch.Tensor | slice) -> Trajectory:
        """The sub-batch at `rows` (an index tensor or a slice), e.g. one PPO minibatch."""
        return Trajectory(**{f.name: getattr(self, f.name)[rows] for f in dataclasses.fields(self)})

    def to(self, device: torch.device | str) -> Trajectory:
        return Trajectory(**{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)})
