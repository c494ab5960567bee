"""The PPO fast paths: the engine's log-probs stand in for the rollout forward, and an RM that shares the
policy's tokenizer scores the sampled token ids directly — both must equal the slow paths they replace."""

import json
from types import SimpleNamespace

import pytest
import torch
from helpers import save_tiny_model

from chatforge.config import PPOConfig, load_config
from chatforge.core.io import UserError
from chatforge.core.rewards import RMReward, make_reward_source, score_rollout
from chatforge.core.rollout import engine_logprobs_usable, generate_rollouts, rollout_logprobs
from chatforge.core.tokenizer import assistant_turn_suffix, end_of_turn_id, render_for_completion

PROMPTS = ["Tell me about the red ball, please.", "Hi", "What is 2 + 3?", "Where did Lily go one sunny day?"]


def _prompts(tok):
    prompts = [{"id": str(i), "messages": [{"role": "user", "content": t}]} for i, t in enumerate(PROMPTS)]
    return prompts, [render_for_completion(tok, p["messages"]) for p in prompts]


def test_engine_logprobs_equal_the_rollout_forward(tiny_tokenizer, tiny_model_factory):
    tok = tiny_tokenizer
    policy = tiny_model_factory(tok).train()
    prompts, ids = _prompts(tok)
    ro = generate_rollouts(policy, tok, prompts, ids, max_new_tokens=10, temperature=1.0, top_k=0, top_p=1.0,
                           seeds=[1, 2, 3, 4])
    assert len({len(i) for i in ids}) > 1, "left padding is exercised"
    forward, _ = rollout_logprobs(policy, ro.query_ids, ro.query_mask, ro.response_ids, ro.mask, 1.0, chunk=4)
    assert ro.logprobs.shape == forward.shape and ro.logprobs.dtype == torch.float32
    assert (ro.logprobs[ro.mask] < 0).all() and (ro.logprobs[~ro.mask] == 0).all()
    assert torch.allclose(ro.logprobs, forward, atol=1e-4), (ro.logprobs - forward).abs().max()
    assert [len(t) for t in ro.token_ids] == ro.mask.sum(1).tolist() and ro.prompt_ids == ids
    # only plain sampling in the weights' dtype samples the distribution the PPO ratio uses
    assert engine_logprobs_usable(1.0, 0, 1.0, None)
    for args in ((0.7, 0, 1.0, None), (1.0, 5, 1.0, None), (1.0, 0, 0.9, None), (1.0, 0, 1.0, torch.bfloat16)):
        assert not engine_logprobs_usable(*args)


@pytest.fixture(scope="module")
def rm_reward(tiny_tokenizer, tiny_model_factory, tmp_path_factory):
    from chatforge.stages.rm import RewardNorm, init_reward_model, save_reward_model

    root = tmp_path_factory.mktemp("ppo_fast")
    base = save_tiny_model(root / "base", tiny_tokenizer, tiny_model_factory)
    rm, rm_tok, _ = init_reward_model(str(base), seed=0)
    torch.nn.init.normal_(rm.score.weight, std=0.5)  # a non-trivial head so scores differ by content
    save_reward_model(rm, rm_tok, RewardNorm(mean=0.25), root / "rm")
    return make_reward_source(str(root / "rm"))


def test_rm_scores_token_ids_like_the_text_path(tiny_tokenizer, rm_reward):
    tok = tiny_tokenizer
    assert isinstance(rm_reward, RMReward) and rm_reward.accepts_ids_of(tok)
    assert rm_reward.turn_suffix == assistant_turn_suffix(tok) and rm_reward.turn_suffix
    prompts, ids = _prompts(tok)
    texts = ["Lily saw a big red ball.", "One day", "5", "She went to the park and played with Tom."]
    eot = end_of_turn_id(tok)
    # canonical reply ids; the last reply hit the length limit (no end of turn): both paths score it without
    # the end-of-turn suffix, as the RM was trained on such replies (data/rm_data.py)
    replies = [tok.encode(t, add_special_tokens=False) + [eot] for t in texts[:3]]
    replies.append(tok.encode(texts[3], add_special_tokens=False))
    ro = SimpleNamespace(prompts=prompts, texts=texts, prompt_ids=ids, token_ids=replies,
                         ended=torch.tensor([True, True, True, False]))
    fast = score_rollout(rm_reward, tok, ro)
    slow = rm_reward.score(prompts, texts, [True, True, True, False])
    assert len(set(slow)) == 4, "the replies score differently"
    assert fast == pytest.approx(slow, abs=1e-5)
    closed = rm_reward.score(prompts, texts)  # the same text as if it had ended
    assert closed[:3] == pytest.approx(slow[:3]) and abs(closed[3] - slow[3]) > 1e-4, "a cut-off reply looks ended"


def test_rm_with_another_template_keeps_the_text_path(tiny_tokenizer, rm_reward, monkeypatch):
    tok = tiny_tokenizer
    other = SimpleNamespace(get_vocab=tok.get_vocab, chat_template=(tok.chat_template or "") + "{# another #}")
    assert not rm_reward.accepts_ids_of(other), "same vocab but another template: ids would mean other text"
    prompts, ids = _prompts(tok)
    ro = SimpleNamespace(prompts=prompts[:1], texts=["Hello"], prompt_ids=ids[:1], token_ids=[[5, 6]],
                         ended=torch.tensor([True]))
    monkeypatch.setattr(rm_reward, "score_ids", lambda seqs: pytest.fail("id path used"))
    assert score_rollout(rm_reward, other, ro) == pytest.approx(rm_reward.score(prompts[:1], ["Hello"]))


