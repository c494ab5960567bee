"""The RM's best-of-n pick among an SFT model's samples vs that model's greedy reply, by the noise-free gold.

Shows the ceiling of a policy trained on the RM: how much gold utility the RM's selection recovers (next
to the gold's own pick and a random sample), and the win rate of the pick over greedy decoding.

    python benchmarks/rm_pick_vs_greedy.py --sft runs/demo-smol/sft --rm runs/demo-smol/loop/round-1/rm \\
        --prompts tasks-heldout:12:1 --temperature 0.7 --n 8
"""

from __future__ import annotations

import argparse

from chatforge.core.model import load_model_and_tokenizer
from chatforge.core.reward_model import load_reward_model, score_texts
from chatforge.data.prompts import load_prompts
from chatforge.data.utility import rule_utility
from chatforge.stages.evaluate import generate_replies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sft", required=True)
    ap.add_argument("--rm", required=True)
    ap.add_argument("--prompts", default="tasks-heldout:12:1")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    a = ap.parse_args()
    prompts = load_prompts(a.prompts)
    model, tok, _ = load_model_and_tokenizer(a.sft)
    model.eval()
    greedy = generate_replies(model, tok, prompts, max_new_tokens=a.max_new_tokens)[0]
    samples = [generate_replies(model, tok, prompts, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                                seed=s)[0] for s in range(a.n)]
    del model
    rm, rtok, norm = load_reward_model(a.rm)
    msgs = [p["messages"] for p in prompts]
    scores = [score_texts(rm, rtok, msgs, s, norm) for s in samples]
    u_greedy = [rule_utility(p, r) for p, r in zip(prompts, greedy)]
    u = [[rule_utility(p, r) for p, r in zip(prompts, s)] for s in samples]
    m = len(prompts)
    print(f"greedy SFT: mean gold utility {sum(u_greedy) / m:.3f} on {m} prompts")
    n = 1
    while n <= a.n:
        pick = [u[max(range(n), key=lambda j: scores[j][i])][i] for i in range(m)]
        oracle = [max(u[j][i] for j in range(n)) for i in range(m)]
        wins = sum(x > y for x, y in zip(pick, u_greedy))
        losses = sum(x < y for x, y in zip(pick, u_greedy))
        print(f"n={n}: RM pick {sum(pick) / m:.3f}, oracle {sum(oracle) / m:.3f}, random {sum(u[0]) / m:.3f}; "
              f"RM pick vs greedy W/L/T {wins}/{losses}/{m - wins - losses}, win rate {(wins + (m - wins - losses) / 2) / m:.3f}")
        n *= 2


if __name__ == "__main__":
    main()
