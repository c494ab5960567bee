"""`chatforge bench serve`: the server under a concurrency sweep of streaming clients on loopback.

A real `chatforge serve` runs in a subprocess (its own interpreter, as in production); this process is the
clients: asyncio + httpx, each client streams one request at a time. Every level (1, 2, 4, 8, 16, 32
clients) sends the **same** requests (same prompts, same seeds; a reply does not depend on the batch, so
each level generates the same tokens), and reports output tokens/s and requests/s over the level's wall
time, time to first token (request sent -> first content chunk) and inter-token latency (gaps between
content chunks) p50/p95, plus the server's own mean batch size from /metrics.

Default model: a from-scratch Llama (depth 4, width 256, random weights) with a 4096-token BPE trained on a
slice of the embedded corpus. `--model smollm2-135m-instruct` (or any model spec) benchmarks that model.
Where llama-cpp-python is importable (here, or by the interpreter named in $CHATFORGE_LLAMA_CPP_PYTHON) and
the model is the built-in SmolLM2, its Q4_1 GGUF is timed single-stream beside it (2 threads, same prompt).

    chatforge bench serve [--model smollm2-135m-instruct] [--quick] [--out result.json]
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from chatforge.bench.common import machine, print_table, wait_until_up
from chatforge.core.io import UserError

LEVELS = (1, 2, 4, 8, 16, 32)
PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a bicycle stays upright, step by step.",
    "Describe a busy market in the morning.",
    "Give me some advice for my first day at a new job.",
    "Tell me about the life cycle of a butterfly.",
    "Write a letter to a friend about your summer holiday.",
    "What should I pack for a week of hiking in the mountains?",
    "Explain why the sky is blue to a ten year old.",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_model(root: Path) -> Path:
    """Save the default tiny Llama (random weights) with a 4096-token BPE into `root`."""
    import itertools

    from chatforge.config import ModelConfig
    from chatforge.core.model import build_model
    from chatforge.core.tokenizer import train_tokenizer
    from chatforge.data.corpus import default_corpus_paths
    from chatforge.data.corpus_read import iter_documents, list_inputs

    docs = (d for f in list_inputs(default_corpus_paths()) for d in iter_documents(f))
    tok = train_tokenizer(itertools.islice(docs, 3000), 4096, root / "tokenizer")
    model = build_model(ModelConfig(depth=4, max_seq_len=1024), tok, seed=0)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return root / "model"


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


async def _one(client: Any, url: str, body: dict) -> dict:
    t0 = time.perf_counter()
    times: list[float] = []
    usage = None
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"server answered {r.status_code}: {(await r.aread()).decode()[:300]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk.get("choices", []):
                if c.get("delta", {}).get("content"):
                    times.append(time.perf_counter())
    if usage is None:
        raise RuntimeError("the stream carried no usage chunk")
    return {"ttft": times[0] - t0 if times else None, "itl": [b - a for a, b in zip(times, times[1:], strict=False)],
            "tokens": usage["completion_tokens"]}


async def _level(base: str, model: str, clients: int, requests: list[dict], timeout_s: float) -> dict:
    import httpx

    url = f"{base}/v1/chat/completions"
    queue: asyncio.Queue = asyncio.Queue()
    for r in requests:
        queue.put_nowait({"model": model, "stream": True, "stream_options": {"include_usage": True}, **r})
    results: list[dict] = []

    async def worker(client: Any) -> None:
        while not queue.empty():
            results.append(await _one(client, url, queue.get_nowait()))

    limits = httpx.Limits(max_connections=clients + 2)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(worker(client) for _ in range(clients))), timeout_s)
        wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    itl = [x for r in results for x in r["itl"]]
    return {"clients": clients, "requests": len(results), "wall_s": round(wall, 2), "output_tokens": tokens,
            "output_tok_s": round(tokens / wall, 1), "req_s": round(len(results) / wall, 3),
            "ttft_p50_s": _round(_pct(ttft, 0.5)), "ttft_p95_s": _round(_pct(ttft, 0.95)),
            "itl_p50_s": _round(_pct(itl, 0.5)), "itl_p95_s": _round(_pct(itl, 0.95))}


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def _batch_stats(base: str) -> tuple[float, float]:
    """(sum, count) of the server's chatforge:batch_size histogram."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    total = count = 0.0
    for fam in text_string_to_metric_families(httpx.get(f"{base}/metrics").text):
        for s in fam.samples:
            if s.name == "chatforge:batch_size_sum":
                total += s.value
            elif s.name == "chatforge:batch_size_count":
                count += s.value
    return total, count


def _start_server(model: str, port: int, max_batch: int, dtype: str, threads: int) -> subprocess.Popen:

    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "chatforge.cli", "serve", "--model", model, "--port", str(port), "--no-auth",
           "--db", "none", "--max-batch", str(max_batch), "--queue-size", "256", "--dtype", dtype]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return wait_until_up(proc, f"http://127.0.0.1:{port}/health", 300, "the server", proc.stdout.read)


_LLAMA_SCRIPT = """
import json, sys, time
from llama_cpp import Llama
path, prompt, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
llm = Llama(model_path=path, n_threads=2, n_ctx=1024, verbose=False, seed=0)
msgs = [{"role": "user", "content": prompt}]
llm.create_chat_completion(msgs, max_tokens=8)
best = 0.0
for _ in range(2):
    t0 = time.perf_counter()
    out = llm.create_chat_completion(msgs, max_tokens=n, temperature=0.8, seed=0)
    best = max(best, out["usage"]["completion_tokens"] / (time.perf_counter() - t0))
print(json.dumps({"tok_s": best}))
"""


