"""The KV-cache generation engine against naive no-cache decoding and its own invariants."""

import pytest
import torch

from chatforge.core import generation as gen
from chatforge.core.generation import Generation, SamplingParams, generate, sample, stream
from chatforge.core.io import UserError
from chatforge.core.tokenizer import render_for_completion, stop_token_ids

PROMPT_TEXTS = ["Once upon a time", "Lily saw a big red ball. She liked to play outside in the sun.", "1 2 3"]


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    return tiny_tokenizer


@pytest.fixture(scope="module")
def model(tok, tiny_model_factory):
    """Matrices re-drawn with std 0.2: at the default 0.02 init a random model repeats one token, which
    would let the greedy comparisons pass trivially."""
    m = tiny_model_factory(tok, hidden=64, layers=2, heads=4, seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return m


@pytest.fixture(scope="module")
def prompts(tok):
    return [render_for_completion(tok, [{"role": "user", "content": t}]) for t in PROMPT_TEXTS]


def run(model, tok, prompts, params, stop=(), **kw):
    return generate(model, prompts, params, stop_token_ids=list(stop), pad_id=tok.pad_token_id, **kw)


def naive_greedy(model, prompt, n):
    """Recompute the whole sequence every step, no cache, no padding."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def test_fixtures_are_not_degenerate(model, tok, prompts):
    assert len({len(p) for p in prompts}) == len(prompts)
    out = run(model, tok, prompts, SamplingParams(temperature=0, max_new_tokens=12))
    assert all(len(set(g[0].token_ids)) >= 6 for g in out)  # greedy replies are not one repeated token
    assert len({tuple(g[0].token_ids) for g in out}) == len(prompts)


def test_greedy_matches_naive_loop_with_left_padding(model, tok, prompts):
    out = run(model, tok, prompts, SamplingParams(temperature=0, max_new_tokens=12))
    for p, group in zip(prompts, out, strict=True):
        assert len(group) == 1
        assert group[0].token_ids == naive_greedy(model, p, 12)
        assert group[0].finish_reason == "length"
        assert group[0].prompt_ids == p


def test_fallback_dynamic_cache_path_matches(model, tok, prompts, monkeypatch):
    params = SamplingParams(temperature=0.9, top_p=0.9, max_new_tokens=10, seed=3)
    fast = run(model, tok, prompts, params)
    monkeypatch.setattr(gen, "uses_fast_path", lambda m: False)
    slow = run(model, tok, prompts, params)
    assert [g[0].token_ids for g in fast] == [g[0].token_ids for g in slow]
    for a, b in zip(fast, slow, strict=True):
        assert a[0].logprobs == pytest.approx(b[0].logprobs, abs=1e-4)


@pytest.mark.parametrize("params", [SamplingParams(temperature=0, max_new_tokens=10),
                                    SamplingParams(temperature=1.0, max_new_tokens=10, seed=7)])
def test_left_padded_row_equals_row_alone(model, tok, prompts, params):
    batched = run(model, tok, prompts, params)
    for i, p in enumerate(prompts):
        alone = run(model, tok, [p], params)[0][0]
        assert batched[i][0].token_ids == alone.token_ids
        assert batched[i][0].logprobs == pytest.approx(alone.logprobs, abs=1e-5)


def test_same_seed_same_output_different_seed_different(model, tok, prompts):
    a = run(model, tok, prompts[:1], SamplingParams(max_new_tokens=16, seed=1))[0][0]
    b = run(model, tok, prompts[:1], SamplingParams(max_new_tokens=16, seed=1))[0][0]
    c = run(model, tok, prompts[:1], SamplingParams(max_new_tokens=16, seed=2))[0][0]
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_seed_does_not_depend_on_batch_composition(model, tok, prompts):
    target = SamplingParams(temperature=0.8, top_k=50, max_new_tokens=12, seed=11)
    alone = run(model, tok, [prompts[1]], target)[0][0]
    mates_a = [SamplingParams(max_new_tokens=3, seed=5), target]
    mates_b = [target, SamplingParams(temperature=0, max_new_tokens=20), SamplingParams(top_p=0.5, seed=99)]
    in_a = run(model, tok, [prompts[0], prompts[1]], mates_a)[1][0]
    in_b = run(model, tok, [prompts[1], prompts[2], prompts[0]], mates_b)[0][0]
    assert in_a.token_ids == alone.token_ids == in_b.token_ids


def test_plain_sampling_row_same_in_mixed_batch(model, tok, prompts):
    """Temperature-1 rows take a faster path when the whole batch is plain; the tokens must not change."""
    plain = SamplingParams(max_new_tokens=12, seed=3)
    alone = run(model, tok, [prompts[2]], plain)[0][0]
    mixed = run(model, tok, [prompts[0], prompts[2]], [SamplingParams(temperature=0.5, seed=1), plain])[1][0]
    assert alone.token_ids == mixed.token_ids


def test_top_k_1_equals_greedy(model, tok, prompts):
    greedy = run(model, tok, prompts, SamplingParams(temperature=0, max_new_tokens=8))
    top1 = run(model, tok, prompts, SamplingParams(temperature=1.5, top_k=1, max_new_tokens=8, seed=4))
    assert [g[0].token_ids for g in greedy] == [g[0].token_ids for g in top1]


def test_stop_ids_end_generation(model, tok, prompts):
    free = run(model, tok, prompts[:1], SamplingParams(temperature=0, max_new_tokens=12))[0][0]
    assert free.finish_reason == "length" and len(free.token_ids) == 12
    stop_id = free.token_ids[3]
    first = free.token_ids.index(stop_id)
    params = SamplingParams(temperature=0, max_new_tokens=12)
    stopped = run(model, tok, prompts[:1], params, stop=[stop_id])[0][0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == free.token_ids[: first + 1]
    assert len(stopped.logprobs) == len(stopped.token_ids)


def test_per_prompt_max_new_tokens_and_finished_rows(model, tok, prompts):
    params = [SamplingParams(temperature=0, max_new_tokens=n) for n in (2, 9, 5)]
    out = run(model, tok, prompts, params)
    assert [len(g[0].token_ids) for g in out] == [2, 9, 5]
    assert out[1][0].token_ids == naive_greedy(model, prompts[1], 9)


def test_stop_strings_cut_text(model, tok, prompts):
    free = run(model, tok, prompts[:1], SamplingParams(temperature=0, max_new_tokens=24), tokenizer=tok)[0][0]
    text = free.text
    # A printable stop string from the middle of the reply (a random model also emits broken UTF-8,
    # whose replacement character only becomes final once the next bytes arrive).
    start = next(i for i in range(3, len(text) - 2) if text[i : i + 2].isascii() and text[i : i + 2].isprintable())
    stop = text[start : start + 2]
    cut = text.index(stop)
    params = SamplingParams(temperature=0, max_new_tokens=24, stop=[stop, "\x00never"])
    out = run(model, tok, prompts[:1], params, tokenizer=tok)[0][0]
    assert out.finish_reason == "stop"
    assert out.text == text[:cut]
    assert free.token_ids[: len(out.token_ids)] == out.token_ids
    assert stop in tok.decode(out.token_ids) and stop not in tok.decode(out.token_ids[:-1])


def test_num_samples_prefill_once_and_repeat(model, tok, prompts):
    params = SamplingParams(max_new_tokens=10, seed=20)
    out = run(model, tok, prompts[:2], params, num_samples=3)
    assert [len(g) for g in out] == [3, 3]
    for p, group in zip(prompts[:2], out, strict=True):
        assert len({tuple(g.token_ids) for g in group}) == 3  # seeds s, s+1, s+2 differ
        for j, g in enumerate(group):
            alone = run(model, tok, [p], SamplingParams(max_new_tokens=10, seed=20 + j))[0][0]
            assert g.token_ids == alone.token_ids


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=10, seed=5),  # filtered sampling
    SamplingParams(temperature=1.0, max_new_tokens=10, seed=5),  # plain sampling (shared-pass path)
    SamplingParams(temperature=0, max_new_tokens=10),  # greedy
])
def test_logprobs_equal_full_forward(model, tok, prompts, params):
    out = run(model, tok, prompts, params)
    for p, group in zip(prompts, out, strict=True):
        g = group[0]
        ids = torch.tensor([p + g.token_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
        expected = [logp[len(p) - 1 + i, t].item() for i, t in enumerate(g.token_ids)]
        assert g.logprobs == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("stop,seed", [([], 8), ([], 9), (["e"], 8), (["the", "a b"], 10), (["an", "t"], 11)])
def test_stream_text_equals_generate_text(model, tok, prompts, stop, seed):
    params = SamplingParams(temperature=1.0, max_new_tokens=30, seed=seed, stop=stop)
    g = generate(model, prompts[:1], params, stop_token_ids=stop_token_ids(tok), pad_id=tok.pad_token_id,
                 tokenizer=tok)[0][0]
    it = stream(model, prompts[0], params, stop_token_ids=stop_token_ids(tok), tokenizer=tok)
    deltas = []
    while True:
        try:
            deltas.append(next(it))
        except StopIteration as e:
            final = e.value
            break
    assert "".join(deltas) == g.text
    assert all(d for d in deltas)
    assert isinstance(final, Generation) and final.token_ids == g.token_ids and final.text == g.text
    for s in stop:  # a stream never shows a stop string, even split across deltas
        assert s not in "".join(deltas)


def test_stream_holds_back_partial_stop_string():
    class CharTok:  # one character per id: decode is exact and incremental
        def decode(self, ids, **kw):
            return "".join(chr(i) for i in ids)

    tracker = gen._TextTracker(CharTok(), ["xyz"])
    shown = ""
    for ch in "abxy":
        assert not tracker.push(ord(ch))
        shown += tracker.pop_delta()
    assert shown == "ab"  # "xy" may still become "xyz"
    assert tracker.push(ord("z"))
    assert tracker.pop_delta() == "" and tracker.text == "ab"


def test_sample_is_inverse_cdf_and_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]] * 4))
    t = torch.ones(4)
    u = torch.tensor([0.1, 0.6, 0.85, 0.99])
    assert sample(logits, t, u).tolist() == [0, 1, 2, 2]
    assert sample(logits, t, u, top_k=torch.tensor([2] * 4)).tolist() == [0, 0, 1, 1]  # 0.5/0.8 split
    assert sample(logits, t, u, top_p=torch.tensor([0.5] * 4)).tolist() == [0, 0, 0, 0]
    assert sample(logits, torch.zeros(4), u).tolist() == [0, 0, 0, 0]
    probs, order = gen.filtered_probs(logits, t, None, torch.tensor([0.75] * 4))
    assert order[0].tolist() == [0, 1, 2] and probs[0].tolist() == pytest.approx([0.5, 0.3, 0.0])


def test_sample_frequencies_match_probs():
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    n = 20000
    u = torch.rand(n, generator=torch.Generator().manual_seed(0))
    toks = sample(torch.log(p).expand(n, 4), torch.ones(n), u)
    freq = torch.bincount(toks, minlength=4).float() / n
    assert torch.allclose(freq, p, atol=0.015)


def test_bad_inputs_raise_user_errors(model, tok, prompts):
    with pytest.raises(UserError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(UserError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(UserError, match="2 SamplingParams for 3 prompts"):
        run(model, tok, prompts, [SamplingParams(), SamplingParams()])
    with pytest.raises(UserError, match="tokenizer"):
        run(model, tok, prompts, SamplingParams(stop=["x"]))
    with pytest.raises(UserError, match="prompt 1 is empty"):
        run(model, tok, [prompts[0], []], SamplingParams())


def test_training_mode_is_restored(model, tok, prompts):
    model.train()
    try:
        run(model, tok, prompts[:1], SamplingParams(max_new_tokens=2, seed=0))
        assert model.training
    finally:
        model.eval()


def test_absolute_position_model_left_padding(tok):
    """GPT-2 adds learned absolute position embeddings, so wrong position ids under left padding show."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=0,
                     eos_token_id=0, initializer_range=0.2)
    model = GPT2LMHeadModel(cfg).eval()
    assert gen.uses_fast_path(model)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [3, 4]]
    out = generate(model, prompts, SamplingParams(max_new_tokens=8, seed=1), stop_token_ids=[], pad_id=1)
    for p, group in zip(prompts, out, strict=True):
        ids = torch.tensor([p + group[0].token_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0], dim=-1)
        expected = [logp[len(p) - 1 + i, t].item() for i, t in enumerate(group[0].token_ids)]
        assert group[0].logprobs == pytest.approx(expected, abs=1e-4)


