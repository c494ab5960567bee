"""Reward model on real human preferences: Anthropic HH (helpful + harmless, the embedded subset).

Splits `embedded:prefs/hh` by a hash of each task id (20 % held out, the same split `rm train` uses
with data.val_fraction=0.2), trains an RM on the train part and evaluates it on the first N held-out
comparisons (by task id), printing accuracy with a 95 % Wilson interval, pairs seen and minutes.

    python benchmarks/rm_hh.py --model smollm2-135m-instruct --steps 100 --lora --out runs/rm-hh-smol
    python benchmarks/rm_hh.py --model runs/demo/sft --steps 200 --out runs/rm-hh-tiny
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from chatforge.config import RMConfig, load_config
from chatforge.data.rm_data import load_comparisons, split_comparisons
from chatforge.evals.stats import wilson_interval
from chatforge.stages import rm
from chatforge.stages.rm_eval import evaluate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--heldout", type=int, default=400)
    ap.add_argument("--lora", action="store_true")
    ap.add_argument("--norm-replies", type=int, default=256,
                    help="train replies scored to fit the reward normalisation (it does not change accuracy)")
    ap.add_argument("--out", type=Path, default=Path("runs/rm-hh"))
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    train, val = split_comparisons(load_comparisons(["embedded:prefs/hh"], "none"), 0.2)
    val = sorted(val, key=lambda c: c.task_id)[: a.heldout]
    for name, rows in (("train.jsonl", train), ("heldout.jsonl", val)):
        (a.out / name).write_text("".join(json.dumps(c.to_dict()) + "\n" for c in rows), encoding="utf-8")
    sets = [f"model={a.model}", f"data.paths={a.out / 'train.jsonl'}", "data.val_fraction=0",
            f"train.max_steps={a.steps}", f"train.batch_size={a.batch}", f"train.lr={a.lr}",
            f"train.seq_len={a.seq_len}", "train.warmup_steps=5", "train.eval_every=0",
            f"train.checkpoint_every={a.steps}", f"lora.enabled={str(a.lora).lower()}",
            f"norm.max_replies={a.norm_replies}"]
    t0 = time.time()
    rm.run(load_config(RMConfig, None, sets), a.out / "rm")
    minutes = (time.time() - t0) / 60
    res = evaluate(str(a.out / "rm"), str(a.out / "heldout.jsonl"), a.out / "rm" / "eval")
    lo, hi = wilson_interval(res["accuracy"] * res["pairs"], res["pairs"])
    summary = {"model": a.model, "lora": a.lora, "train_pairs_seen": a.steps * a.batch, "train_minutes": round(minutes, 1),
               "heldout_pairs": res["pairs"], "accuracy": res["accuracy"], "ci95": [lo, hi],
               "by_source": res["by_source"]}
    (a.out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
