"""RL math against hand-computed numbers (the arithmetic is in the comments, not in rl.py)."""

import math

import pytest
import torch

from chatforge.core import rl
from chatforge.core.tokenizer import IGNORE_INDEX

GARBAGE = 1e6  # value placed on padding positions: any leak shows up immediately


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def assert_close(x: torch.Tensor, expected, atol: float = 1e-6) -> None:
    """Compare a tensor with explicit (possibly nested) numbers."""
    torch.testing.assert_close(x.detach(), torch.tensor(expected, dtype=x.dtype), rtol=0, atol=atol)


# ------------------------------------------------------------------------------- masked reductions


def test_masked_reductions_ignore_padding():
    x = t([1.0, 2.0, 3.0, GARBAGE], [4.0, GARBAGE, GARBAGE, GARBAGE])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert rl.masked_sum(x, mask).item() == pytest.approx(10.0)
    assert rl.masked_mean(x, mask).item() == pytest.approx(2.5)  # (1+2+3+4)/4
    assert rl.masked_mean(x, mask, dim=1).tolist() == pytest.approx([2.0, 4.0])
    assert rl.masked_sum(x, mask, dim=1).tolist() == pytest.approx([6.0, 4.0])
    # deviations from 2.5: -1.5 -0.5 0.5 1.5 → squares sum 5.0; biased 5/4, unbiased 5/3
    assert rl.masked_var(x, mask, unbiased=False).item() == pytest.approx(1.25)
    assert rl.masked_var(x, mask).item() == pytest.approx(5.0 / 3.0)
    # bool masks work the same; an empty row's mean is 0, not NaN
    assert rl.masked_mean(x, mask.bool(), dim=1).tolist() == pytest.approx([2.0, 4.0])
    empty = rl.masked_mean(x, torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]]), dim=1)
    assert empty.tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="no valid"):
        rl.masked_var(x, torch.zeros_like(mask))


def test_masked_whiten_explicit_and_random():
    x = t([1.0, 2.0, 3.0, GARBAGE])
    mask = torch.tensor([[1, 1, 1, 0]])
    # mean 2, unbiased var ((1+0+1)/2) = 1 → [-1, 0, 1], padding set to 0
    assert_close(rl.masked_whiten(x, mask, eps=0.0), [[-1.0, 0.0, 1.0, 0.0]])
    # shift_mean=False keeps the mean: [-1, 0, 1] + 2
    assert_close(rl.masked_whiten(x, mask, shift_mean=False, eps=0.0), [[1.0, 2.0, 3.0, 0.0]])

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 9, generator=g, dtype=torch.float64) * 5 + 3
    mask = torch.ones(4, 9, dtype=torch.bool)
    mask[0, 6:] = False
    mask[2, 2:] = False
    x[~mask] = GARBAGE
    w = rl.masked_whiten(x, mask)
    vals = w[mask]
    assert vals.mean().item() == pytest.approx(0.0, abs=1e-9)
    assert vals.std().item() == pytest.approx(1.0, abs=1e-6)
    assert (w[~mask] == 0).all()


# ------------------------------------------------------------------------------------ KL estimators


def test_kl_estimators_on_known_numbers():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    # k1 = ln 0.5 − ln 0.25 = ln 2 = 0.693147
    assert rl.KL_ESTIMATORS["k1"](logp, ref).item() == pytest.approx(0.693147, abs=1e-6)
    # k2 = ½ (ln 2)² = ½ · 0.480453 = 0.240227
    assert rl.KL_ESTIMATORS["k2"](logp, ref).item() == pytest.approx(0.240227, abs=1e-6)
    # k3: d = ref − logp = −ln 2 → e^d − d − 1 = 0.5 + 0.693147 − 1 = 0.193147
    assert rl.KL_ESTIMATORS["k3"](logp, ref).item() == pytest.approx(0.193147, abs=1e-6)
    assert rl.KL_ESTIMATORS["abs"](ref, logp).item() == pytest.approx(0.693147, abs=1e-6)
    with pytest.raises(ValueError, match="k3"):
        rl.get_kl_estimator("k4")


