"""GRPO: the loss (group advantages, clipped ratio, k3 KL term), the reward goes up, LoRA + KL, task rewards,
exact resume after SIGKILL."""

import json
import os
import sys

import pytest
import torch
from helpers import assert_resumed, run_killed_then_resumed, save_tiny_model

from chatforge.config import GRPOConfig, LoraConfig, load_config
from chatforge.core.io import UserError
from chatforge.core.rewards import KeywordReward, TaskReward, make_reward_source
from chatforge.core.rl import group_advantages
from chatforge.core.rollout import generate_rollouts, keep_scorable, rollout_logprobs
from chatforge.core.tokenizer import render_for_completion


@pytest.fixture(scope="module")
def setup(tiny_tokenizer, tiny_model_factory, tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    model_dir = save_tiny_model(root / "base", tiny_tokenizer, tiny_model_factory)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "messages": [{"role": "user", "content": f"Ball {i}?"}]})
                               + "\n" for i in range(24)))
    return model_dir, prompts


def _sets(model_dir, prompts, steps, extra=()):
    return [f"policy={model_dir}", f"prompts={prompts}", "reward=keyword:e", f"train.max_steps={steps}",
            "train.batch_size=4", "grpo.group_size=4", "grpo.minibatch_size=8", "grpo.epochs=2",
            "rollout.max_new_tokens=12", "train.lr=3e-3", "train.log_every=1", "train.checkpoint_every=0",
            "log.tensorboard=false", "train.threads=1", *extra]


def test_grpo_loss_group_advantages_and_kl_term(tiny_tokenizer, tiny_model_factory):
    from chatforge.stages.grpo import grpo_loss

    tok = tiny_tokenizer
    policy = tiny_model_factory(tok)
    prompts = [{"id": "a", "messages": [{"role": "user", "content": "Tell me a story."}]}]
    ro = generate_rollouts(policy, tok, prompts, [render_for_completion(tok, prompts[0]["messages"])],
                           max_new_tokens=10, temperature=1.0, top_k=0, top_p=1.0, seeds=[0], num_samples=4)
    assert len(ro) == 4 and len(set(ro.texts)) > 1, "one prefill, four different samples"
    same = generate_rollouts(policy, tok, prompts, [render_for_completion(tok, prompts[0]["messages"])],
                             max_new_tokens=10, temperature=1.0, top_k=0, top_p=1.0, seeds=[0], num_samples=4,
                             compile=True)  # rollout.compile: the compiled decode step samples the same
    assert same.texts == ro.texts and torch.allclose(same.logprobs, ro.logprobs, atol=1e-4)
    rows = (ro.query_ids, ro.query_mask, ro.response_ids, ro.mask)
    old, _ = rollout_logprobs(policy, *rows, temperature=1.0, chunk=4)
    cfg = load_config(GRPOConfig, None, [])
    # equal rewards in a group: zero advantage, zero loss, zero gradient
    adv = group_advantages(torch.ones(4), 4)
    loss, st = grpo_loss(policy, rows, old, None, adv, cfg)
    assert float(loss.detach()) == 0.0 and st["policy/ratio"] == pytest.approx(1.0)
    # the best reply of the group gets the only positive advantage; at ratio 1 the loss is -mean token advantage
    adv = group_advantages(torch.tensor([0.0, 3.0, 0.0, 0.0]), 4)
    loss, _ = grpo_loss(policy, rows, old, None, adv, cfg)
    n_tok = ro.mask.sum(1).float()
    assert float(loss.detach()) == pytest.approx(float(-(adv * n_tok).sum() / n_tok.sum()), abs=1e-6)
    # beta > 0 adds beta * mean k3 KL to the reference
    cfg.grpo.beta = 0.5
    with_kl, st = grpo_loss(policy, rows, old, old - 0.3, adv, cfg)
    k3 = torch.exp(torch.tensor(-0.3)) + 0.3 - 1
    assert float((with_kl - loss).detach()) == pytest.approx(0.5 * float(k3), rel=1e-5)
    assert st["loss/kl"] == pytest.approx(float(k3), rel=1e-5)


