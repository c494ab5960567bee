"""PPO: rollout log-probs, reference = policy at the start, LoRA reference, PPO-ptx term, reward goes up,
exact resume after SIGKILL, reward sources, guards and bad input."""

import json
import os
import sys

import pytest
import torch
from helpers import (
    assert_resumed,
    make_data_dir,
    run_killed_then_resumed,
    run_probed,
    save_tiny_model,
)

from chatforge.config import LoraConfig, PPOConfig, load_config
from chatforge.core.generation import SamplingParams, generate
from chatforge.core.io import UserError
from chatforge.core.rl import Trajectory, per_token_rewards
from chatforge.core.rollout import (
    HackingGuards,
    generate_rollouts,
    pad_rows,
    prepare_prompts,
    reference_logprobs,
    rollout_logprobs,
)
from chatforge.core.tokenizer import render_for_completion, stop_token_ids

PROMPTS = [f"Tell me about the {w} ball, please." for w in ("red", "big", "little", "sunny")] + ["Hi", "What is 2 + 3?"]


def _messages(text):
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def setup(tiny_tokenizer, tiny_model_factory, tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo")
    model_dir = save_tiny_model(root / "base", tiny_tokenizer, tiny_model_factory)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "messages": _messages(f"Tell me about ball {i}.")}) + "\n"
                               for i in range(32)))
    return root, model_dir, prompts


def _rollout(model, tok, n=len(PROMPTS), max_new=12):
    prompts = [{"id": str(i), "messages": _messages(t)} for i, t in enumerate(PROMPTS[:n])]
    ids = [render_for_completion(tok, p["messages"]) for p in prompts]
    return generate_rollouts(model, tok, prompts, ids, max_new_tokens=max_new, temperature=1.0, top_k=0, top_p=1.0,
                             seeds=list(range(n)))


def test_rollout_logprobs_match_engine_and_reference_at_start(setup, tiny_tokenizer, tiny_model_factory):
    tok = tiny_tokenizer
    policy, ref = tiny_model_factory(tok), tiny_model_factory(tok)  # same seed: the SFT model and its copy
    ids = [render_for_completion(tok, _messages(t)) for t in PROMPTS]
    gens = [g[0] for g in generate(policy, ids, SamplingParams(max_new_tokens=12, seed=3),
                                   stop_token_ids=stop_token_ids(tok), pad_id=tok.pad_token_id)]
    rows = pad_rows([g.prompt_ids for g in gens], [g.token_ids for g in gens], tok.pad_token_id)
    assert len({len(i) for i in ids}) > 1, "prompts of different lengths exercise the left padding"
    logprobs, entropy = rollout_logprobs(policy, *rows, temperature=1.0, chunk=4)
    mask = rows[3]
    engine = torch.zeros_like(logprobs)
    for i, g in enumerate(gens):
        engine[i, : len(g.logprobs)] = torch.tensor(g.logprobs)
    # the padded training-side forward reproduces the engine's KV-cache log-probs token for token
    assert torch.allclose(logprobs[mask], engine[mask], atol=1e-4)
    assert (logprobs[~mask] == 0).all() and 0 < entropy <= torch.log(torch.tensor(float(len(tok)))) + 1e-4
    # at step 0 the reference is the policy: KL exactly 0 and the shaped reward is the score alone
    ref_lp = reference_logprobs(ref, policy, *rows, temperature=1.0, chunk=3)
    assert torch.equal(ref_lp, logprobs)
    scores = torch.arange(len(gens), dtype=torch.float32)
    rewards, kl = per_token_rewards(scores, logprobs, ref_lp, mask, 0.1)
    assert kl.abs().max() == 0 and torch.allclose(rewards.sum(1), scores)


def test_lora_reference_is_the_base_model(tiny_tokenizer, tiny_model_factory):
    from chatforge.core.model import apply_lora

    tok = tiny_tokenizer
    base = tiny_model_factory(tok)
    policy = apply_lora(tiny_model_factory(tok), LoraConfig(enabled=True, r=4))
    with torch.no_grad():  # trained-looking adapters, so the policy really differs from its base
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    ro = _rollout(policy, tok)
    rows = (ro.query_ids, ro.query_mask, ro.response_ids, ro.mask)
    pol_lp, _ = rollout_logprobs(policy, *rows, temperature=1.0, chunk=8)
    ref_lp = reference_logprobs(None, policy, *rows, temperature=1.0, chunk=8)  # None: adapters off
    base_lp, _ = rollout_logprobs(base, *rows, temperature=1.0, chunk=8)
    assert torch.allclose(ref_lp, base_lp, atol=1e-6)
    assert (pol_lp - base_lp).abs().max() > 0.1
    assert all(p.requires_grad == ("lora" in n) for n, p in policy.named_parameters())  # adapters back on, trainable