def test_k3_is_nonnegative_and_zero_at_equality():
    g = torch.Generator().manual_seed(1)
    logp, ref = torch.randn(1000, generator=g) * 3, torch.randn(1000, generator=g) * 3
    assert (rl.kl_k3(logp, ref) >= 0).all()
    assert (rl.kl_k2(logp, ref) >= 0).all()
    assert rl.kl_k3(logp, logp).abs().max().item() == 0.0
    assert (rl.kl_k1(logp, ref) < 0).any()  # k1 alone can be negative


def test_k1_k3_unbiased_by_monte_carlo():
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    # KL(p‖q) = 0.5 ln(2.5) + 0.3 ln 1 + 0.2 ln(0.4) = 0.3 · ln 2.5 = 0.274887
    exact = 0.274887
    g = torch.Generator().manual_seed(0)
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)
    logp, ref = p.log()[x], q.log()[x]
    assert rl.kl_k1(logp, ref).mean().item() == pytest.approx(exact, abs=0.01)
    assert rl.kl_k3(logp, ref).mean().item() == pytest.approx(exact, abs=0.01)
    # k2 is biased here: E[½ (ln p/q)²] = ½ · 0.7 · (ln 2.5)² = 0.293856
    k2 = rl.kl_k2(logp, ref).mean().item()
    assert k2 == pytest.approx(0.293856, abs=0.01) and abs(k2 - exact) > 0.01


# ------------------------------------------------------------------------------ rewards / penalties


def test_per_token_rewards_places_score_at_last_valid_token():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    ref = torch.zeros(2, 4, dtype=torch.float64)
    logp = t([0.2, -0.4, 1.0, GARBAGE], [0.5, 0.1, GARBAGE, GARBAGE])
    scores = t(2.0, -1.0)
    rewards, kl = rl.per_token_rewards(scores, logp, ref, mask, kl_coef=0.1)
    # k1 = logp − 0 on valid tokens; reward = −0.1·k1, + score at index 2 (row 0) / 1 (row 1)
    assert_close(kl, [[0.2, -0.4, 1.0, 0.0], [0.5, 0.1, 0.0, 0.0]])
    assert_close(rewards, [[-0.02, 0.04, -0.1 + 2.0, 0.0], [-0.05, -0.01 - 1.0, 0.0, 0.0]])
    # k2 with the same numbers: ½x² → row 1 = [0.125, 0.005]
    rewards2, kl2 = rl.per_token_rewards(scores, logp, ref, mask, kl_coef=1.0, estimator="k2")
    assert kl2[1].tolist() == pytest.approx([0.125, 0.005, 0.0, 0.0])
    assert rewards2[1].tolist() == pytest.approx([-0.125, -0.005 - 1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="at least one valid"):
        rl.per_token_rewards(scores, logp, ref, torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]]), 0.1)


