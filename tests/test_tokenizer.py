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
