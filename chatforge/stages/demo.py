"""`chatforge demo`: the whole ChatGPT recipe on embedded data, CPU only, no people, measured.

prepare the embedded corpus (clean, dedup, tokenizer, shards) → pretrain a small Llama → SFT on
task-suite demonstrations → rounds of: sample K replies → a simulated labeler panel ranks them →
reward model → PPO with a KL leash to SFT (`chatforge loop`) → held-out evaluation with the panel
as judge. Ends with a table: SFT vs each round on task accuracy, win rate with 95 % intervals, KL.

Everything lands under OUT (default runs/demo/); each stage is a run dir, and re-running the demo
resumes or skips stages that already finished. `--quick` uses tiny sizes (what the tests run).
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
    rounds: int = 2
    rm_steps: int = 100
    ppo_steps: int = 20
    ppo_batch: int = 16
    ppo_prompts_per_family: int = 16
    ppo_lr: float = 1e-4
    reply_tokens: int = 24


FULL = DemoSizes(depth=4, pretrain_steps=200, sft_steps=500, demos_per_family=400, eval_per_family=25,
                 sample_prompts_per_family=16, k=4, seq_len=128, batch_size=16)
QUICK = DemoSizes(depth=1, pretrain_steps=20, sft_steps=30, demos_per_family=20, eval_per_family=2,
                  sample_prompts_per_family=2, k=2, seq_len=64, batch_size=8, rm_steps=4, ppo_steps=2,
                  ppo_batch=4, ppo_prompts_per_family=1, reply_tokens=8)


def _done(run_dir: Path) -> bool:
    m = read_manifest(run_dir) if run_dir.exists() else None
    return bool(m and m.get("status") == "completed")


def _stage(title: str) -> None:
    console.rule(f"[bold]{title}")


def run(out: Path, quick: bool = False) -> dict:
    from chatforge.data.corpus import PrepareConfig, prepare
    from chatforge.stages import pretrain, sft

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

    _stage("4/5 rounds of RLHF: sample K → simulated panel ranks → reward model → PPO")
    t = time.perf_counter()
    from chatforge.stages.loop import LoopConfig
    from chatforge.stages.loop import run as run_loop

    lcfg = load_config(LoopConfig, None, [
        f"rounds={sizes.rounds}", f"prompts=tasks:{sizes.sample_prompts_per_family}", f"k={sizes.k}",
        f"sample_max_new_tokens={sizes.reply_tokens}", f"eval_max_new_tokens={sizes.reply_tokens}",
        f"eval_prompts=tasks-heldout:{sizes.eval_per_family}:1", f"algo_prompts=tasks:{sizes.ppo_prompts_per_family}"])
    lcfg.sft, lcfg.out = str(sft_dir), str(out / "loop")
    lcfg.rm_set = [f"train.max_steps={sizes.rm_steps}", "train.batch_size=8", f"train.seq_len={sizes.seq_len}",
                   "train.eval_every=0", f"train.checkpoint_every={sizes.rm_steps}", "train.lr=3e-4"]
    lcfg.algo_set = [f"train.max_steps={sizes.ppo_steps}", f"train.batch_size={sizes.ppo_batch}",
                     f"train.checkpoint_every={sizes.ppo_steps}", f"train.lr={sizes.ppo_lr}",
                     f"rollout.max_new_tokens={sizes.reply_tokens}", "ppo.epochs=2",
                     f"ppo.minibatch_size={max(2, sizes.ppo_batch // 2)}", "ppo.kl_coef=0.05"]
    loop_summary = run_loop(lcfg)
    timings["rlhf_rounds"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start

    _stage("5/5 results: SFT vs each round on held-out prompts (simulated panel as judge)")
    from rich.table import Table

    table = Table(title="held-out task-suite prompts, greedy replies")
    for col in ("model", "task accuracy", "win rate vs SFT (95% CI)", "KL to SFT"):
        table.add_column(col, justify="right" if col != "model" else "left")
    first = loop_summary["rounds"][0]["vs_sft"]
    table.add_row("SFT", f"{first['accuracy_baseline']['all']['accuracy']:.3f}", "-", "0")
    rows = [{"model": "sft", "accuracy": first["accuracy_baseline"]["all"]["accuracy"]}]
    for res in loop_summary["rounds"]:
        v = res["vs_sft"]
        wr = v["win_rate"]
        kl = res["policy_metrics"].get("final_kl", res["policy_metrics"].get("objective/kl"))
        table.add_row(f"round {res['round']}", f"{v['accuracy_model']['all']['accuracy']:.3f}",
                      f"{wr['win_rate']:.2f} ({wr['ci_wilson'][0]:.2f}-{wr['ci_wilson'][1]:.2f})",
                      "-" if kl is None else f"{kl:.2f}")
        rows.append({"model": f"round-{res['round']}", "accuracy": v["accuracy_model"]["all"]["accuracy"],
                     "win_rate_vs_sft": wr["win_rate"], "ci": wr["ci_wilson"], "kl": kl})
    console.print(table)
    summary = {"out": str(out), "quick": quick, "timings_s": {k: round(v, 1) for k, v in timings.items()},
               "table": rows, "artifacts": {
                   "data": str(data_dir), "pretrained": str(base / "model"), "sft": str(sft_dir / "model"),
                   "rounds": [str(out / "loop" / f"round-{r['round']}") for r in loop_summary["rounds"]]}}
    (out / "demo.json").write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    console.print("artifacts: " + ", ".join(f"{k}={v}" for k, v in summary["artifacts"].items()))
    console.print(f"demo finished in {timings['total'] / 60:.1f} min; summary in {out / 'demo.json'}")
    return summary
