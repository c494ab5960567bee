"""SFT: assistant-only loss mask, truncation policy, packing equivalence, exact resume."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import (
    assert_resumed,
    run_killed_then_resumed,
    run_probed,
    save_tiny_model,
)

from chatforge.core.tokenizer import IGNORE_INDEX, render_conversation
from chatforge.data.sft_data import collate, pack, render_examples, token_losses

MULTI = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3 + 3?"},
    {"role": "assistant", "content": "6, of course."},
]


def test_loss_mask_token_by_token(tiny_tokenizer):
    tok = tiny_tokenizer
    ids, mask = render_conversation(tok, MULTI)
    # Expected: build the rendering by pieces and mark exactly the assistant contents + <|end|>.
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    end = tok.convert_tokens_to_ids("<|end|>")
    expected_ids, expected_mask = [tok.bos_token_id], [0]
    for m in MULTI:
        head = enc(f"<|{m['role']}|>\n")
        body = enc(m["content"]) + [end]
        tail = enc("\n")
        a = 1 if m["role"] == "assistant" else 0
        expected_ids += head + body + tail
        expected_mask += [0] * len(head) + [a] * len(body) + [0] * len(tail)
    assert ids == expected_ids
    assert mask == expected_mask
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert trained == "4<|end|>6, of course.<|end|>"


def test_truncation_drops_whole_turns(tiny_tokenizer):
    tok = tiny_tokenizer
    full, _ = render_conversation(tok, MULTI)
    first, _ = render_conversation(tok, MULTI[:3])
    seq_len = len(first) + 2  # room for the first exchange only
    assert len(full) > seq_len + 1
    ex, st = render_examples(tok, [{"messages": MULTI}], seq_len, "turns")
    assert st.truncated == 1 and len(ex) == 1 and ex[0][0] == first[:-1]
    ex, st = render_examples(tok, [{"messages": MULTI}], seq_len, "drop")
    assert ex == [] and st.skipped_too_long == 1
    ex, st = render_examples(tok, [{"messages": MULTI}], 4, "turns")
    assert ex == [] and st.skipped_too_long == 1


def test_packing_matches_unpacked_losses(tiny_tokenizer, tiny_model_factory):
    tok = tiny_tokenizer
    model = tiny_model_factory(tok)
    convs = [{"messages": MULTI}, {"messages": MULTI[1:3]},
             {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello Lily!"}]}]
    ex, _ = render_examples(tok, convs, 128)
    rows = pack(ex, 128, packing=True)
    assert len(rows) == 1, "all three fit in one packed row"
    with torch.no_grad():
        packed, valid = token_losses(model, collate(rows, tok.pad_token_id))
        packed_vals = packed[valid].tolist()
        alone_vals = []
        # pack() orders by decreasing length; compare in that order
        for inputs, targets in sorted(ex, key=lambda e: -len(e[0])):
            one, v = token_losses(model, collate(pack([(inputs, targets)], 128), tok.pad_token_id))
            alone_vals += one[v].tolist()
    assert len(packed_vals) == len(alone_vals) == sum(t != IGNORE_INDEX for _, ts in ex for t in ts)
    assert packed_vals == pytest.approx(alone_vals, abs=1e-5)
    # and without the block-diagonal mask the losses would differ (the test can fail)
    b = collate(rows, tok.pad_token_id)
    b["attention_mask"] = torch.tril(torch.ones_like(b["attention_mask"][0, 0]))[None, None].bool()
    with torch.no_grad():
        leaky, v = token_losses(model, b)
    assert leaky[v].tolist() != pytest.approx(alone_vals, abs=1e-5)


@pytest.fixture(scope="module")
def sft_setup(tiny_tokenizer, tiny_model_factory, tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    model_dir = save_tiny_model(root / "base", tiny_tokenizer, tiny_model_factory)
    data = root / "convs.jsonl"
    rows = []
    for i in range(60):
        a, b = i % 10, (i * 7) % 10
        rows.append({"id": f"c{i}", "messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                                                 {"role": "assistant", "content": str(a + b)}]})
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model_dir, data


def _sft_cmd(model_dir, data, out, steps):
    sets = [f"train.max_steps={steps}", "train.batch_size=4", "train.seq_len=64", "train.checkpoint_every=5",
            "train.eval_every=10", "train.log_every=5", "train.warmup_steps=2", "log.tensorboard=false",
            "train.threads=1"]
    return [sys.executable, "-m", "chatforge.cli", "sft", "--model", str(model_dir), "--data", str(data),
            "--out", str(out), *sum([["--set", s] for s in sets], [])]


def test_sft_exact_resume_and_loss_drops(sft_setup, tmp_path):
    model_dir, data = sft_setup
    env = {**os.environ, "CI": "1"}
    ref = tmp_path / "ref"
    r = subprocess.run(_sft_cmd(model_dir, data, ref, 40), env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines() if "train/loss" in x]
    assert rows[-1]["train/loss"] < rows[0]["train/loss"]
    out = tmp_path / "killed"
    r = run_killed_then_resumed(_sft_cmd(model_dir, data, out, 40), out, 10, env)
    assert r.returncode == 0, r.stderr
    assert assert_resumed(r, out, 10) < 40  # resumed from the killed run's checkpoint, not retrained
    assert (ref / "model" / "model.safetensors").read_bytes() == (out / "model" / "model.safetensors").read_bytes()


def test_sft_under_torchrun_two_processes(sft_setup, tmp_path):
    """DDP: each rank trains on its own rows of every global batch; the ranks end with the same weights."""
    model_dir, data = sft_setup
    out = tmp_path / "ddp"
    recs = run_probed(_sft_cmd(model_dir, data, out, 3)[3:], out, steps=3)
    assert all(len(idx) == 4 for rec in recs.values() for _, _, idx in rec["batches"])
    # the position all ranks share: 2 x batch_size packed rows a step, a new epoch when a step no longer fits
    data = torch.load(out / "checkpoints" / "step-3" / "state.pt", weights_only=False)["data"]
    epoch, cursor, epochs = 0, 0, []
    for _ in range(3):
        epoch, cursor = (epoch + 1, 0) if cursor + 8 > data["n"] else (epoch, cursor)
        cursor, epochs = cursor + 8, [*epochs, epoch]
    assert (data["epoch"], data["cursor"]) == (epoch, cursor)
    assert [b[1] for b in recs[0]["batches"]] == [b[1] for b in recs[1]["batches"]] == epochs


def test_sft_lora_exports_plain_model(sft_setup, tmp_path):
    model_dir, data = sft_setup
    out = tmp_path / "lora"
    cmd = _sft_cmd(model_dir, data, out, 3) + ["--set", "lora.enabled=true", "--set", "lora.r=4"]
    r = subprocess.run(cmd, env={**os.environ, "CI": "1"}, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    files = sorted(p.name for p in (out / "model").iterdir())
    assert "model.safetensors" in files and "adapter_config.json" not in files
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(out / "model")
    assert not any("lora" in k for k in m.state_dict())


def test_sft_bad_data_names_file_and_line(sft_setup, tmp_path):
    model_dir, _ = sft_setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant",
                                                                               "content": "yo"}]}) + "\n"
                   + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    out = tmp_path / "o"
    r = subprocess.run(_sft_cmd(model_dir, bad, out, 2), capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and f"{bad}:2" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()
