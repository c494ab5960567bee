"""RL methods against their SFT start: held-out task accuracy and the panel's win rate, side by side.

Every model is compared with the same SFT baseline on the same held-out prompts (greedy, 32 tokens)
by the same simulated panel; the baseline's replies are generated once. Prints one line per model
(win rate with its Wilson and bootstrap 95 % intervals, wins/losses/ties, both accuracies) and
writes everything to --out (JSON, rewritten atomically after each model, so a rerun skips the done ones).

    python benchmarks/rl_vs_sft.py --sft runs/smol/sft --prompts tasks-heldout:125:7 \\
        --out runs/rl_vs_sft.json runs/ppo runs/dpo runs/grpo smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from chatforge.core.io import write_json
from chatforge.stages.loop import compare_models
from chatforge.stages.sample import load_prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="run dirs, HF dirs or model names to compare with --sft")
    ap.add_argument("--sft", required=True, help="the baseline (the SFT model the RL runs started from)")
    ap.add_argument("--prompts", default="tasks-heldout:125:7", help="held-out prompts (default: 1,000)")
    ap.add_argument("--judge", default="panel:rule*5:temperature=0.5")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path("runs/rl_vs_sft.json"))
    a = ap.parse_args()
    prompts = load_prompts(a.prompts)
    results = json.loads(a.out.read_text()) if a.out.exists() else {}
    cache: dict = {}
    for model in a.models:
        if model not in results:
            t0 = time.time()
            res = compare_models(model, a.sft, prompts, a.judge, a.max_new_tokens, cache=cache)
            res["seconds"] = round(time.time() - t0, 1)
            res["prompts"] = a.prompts
            results[model] = res
            write_json(a.out, results)
        res = results[model]
        wr = res["win_rate"]
        print(f"{model}: win rate {wr['win_rate']:.3f} (Wilson {wr['ci_wilson'][0]:.3f}-{wr['ci_wilson'][1]:.3f}, "
              f"bootstrap {wr['ci_bootstrap'][0]:.3f}-{wr['ci_bootstrap'][1]:.3f}; "
              f"{wr['wins']}/{wr['losses']}/{wr['ties']} W/L/T of {wr['n']}), accuracy "
              f"{res['accuracy_model']['all']['accuracy']:.3f} vs SFT {res['accuracy_baseline']['all']['accuracy']:.3f}",
              flush=True)


if __name__ == "__main__":
    main()