def test_ptx_adds_exactly_coef_times_lm_loss(setup, tiny_tokenizer, tiny_model_factory):
    from chatforge.stages.ppo import ValueHead, ppo_loss
    from chatforge.stages.pretrain import lm_loss

    tok = tiny_tokenizer
    policy = tiny_model_factory(tok)
    ro = _rollout(policy, tok, n=4)
    rows = (ro.query_ids, ro.query_mask, ro.response_ids, ro.mask)
    lp, _ = rollout_logprobs(policy, *rows, temperature=1.0, chunk=4)
    n, t = ro.response_ids.shape
    g = torch.Generator().manual_seed(0)
    traj = Trajectory(*rows, lp, lp, torch.randn(n, t, generator=g), torch.randn(n, generator=g), ro.ended)
    adv, ret = torch.randn(n, t, generator=g), torch.randn(n, t, generator=g)
    ptx_batch = (torch.randint(0, len(tok), (2, 16), generator=g), torch.randint(0, len(tok), (2, 16), generator=g))
    critic = ValueHead(policy.config.hidden_size)
    cfg = load_config(PPOConfig, None, ["critic.shared=true"])
    base, _ = ppo_loss(policy, critic, traj, adv, ret, cfg, ptx_batch)
    cfg.ptx.coef = 0.7
    with_ptx, stats = ppo_loss(policy, critic, traj, adv, ret, cfg, ptx_batch)
    lm, _ = lm_loss(policy, ptx_batch)
    assert float((with_ptx - base).detach()) == pytest.approx(0.7 * lm.item(), rel=1e-6)
    assert stats["ppo/ptx_loss"] == pytest.approx(lm.item()) and lm.item() > 1.0
    # and the added term has gradients: the LM loss really trains the policy
    with_ptx.backward()
    assert policy.model.embed_tokens.weight.grad.abs().sum() > 0


def test_ptx_on_demonstrations_trains_their_assistant_tokens(setup, tmp_path):
    """ptx.demos: the LM term is the SFT loss of packed demonstrations (assistant tokens only), and it runs and
    resumes in the PPO loop; one of ptx.data / ptx.demos is required, not both."""
    from chatforge.stages import ppo

    root, model_dir, prompts = setup
    demos = tmp_path / "demos.jsonl"
    demos.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say {w}."},
                                                      {"role": "assistant", "content": f"{w} {w} {w}."}]}) + "\n"
                             for w in ("ball", "sun", "cat", "tree", "red", "dog")))
    sets = _ppo_sets(root, model_dir, prompts, 3, ["train.checkpoint_every=0", "ptx.coef=1.0", f"ptx.demos={demos}",
                                                   "ptx.seq_len=64", "ptx.batch_size=2"])
    ppo.run(load_config(PPOConfig, None, sets), tmp_path / "run", resume=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["ppo/ptx_loss"] > 0.5 for r in rows)
    from chatforge.stages.report import training_specs

    assert str(demos) in training_specs([tmp_path / "run"])  # the eval leaves the ptx demos out of general chat

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chatforge.core.distributed import init_distributed
    from chatforge.data.sft_data import sft_loss

    cfg = load_config(PPOConfig, None, sets)
    tok = AutoTokenizer.from_pretrained(model_dir)
    loader = ppo.make_ptx_loader(cfg.ptx, tok, 0, init_distributed("cpu"))
    batch = next(iter(loader))
    assert isinstance(batch, dict) and (batch["targets"] != -100).sum() < batch["input_ids"].numel()  # masked
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ro = _rollout(model, tok, n=2)
    rows_ = (ro.query_ids, ro.query_mask, ro.response_ids, ro.mask)
    lp, _ = rollout_logprobs(model, *rows_, temperature=1.0, chunk=4)
    n, t = ro.response_ids.shape
    traj = Trajectory(*rows_, lp, lp, torch.zeros(n, t), torch.zeros(n), ro.ended)
    cfg.ppo.vf_coef = 0.0
    loss, stats = ppo.ppo_loss(model, None, traj, torch.zeros(n, t), torch.zeros(n, t), cfg, batch)
    expected, _ = sft_loss(model, batch)
    assert stats["ppo/ptx_loss"] == pytest.approx(expected.item(), rel=1e-5)
    for bad in (["ptx.coef=1.0"], ["ptx.coef=1.0", f"ptx.demos={demos}", f"ptx.data={root}"]):
        with pytest.raises(UserError, match="ptx.data .* or ptx.demos"):
            ppo.run(load_config(PPOConfig, None, _ppo_sets(root, model_dir, prompts, 1, bad)), tmp_path / "bad")


