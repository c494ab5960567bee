"""Single-stream decode speed through the server's scheduler: fp32 / bf16 / fp16 side by side.

One person chatting feels the speed of one stream. This loads the model once per precision off the main thread
(as `chatforge serve` does, server.app.off_main_thread), and for every run starts a serving Scheduler, sends it the
same request (one prompt, sampling at T 0.8, `--new-tokens` tokens, fixed seed, no stop) and closes it (one
scheduler thread alive at a time, as in a one-model server), each variant in turn, `--repeats` times alternated,
so a noisy machine hits every variant alike. Tokens/s = generated tokens / the
request's wall time (prefill included, as a chat user waits for it).

    python benchmarks/single_stream.py --model smollm2-135m-instruct --new-tokens 128 --repeats 3 --threads 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import torch

from chatforge.core.tokenizer import render_for_completion
from chatforge.server.app import load_served, off_main_thread
from chatforge.server.scheduler import GenRequest, RowParams, Scheduler


async def run_once(sched: Scheduler, prompt_ids: list[int], new_tokens: int) -> tuple[int, float]:
    """Submit one request and read its events until "done", as the API does; (generated tokens, seconds)."""
    req = GenRequest(prompt_ids, RowParams(temperature=0.8, max_new_tokens=new_tokens, seed=0, stop=[]), n=1,
                     loop=asyncio.get_running_loop(), events=asyncio.Queue())
    t0 = time.perf_counter()
    sched.submit(req)
    while (event := await req.events.get())[0] not in ("done", "error"):
        pass
    if event[0] == "error":
        raise RuntimeError(event[2])
    return event[3], time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precisions", default="fp32,bf16,fp16")
    ap.add_argument("--prompt", default="Write a short story about a robot who learns to paint.")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    served = off_main_thread(lambda: {p: load_served(args.model, p) for p in args.precisions.split(",")})
    tok = next(iter(served.values())).tok
    prompt_ids = render_for_completion(tok, [{"role": "user", "content": args.prompt}])

    rates: dict[str, list[float]] = {v: [] for v in served}
    for rep in range(args.repeats):
        for variant, m in served.items():
            sched = Scheduler(m.model, m.tok, [], max_batch=1, model_name=variant)
            n, dt = asyncio.run(run_once(sched, list(prompt_ids), args.new_tokens))
            sched.close()
            rates[variant].append(n / dt)
            print(f"repeat {rep}: {variant} {n} tokens in {dt:.2f} s = {n / dt:.1f} tok/s", flush=True)
    base = max(rates[next(iter(rates))])
    summary = {v: {"best_tok_s": round(max(r), 1), "median_tok_s": round(sorted(r)[len(r) // 2], 1),
                   "x_first": round(max(r) / base, 2)} for v, r in rates.items()}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