def test_last_valid_index_with_holes():
    mask = torch.tensor([[1, 0, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert rl.last_valid_index(mask).tolist() == [2, 3, 0]


def test_eot_penalty_subtracts_for_unended_replies():
    scores = torch.tensor([1.0, 2.0, 3.0])
    ended = torch.tensor([True, False, True])
    out = rl.eot_penalty(scores, ended, penalty=0.5)
    assert out.tolist() == [1.0, 1.5, 3.0]
    assert scores.tolist() == [1.0, 2.0, 3.0]  # input untouched


# ------------------------------------------------------------------------------------------- GAE


def test_gae_hand_computed_with_padding():
    # Row 0 (T=3), γ=0.9, λ=0.8, γλ=0.72, r=[0,0,1], V=[0.5,0.4,0.3], V after the end = 0:
    #   t=2: δ = 1 + 0.9·0   − 0.3 =  0.7                     A2 = 0.7
    #   t=1: δ = 0 + 0.9·0.3 − 0.4 = −0.13   A1 = −0.13 + 0.72·0.7   =  0.374
    #   t=0: δ = 0 + 0.9·0.4 − 0.5 = −0.14   A0 = −0.14 + 0.72·0.374 =  0.12928
    #   returns = A + V = [0.62928, 0.774, 1.0]
    # Row 1 (T=2), r=[0,2], V=[1,0.5]:
    #   t=1: δ = 2 − 0.5 = 1.5 → A1 = 1.5;  t=0: δ = 0.9·0.5 − 1 = −0.55 → A0 = −0.55 + 0.72·1.5 = 0.53
    #   returns = [1.53, 2.0]
    rewards = t([0.0, 0.0, 1.0, GARBAGE], [0.0, 2.0, GARBAGE, GARBAGE])
    values = t([0.5, 0.4, 0.3, GARBAGE], [1.0, 0.5, GARBAGE, GARBAGE])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    adv, ret = rl.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert_close(adv, [[0.12928, 0.374, 0.7, 0.0], [0.53, 1.5, 0.0, 0.0]])
    assert_close(ret, [[0.62928, 0.774, 1.0, 0.0], [1.53, 2.0, 0.0, 0.0]])


def _gae_reference(r: list[float], v: list[float], gamma: float, lam: float) -> list[float]:
    """Independent definition: A_t = Σ_k (γλ)^k δ_{t+k}, written as a double loop."""
    n = len(r)
    deltas = [r[i] + gamma * (v[i + 1] if i + 1 < n else 0.0) - v[i] for i in range(n)]
    return [sum((gamma * lam) ** k * deltas[i + k] for k in range(n - i)) for i in range(n)]


def test_gae_matches_double_loop_and_skips_holes():
    g = torch.Generator().manual_seed(3)
    rewards = torch.randn(3, 6, generator=g, dtype=torch.float64)
    values = torch.randn(3, 6, generator=g, dtype=torch.float64)
    lengths = [6, 4, 1]
    mask = torch.tensor([[1] * n + [0] * (6 - n) for n in lengths])
    adv, ret = rl.gae(rewards, values, mask, gamma=0.95, lam=0.9)
    for b, n in enumerate(lengths):
        expected = _gae_reference(rewards[b, :n].tolist(), values[b, :n].tolist(), 0.95, 0.9)
        assert adv[b, :n].tolist() == pytest.approx(expected)
        assert ret[b, :n].tolist() == pytest.approx(
            [a + v for a, v in zip(expected, values[b, :n].tolist(), strict=True)]
        )
    # a masked hole in the middle is skipped: same as the row with the hole removed
    hole = torch.tensor([[1, 1, 0, 1, 1, 0]])
    adv_h, _ = rl.gae(rewards[:1], values[:1], hole, gamma=0.95, lam=0.9)
    keep = [0, 1, 3, 4]
    expected = _gae_reference(rewards[0, keep].tolist(), values[0, keep].tolist(), 0.95, 0.9)
    assert adv_h[0, keep].tolist() == pytest.approx(expected)
    assert adv_h[0, 2].item() == 0.0 and adv_h[0, 5].item() == 0.0


def test_gae_whiten_flag_keeps_raw_returns():
    rewards = t([0.0, 0.0, 1.0, 0.0], [0.0, 2.0, 0.0, 0.0])
    values = t([0.5, 0.4, 0.3, 0.0], [1.0, 0.5, 0.0, 0.0])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    raw, ret_raw = rl.gae(rewards, values, mask, 0.9, 0.8)
    white, ret = rl.gae(rewards, values, mask, 0.9, 0.8, whiten=True)
    assert torch.equal(ret, ret_raw)
    assert torch.allclose(white, rl.masked_whiten(raw, mask))
    assert white[mask.bool()].mean().item() == pytest.approx(0.0, abs=1e-9)


# ------------------------------------------------------------------------------------ PPO losses


def test_policy_loss_clipping_binds_and_not():
    eps = 0.2
    # one token each, A = 1:
    #   r = 1.1 → −1.1 vs −clip(1.1)=−1.1 → −1.1, not clipped
    #   r = 1.5 → −1.5 vs −1.2 → max = −1.2, clipped
    # A = −1:
    #   r = 0.5 → 0.5 vs 0.8 → 0.8, clipped;   r = 1.5 → 1.5 vs 1.2 → 1.5, not clipped (pessimistic)
    ratios = [1.1, 1.5, 0.5, 1.5]
    adv = t([1.0, 1.0, -1.0, -1.0, GARBAGE])
    old = torch.zeros(1, 5, dtype=torch.float64)
    logp = t([math.log(r) for r in ratios] + [5.0]).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss, stats = rl.ppo_policy_loss(logp, old, adv, mask, clip_range=eps)
    assert loss.item() == pytest.approx((-1.1 - 1.2 + 0.8 + 1.5) / 4)
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    assert stats["ratio"].item() == pytest.approx(sum(ratios) / 4)
    assert stats["approxkl"].item() == pytest.approx(0.5 * sum(math.log(r) ** 2 for r in ratios) / 4)
    assert not stats["clipfrac"].requires_grad
    loss.backward()
    # d/dlogp of −A·r = −A·r; divided by 4 tokens; zero where clipping binds and on padding
    assert_close(logp.grad, [[-1.1 / 4, 0.0, 0.0, 1.5 / 4, 0.0]])


def test_policy_loss_unclipped_equals_vanilla_pg_and_accepts_sequence_advantages():
    logp = t([0.01, -0.02, 0.03])
    old = torch.zeros(1, 3, dtype=torch.float64)
    mask = torch.ones(1, 3)
    loss, stats = rl.ppo_policy_loss(logp, old, torch.tensor([2.0], dtype=torch.float64), mask, 0.2)
    expected = -2.0 * sum(math.exp(x) for x in [0.01, -0.02, 0.03]) / 3
    assert loss.item() == pytest.approx(expected)
    assert stats["clipfrac"].item() == 0.0


def test_value_loss_clipped():
    # ε = 0.2:
    #   old=1, v=1.5, R=1:   v_clip=1.2, (v−R)²=0.25, (v_clip−R)²=0.04 → 0.25 (not clipped)
    #   old=1, v=1.5, R=2:   v_clip=1.2, 0.25 vs 0.64 → 0.64 (clipped)
    #   old=0, v=0.1, R=0:   v_clip=0.1, 0.01 vs 0.01 → 0.01 (tie: not counted as clipped)
    #   old=0, v=0.5, R=0.6: v_clip=0.2, 0.01 vs 0.16 → 0.16 (clipped)
    # loss = ½ · (0.25 + 0.64 + 0.01 + 0.16) / 4 = 0.1325, clipfrac = 2/4
    values = t([1.5, 1.5, 0.1, 0.5, GARBAGE])
    old = t([1.0, 1.0, 0.0, 0.0, 0.0])
    returns = t([1.0, 2.0, 0.0, 0.6, -GARBAGE])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss, stats = rl.ppo_value_loss(values, old, returns, mask, clip_range_value=0.2)
    assert loss.item() == pytest.approx(0.1325)
    assert stats["clipfrac"].item() == pytest.approx(0.5)


def test_explained_variance():
    returns = t([1.0, 2.0, 3.0, GARBAGE])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert rl.explained_variance(returns.clone(), returns, mask).item() == pytest.approx(1.0)
    assert rl.explained_variance(torch.full_like(returns, 2.0), returns, mask).item() == pytest.approx(0.0)
    # V = [1, 1, 1]: residual [0, 1, 2] has var 2/3, returns var 2/3 → 0;  V = [1.5, 2, 2.5]:
    # residual [−0.5, 0, 0.5] var (0.25+0+0.25)/3 = 1/6 → 1 − (1/6)/(2/3) = 0.75
    assert rl.explained_variance(t([1.5, 2.0, 2.5, 0.0]), returns, mask).item() == pytest.approx(0.75)


# ------------------------------------------------------------------------------ logits helpers


def test_logprobs_from_logits_matches_manual_and_ignores_padding():
    logits = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], [[5.0, 1.0, 1.0], [2.0, 2.0, 9.0]]])
    labels = torch.tensor([[2, 1], [0, IGNORE_INDEX]])
    lse = lambda xs: math.log(sum(math.exp(x) for x in xs))  # noqa: E731
    expected = [[3.0 - lse([1, 2, 3]), -math.log(3)], [5.0 - lse([5, 1, 1]), 0.0]]
    for chunk in (1, 4):
        out = rl.logprobs_from_logits(logits, labels, chunk_rows=chunk)
        assert out.dtype == torch.float32
        assert_close(out, expected)
    # bf16 input is upcast; still differentiable
    leaf = logits.clone().requires_grad_()
    rl.logprobs_from_logits(leaf.bfloat16(), labels).sum().backward()
    assert leaf.grad is not None and leaf.grad[1, 1].abs().sum().item() == 0.0


