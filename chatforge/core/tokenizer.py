"""Tokenizers and the one chat renderer.

`train_tokenizer` builds a byte-level BPE (HF `tokenizers`) with chat special tokens and a Jinja chat
template, saved as a directory that `transformers.AutoTokenizer.from_pretrained` loads.

`render_conversation` and `render_for_completion` are the only place that decides chat formatting
and the assistant-only loss mask. They work with *any* HF chat template (ours, SmolLM2's, Llama's):
each assistant turn is located by rendering the conversation prefix with `add_generation_prompt=True`
and diffing token ids, so no template needs `{% generation %}` markers.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

IGNORE_INDEX = -100

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SYSTEM, USER, ASSISTANT, END_OF_TURN = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, SYSTEM, USER, ASSISTANT, END_OF_TURN]

# Each message: <|role|>\n{content}<|end|>\n ; the prompt for a reply ends with <|assistant|>\n.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# End-of-turn markers of well-known chat templates, tried in order before falling back to eos.
KNOWN_END_OF_TURN = [END_OF_TURN, "<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end_of_text|>"]


class TokenizerError(ValueError):
    """A user-facing tokenizer problem (bad directory, template that cannot be rendered)."""


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path, min_frequency: int = 2) -> Any:
    """Train a byte-level BPE on `texts` (streamed) and save an HF tokenizer dir to `out_dir`.

    Byte-level pre-tokenization makes the round trip lossless for any Unicode string.
    The directory is written to a temp dir and renamed, so a crash leaves nothing half-written.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from chatforge.core.io import atomic_dir

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise TokenizerError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (256 bytes + specials)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[SYSTEM, USER, ASSISTANT, END_OF_TURN],
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    with atomic_dir(Path(out_dir)) as tmp:
        fast.save_pretrained(tmp)
    return load_tokenizer(out_dir)


