"""RL models vs their SFT start on held-out prompts, judged by the noise-free gold and the noisy panel.

The measurement is `chatforge loop`'s own (`stages.loop.compare_models`): greedy replies, and with
--samples S also S sampled replies per prompt at --temperature (sample s drawn with seed s by every model,
so samples are paired); the judges see which replies were cut off at max_new_tokens. Replies are generated
once per model and kept in --cache (JSON, atomic), so a model added later costs only its own generation.
Win rates count ties half; greedy: Wilson and bootstrap 95 % intervals over prompts; sampled: each prompt's
mean outcome over its S paired samples, bootstrap over prompts.

    python benchmarks/rl_gold_eval.py --sft runs/demo-smol/sft --prompts tasks-heldout:25:1 --samples 2 \\
        --cache runs/exp/replies.json runs/demo-smol/loop/round-1/policy runs/exp/rloo
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from chatforge.core.io import write_json
from chatforge.data.prompts import load_prompts
from chatforge.stages.loop import compare_models, rm_change_text

JUDGE, GOLD = "panel:rule*5:temperature=0.5", "rule"  # the panel the RM learned from; the gold without noise


def _ci(w: dict) -> str:
    lo, hi = w.get("ci_wilson") or w["ci_bootstrap"]
    return f"{w['win_rate']:.3f} ({lo:.3f}-{hi:.3f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*")
    ap.add_argument("--sft", required=True)
    ap.add_argument("--prompts", default="tasks-heldout:25:1")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--cache", type=Path, default=Path("runs/exp/replies.json"))
    ap.add_argument("--exclude", default="tasks-heldout:8:977",
                    help="prompts left out of the test set (the RL runs' gold validation prompts)")
    ap.add_argument("--samples", type=int, default=2, help="sampled replies per prompt (paired seeds 0..S-1)")
    ap.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (the rollouts' by default)")
    ap.add_argument("--rm", help="also the paired change of this reward model's normalised score (e.g. the RM the "
                    "RL runs were trained against)")
    ap.add_argument("--out", type=Path, help="write every comparison as JSON here")
    a = ap.parse_args()
    from chatforge.data.tasks import normalize_prompt, prompt_text

    seen = {normalize_prompt(prompt_text(p)) for p in load_prompts(a.exclude)} if a.exclude else set()
    prompts = [p for p in load_prompts(a.prompts) if normalize_prompt(prompt_text(p)) not in seen]
    print(f"{len(prompts)} test prompts ({a.prompts}, without the {a.exclude or 'no'} validation prompts)")
    tag = f"{a.prompts}-x{a.exclude}|{a.max_new_tokens}"
    stored = json.loads(a.cache.read_text()) if a.cache.exists() else {}
    cache = {tuple(k.split("\x00")[:2]): tuple(v) for k, v in stored.items() if k.split("\x00")[2:] == [tag]}
    results = []
    for spec in a.models:
        res = compare_models(spec, a.sft, prompts, JUDGE, a.max_new_tokens, cache, gold=GOLD, samples=a.samples,
                             temperature=a.temperature, rm=a.rm)
        stored.update({f"{s}\x00{k}\x00{tag}": list(v) for (s, k), v in cache.items()})
        write_json(a.cache, stored)
        results.append(res)
        acc_m, acc_b = res["accuracy_model"]["all"]["accuracy"], res["accuracy_baseline"]["all"]["accuracy"]
        line = [f"{spec}: accuracy greedy {acc_b:.3f} -> {acc_m:.3f}", f"gold greedy {_ci(res['gold']['greedy'])}",
                f"panel greedy {_ci(res['win_rate'])}"]
        if a.samples:
            sa = res["sampled_accuracy"]
            line += [f"sampled accuracy {sa['baseline']:.3f} -> {sa['model']:.3f}",
                     f"gold sampled {_ci(res['gold']['sampled'])}", f"panel sampled {_ci(res['panel_sampled'])}"]
        if a.rm:
            line.append(f"RM score change {rm_change_text(res['rm_score'])}")
        print("; ".join(line), flush=True)
    if a.out:
        write_json(a.out, results)


if __name__ == "__main__":
    main()