def test_entropy_from_logits():
    V = 8
    uniform = torch.zeros(1, 2, V)
    peaked = torch.full((1, 2, V), -1e4)
    peaked[..., 0] = 0.0
    logits = torch.cat([uniform, peaked], dim=0)
    assert rl.entropy_from_logits(uniform, torch.ones(1, 2)).item() == pytest.approx(math.log(V), abs=1e-5)
    # mean over 2 uniform tokens + 1 peaked token (second peaked token masked): 2·ln8 / 3
    mask = torch.tensor([[1, 1], [1, 0]])
    assert rl.entropy_from_logits(logits, mask, chunk_rows=1).item() == pytest.approx(
        2 * math.log(V) / 3, abs=1e-5
    )
    # two-way 0.25/0.75: H = −(0.25 ln 0.25 + 0.75 ln 0.75) = 0.562335
    two = torch.tensor([[[0.0, math.log(3.0)]]])
    assert rl.entropy_from_logits(two, torch.ones(1, 1)).item() == pytest.approx(0.562335, abs=1e-5)


def test_sequence_logps_sum_and_average():
    tok = t([-1.0, -2.0, -3.0, GARBAGE], [-4.0, GARBAGE, GARBAGE, GARBAGE])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert rl.sequence_logps(tok, mask).tolist() == pytest.approx([-6.0, -4.0])
    assert rl.sequence_logps(tok, mask, average=True).tolist() == pytest.approx([-2.0, -4.0])


