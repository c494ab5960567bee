"""`chatforge serve` through the official `openai` client against a live uvicorn on 127.0.0.1 (tiny model).

One server (a thread running uvicorn on a free port) serves the module; the tests that need other limits
(queue size, body timeout) start their own. The tiny Llama gets a wide init (0.3) so that greedy replies
differ between prompts and are not a run of one token.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch
from helpers import free_port as _free_port
from helpers import live
from prometheus_client.parser import text_string_to_metric_families

from chatforge.core.tokenizer import render_for_completion

CONTEXT = 512


def _tiny(tok, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=CONTEXT,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True, initializer_range=0.3)
    return LlamaForCausalLM(cfg).eval()


def _never_stops(model, tok):
    """The model with its stop tokens' logits at -inf and 10 ms per forward: replies always run to max_tokens
    and take seconds (long requests)."""
    from chatforge.core.tokenizer import stop_token_ids

    ids = stop_token_ids(tok)

    def hook(_module, _inputs, out):
        out.logits[..., ids] = float("-inf")
        time.sleep(0.01)

    model.register_forward_hook(hook)
    return model


def _app(tok, endless: bool = False, **kw):
    from chatforge.server.app import ServedModel, create_app

    model = _never_stops(_tiny(tok), tok) if endless else _tiny(tok)
    served = ServedModel(id="tiny", model=model, tok=tok, aliases=["tiny", "tiny-alias"], context=CONTEXT)
    return create_app([served], no_auth=True, **kw)


@pytest.fixture(scope="module")
def server(tiny_tokenizer):
    with live(_app(tiny_tokenizer, body_timeout_s=1.0, max_body_bytes=64 * 1024)) as base:
        yield base


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


def _msgs(text: str = "Once upon a time") -> list[dict]:
    return [{"role": "user", "content": text}]


def _metrics(base: str) -> dict[str, float]:
    """Flat {name{labels}: value} of /metrics."""
    out = {}
    for fam in text_string_to_metric_families(httpx.get(f"{base}/metrics").text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def _stream_text(client, **kw) -> tuple[list[str], list]:
    chunks = list(client.chat.completions.create(model="tiny", stream=True, **kw))
    return [c.choices[0].delta.content or "" for c in chunks if c.choices], chunks


# ------------------------------------------------------------------------------------------ basics


def test_models_health_and_chat_usage(server, client, tiny_tokenizer):
    assert httpx.get(f"{server}/health").json()["status"] == "ok"
    ids = [m.id for m in client.models.list().data]
    assert ids == ["tiny"]
    r = client.chat.completions.create(model="tiny-alias", messages=_msgs(), max_tokens=12, temperature=0,
                                       logprobs=True, top_logprobs=3)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.model == "tiny" and r.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content
    assert r.usage.prompt_tokens == len(render_for_completion(tiny_tokenizer, _msgs()))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    content = choice.logprobs.content
    assert len(content) == r.usage.completion_tokens  # one entry per generated token: usage is exact
    # the tokens' bytes are the reply's bytes (the stop token, when there is one, is not reply text)
    raw = b"".join(bytes(e.bytes) for e in content[: len(content) - (choice.finish_reason == "stop")])
    assert raw.decode("utf-8", errors="replace") == choice.message.content  # random tiny model: may cut a char
    if choice.finish_reason == "length":
        assert r.usage.completion_tokens == 12
    for e in content:  # greedy: the chosen token is the most likely one
        assert len(e.top_logprobs) == 3 and e.logprob <= 0
        assert e.logprob == pytest.approx(e.top_logprobs[0].logprob, abs=1e-4)
        assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob >= e.top_logprobs[2].logprob


def test_stream_matches_plain_and_chunk_format(client):
    kw = dict(messages=_msgs("big red ball"), max_tokens=20, temperature=1.0, seed=7)
    plain = client.chat.completions.create(model="tiny", **kw)
    texts, chunks = _stream_text(client, stream_options={"include_usage": True}, **kw)
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [c for c in chunks if c.choices]
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    assert with_choices[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    assert "".join(texts) == plain.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert all(c.id == chunks[0].id and c.object == "chat.completion.chunk" for c in chunks)


def test_sse_wire_format_ends_with_done(server):
    body = {"model": "tiny", "messages": _msgs(), "max_tokens": 5, "stream": True}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines)
    assert lines[-1] == "data: [DONE]" and lines.count("data: [DONE]") == 1


def test_n_choices_plain_and_streamed(client):
    kw = dict(messages=_msgs("hi"), max_tokens=10, temperature=1.0, seed=100)
    many = client.chat.completions.create(model="tiny", n=3, **kw)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert len({c.message.content for c in many.choices}) > 1  # different samples
    # choice j with seed s is the single reply with seed s + j (the engine's rule)
    for j, c in enumerate(many.choices):
        alone = client.chat.completions.create(model="tiny", **{**kw, "seed": 100 + j})
        assert c.message.content == alone.choices[0].message.content
    assert many.usage.completion_tokens == sum(
        client.chat.completions.create(model="tiny", **{**kw, "seed": 100 + j}).usage.completion_tokens
        for j in range(3))
    chunks = list(client.chat.completions.create(model="tiny", n=3, stream=True, **kw))
    by_index = {0: "", 1: "", 2: ""}
    finished = set()
    for ch in chunks:
        for c in ch.choices:
            by_index[c.index] += c.delta.content or ""
            if c.finish_reason:
                assert c.index not in finished
                finished.add(c.index)
    assert finished == {0, 1, 2}
    assert [by_index[i] for i in range(3)] == [c.message.content for c in many.choices]


def test_seed_reproducible(client):
    kw = dict(model="tiny", messages=_msgs("Lily"), max_tokens=16, temperature=1.0, top_p=0.9)
    a = client.chat.completions.create(seed=5, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=5, **kw).choices[0].message.content
    c = client.chat.completions.create(seed=6, **kw).choices[0].message.content
    assert a == b and a != c


def test_stop_strings_never_leak(client, tiny_tokenizer):
    kw = dict(messages=_msgs("Once upon a time"), max_tokens=40, temperature=1.0, seed=11)
    full = client.chat.completions.create(model="tiny", logprobs=True, **kw).choices[0]
    text = full.message.content
    pieces = [e.token for e in full.logprobs.content]
    # a stop string across a token boundary: last char of one token + first char of the next printable one
    pos, stop = 0, None
    for a, b in zip(pieces[3:], pieces[4:], strict=False):
        start = text.find(a + b, pos)
        if a and b and a.isprintable() and b.isprintable() and "\ufffd" not in a + b and start > 0:
            stop = a[-1] + b[0]
            break
    assert stop, f"no usable token boundary in {pieces}"
    expected = text[: text.find(stop)]
    got = client.chat.completions.create(model="tiny", stop=[stop, "zzzz"], **kw).choices[0]
    assert got.message.content == expected and got.finish_reason == "stop"
    texts, _ = _stream_text(client, stop=stop, **kw)
    assert "".join(texts) == expected  # nothing of the stop string, not even its first char, was streamed
    assert all(stop not in t for t in texts)


def test_text_completions(client):
    r = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.usage.completion_tokens == 8 and r.choices[0].finish_reason == "length"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=8, temperature=0, stream=True) if c.choices)
    assert streamed == r.choices[0].text


# ------------------------------------------------------------------------------------------ errors


def _error(exc: openai.APIStatusError) -> dict:
    body = exc.response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    return body


def test_errors_are_typed_and_openai_shaped(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=_msgs())
    assert _error(e.value)["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=_msgs(), max_tokens=CONTEXT)
    assert _error(e.value)["code"] == "context_length_exceeded" and _error(e.value)["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=_msgs("ball " * 600))
    assert _error(e.value)["code"] == "context_length_exceeded"
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=_msgs(), tools=tools)
    assert _error(e.value)["param"] == "tools" and "tools" in _error(e.value)["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=_msgs(), response_format={"type": "json_object"})
    assert _error(e.value)["param"] == "response_format"
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.chat.completions.create(model="tiny", messages="hello")  # wrong type
    assert _error(e.value)["param"] == "messages"
    # harmless unknown fields are ignored
    r = client.chat.completions.create(model="tiny", messages=_msgs(), max_tokens=2, store=False,
                                       extra_body={"metadata": {"a": "b"}, "some_new_field": 1})
    assert r.choices


@pytest.mark.parametrize("body,status,param", [
    ({"model": "tiny", "messages": []}, 400, "messages"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     400, "messages"),
    ({"model": "tiny", "messages": [{"role": "wizard", "content": "a"}]}, 400, "messages.0.role"),
    ({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages.0.content"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "a"}], "n": 100000}, 400, "n"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "a"}], "max_tokens": 10**12}, 400, "max_tokens"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "a"}], "temperature": "hot"}, 422, "temperature"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "a"}], "stop": [""]}, 400, "stop"),
    ({"messages": [{"role": "user", "content": "a"}]}, 422, "model"),
])
def test_bad_bodies(server, body, status, param):
    r = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


def test_bad_bytes_slow_and_huge_bodies_while_others_stream(server):
    """Non-JSON, invalid UTF-8, a body too large, a body that never finishes: each a 4xx, while a stream
    started before them completes."""
    url = f"{server}/v1/chat/completions"
    results: dict = {}

    def long_stream() -> None:
        body = {"model": "tiny", "messages": _msgs(), "max_tokens": 150, "stream": True}
        with httpx.stream("POST", url, json=body, timeout=60) as r:
            results["stream"] = [ln for ln in r.iter_lines() if ln]

    t = threading.Thread(target=long_stream)
    t.start()
    headers = {"content-type": "application/json"}
    r = httpx.post(url, content=b"{not json", headers=headers)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(url, content=b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
                   headers=headers)
    assert r.status_code in (400, 422) and "error" in r.json()
    r = httpx.post(url, content=b"x" * (65 * 1024), headers=headers)
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
    # a client that announces a body and sends only part of it (slowloris): 408 after the body timeout
    with socket.create_connection(("127.0.0.1", int(server.rsplit(":", 1)[1])), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 500\r\n\r\n{\"model\": ")
        reply = b""
        while b"\r\n\r\n" not in reply or len(reply.split(b"\r\n\r\n", 1)[1]) < 2:  # head and body may
            chunk = s.recv(4096)  # arrive in separate packets: read until the body has started or EOF
            if not chunk:
                break
            reply += chunk
        head, _, rest = reply.partition(b"\r\n\r\n")
        length = int(next((ln.split(b":")[1] for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length")),
                          b"0"))
        while len(rest) < length and (chunk := s.recv(4096)):
            rest += chunk
        reply = (head + b"\r\n\r\n" + rest).decode()
    assert reply.startswith("HTTP/1.1 408") and '"error"' in reply
    t.join(timeout=60)
    assert results["stream"][-1] == "data: [DONE]"
    assert httpx.get(f"{server}/health").status_code == 200


# ------------------------------------------------------------------------------------------ batching


def test_batching_is_real_and_batch_invariant(server, client):
    """8 concurrent streaming greedy requests share forward passes (mean batch > 1 from /metrics), and each
    reply equals what the same request gets alone."""
    prompts = [f"Story {i}: {w}" for i, w in enumerate(["Lily", "ball", "sun", "park", "red", "girl", "Tom", "play"])]
    kw = dict(max_tokens=48, temperature=0)
    alone = [client.chat.completions.create(model="tiny", messages=_msgs(p), **kw).choices[0].message.content
             for p in prompts]
    assert len(set(alone)) > 1
    before = _metrics(server)

    async def one(ac, p):
        s = await ac.chat.completions.create(model="tiny", messages=_msgs(p), stream=True, **kw)
        return "".join([c.choices[0].delta.content or "" async for c in s if c.choices])

    async def all_of_them():
        async with openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0) as ac:
            return await asyncio.gather(*(one(ac, p) for p in prompts))

    together = asyncio.run(all_of_them())
    after = _metrics(server)
    steps = after["chatforge:batch_size_count"] - before["chatforge:batch_size_count"]
    rows = after["chatforge:batch_size_sum"] - before["chatforge:batch_size_sum"]
    assert rows / steps > 1, f"mean batch size {rows / steps}"
    assert together == alone


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_16_bit_weights_serve_the_engines_greedy_replies(tiny_tokenizer, precision):
    """`serve --dtype bfloat16|float16`: the scheduler decodes a 16-bit model (its additive mask in the
    model's dtype, logits upcast for sampling) to the same greedy tokens as core.generation on that model."""
    from chatforge.core.generation import SamplingParams, generate
    from chatforge.core.model import for_inference
    from chatforge.core.tokenizer import stop_token_ids
    from chatforge.server.app import ServedModel, create_app

    tok = tiny_tokenizer
    model = for_inference(_tiny(tok), precision)
    assert next(model.parameters()).dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    prompts = ["Once upon a time", "The dog", "Tom and Lily went to"]
    engine = generate(model, [render_for_completion(tok, _msgs(p)) for p in prompts],
                      SamplingParams(max_new_tokens=24, temperature=0.0), stop_token_ids=stop_token_ids(tok),
                      pad_id=tok.pad_token_id, tokenizer=tok)
    served = ServedModel(id="tiny", model=model, tok=tok, aliases=["tiny"], context=CONTEXT)
    with live(create_app([served], no_auth=True)) as base:
        c = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
        replies = [c.chat.completions.create(model="tiny", messages=_msgs(p), max_tokens=24, temperature=0)
                   for p in prompts]
    assert [r.choices[0].message.content for r in replies] == [g[0].text for g in engine]
    assert [r.usage.completion_tokens for r in replies] == [len(g[0].token_ids) for g in engine]
    assert len({r.choices[0].message.content for r in replies}) > 1


def test_two_models_share_one_step_thread_and_answer_as_alone(tiny_tokenizer):
    """Every model of a server is stepped by one thread (one OpenMP pool, StepThread): two models streaming at the
    same time each give the greedy reply they give alone, and the thread ends when the server shuts down."""
    import threading

    from chatforge.server.app import ServedModel, create_app

    tok = tiny_tokenizer
    served = [ServedModel(id=f"m{i}", model=_tiny(tok, seed=i), tok=tok, aliases=[f"m{i}"], context=CONTEXT)
              for i in (1, 2)]
    before = set(threading.enumerate())  # other tests' servers may still be running
    app = create_app(served, no_auth=True)
    stepper = served[0].scheduler.stepper
    assert served[1].scheduler.stepper is stepper and stepper.thread.is_alive()
    with live(app) as base:
        c = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)

        def ask(model: str) -> str:
            return c.chat.completions.create(model=model, messages=_msgs(), max_tokens=24, temperature=0).choices[0].message.content

        alone = [ask("m1"), ask("m2")]
        out: dict[str, str] = {}
        workers = [threading.Thread(target=lambda m=m: out.__setitem__(m, "".join(
            ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
                model=m, messages=_msgs(), max_tokens=24, temperature=0, stream=True)))) for m in ("m1", "m2")]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=60)
        assert [out["m1"], out["m2"]] == alone and alone[0] != alone[1]
        fresh = [t for t in threading.enumerate() if t not in before and t.name.startswith("scheduler")]
        assert fresh == [stepper.thread]  # no thread per model
    assert not stepper.thread.is_alive()


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_frees_the_slot(tiny_tokenizer, stream):
    """A client that goes away mid-reply (streaming or not) leaves nothing running, well before max_tokens."""
    with live(_app(tiny_tokenizer, endless=True)) as base:
        body = {"model": "tiny", "messages": _msgs(), "max_tokens": 480, "stream": stream}
        if stream:
            with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=30) as r:
                lines = r.iter_lines()
                for _ in range(4):
                    next(lines)
                assert _metrics(base)["chatforge:num_requests_running"] == 1
        else:
            with socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1]))) as s:
                data = json.dumps(body).encode()
                s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
                deadline = time.time() + 5
                while _metrics(base)["chatforge:num_requests_running"] != 1:
                    assert time.time() < deadline
                    time.sleep(0.005)
        deadline = time.time() + 5
        while _metrics(base)["chatforge:num_requests_running"] != 0:
            assert time.time() < deadline, "the disconnected request is still running"
            time.sleep(0.01)
        after = _metrics(base)
        assert after["chatforge:request_success_total{finished_reason=abort}"] == 1
        assert after["chatforge:generation_tokens_total"] < 480


