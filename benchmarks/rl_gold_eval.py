"""RL models vs their SFT start on held-out prompts, judged by the noise-free gold and the noisy panel.

Replies (greedy, 32 tokens; with --samples S also S sampled replies per prompt at --temperature, sample s
drawn with seed s by every model, so samples are paired) are generated once per model and cached in
--cache (JSON, atomic), so a model added later costs only its own generation. Win rates count ties
half; greedy: Wilson and bootstrap 95 % intervals over prompts; sampled: each prompt's mean outcome over
its S paired samples, bootstrap over prompts.

    python benchmarks/rl_gold_eval.py --sft runs/demo-smol/sft --prompts tasks-heldout:25:1 \\
        --cache runs/exp/replies.json runs/demo-smol/loop/round-1/policy runs/exp/rloo
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from chatforge.core.io import write_json
from chatforge.evals.stats import bootstrap_ci, win_rate
from chatforge.stages.evaluate import generate_replies, task_accuracy
from chatforge.stages.loop import judged_outcomes
from chatforge.stages.sample import load_prompts

JUDGES = ("rule", "panel:rule*5:temperature=0.5")  # gold without noise, then the panel the RM learned from


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*")
    ap.add_argument("--sft", required=True)
    ap.add_argument("--prompts", default="tasks-heldout:25:1")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--cache", type=Path, default=Path("runs/exp/replies.json"))
    ap.add_argument("--exclude", default="tasks-heldout:4:977",
                    help="prompts left out of the test set (the RL runs' gold validation prompts)")
    ap.add_argument("--samples", type=int, default=0, help="sampled replies per prompt (paired seeds 0..S-1)")
    ap.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (the rollouts' by default)")
    a = ap.parse_args()
    from chatforge.core.model import load_model_and_tokenizer
    from chatforge.data.tasks import normalize_prompt, prompt_text

    seen = {normalize_prompt(prompt_text(p)) for p in load_prompts(a.exclude)} if a.exclude else set()
    prompts = [p for p in load_prompts(a.prompts) if normalize_prompt(prompt_text(p)) not in seen]
    print(f"{len(prompts)} test prompts ({a.prompts}, without the {a.exclude or 'no'} validation prompts)")
    cache = json.loads(a.cache.read_text()) if a.cache.exists() else {}
    for spec in [a.sft, *a.models]:
        key = f"{spec}|{a.prompts}-x|{a.max_new_tokens}"
        if key not in cache:
            model, tok, _ = load_model_and_tokenizer(spec)
            model.eval()
            cache[key] = generate_replies(model, tok, prompts, max_new_tokens=a.max_new_tokens, temperature=0.0)[0]
            write_json(a.cache, cache)
            print(f"generated {len(prompts)} replies for {spec}", flush=True)
        for seed in range(a.samples):
            skey = f"{key}|T{a.temperature}|s{seed}"
            if skey not in cache:
                model, tok, _ = load_model_and_tokenizer(spec)
                model.eval()
                cache[skey] = generate_replies(model, tok, prompts, max_new_tokens=a.max_new_tokens,
                                               temperature=a.temperature, seed=seed)[0]
                write_json(a.cache, cache)
                print(f"sampled {len(prompts)} replies for {spec} (seed {seed})", flush=True)
    sft = cache[f"{a.sft}|{a.prompts}-x|{a.max_new_tokens}"]
    print(f"SFT accuracy {task_accuracy(prompts, sft)['all']['accuracy']:.3f}")
    for seed in range(a.samples):
        acc = task_accuracy(prompts, cache[f"{a.sft}|{a.prompts}-x|{a.max_new_tokens}|T{a.temperature}|s{seed}"])
        print(f"  SFT sampled seed {seed}: accuracy {acc['all']['accuracy']:.3f}")
    for spec in a.models:
        rep = cache[f"{spec}|{a.prompts}-x|{a.max_new_tokens}"]
        acc = task_accuracy(prompts, rep)["all"]["accuracy"]
        line = [f"{spec}: accuracy {acc:.3f}"]
        for judge in JUDGES:
            w = win_rate(judged_outcomes(prompts, rep, sft, judge))
            line.append(f"{judge}: {w['win_rate']:.3f} (Wilson {w['ci_wilson'][0]:.3f}-{w['ci_wilson'][1]:.3f}, "
                        f"bootstrap {w['ci_bootstrap'][0]:.3f}-{w['ci_bootstrap'][1]:.3f}, "
                        f"W/L/T {w['wins']}/{w['losses']}/{w['ties']})")
        print("; ".join(line), flush=True)
        if a.samples:
            keys = [f"|T{a.temperature}|s{seed}" for seed in range(a.samples)]
            base = f"{a.sft}|{a.prompts}-x|{a.max_new_tokens}"
            own = f"{spec}|{a.prompts}-x|{a.max_new_tokens}"
            acc = sum(task_accuracy(prompts, cache[own + k])["all"]["accuracy"] for k in keys) / len(keys)
            line = [f"  sampled T={a.temperature} x{a.samples}: accuracy {acc:.3f}"]
            for judge in JUDGES:
                per = [judged_outcomes(prompts, cache[own + k], cache[base + k], judge) for k in keys]
                y = np.mean(np.array(per), axis=0)  # each prompt's mean over its paired samples
                lo, hi = bootstrap_ci(y, np.mean)
                line.append(f"{judge}: {y.mean():.3f} (bootstrap {lo:.3f}-{hi:.3f})")
            print("; ".join(line), flush=True)


if __name__ == "__main__":
    main()