# ------------------------------------------------------------------------------- KL controllers


def test_adaptive_kl_controller_steps_and_resume():
    ctl = rl.AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10_000)
    # KL 12: e = clip(12/6 − 1) = 0.2 (clipped from 1.0); mult = 1 + 0.2·512/10000 = 1.01024
    ctl.update(12.0, n_steps=512)
    assert ctl.value == pytest.approx(0.101024)
    # on target: e = 0 → unchanged
    ctl.update(6.0, n_steps=512)
    assert ctl.value == pytest.approx(0.101024)
    # KL 3: e = −0.5 → −0.2; mult = 1 − 0.2·1000/10000 = 0.98 → 0.09900352
    ctl.update(3.0, n_steps=1000)
    assert ctl.value == pytest.approx(0.09900352)
    state = ctl.state_dict()
    # KL 5.4: e = −0.1 (unclipped); mult = 0.99 → 0.0980134848
    ctl.update(5.4, n_steps=1000)
    assert ctl.value == pytest.approx(0.0980134848)

    resumed = rl.AdaptiveKLController(init_kl_coef=123.0, target=1.0, horizon=1.0)
    resumed.load_state_dict(state)
    resumed.update(5.4, n_steps=1000)
    assert resumed.value == ctl.value  # exact, not approximate
    with pytest.raises(ValueError):
        rl.AdaptiveKLController(0.1, target=0.0, horizon=10)


