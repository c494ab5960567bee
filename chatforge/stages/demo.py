"""`chatforge demo`: the recipe on embedded data, CPU only, no people, with measured results.

Stages run today: prepare the embedded corpus → train a tokenizer → pretrain a small Llama →
SFT on task-suite demonstrations plus human demonstrations → sample K replies per prompt as
ranking tasks → evaluate held-out task accuracy of the pretrained vs the SFT model.
(Reward model, PPO and later rounds join this demo as those stages land.)

Everything lands under OUT (default runs/demo/); each stage is a run dir, and re-running the demo
resumes or skips stages that already finished.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from chatforge.config import PretrainConfig, SFTConfig, load_config
from chatforge.core.log import console, print0
from chatforge.core.run import read_manifest


@dataclass
class DemoSizes:
    depth: int
    pretrain_steps: int
    sft_steps: int
    demos_per_family: int
    eval_per_family: int
    sample_prompts_per_family: int
    k: int
    seq_len: int
    batch_size: int


FULL = DemoSizes(depth=4, pretrain_steps=200, sft_steps=500, demos_per_family=400, eval_per_family=25,
                 sample_prompts_per_family=4, k=4, seq_len=128, batch_size=16)
QUICK = DemoSizes(depth=1, pretrain_steps=20, sft_steps=30, demos_per_family=20, eval_per_family=3,
                  sample_prompts_per_family=1, k=2, seq_len=64, batch_size=8)


def _done(run_dir: Path) -> bool:
    m = read_manifest(run_dir) if run_dir.exists() else None
    return bool(m and m.get("status") == "completed")


def _stage(title: str) -> None:
    console.rule(f"[bold]{title}")


def run(out: Path, quick: bool = False) -> dict:
    from chatforge.data.corpus import PrepareConfig, prepare
    from chatforge.stages import pretrain, sample, sft
    from chatforge.stages.evaluate import generate_replies, task_accuracy

    sizes = QUICK if quick else FULL
    out = Path(out)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    _stage("1/5 prepare the embedded corpus (clean, dedup, split, tokenizer, shards)")
    t = time.perf_counter()
    data_dir = out / "data"
    if not (data_dir / "meta.json").exists():
        report = prepare(None, data_dir, PrepareConfig(vocab_size=2048 if quick else 4096))
        print0(f"kept {report.get('kept', '?')} documents; tokens {report.get('tokens', {})}")
    timings["prepare"] = time.perf_counter() - t

    _stage("2/5 pretrain a small Llama on the corpus")
    t = time.perf_counter()
    base = out / "base"
    if not _done(base):
        cfg = load_config(PretrainConfig, None, [
            f"data.dir={data_dir}", f"model.depth={sizes.depth}", f"train.max_steps={sizes.pretrain_steps}",
            f"train.seq_len={sizes.seq_len}", f"model.max_seq_len={max(256, sizes.seq_len)}",
            f"train.batch_size={sizes.batch_size}", f"train.checkpoint_every={max(10, sizes.pretrain_steps // 2)}",
            f"train.eval_every={max(10, sizes.pretrain_steps // 2)}", "train.warmup_steps=10"])
        pretrain.run(cfg, base)
    timings["pretrain"] = time.perf_counter() - t

    _stage("3/5 supervised fine-tuning on demonstrations (task suite + human-written)")
    t = time.perf_counter()
    sft_dir = out / "sft"
    if not _done(sft_dir):
        cfg = load_config(SFTConfig, None, [
            f"train.max_steps={sizes.sft_steps}", f"train.seq_len={sizes.seq_len}",
            f"train.batch_size={sizes.batch_size}", f"train.checkpoint_every={max(10, sizes.sft_steps // 2)}",
            f"train.eval_every={max(10, sizes.sft_steps // 2)}", "train.lr=2e-3", "train.warmup_steps=20"])
        cfg.model = str(base)
        cfg.data.paths = [f"tasks:{sizes.demos_per_family}"]
        sft.run(cfg, sft_dir)
    timings["sft"] = time.perf_counter() - t

    _stage("4/5 sample K replies per prompt (ranking tasks for labelers)")
    t = time.perf_counter()
    tasks_path = out / "round1" / "tasks.jsonl"
    sample.run(str(sft_dir), f"tasks:{sizes.sample_prompts_per_family}:1", tasks_path,
               sample.SampleConfig(k=sizes.k, temperature=1.0, max_new_tokens=24, seed=0))
    timings["sample"] = time.perf_counter() - t

    _stage("5/5 evaluate: held-out task accuracy, pretrained vs SFT")
    t = time.perf_counter()
    from chatforge.core.model import load_model_and_tokenizer
    from chatforge.data.tasks import heldout_prompts

    heldout = heldout_prompts(sizes.eval_per_family, seed=1)
    results = {}
    for name, d in (("pretrained", base), ("sft", sft_dir)):
        model, tok, _ = load_model_and_tokenizer(str(d))
        model.eval()
        replies, _ = generate_replies(model, tok, heldout, max_new_tokens=24)
        results[name] = task_accuracy(heldout, replies)
        results[name]["_examples"] = [{"prompt": p["messages"][-1]["content"], "reply": r}
                                      for p, r in list(zip(heldout, replies))[:: max(1, len(heldout) // 6)]]
    timings["eval"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start

    from rich.table import Table

    table = Table(title="held-out task accuracy (greedy)")
    table.add_column("family")
    table.add_column("pretrained", justify="right")
    table.add_column("SFT", justify="right")
    for fam in results["sft"]:
        if fam.startswith("_"):
            continue
        table.add_row(fam, f"{results['pretrained'][fam]['accuracy']:.2f}", f"{results['sft'][fam]['accuracy']:.2f}")
    console.print(table)
    for ex in results["sft"]["_examples"]:
        console.print(f"  [dim]{ex['prompt']!r}[/dim] → {ex['reply']!r}")
    summary = {"out": str(out), "quick": quick, "timings_s": {k: round(v, 1) for k, v in timings.items()},
               "accuracy": {k: {f: v for f, v in r.items() if not f.startswith("_")} for k, r in results.items()},
               "examples": results["sft"]["_examples"], "artifacts": {
                   "data": str(data_dir), "pretrained": str(base / "model"), "sft": str(sft_dir / "model"),
                   "ranking_tasks": str(tasks_path)}}
    (out / "demo.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    console.print("artifacts: " + ", ".join(f"{k}={v}" for k, v in summary["artifacts"].items()))
    console.print(f"demo finished in {timings['total'] / 60:.1f} min; summary in {out / 'demo.json'}")
    return summary