def _llama_cpp(model: str, prompt: str, new_tokens: int) -> dict:
    """Single-stream tok/s of llama.cpp on the built-in model's GGUF, where llama-cpp-python is available."""
    from chatforge.core.hub import BUILTINS, builtin_gguf

    if model not in BUILTINS:
        return {"skipped": "only the built-in model has a GGUF to compare against"}
    python = os.environ.get("CHATFORGE_LLAMA_CPP_PYTHON", sys.executable)
    try:
        gguf = builtin_gguf(model)
        out = subprocess.run([python, "-c", _LLAMA_SCRIPT, str(gguf), prompt, str(new_tokens)], capture_output=True,
                             text=True, timeout=300)
    except (UserError, OSError, subprocess.TimeoutExpired) as e:
        return {"skipped": str(e)}
    if out.returncode != 0:
        return {"skipped": "llama-cpp-python not available (" + (out.stderr.strip().splitlines() or ["?"])[-1] + ")"}
    return {"gguf": gguf.name, **json.loads(out.stdout.strip().splitlines()[-1])}


def _single_stream(base: str, model: str, prompt: str, new_tokens: int) -> float:
    """One client, one long sampled reply: decode tok/s as one chatting person feels it (best of 2)."""
    best = 0.0
    for seed in (1, 2):
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": new_tokens, "temperature": 0.8,
                "seed": seed}
        r = asyncio.run(_level(base, model, 1, [body], 600))
        best = max(best, r["output_tokens"] / r["wall_s"])
    return round(best, 1)


def run(quick: bool = False, model_path: str | None = None, batch: int | None = None, requests: int = 32,
        max_tokens: int = 64, dtype: str = "float32", threads: int = 2, level_timeout_s: float = 240) -> dict:
    """The sweep; returns a JSON-able dict (levels, speed-ups over one client, llama.cpp ratio)."""
    levels = LEVELS if not quick else (1, 4)
    if quick:
        requests, max_tokens = 8, 16
    max_batch = batch or max(levels)
    with tempfile.TemporaryDirectory() as tmp:
        model = model_path or str(_tiny_model(Path(tmp)))
        name = model_path or "llama depth 4 (random init)"
        port = _free_port()
        proc = _start_server(model, port, max_batch, dtype, threads)
        base = f"http://127.0.0.1:{port}"
        try:
            import httpx

            served = httpx.get(f"{base}/v1/models").json()["data"][0]["id"]
            reqs = [{"messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], "max_tokens": max_tokens,
                     "temperature": 0.8, "seed": i} for i in range(requests)]
            asyncio.run(_level(base, served, 2, reqs[:2], level_timeout_s))  # warm-up
            rows = []
            for c in levels:
                s0, n0 = _batch_stats(base)
                row = asyncio.run(_level(base, served, c, reqs, level_timeout_s))
                s1, n1 = _batch_stats(base)
                row["mean_batch"] = round((s1 - s0) / max(n1 - n0, 1), 2)
                rows.append(row)
            single = _single_stream(base, served, PROMPTS[0], 128) if not quick else None
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    one = rows[0]["output_tok_s"]
    speedup = {str(r["clients"]): round(r["output_tok_s"] / one, 2) for r in rows}
    result: dict[str, Any] = {"stage": "serve", "model": name, "dtype": dtype, "machine": machine(),
                              "server_threads": threads, "max_batch": max_batch, "requests_per_level": requests,
                              "max_tokens": max_tokens, "levels": rows, "speedup_vs_1_client": speedup}
    if single is not None:
        result["single_stream_tok_s"] = single
        if model_path:
            llama = _llama_cpp(model_path, PROMPTS[0], 128)
            if "tok_s" in llama:
                llama["ours_over_llama_cpp"] = round(single / llama["tok_s"], 3)
            result["llama_cpp"] = llama
    _print(result)
    return result


def _print(result: dict) -> None:
    from rich.table import Table

    from chatforge.core.log import console

    t = Table(title=f"bench serve: {result['model']} ({result['dtype']})")
    for col in ("clients", "output tok/s", "req/s", "TTFT p50", "TTFT p95", "ITL p50", "ITL p95", "mean batch",
                "x vs 1"):
        t.add_column(col, justify="right")
    for r in result["levels"]:
        t.add_row(str(r["clients"]), f"{r['output_tok_s']:.1f}", f"{r['req_s']:.2f}", _ms(r["ttft_p50_s"]),
                  _ms(r["ttft_p95_s"]), _ms(r["itl_p50_s"]), _ms(r["itl_p95_s"]), f"{r['mean_batch']:.1f}",
                  f"{result['speedup_vs_1_client'][str(r['clients'])]:.2f}")
    console.print(t)
    extra = []
    if "single_stream_tok_s" in result:
        extra.append(("single stream tok/s (128 new tokens)", f"{result['single_stream_tok_s']:.1f}"))
    if "llama_cpp" in result:
        ll = result["llama_cpp"]
        extra.append(("llama.cpp single stream", f"{ll['tok_s']:.1f} tok/s" if "tok_s" in ll else ll["skipped"]))
    if extra:
        print_table("single stream", extra)


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{1000 * x:.0f} ms"


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