def test_finished_rows_are_retired_without_changing_results(model, tok, prompts, monkeypatch):
    calls = []
    real_retire = gen._retire

    def spy(state, which):
        calls.append(len(which))
        return real_retire(state, which)

    monkeypatch.setattr(gen, "_retire", spy)
    params = [SamplingParams(max_new_tokens=3, seed=1),
              SamplingParams(temperature=0.9, max_new_tokens=12, seed=2),
              SamplingParams(temperature=0, max_new_tokens=5)]
    out = run(model, tok, prompts, params, num_samples=2)
    assert calls[0] == 6 and calls[-1] < 6  # compacted 6 rows mid-way, then the rest at the end
    for p, pp, group in zip(prompts, params, out, strict=True):
        for j, g in enumerate(group):
            seed = None if pp.seed is None else pp.seed + j
            solo = SamplingParams(temperature=pp.temperature, max_new_tokens=pp.max_new_tokens, seed=seed)
            alone = run(model, tok, [p], solo)[0][0]
            assert g.token_ids == alone.token_ids and len(g.token_ids) == pp.max_new_tokens
            assert g.logprobs == pytest.approx(alone.logprobs, abs=1e-5)


def test_batch_size_chunks_do_not_change_results(model, tok, prompts):
    params = [SamplingParams(max_new_tokens=6, seed=s) for s in (1, 2, 3)]
    whole = run(model, tok, prompts, params, num_samples=2)
    chunked = run(model, tok, prompts, params, num_samples=2, batch_size=1)
    ids = [[[g.token_ids for g in group] for group in out] for out in (whole, chunked)]
    assert ids[0] == ids[1]


