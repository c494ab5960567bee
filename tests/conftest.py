import os

import pytest
import torch

pytest_plugins = ["postgres"]  # a real PostgreSQL server for the storage tests (tests/postgres.py)

# Tests share 2 cores with everything else: keep torch single-threaded and deterministic.
torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(params=["sqlite", "postgresql"])
def web_db_url(request, tmp_path):
    """A fresh database for a web-app test: a SQLite file, then a database on the real PostgreSQL server
    (tests/postgres.py; that fixture skips only when initdb/pg_ctl are not installed)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'app.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A small byte-level BPE with chatforge's chat template, trained on a few KB of text."""
    from chatforge.core.tokenizer import train_tokenizer

    text = (
        "Once upon a time there was a little girl named Lily. She liked to play outside in the sun. "
        "One day she saw a big red ball. 1 2 3 4 5 6 7 8 9 0 + - * / = ? ! , . : ; ' \" ( ) [ ] { } "
    ) * 20
    return train_tokenizer([text], vocab_size=400, out_dir=tmp_path_factory.mktemp("tok") / "tokenizer")


@pytest.fixture(scope="session")
def tiny_model_factory():
    """Build a tiny random Llama for a tokenizer (a few hundred thousand parameters)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def make(tok, hidden=64, layers=2, heads=4, seed=0):
        torch.manual_seed(seed)
        cfg = LlamaConfig(
            vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=512,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            tie_word_embeddings=True,
        )
        return LlamaForCausalLM(cfg).eval()

    return make