def test_fixed_kl_controller():
    ctl = rl.FixedKLController(0.05)
    ctl.update(100.0, n_steps=64)
    assert ctl.value == 0.05
    other = rl.FixedKLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


# ----------------------------------------------------------------------------------------- GRPO


def test_group_advantages():
    r = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0], dtype=torch.float64)
    # group 1: mean 2, std 1 → [−1, 0, 1]; group 2: mean 2, centred [−2, −2, 4],
    # std = sqrt((4 + 4 + 16)/2) = sqrt(12) = 3.464102 → [−0.577350, −0.577350, 1.154701]
    g = rl.group_advantages(r, 3, "group", eps=0.0)
    assert g.tolist() == pytest.approx([-1.0, 0.0, 1.0, -0.577350, -0.577350, 1.154701], abs=1e-6)
    # batch std: mean 2, squared deviations 1+0+1+4+4+16 = 26, /5 = 5.2 → std 2.280351
    b = rl.group_advantages(r, 3, "batch", eps=0.0)
    assert b.tolist() == pytest.approx([x / 2.280351 for x in [-1, 0, 1, -2, -2, 4]], abs=1e-6)
    assert rl.group_advantages(r, 3, "none").tolist() == pytest.approx([-1, 0, 1, -2, -2, 4])
    # an all-equal group gets 0 advantage, not NaN
    assert rl.group_advantages(torch.tensor([5.0, 5.0, 1.0, 3.0]), 2).tolist()[:2] == [0.0, 0.0]
    with pytest.raises(ValueError, match="divide"):
        rl.group_advantages(r, 4)
    with pytest.raises(ValueError, match="scale"):
        rl.group_advantages(r, 3, "rank")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ DPO


def _dpo_inputs():
    # πc = −1, πr = −3, rc = rr = −2 → h = (−1 + 2) − (−3 + 2) = 1 − (−1) = 2
    return (t(-1.0), t(-3.0), t(-2.0), t(-2.0))


def test_dpo_sigmoid():
    losses, chosen, rejected = rl.DPO_LOSSES["sigmoid"](*_dpo_inputs(), beta=0.1)
    # −logσ(0.1·2) = ln(1 + e^−0.2) = 0.598139
    assert losses.item() == pytest.approx(0.598139, abs=1e-6)
    assert chosen.item() == pytest.approx(0.1) and rejected.item() == pytest.approx(-0.1)
    # label smoothing 0.1: 0.9·0.598139 + 0.1·ln(1 + e^0.2) = 0.538325 + 0.079814 = 0.618139
    smoothed, _, _ = rl.dpo_sigmoid_loss(*_dpo_inputs(), beta=0.1, label_smoothing=0.1)
    assert smoothed.item() == pytest.approx(0.618139, abs=1e-6)


def test_dpo_ipo_and_hinge():
    # IPO: (h − 1/(2β))² with β = 0.1 → (2 − 5)² = 9; with β = 0.25 → (2 − 2)² = 0
    assert rl.DPO_LOSSES["ipo"](*_dpo_inputs(), beta=0.1)[0].item() == pytest.approx(9.0)
    assert rl.DPO_LOSSES["ipo"](*_dpo_inputs(), beta=0.25)[0].item() == pytest.approx(0.0)
    # hinge: relu(1 − 0.1·2) = 0.8; relu(1 − 1·2) = 0
    assert rl.DPO_LOSSES["hinge"](*_dpo_inputs(), beta=0.1)[0].item() == pytest.approx(0.8)
    assert rl.DPO_LOSSES["hinge"](*_dpo_inputs(), beta=1.0)[0].item() == 0.0
    assert set(rl.DPO_AVERAGE_LOGPS) == set(rl.DPO_LOSSES)
    with pytest.raises(ValueError, match="sigmoid"):
        rl.get_dpo_loss("kto")