def load_tokenizer(path: str | Path) -> Any:
    """Load an HF tokenizer dir; give it our chat template (with a message) if it has none."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.exists():
        raise TokenizerError(f"tokenizer directory not found: {path}")
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # transformers raises many types for a broken dir
        raise TokenizerError(f"cannot load tokenizer from {path}: {e}") from e
    return ensure_chat_template(tok, str(path))


def ensure_chat_template(tok: Any, where: str = "model") -> Any:
    if not getattr(tok, "chat_template", None):
        from chatforge.core.log import warn

        warn(f"{where} has no chat template; using chatforge's default (<|role|> ... <|end|>)")
        tok.chat_template = CHAT_TEMPLATE
        missing = [t for t in SPECIAL_TOKENS if t not in tok.get_vocab()]
        if missing:
            tok.add_special_tokens({"additional_special_tokens": missing})
        if tok.bos_token is None:
            tok.bos_token = BOS
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def end_of_turn_id(tok: Any) -> int:
    """The token that ends an assistant turn (the generation stop token)."""
    vocab = tok.get_vocab()
    for t in KNOWN_END_OF_TURN:
        if t in vocab and t in (tok.chat_template or ""):
            return vocab[t]
    if tok.eos_token_id is None:
        raise TokenizerError("tokenizer has neither an end-of-turn token nor an eos token")
    return tok.eos_token_id


def stop_token_ids(tok: Any) -> list[int]:
    ids = {end_of_turn_id(tok)}
    if tok.eos_token_id is not None:
        ids.add(tok.eos_token_id)
    return sorted(ids)


def _template_ids(tok: Any, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    out = tok.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=True
    )
    return list(out["input_ids"])


def render_for_completion(tok: Any, messages: list[dict]) -> list[int]:
    """Token ids of `messages` followed by the assistant-start prompt (what a model continues)."""
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return _template_ids(tok, messages, add_generation_prompt=True)


def assistant_turn_suffix(tok: Any) -> list[int] | None:
    """The ids the chat template emits after an assistant reply's content (e.g. `<|end|>\\n`), or None
    when prompt + reply does not render as completion prompt + reply ids + a fixed suffix. Cached per
    tokenizer object and chat template."""
    template = getattr(tok, "chat_template", None)
    cached = getattr(tok, "_chatforge_turn_suffix", None)
    if cached is not None and cached[0] == template:
        return cached[1]
    user = [{"role": "user", "content": "Say hello."}]
    try:
        prefix = render_for_completion(tok, user)
        empty = _template_ids(tok, user + [{"role": "assistant", "content": ""}], add_generation_prompt=False)
        probe = "Hello, world! 42"
        full = _template_ids(tok, user + [{"role": "assistant", "content": probe}], add_generation_prompt=False)
    except Exception:  # a template that cannot render this probe: no fixed suffix
        suffix = None
    else:
        tail = empty[len(prefix):]
        body = tok.encode(probe, add_special_tokens=False)
        suffix = tail if empty[: len(prefix)] == prefix and full == prefix + body + tail else None
    try:
        tok._chatforge_turn_suffix = (template, suffix)
    except AttributeError:  # a tokenizer that refuses attributes: recompute next time
        pass
    return suffix


def token_bytes(tok: Any, token_id: int) -> bytes:
    """The raw bytes one token stands for (OpenAI's `logprobs.content[].bytes`): a byte-level BPE token that
    holds part of a multi-byte character decodes alone to U+FFFD, but its bytes are exact, and the bytes of a
    reply's tokens concatenate to the reply's UTF-8. Byte-level BPE (GPT-2, Llama 3, SmolLM2) maps through the
    byte alphabet, SentencePiece byte fallback (`<0xE2>`) through its hex, anything else through decode."""
    piece = tok.convert_ids_to_tokens(int(token_id))
    special = getattr(tok, "all_special_ids", None) or []
    if piece is not None and int(token_id) not in special:
        if _is_byte_level(tok):
            table = _byte_decoder()
            if all(ch in table for ch in piece):
                return bytes(table[ch] for ch in piece)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                return bytes.fromhex(piece[3:5])
            except ValueError:
                pass
    return tok.decode([int(token_id)], skip_special_tokens=False, clean_up_tokenization_spaces=False).encode("utf-8")


def _is_byte_level(tok: Any) -> bool:
    backend = getattr(tok, "backend_tokenizer", None)
    return backend is not None and type(backend.decoder).__name__ == "ByteLevel"


def _byte_decoder() -> dict[str, int]:
    global _BYTE_DECODER
    if _BYTE_DECODER is None:
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        _BYTE_DECODER = {ch: b for b, ch in bytes_to_unicode().items()}
    return _BYTE_DECODER


_BYTE_DECODER: dict[str, int] | None = None


def render_conversation(tok: Any, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Render a whole conversation; return (ids, mask) with mask 1 exactly on assistant tokens.

    The masked span of an assistant turn is its content plus the end-of-turn token (the model must
    learn to stop); role headers and whatever the template puts after end-of-turn stay 0.
    """
    eot = end_of_turn_id(tok)
    full = _template_ids(tok, messages, add_generation_prompt=False)
    mask = [0] * len(full)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = _template_ids(tok, messages[:i], add_generation_prompt=True)
        upto = _template_ids(tok, messages[: i + 1], add_generation_prompt=False)
        if full[: len(prefix)] != prefix or full[: len(upto)] != upto:
            raise TokenizerError("chat template is not prefix-stable; cannot locate assistant turns")
        end = len(upto)
        # Stop the span right after the end-of-turn token (trailing newlines are template, not reply).
        for j in range(len(prefix), len(upto)):
            if upto[j] == eot:
                end = j + 1
                break
        for j in range(len(prefix), end):
            mask[j] = 1
    return full, mask


def iter_text_file(path: str | Path, text_field: str = "text") -> Iterator[str]:
    """Yield documents from a cleaned-text JSONL file written by `data prepare`."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)[text_field]
