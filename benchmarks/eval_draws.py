"""The eval's sampled draws: one prefill per prompt for all draws vs one `generate_replies` call per draw.

Side by side in one process, alternating, on the same model and prompts (the machine is noisy): the time of
S separate one-draw calls (the eval before session 16) and of one `sample_replies` call with S draws, which
prefills each prompt once and repeats its KV cache; checks that the replies are identical.

    python benchmarks/eval_draws.py --model runs/demo-smol16/sft/model --prompts tasks-heldout:25:1 --samples 2
"""

from __future__ import annotations

import argparse
import time

from chatforge.core.model import load_model_and_tokenizer
from chatforge.data.prompts import load_prompts
from chatforge.stages.evaluate import generate_replies, sample_replies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", default="tasks-heldout:25:1")
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    model, tok, _ = load_model_and_tokenizer(args.model)
    model.eval()
    prompts = load_prompts(args.prompts)
    times: dict[str, list[float]] = {"separate": [], "shared": []}
    for _ in range(args.repeats):
        t = time.perf_counter()
        separate = [generate_replies(model, tok, prompts, args.max_new_tokens, 1.0, s) for s in range(args.samples)]
        times["separate"].append(time.perf_counter() - t)
        t = time.perf_counter()
        shared = sample_replies(model, tok, prompts, args.max_new_tokens, 1.0, 0, args.samples)
        times["shared"].append(time.perf_counter() - t)
        same = sum(a == b for x, y in zip(separate, shared) for a, b in zip(x[0], y[0]))
        print(f"identical replies: {same}/{len(prompts) * args.samples}")
    best = {k: min(v) for k, v in times.items()}
    print(f"{len(prompts)} prompts x {args.samples} draws, {args.max_new_tokens} new tokens: separate "
          f"{best['separate']:.1f} s, shared prefill {best['shared']:.1f} s "
          f"({best['separate'] / best['shared']:.2f}x; best of {args.repeats})")


if __name__ == "__main__":
    main()