def test_bench_generate_runs_both_engines():
    from chatforge.bench.generate import run as bench_run

    res = bench_run(quick=True, batch=2, new_tokens=8, threads=1)
    assert res["new_tokens"] == 8 and res["batch"] == 2 and res["repeats"] == 1
    assert res["hf_tokens_per_sec"] > 0 and res["chatforge_tokens_per_sec"] > 0 and res["speedup"] > 0


def test_compiled_decoding_matches_eager(model, tok, prompts):
    """compile=True (static-shape cache and mask, one torch.compile'd step) samples the same tokens, with
    stop ids, per-row lengths and K samples per prompt."""
    params = [SamplingParams(temperature=0, max_new_tokens=12), SamplingParams(temperature=0.8, top_p=0.9,
              max_new_tokens=7, seed=4), SamplingParams(temperature=1.0, max_new_tokens=12, seed=9)]
    stop = [prompts[0][-1]]
    eager = run(model, tok, prompts, params, stop=stop, num_samples=2)
    compiled = run(model, tok, prompts, params, stop=stop, num_samples=2, compile=True)
    for a, b in zip(eager, compiled, strict=True):
        assert [g.token_ids for g in a] == [g.token_ids for g in b]
        assert [g.finish_reason for g in a] == [g.finish_reason for g in b]
        for x, y in zip(a, b, strict=True):
            assert x.logprobs == pytest.approx(y.logprobs, abs=1e-4)