def test_queue_full_is_429_with_retry_after(tiny_tokenizer):
    with live(_app(tiny_tokenizer, endless=True, max_batch=1, queue_size=1)) as base:
        url = f"{base}/v1/chat/completions"
        long = {"model": "tiny", "messages": _msgs(), "max_tokens": 480, "stream": True}
        with httpx.stream("POST", url, json=long, timeout=30) as r1:
            lines = r1.iter_lines()  # kept: a dropped line iterator closes the response
            next(lines)  # running: the batch (1 row) is full
            with httpx.stream("POST", url, json=long, timeout=30) as r2:  # waits in the queue (1 place)
                assert r2.status_code == 200
                deadline = time.time() + 5
                while _metrics(base)["chatforge:num_requests_waiting"] != 1:
                    assert time.time() < deadline
                    time.sleep(0.01)
                r3 = httpx.post(url, json={**long, "stream": False}, timeout=30)
                assert r3.status_code == 429 and r3.headers["retry-after"] == "1"
                assert r3.json()["error"]["type"] == "rate_limit_error"
        c = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        assert c.chat.completions.create(model="tiny", messages=_msgs(), max_tokens=2).choices


def test_metrics_names_a_vllm_user_knows(server, client):
    client.chat.completions.create(model="tiny", messages=_msgs(), max_tokens=3)
    names = set(_metrics(server))
    for n in ("chatforge:num_requests_running", "chatforge:num_requests_waiting",
              "chatforge:time_to_first_token_seconds_count", "chatforge:time_per_output_token_seconds_count",
              "chatforge:e2e_request_latency_seconds_count", "chatforge:prompt_tokens_total",
              "chatforge:generation_tokens_total", "chatforge:request_success_total{finished_reason=length}"):
        assert n in names, n