def test_dpo_sigmoid_gradient_direction():
    pc, pr, rc, rr = (x.clone().requires_grad_() if i < 2 else x for i, x in enumerate(_dpo_inputs()))
    losses, _, _ = rl.dpo_sigmoid_loss(pc, pr, rc, rr, beta=0.1)
    losses.sum().backward()
    # dL/dπc = −β·σ(−βh) = −0.1·σ(−0.2) = −0.1·0.450166 → raising πc lowers the loss
    assert pc.grad.item() == pytest.approx(-0.0450166, abs=1e-6)
    assert pr.grad.item() == pytest.approx(0.0450166, abs=1e-6)


# ------------------------------------------------------------------------------------ Trajectory


def test_trajectory_select_and_len():
    B, Q, T = 4, 3, 5
    traj = rl.Trajectory(
        query_ids=torch.arange(B * Q).view(B, Q),
        query_mask=torch.ones(B, Q, dtype=torch.long),
        response_ids=torch.arange(B * T).view(B, T),
        mask=torch.ones(B, T, dtype=torch.bool),
        logprobs=torch.zeros(B, T),
        ref_logprobs=torch.zeros(B, T),
        values=torch.zeros(B, T),
        scores=torch.arange(B, dtype=torch.float32),
        ended=torch.tensor([True, False, True, True]),
    )
    assert len(traj) == 4
    sub = traj.select(torch.tensor([3, 1]))
    assert len(sub) == 2
    assert sub.scores.tolist() == [3.0, 1.0] and sub.ended.tolist() == [True, False]
    assert sub.response_ids[0].tolist() == [15, 16, 17, 18, 19]
    assert len(traj.select(slice(0, 3)).to("cpu")) == 3


# ------------------------------------------------------------------------------------ leave-one-out baseline


def test_leave_one_out_baseline_by_hand_and_sums_to_zero():
    # two prompts x K=3 samples, prompt-major; prompt 0 carries a large offset (+10)
    scores = torch.tensor([11.0, 13.0, 10.0, 1.0, 2.0, 6.0])
    base = rl.leave_one_out_baseline(scores, 3)
    # sample 0: mean(13, 10) = 11.5; sample 1: mean(11, 10) = 10.5; sample 2: mean(11, 13) = 12; ...
    assert base.tolist() == pytest.approx([11.5, 10.5, 12.0, 4.0, 3.5, 1.5])
    centred = (scores - base).view(2, 3)
    assert centred.sum(dim=1).abs().max() < 1e-6, "sums to zero over each prompt's samples"
    assert centred.flatten().tolist() == pytest.approx([-0.5, 2.5, -2.0, -3.0, -1.5, 4.5])
    # K/(K-1) times the group-mean-centred score; K = 1 leaves the scores as they are
    assert torch.allclose(centred.flatten(), 1.5 * rl.group_advantages(scores, 3, "none"))
    assert rl.leave_one_out_baseline(scores, 1).eq(0).all()
    with pytest.raises(ValueError):
        rl.leave_one_out_baseline(scores, 4)


def test_rloo_advantages_sequence_reward_minus_siblings():
    scores = torch.tensor([1.0, 3.0])
    kl = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    adv = rl.rloo_advantages(scores, kl, mask, kl_coef=0.1, k=2)
    # R = [1 - 0.1, 3 - 0.1] = [0.9, 2.9]; A = [0.9 - 2.9, 2.9 - 0.9], on every valid token
    assert torch.allclose(adv, torch.tensor([[-2.0, -2.0, 0.0], [2.0, 0.0, 0.0]]))