def test_ppo_run_reuses_engine_logprobs_and_logs_entropy(tiny_tokenizer, tiny_model_factory, tmp_path, monkeypatch):
    from chatforge.core import rollout
    from chatforge.stages import ppo

    model_dir = save_tiny_model(tmp_path / "base", tiny_tokenizer, tiny_model_factory)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "messages": [{"role": "user", "content": f"Ball {i}?"}]})
                               + "\n" for i in range(8)))
    calls = []
    real = rollout.rollout_logprobs
    monkeypatch.setattr(ppo, "rollout_logprobs", lambda *a, **k: calls.append(1) or real(*a, **k))
    sets = [f"policy={model_dir}", f"prompts={prompts}", "reward=keyword:e", "train.max_steps=2",
            "train.batch_size=4", "ppo.minibatch_size=2", "ppo.epochs=1", "rollout.max_new_tokens=6",
            "train.log_every=1", "train.checkpoint_every=0", "log.tensorboard=false", "train.threads=1"]
    ppo.run(load_config(PPOConfig, None, sets), tmp_path / "run", resume=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert not calls, "temperature 1, no filters: no separate rollout forward"
    vocab = float(torch.log(torch.tensor(float(len(tiny_tokenizer)))))
    assert all(0 < r["objective/entropy"] <= vocab + 1e-4 for r in rows) and len(rows) == 2
    # with top-k the engine's log-probs are not the sampling distribution's: the forward runs again
    ppo.run(load_config(PPOConfig, None, sets + ["rollout.top_k=5"]), tmp_path / "run2", resume=False)
    assert len(calls) == 2


def test_ensemble_scores_are_the_members_mean_or_worst_case(tiny_tokenizer, tiny_model_factory, rm_reward,
                                                          tmp_path):
    """`ensemble:min:A,B` scores a rollout with each member (each its own normalisation) and takes the min; a
    member with another tokenizer, a nested ensemble or a bad combine fails before any scoring."""
    from chatforge.core.rewards import EnsembleReward, divide_by_sft_std
    from chatforge.stages.rm import RewardNorm, init_reward_model, save_reward_model

    tok = tiny_tokenizer
    base = save_tiny_model(tmp_path / "base", tok, tiny_model_factory, seed=5)
    rm, rm_tok, _ = init_reward_model(str(base), seed=1)
    torch.nn.init.normal_(rm.score.weight, std=0.5)
    save_reward_model(rm, rm_tok, RewardNorm(mean=-5.5), tmp_path / "rm2")  # offset chosen so the two cross
    first = rm_reward.name.removeprefix("rm:")
    prompts, ids = _prompts(tok)
    texts = ["Lily saw a big red ball.", "One day", "5", "She went to the park."]
    ro = SimpleNamespace(prompts=prompts, texts=texts, prompt_ids=ids, ended=torch.tensor([True] * 4),
                         token_ids=[tok.encode(t, add_special_tokens=False) + [end_of_turn_id(tok)] for t in texts])
    a = score_rollout(rm_reward, tok, ro)
    b = score_rollout(make_reward_source(str(tmp_path / "rm2")), tok, ro)
    assert any(x < y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b)), (a, b)
    worst = make_reward_source(f"ensemble:min:{first},{tmp_path / 'rm2'}")
    assert isinstance(worst, EnsembleReward) and len(worst.members) == 2
    assert score_rollout(worst, tok, ro) == pytest.approx([min(x, y) for x, y in zip(a, b)], abs=1e-5)
    mean = make_reward_source(f"ensemble:mean:{first},{tmp_path / 'rm2'}")
    assert mean.score(prompts, texts) == pytest.approx([(x + y) / 2 for x, y in zip(a, b)], abs=1e-5)
    # ppo.normalise_scores: each member in its own SFT stds (rm2 stores std 4; the first RM none, so it stays)
    save_reward_model(rm, rm_tok, RewardNorm(mean=-5.5, std=4.0), tmp_path / "rm2")
    worst = make_reward_source(f"ensemble:min:{first},{tmp_path / 'rm2'}")
    assert score_rollout(worst, tok, ro) == pytest.approx([min(x, y) for x, y in zip(a, b)], abs=1e-5)
    divide_by_sft_std(worst)
    assert score_rollout(worst, tok, ro) == pytest.approx([min(x, y / 4) for x, y in zip(a, b)], abs=1e-5)

    from transformers import AutoTokenizer

    other_tok = AutoTokenizer.from_pretrained(str(tmp_path / "rm2"))
    other_tok.add_tokens(["<extra_token>"])
    other_tok.save_pretrained(tmp_path / "rm2")  # now rm2's tokenizer has a token the first RM's lacks
    with pytest.raises(UserError, match="different tokenizers"):
        make_reward_source(f"ensemble:min:{first},{tmp_path / 'rm2'}")
    with pytest.raises(UserError, match="do not nest"):
        make_reward_source(f"ensemble:min:{first},ensemble:mean:{first}")
    with pytest.raises(UserError, match="expected ensemble:mean"):
        make_reward_source(f"ensemble:max:{first},{first}")
    with pytest.raises(UserError, match="at least two"):
        make_reward_source(f"ensemble:min:{first}")