# ------------------------------------------------------------------------------------------ auth, CLI


def test_bad_key_is_authentication_error(tiny_tokenizer, tmp_path):
    auth = pytest.importorskip("chatforge.server.auth", reason="API keys (chatforge.server.auth) not in this build")
    assert hasattr(auth, "api_key")
    from chatforge.server.app import ServedModel, create_app

    served = ServedModel(id="tiny", model=_tiny(tiny_tokenizer), tok=tiny_tokenizer, aliases=["tiny"],
                         context=CONTEXT)
    app = create_app([served], db_url=f"sqlite:///{tmp_path / 'serve.db'}", no_auth=False)
    with live(app) as base:
        c = openai.OpenAI(base_url=f"{base}/v1", api_key="sk-not-a-real-key", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            c.chat.completions.create(model="tiny", messages=_msgs(), max_tokens=2)
        assert _error(e.value)["type"] == "authentication_error"


def test_cli_serve_subprocess(tiny_tokenizer, tmp_path):
    """`chatforge serve --model DIR` as a user runs it: a model dir, a free port, the official client."""
    model_dir = tmp_path / "tiny-model"
    _tiny(tiny_tokenizer).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "chatforge.cli", "serve", "--model", str(model_dir), "--port",
                             str(port), "--no-auth", "--db", "none", "--max-batch", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "server did not come up"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            time.sleep(0.2)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in c.models.list().data] == ["tiny-model"]
        r = c.chat.completions.create(model="tiny-model", messages=_msgs(), max_tokens=4, temperature=0)
        assert r.usage.completion_tokens >= 1
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert "--no-auth" in out and f"127.0.0.1:{port}" in out


def test_unknown_model_spec_is_a_clear_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "chatforge.cli", "serve", "--model", str(tmp_path / "missing"),
                        "--no-auth", "--db", "none"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "unknown model" in r.stderr and "Traceback" not in r.stderr


def test_stream_json_lines_are_valid(server):
    body = {"model": "tiny", "messages": _msgs(), "max_tokens": 6, "stream": True, "n": 2, "logprobs": True}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=30) as r:
        payloads = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: {")]
    entries = [e for p in payloads for c in p["choices"] for e in (c.get("logprobs") or {}).get("content", [])]
    assert entries and all({"token", "logprob", "bytes", "top_logprobs"} <= set(e) for e in entries)