def _ppo_sets(root, model_dir, prompts, steps, extra=()):
    return [f"policy={model_dir}", f"prompts={prompts}", "reward=keyword:e", f"train.max_steps={steps}",
            "train.batch_size=8", "ppo.minibatch_size=4", "ppo.epochs=2", "rollout.max_new_tokens=12",
            "train.lr=3e-3", "train.log_every=1", "log.tensorboard=false", "train.threads=1", *extra]


def test_ppo_raises_toy_reward_with_bounded_kl(setup, tmp_path):
    from chatforge.stages import ppo

    root, model_dir, prompts = setup
    cfg = load_config(PPOConfig, None, _ppo_sets(root, model_dir, prompts, 24, ["ppo.kl_coef=0.1",
                                                                                 "train.checkpoint_every=0"]))
    res = ppo.run(cfg, tmp_path / "run", resume=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert res["iterations"] == 24 and len(rows) == 24
    first, last = rows[:6], rows[-6:]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    assert mean(last, "objective/raw_scores") > mean(first, "objective/raw_scores") + 1.5
    assert rows[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5), "reference == policy at the first rollout"
    assert max(r["objective/kl"] for r in rows) < 25.0
    for key in ("objective/entropy", "objective/rlhf_reward", "objective/scores", "policy/clipfrac", "policy/approxkl",
                "val/clipfrac", "val/explained_variance", "ppo/lr", "ppo/reply_length", "ppo/kl_coef", "ppo/ptx_loss"):
        assert key in rows[-1], key
    man = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert man["stage"] == "ppo" and man["status"] == "completed"
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model").config.hidden_size == 64


RUN_PPO = ("import sys; from chatforge.config import PPOConfig, load_config; from chatforge.stages.ppo import run; "
           "run(load_config(PPOConfig, None, sys.argv[2:]), sys.argv[1])")


def test_ppo_exact_resume_after_sigkill(setup, tmp_path):
    from chatforge.stages.ppo import run

    root, model_dir, prompts = setup
    data = make_data_dir(tmp_path / "data", __import__("transformers").AutoTokenizer.from_pretrained(model_dir))
    sets = _ppo_sets(root, model_dir, prompts, 8, ["train.checkpoint_every=3", "ppo.kl_target=2.0",
                                                    "ptx.coef=0.5", f"ptx.data={data}", "ptx.seq_len=16"])
    ref = tmp_path / "ref"
    run(load_config(PPOConfig, None, sets), ref)  # uninterrupted, in this process (saves an interpreter start)
    env = {**os.environ, "CI": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "killed"
    r = run_killed_then_resumed([sys.executable, "-c", RUN_PPO, str(out), *sets], out, 3, env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert assert_resumed(r, out, 3) < 8  # resumed from the killed run's checkpoint, not retrained
    for name in ("model/model.safetensors", "checkpoints/step-8/critic.safetensors"):
        assert (ref / name).read_bytes() == (out / name).read_bytes(), name
    state = torch.load(out / "checkpoints" / "step-8" / "state.pt", weights_only=False)
    assert state["kl_ctl"]["value"] != 0.05, "the adaptive KL coefficient moved (and was restored on resume)"
    assert state["ptx"]["cursor"] > 0 and state["prompts"]["epoch"] == 1


def test_rm_reward_and_rm_initialised_critic(tiny_tokenizer, tiny_model_factory, tmp_path):
    from chatforge.core.rewards import RMReward, make_reward_source
    from chatforge.stages.ppo import load_critic
    from chatforge.stages.rm import RewardNorm, init_reward_model, save_reward_model

    tok = tiny_tokenizer
    base = save_tiny_model(tmp_path / "base", tok, tiny_model_factory)
    rm, rm_tok, _ = init_reward_model(str(base), seed=0)
    save_reward_model(rm, rm_tok, RewardNorm(mean=0.25, std=2.0, divide_std=True), tmp_path / "rm")
    reward = make_reward_source(str(tmp_path / "rm"))
    assert isinstance(reward, RMReward)
    prompts = [{"id": "a", "messages": _messages("Hi")}] * 2
    scores = reward.score(prompts, ["Lily saw a ball.", "One day"])
    assert len(scores) == 2 and scores[0] != scores[1]
    cfg = load_config(PPOConfig, None, [])
    critic, desc = load_critic(cfg, tiny_model_factory(tok), tok, base, reward, torch.device("cpu"))
    assert "from the reward" in desc  # same tokenizer: InstructGPT's RM-initialised value model
    # the critic's value at the last token is the RM's normalised score of the whole sequence (the reward PPO
    # gives that reply; a raw-scale start would be off by the RM's offset): append one (masked) slot
    # so that the last real position is the one that "predicts" it (values use the log-prob alignment)
    conv = prompts[0]["messages"] + [{"role": "assistant", "content": "Lily saw a ball."}]
    x = torch.tensor([rm_tok.apply_chat_template(conv, return_dict=True)["input_ids"]])
    full = torch.cat([x, torch.tensor([[tok.pad_token_id]])], 1)
    inputs = {"input_ids": full, "attention_mask": (full != tok.pad_token_id).long(),
              "position_ids": torch.arange(full.shape[1])[None]}
    with torch.no_grad():
        value = critic(inputs, n_response=1)[0, 0]
        raw = float(rm(input_ids=x).logits[0, 0])
        assert float(value) == pytest.approx((raw - 0.25) / 2.0, abs=1e-5)
        assert float(value) == pytest.approx(scores[0], abs=1e-4)
    cfg.critic.init = "policy"
    critic, desc = load_critic(cfg, tiny_model_factory(tok), tok, base, reward, torch.device("cpu"))
    assert "from the policy" in desc and critic(inputs, n_response=3).abs().max() == 0, "zero-initialised head"


def test_reference_with_another_architecture_is_a_clear_error(setup, tiny_tokenizer, tiny_model_factory, tmp_path):
    from chatforge.stages import ppo

    root, model_dir, prompts = setup
    other = save_tiny_model(tmp_path / "other", tiny_tokenizer, tiny_model_factory, hidden=32, layers=1)
    cfg = load_config(PPOConfig, None, _ppo_sets(root, model_dir, prompts, 2, [f"reference={other}"]))
    with pytest.raises(UserError, match=r"does not match the policy \(hidden_size: reference=32 policy=64"):
        ppo.run(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    cfg = load_config(PPOConfig, None, _ppo_sets(root, model_dir, prompts, 2, ["ppo.minibatch_size=3"]))
    with pytest.raises(UserError, match="must divide train.batch_size"):
        ppo.run(cfg, tmp_path / "out")


def test_too_long_prompts_are_skipped_and_counted(tiny_tokenizer, tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text("".join(json.dumps({"id": str(i), "messages": _messages("ball " * n)}) + "\n"
                         for i, n in enumerate([1, 2, 40, 3, 80])))
    prompts, ids, too_long = prepare_prompts(str(p), tiny_tokenizer, max_new_tokens=16, context=64)
    assert too_long == 2 and [q["id"] for q in prompts] == ["0", "1", "3"]
    assert all(len(x) + 16 <= 64 for x in ids)


def test_guards_warn_with_numbers_and_can_stop(capsys):
    from chatforge.config import RLGuardConfig

    g = HackingGuards(RLGuardConfig(window=4, stop=True), "ppo")
    base = {"objective/kl": 1.0, "objective/entropy": 2.0, "ppo/duplicate_rate": 0.0}
    for i in range(4):  # score up, length x2: the reward is paying for length
        fired = g.update({**base, "objective/scores": 0.1 * i, "ppo/reply_length": 10.0 * (1 + i)})
    assert fired["guards/length"] == 1.0 and fired["guards/kl"] == 0.0
    assert "length grew from 15.0 to 35.0" in g.should_stop({})
    assert "while mean reply length grew" in " ".join(capsys.readouterr().err.split())
    fired = g.update({**base, "objective/kl": 99.0, "objective/entropy": 0.01, "ppo/duplicate_rate": 0.9,
                      "objective/scores": 0.0, "ppo/reply_length": 10.0})
    assert fired == {"guards/kl": 1.0, "guards/entropy": 1.0, "guards/duplicates": 1.0, "guards/length": 0.0}
    err = " ".join(capsys.readouterr().err.split())
    assert "99.00 nats" in err and "0.010 nats per token" in err and "90% of reply pairs" in err
    restored = HackingGuards(RLGuardConfig(window=4), "ppo")
    restored.load_state_dict(g.state_dict())
    assert restored.history == g.history and restored.fired == g.fired


def test_non_finite_rewards_skip_the_update(setup, tmp_path, monkeypatch):
    from chatforge.stages import ppo

    class NaNReward:
        name = "nan"

        def score(self, prompts, replies, finished=None):
            return [float("nan")] * len(replies)

    root, model_dir, prompts = setup
    monkeypatch.setattr(ppo, "make_reward_source", lambda *a, **k: NaNReward())
    cfg = load_config(PPOConfig, None, _ppo_sets(root, model_dir, prompts, 8, ["train.checkpoint_every=0"]))
    with pytest.raises(UserError, match="5 consecutive non-finite steps"):
        ppo.run(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "model").exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_rm_with_another_tokenizer_rescores_text(tiny_tokenizer, tiny_model_factory, tmp_path):
    from chatforge.core.rewards import make_reward_source, same_token_ids
    from chatforge.core.tokenizer import train_tokenizer
    from chatforge.stages.ppo import load_critic
    from chatforge.stages.rm import RewardNorm, init_reward_model, save_reward_model

    other_tok = train_tokenizer(["A quite different corpus about cats and dogs. " * 40], vocab_size=300,
                                out_dir=tmp_path / "tok2")
    assert not same_token_ids(tiny_tokenizer, other_tok)
    rm_base = save_tiny_model(tmp_path / "rm_base", other_tok, tiny_model_factory, hidden=32, layers=1)
    rm, rm_tok, _ = init_reward_model(str(rm_base), seed=0)
    save_reward_model(rm, rm_tok, RewardNorm(), tmp_path / "rm")
    reward = make_reward_source(str(tmp_path / "rm"))
    policy_dir = save_tiny_model(tmp_path / "policy", tiny_tokenizer, tiny_model_factory)
    # replies are text: the RM re-tokenises them with its own template and vocabulary
    scores = reward.score([{"id": "a", "messages": _messages("Hi")}], ["Lily saw a big red ball."])
    assert len(scores) == 1 and scores[0] == scores[0]
    cfg = load_config(PPOConfig, None, [])
    _, desc = load_critic(cfg, tiny_model_factory(tiny_tokenizer), tiny_tokenizer, policy_dir, reward, torch.device("cpu"))
    assert "from the policy" in desc, "an RM that cannot read the policy's ids cannot be the critic"
    cfg.critic.init = "reward"
    with pytest.raises(UserError, match="tokenizer differs"):
        load_critic(cfg, tiny_model_factory(tiny_tokenizer), tiny_tokenizer, policy_dir, reward, torch.device("cpu"))


def test_ppo_with_critic_adapter_on_one_frozen_base(setup, tmp_path):
    """critic.adapter: policy, reference (adapters off) and critic share one copy of the base weights."""
    from safetensors.torch import load_file

    from chatforge.stages import ppo

    root, model_dir, prompts = setup
    cfg = load_config(PPOConfig, None, _ppo_sets(root, model_dir, prompts, 3, [
        "lora.enabled=true", "lora.r=4", "critic.adapter=true", "train.checkpoint_every=3"]))
    res = ppo.run(cfg, tmp_path / "run", resume=False)
    assert res["iterations"] == 3
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)
    weights = load_file(tmp_path / "run" / "checkpoints" / "step-3" / "shared.safetensors")
    base = load_file(model_dir / "model.safetensors")
    critic_keys = [k for k in weights if "lora" in k and ".critic." in k]
    assert critic_keys, "the critic adapter is checkpointed"
    # the frozen base is untouched: every base tensor in the checkpoint equals the original
    checked = 0
    for k, v in base.items():
        matches = [w for name, w in weights.items() if name.replace("base_layer.", "").endswith(k)
                   and "lora" not in name and w.shape == v.shape]
        if matches:
            checked += 1
            assert any(bool((m == v).all()) for m in matches), k
    assert checked >= len(base) // 2, f"only {checked} of {len(base)} base tensors found in the checkpoint"
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model").config.hidden_size == 64


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_rl_under_torchrun_two_processes(setup, tmp_path, stage):
    """Rollouts are sharded: each rank draws its own prompts; only rank 0 writes."""

    root, model_dir, prompts = setup
    out = tmp_path / stage
    sets = [f"policy={model_dir}", f"prompts={prompts}", "reward=keyword:e", "train.max_steps=2",
            "train.batch_size=4", "rollout.max_new_tokens=8", "train.log_every=1", "log.tensorboard=false",
            "train.checkpoint_every=2", "train.threads=1"]
    sets += ["ppo.minibatch_size=2", "ppo.epochs=1"] if stage == "ppo" else ["grpo.group_size=2",
                                                                           "grpo.minibatch_size=4"]
    # each rank drew its own prompts (none twice, by any rank); the ranks end with the same policy (and critic)
    recs = run_probed([stage, "--out", str(out), *sum([["--set", s] for s in sets], [])], out, steps=2)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    assert {b[0] for rec in recs.values() for b in rec["batches"]} == {"prompts"}
    assert all(len(idx) == 4 for rec in recs.values() for _, _, idx in rec["batches"])
