"""Tokenizer: lossless round trip on any Unicode, chat template through plain transformers."""

import pytest
from transformers import AutoTokenizer

from chatforge.core.tokenizer import render_for_completion, stop_token_ids

CASES = [
    "Hello, world!",
    "emoji 🎉🧑‍🚀👩🏽‍💻 flags 🇫🇷",
    "CJK 日本語のテキスト、中文，한국어",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\n\n\nand\r\nCRLF",
    "combining: e\u0301 vs é, zero-width\u200bjoiner",
    "math ∑∫√∞ ≠ ≤ and RTL עברית العربية",
    "<|user|> special-looking text inside a document",
    "",
]


@pytest.mark.parametrize("text", CASES)
def test_round_trip_is_lossless(tiny_tokenizer, text):
    ids = tiny_tokenizer.encode(text, add_special_tokens=False)
    assert tiny_tokenizer.decode(ids) == text


def test_output_dir_loads_with_plain_transformers(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 👋"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<|bos|><|system|>\nBe brief.<|end|>\n<|user|>\nHi 👋<|end|>\n<|assistant|>\n"
    enc = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=True)
    assert list(enc["input_ids"]) == render_for_completion(tiny_tokenizer, msgs)
    assert tok.convert_tokens_to_ids("<|end|>") in stop_token_ids(tok)
    for special in ("<|bos|>", "<|eos|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"):
        assert len(tok.encode(special, add_special_tokens=False)) == 1


def test_token_bytes_are_exact_for_parts_of_a_character(tiny_tokenizer):
    """A byte-level token holding part of a multi-byte character decodes alone to U+FFFD; its bytes do not."""
    from chatforge.core.tokenizer import token_bytes
    from chatforge.server.api import _logprob_entries

    tok = tiny_tokenizer
    text = "Lily → 日本 ball"
    ids = tok.encode(text, add_special_tokens=False)
    assert any("\ufffd" in tok.decode([i]) for i in ids), "the probe must split a character across tokens"
    assert b"".join(token_bytes(tok, i) for i in ids) == text.encode("utf-8")
    entries = _logprob_entries(tok, [(i, -0.5, [(i, -0.5)]) for i in ids])
    assert b"".join(bytes(e["bytes"]) for e in entries) == text.encode("utf-8")
    partial = [e for e in entries if e["token"].startswith("bytes:")]
    assert partial and all("\ufffd" not in e["token"] for e in entries)
    assert partial[0]["token"] == "bytes:" + "".join(f"\\x{b:02x}" for b in partial[0]["bytes"])
    eot = tok.convert_tokens_to_ids("<|end|>")
    assert token_bytes(tok, eot) == b"<|end|>"
