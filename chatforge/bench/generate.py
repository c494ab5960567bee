"""`chatforge bench generate`: sampling throughput of chatforge's engine vs transformers `generate`.

Both run in the same process on the same model and prompts, alternating, after a warm-up, so the
ratio holds on a noisy shared machine. Default model: the default from-scratch Llama (depth 4,
width 256, ~6.3M params with a 4096 vocab, random weights), fp32. Prompts have mixed lengths (left
padding for both). No stop ids, and HF gets `min_new_tokens`, so every row makes exactly
`new_tokens` tokens. Both sample from the plain temperature-1 distribution (HF's default top_k=50 is
switched off) unless top_k/top_p are given, which then apply to both. The engine runs twice: eager
(the default everywhere) and with `compile=True` (decode steps as one torch.compile'd graph; its
one-off compile time is reported apart and not counted in tokens/s).

    python -m chatforge.bench.generate            # or: chatforge bench generate
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from chatforge.bench.common import machine, peak_rss_mb, print_table
from chatforge.config import ModelConfig
from chatforge.core.generation import SamplingParams, generate
from chatforge.core.model import build_model, count_params, load_model


class _VocabOnly:
    """Just enough of a tokenizer to size the model (the bench uses random token ids)."""

    def __init__(self, n: int):
        self.n, self.bos_token_id, self.eos_token_id, self.pad_token_id = n, 0, 1, 2

    def __len__(self) -> int:
        return self.n


def _prompts(batch: int, vocab: int, min_len: int, max_len: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(min_len, max_len + 1, (batch,), generator=g).tolist()
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def _hf_inputs(prompts: list[list[int]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(quick: bool = False, model_path: str | None = None, batch: int = 8, new_tokens: int = 128,
        threads: int = 2, repeats: int = 3, top_k: int = 0, top_p: float = 1.0,
        prompt_len: tuple[int, int] = (16, 48)) -> dict[str, Any]:
    """Time HF `generate` and chatforge `generate` side by side; return a JSON-able result dict."""
    if quick:
        new_tokens, repeats = min(new_tokens, 32), 1
    torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if model_path:
        model = load_model(model_path)
        name = model_path
    else:
        model = build_model(ModelConfig(depth=4, max_seq_len=1024), _VocabOnly(4096), seed=0)
        name = "llama depth 4 (random init)"
    model = model.to(device).eval()
    vocab = model.get_input_embeddings().weight.shape[0]
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    prompts = _prompts(batch, vocab, *prompt_len)
    hf_in = _hf_inputs(prompts, pad_id, device)

    def hf() -> int:
        out = model.generate(**hf_in, do_sample=True, temperature=1.0, top_k=top_k, top_p=top_p,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, use_cache=True,
                             pad_token_id=pad_id)
        return (out.shape[1] - hf_in["input_ids"].shape[1]) * batch

    def ours(seed: int, compile: bool = False) -> int:
        params = SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p, max_new_tokens=new_tokens,
                                seed=seed)
        out = generate(model, prompts, params, stop_token_ids=[], pad_id=pad_id, compile=compile)
        return sum(len(g[0].token_ids) for g in out)

    def ours_compiled(seed: int) -> int:
        return ours(seed, compile=True)

    def timed(fn: Any, *args: Any) -> tuple[float, float, int]:
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        n = fn(*args)
        _sync(device)
        return time.perf_counter() - t0, time.process_time() - c0, n

    hf(), ours(0)  # warm-up: allocator, kernels, lazy imports
    t0 = time.perf_counter()
    ours_compiled(0)  # the first compiled call compiles the decode step for this batch shape
    compile_s = time.perf_counter() - t0
    hf_times, our_times, hf_cpu, our_cpu, comp_times = [], [], [], [], []
    for r in range(repeats):  # alternate so load changes on the machine hit all equally
        dt, ct, n = timed(hf)
        assert n == batch * new_tokens, f"HF generate made {n} tokens, expected {batch * new_tokens}"
        hf_times.append(dt)
        hf_cpu.append(ct)
        dt, ct, n = timed(ours, r + 1)
        assert n == batch * new_tokens, f"chatforge generate made {n} tokens, expected {batch * new_tokens}"
        our_times.append(dt)
        our_cpu.append(ct)
        dt, _, n = timed(ours_compiled, r + 1)
        assert n == batch * new_tokens, f"compiled chatforge generate made {n} tokens, expected {batch * new_tokens}"
        comp_times.append(dt)

    total = batch * new_tokens
    hf_tps, our_tps = total / statistics.median(hf_times), total / statistics.median(our_times)
    # Each HF run is paired with the chatforge run right after it; the median of the pair ratios is
    # less sensitive to other load on the machine than the ratio of medians.
    speedup = statistics.median(h / o for h, o in zip(hf_times, our_times, strict=True))
    # CPU seconds of this process: on a shared machine, time spent descheduled does not count.
    speedup_cpu = statistics.median(h / o for h, o in zip(hf_cpu, our_cpu, strict=True))
    speedup_compiled = statistics.median(h / o for h, o in zip(hf_times, comp_times, strict=True))
    comp_tps = total / statistics.median(comp_times)
    res = {
        "bench": "generate", "machine": machine(), "model": name, "params": count_params(model),
        "device": device.type, "dtype": str(model.dtype).replace("torch.", ""), "batch": batch,
        "new_tokens": new_tokens, "prompt_len": list(prompt_len), "top_k": top_k, "top_p": top_p,
        "repeats": repeats, "hf_times_s": [round(t, 4) for t in hf_times],
        "chatforge_times_s": [round(t, 4) for t in our_times],
        "hf_cpu_s": [round(t, 4) for t in hf_cpu], "chatforge_cpu_s": [round(t, 4) for t in our_cpu],
        "hf_tokens_per_sec": round(hf_tps, 1), "chatforge_tokens_per_sec": round(our_tps, 1),
        "speedup": round(speedup, 3), "speedup_cpu_time": round(speedup_cpu, 3),
        "compiled_times_s": [round(t, 4) for t in comp_times], "compiled_tokens_per_sec": round(comp_tps, 1),
        "speedup_compiled": round(speedup_compiled, 3), "compile_s": round(compile_s, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    print_table("chatforge bench generate", [
        ("model", f"{name} ({res['params'] / 1e6:.2f}M params, {res['dtype']}, {device.type})"),
        ("batch x new tokens", f"{batch} x {new_tokens} (prompts {prompt_len[0]}-{prompt_len[1]} tokens)"),
        ("sampling", f"temperature 1, top_k {top_k or 'off'}, top_p {top_p}"),
        ("threads", str(threads)),
        ("transformers generate", f"{hf_tps:,.0f} tokens/s"),
        ("chatforge generate", f"{our_tps:,.0f} tokens/s"),
        ("speed-up (wall time)", f"{res['speedup']:.2f}x"),
        ("speed-up (process CPU time)", f"{res['speedup_cpu_time']:.2f}x"),
        ("chatforge generate, compile=True", f"{comp_tps:,.0f} tokens/s (one-off compile {compile_s:.0f} s)"),
        ("speed-up, compiled (wall time)", f"{res['speedup_compiled']:.2f}x"),
    ])
    return res


if __name__ == "__main__":
    import json
    import sys

    b = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    print(json.dumps(run(batch=b), indent=2))