def test_compiled_decoding_sees_in_place_weight_updates(model, tok, prompts):
    """The compiled step skips guards on the model's modules; weights are graph inputs, so an in-place
    update (an optimizer step between PPO rollouts) must change what it samples, exactly as in eager."""
    import copy

    m = copy.deepcopy(model)
    greedy = SamplingParams(temperature=0, max_new_tokens=10)
    before = run(m, tok, prompts, greedy, compile=True)
    with torch.no_grad():
        m.get_output_embeddings().weight.mul_(-1.0)  # flips every logit: the greedy tokens must change
    after_compiled = run(m, tok, prompts, greedy, compile=True)
    after_eager = run(m, tok, prompts, greedy)
    assert [g[0].token_ids for g in after_compiled] == [g[0].token_ids for g in after_eager]
    assert [g[0].token_ids for g in after_compiled] != [g[0].token_ids for g in before]


def test_compiled_decoding_follows_lora_adapter_switches(model, tok, prompts):
    """Module guards are skipped, so switching LoRA adapters off (the reference in PPO) must give a new
    compiled entry rather than replay the adapter-on graph."""
    import copy

    from chatforge.config import LoraConfig
    from chatforge.core.model import apply_lora

    peft_model = apply_lora(copy.deepcopy(model), LoraConfig(enabled=True, r=4))
    with torch.no_grad():  # make the adapters matter: LoRA's B starts at zero
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.5)
    greedy = SamplingParams(temperature=0, max_new_tokens=10)
    on = run(peft_model, tok, prompts, greedy, compile=True)
    with peft_model.disable_adapter():
        off_compiled = run(peft_model, tok, prompts, greedy, compile=True)
        off_eager = run(peft_model, tok, prompts, greedy)
    assert [g[0].token_ids for g in off_compiled] == [g[0].token_ids for g in off_eager]
    assert [g[0].token_ids for g in off_compiled] != [g[0].token_ids for g in on]


def test_sample_replies_draws_equal_one_draw_calls(model, tok):
    """The eval's draws share one prefill per prompt; draw j must equal a one-draw call with seed + j (the
    paired seeds the win rates rely on), in any batching."""
    from chatforge.stages.evaluate import generate_replies, sample_replies

    convs = [{"messages": [{"role": "user", "content": t}]} for t in PROMPT_TEXTS]
    draws = sample_replies(model, tok, convs, max_new_tokens=8, temperature=1.0, seed=3, num_samples=3, batch_size=2)
    assert len(draws) == 3 and all(len(texts) == len(convs) == len(why) for texts, why in draws)
    assert len({tuple(texts) for texts, _ in draws}) == 3  # different seeds, different draws
    for j, drawn in enumerate(draws):
        assert drawn == generate_replies(model, tok, convs, max_new_tokens=8, temperature=1.0, seed=3 + j)
