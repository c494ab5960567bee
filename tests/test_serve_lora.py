"""LoRA runs served together share one copy of their base: `serve --model BASE --model LORA_A --model LORA_B`.

Two tiny LoRA SFT runs from one base keep their adapter beside the merged model (model/adapter); the server
loads the base once, adds both adapters to it, and every model answers through the live API exactly as its
merged model/ does alone (greedy), also when all three are asked at once.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
from helpers import live

from chatforge.config import SFTConfig, load_config
from chatforge.core.model import ADAPTER_DIR, lora_adapter

PROMPTS = ["Once upon a time", "What is 2 + 3?", "Tell me about the red ball."]


@pytest.fixture(scope="module")
def runs(tiny_tokenizer, tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    from chatforge.stages import sft

    tok = tiny_tokenizer
    root = tmp_path_factory.mktemp("serve_lora")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True, initializer_range=0.3)
    base = root / "base"
    LlamaForCausalLM(cfg).save_pretrained(base)
    tok.save_pretrained(base)
    out = {}
    for name, seed in (("a", 1), ("b", 2)):
        scfg = load_config(SFTConfig, None, [
            f"model={base}", "data.paths=[tasks:3]", "data.val_fraction=0", "train.max_steps=3", "train.batch_size=4",
            "train.seq_len=64", "train.lr=5e-2", "train.warmup_steps=0", "train.checkpoint_every=0",
            "train.eval_every=0", f"train.seed={seed}", "lora.enabled=true", "lora.r=4", "log.tensorboard=false",
            "train.threads=1"])
        sft.run(scfg, root / name, resume=False)
        out[name] = root / name
    return base, out


def test_lora_run_keeps_its_adapter_beside_the_merged_model(runs):
    base, out = runs
    for run in out.values():
        adir, found = lora_adapter(run / "model")
        assert adir == run / "model" / ADAPTER_DIR and found == base.resolve()
        assert (adir / "adapter_model.safetensors").exists()
        assert json.loads((adir / "base.json").read_text())["base"] == str(base.resolve())


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: p for k, p in model.named_parameters() if "lora_" not in k}


def test_adapters_share_one_base_and_answer_like_their_merged_models(runs):
    from chatforge.server.app import AdapterView, create_app, load_all_served

    base, out = runs
    specs = [str(base), str(out["a"]), str(out["b"])]
    served = load_all_served(specs)
    assert all(isinstance(m.model, AdapterView) and m.base == str(base.resolve()) for m in served)
    # one copy of the base: every served model reads the same storage for every base weight
    ptrs = [{k: p.data_ptr() for k, p in _weights(m.model).items()} for m in served]
    assert ptrs[0] == ptrs[1] == ptrs[2] and len(ptrs[0]) > 0
    alone = load_all_served([str(out["a"])])[0]
    assert not isinstance(alone.model, AdapterView) and alone.base is None  # a lone LoRA run serves merged
    n_base = sum(p.numel() for p in _weights(served[0].model).values())
    n_lora = sum(p.numel() for k, p in served[0].model.named_parameters() if "lora_" in k)
    assert 0 < n_lora < n_base / 4  # the two adapters together add little next to a second base copy

    # every model's greedy replies equal its merged model/ served alone, asked one at a time and all at once
    def replies(base_url: str, model: str) -> list[str]:
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)
        return [client.chat.completions.create(model=model, messages=[{"role": "user", "content": p}], max_tokens=8,
                                               temperature=0).choices[0].message.content for p in PROMPTS]

    expected = {}
    for spec in specs:
        with live(create_app([spec], no_auth=True)) as url:
            expected[spec] = replies(url, _alias(spec))
    assert len({tuple(v) for v in expected.values()}) == 3, "the adapters must change the replies"
    with live(create_app(specs, no_auth=True)) as url:
        for spec in specs:
            assert replies(url, _alias(spec)) == expected[spec], spec
        with ThreadPoolExecutor(6) as pool:  # three schedulers on one base at once: the lock keeps them apart
            futures = {spec: [pool.submit(replies, url, _alias(spec)) for _ in range(2)] for spec in specs}
            for spec, fs in futures.items():
                assert all(f.result() == expected[spec] for f in fs), spec


def _alias(spec: str) -> str:
    """The short name serve gives a run dir (its folder name) or an HF dir."""
    from pathlib import Path

    return Path(spec).name