def test_grpo_raises_toy_reward(setup, tmp_path):
    from chatforge.stages import grpo

    model_dir, prompts = setup
    res = grpo.run(load_config(GRPOConfig, None, _sets(model_dir, prompts, 20)), tmp_path / "run", resume=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert res["iterations"] == 20 and len(rows) == 20
    mean = lambda rs: sum(r["objective/scores"] for r in rs) / len(rs)  # noqa: E731
    assert mean(rows[-5:]) > mean(rows[:5]) + 1.0
    for key in ("objective/entropy", "policy/clipfrac", "grpo/reward_std", "grpo/frac_zero_std", "grpo/reply_length"):
        assert key in rows[-1], key
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["stage"] == "grpo"


RUN_GRPO = ("import sys; from chatforge.config import GRPOConfig, load_config; from chatforge.stages.grpo import run; "
            "run(load_config(GRPOConfig, None, sys.argv[2:]), sys.argv[1])")


def test_grpo_exact_resume_after_sigkill(setup, tmp_path):
    from chatforge.stages import grpo

    model_dir, prompts = setup
    sets = [s for s in _sets(model_dir, prompts, 6) if not s.startswith("train.checkpoint_every")]
    sets += ["train.checkpoint_every=3"]
    ref = tmp_path / "ref"
    grpo.run(load_config(GRPOConfig, None, sets), ref)  # uninterrupted, in this process
    out = tmp_path / "killed"
    r = run_killed_then_resumed([sys.executable, "-c", RUN_GRPO, str(out), *sets], out, 3,
                                {**os.environ, "CI": "1", "OMP_NUM_THREADS": "1"})
    assert assert_resumed(r, out, 3) < 6  # resumed from the killed run's checkpoint, not retrained
    assert (ref / "model" / "model.safetensors").read_bytes() == (out / "model" / "model.safetensors").read_bytes()
    state = torch.load(out / "checkpoints" / "step-6" / "state.pt", weights_only=False)
    assert state["prompts"]["cursor"] + 24 * state["prompts"]["epoch"] == 6 * 4, "the prompt position was restored"


def test_grpo_lora_with_kl_to_adapters_off(setup, tmp_path):
    from chatforge.stages import grpo

    model_dir, prompts = setup
    sets = _sets(model_dir, prompts, 3, ["lora.enabled=true", "lora.r=4", "grpo.beta=0.1"])
    grpo.run(load_config(GRPOConfig, None, sets), tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["objective/kl"] == pytest.approx(0.0, abs=1e-6), "fresh adapters: policy == reference"
    assert rows[-1]["objective/kl"] != 0.0
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert not any("lora" in k for k in merged.state_dict())


def test_task_reward_and_prompt_filtering(tiny_tokenizer):
    from chatforge.data.tasks import train_prompts

    suite = train_prompts(1)[:3]
    other = {"id": "x", "messages": [{"role": "user", "content": "Tell me a joke."}]}
    reward = make_reward_source("tasks")
    assert isinstance(reward, TaskReward)
    ids = [[1]] * 4
    kept, kept_ids = keep_scorable(reward, suite + [other], ids)
    assert kept == suite and len(kept_ids) == 3
    with pytest.raises(UserError, match="task-suite prompts"):
        keep_scorable(reward, [other], [[1]])
    from chatforge.data.tasks import reference_of

    right = [reference_of(p) for p in suite]
    assert reward.score(suite, right) == [1.0, 1.0, 1.0]
    assert reward.score([other], ["hm"]) == [0.0] and reward.n_missing == 1
    assert KeywordReward(["ba", "x"]).score([other] * 2, ["Ball BALL xx", ""]) == [4.0, 0.0]
    assert keep_scorable(KeywordReward(["a"]), [other], [[1]]) == ([other], [[1]])


def test_grpo_config_errors(setup, tmp_path):
    from chatforge.stages import grpo

    model_dir, prompts = setup
    cfg = load_config(GRPOConfig, None, _sets(model_dir, prompts, 2, ["grpo.group_size=1", "grpo.minibatch_size=5"]))
    with pytest.raises(UserError, match="group_size must be >= 2.*minibatch_size=5 must divide"):
        grpo.run(cfg, tmp_path / "o")
    assert not (tmp_path / "o").exists()
    assert LoraConfig().enabled is False


def test_grpo_logs_gold_and_proxy(setup, tmp_path):
    from chatforge.stages import grpo

    model_dir, prompts = setup
    res = grpo.run(load_config(GRPOConfig, None, _sets(model_dir, prompts, 3, ["gold.spec=keyword:a", "gold.every=2",
                                                                             f"gold.prompts={prompts}"])),
                   tmp_path / "run", resume=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [i for i, r in enumerate(rows) if "objective/gold" in r] == [0, 2]  # the start, and the final model
    assert res["gold_best"] == max(r["objective/gold"] for r in rows if "objective/gold" in r)
    assert (tmp_path / "run" / "best_gold" / "config.json").exists()
