"""`chatforge demo`: the whole ChatGPT recipe on embedded data, CPU only, no people, measured.

prepare the embedded corpus (clean, dedup, tokenizer, shards) → pretrain a small Llama → SFT on
task-suite demonstrations → rounds of: sample K replies → a simulated labeler panel ranks them →
reward model → PPO with a KL leash to SFT (`chatforge loop`) → held-out evaluation with the panel
as judge. Ends with a table: SFT vs each round on task accuracy, win rate with 95 % intervals, KL.

Everything lands under OUT (default runs/demo/); each stage is a run dir, and re-running the demo
resumes or skips stages that already finished. `--quick` uses tiny sizes (what the tests run).

`--base MODEL` (e.g. smollm2-135m-instruct) is the transfer-learning version: no corpus or pretraining;
LoRA SFT of that chat model on task-suite plus embedded human demonstrations → one round of sample K →
panel → LoRA reward model → PPO (LoRA policy, value head on the policy's trunk) → eval against the SFT
model and against the untouched base.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
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
    human_demos: int = 0
    """Embedded OpenAssistant demonstrations added to the task-suite ones (the --base demo)."""
    chat_demos: int = 0
    """Embedded HH-RLHF `chosen` dialogues added too: general chat, so SFT on terse task demos does not cost the
    base model its conversational replies (the alignment tax; BENCHMARKS.md, session 14)."""
    sft_lr: float = 2e-3
    rm_lr: float = 3e-4
    rm_warmup: int = 20
    rm_batch: int = 8
    kl_coef: float = 0.05
    lora: bool = False
    """LoRA for SFT, RM and PPO (policy; the value head sits on the policy's trunk), as for a real base model."""
    ptx_coef: float = 0.0
    """PPO-ptx on the SFT mix's general-chat demonstrations (`ptx.demos`): the RL round's LM term that keeps the
    held-out loss on human replies at the base's (the alignment tax of RL; BENCHMARKS.md, session 15)."""
    ptx_batch: int = 2
    """Packed demonstration rows in each policy minibatch's ptx term."""
    rl: tuple[str, ...] = ()
    """Extra --set overrides for the RL stage (e.g. RLOO with the gold validation checkpoint)."""
    report_bias: bool = True


FULL = DemoSizes(depth=4, pretrain_steps=200, sft_steps=500, demos_per_family=400, eval_per_family=25,
                 sample_prompts_per_family=16, k=4, seq_len=128, batch_size=16)
QUICK = DemoSizes(depth=1, pretrain_steps=20, sft_steps=30, demos_per_family=20, eval_per_family=2,
                  sample_prompts_per_family=2, k=2, seq_len=64, batch_size=8, rm_steps=4, ppo_steps=2,
                  ppo_batch=4, ppo_prompts_per_family=1, reply_tokens=8)
# SmolLM2-135M-Instruct on 2 CPU cores: sized to finish in well under an hour (BENCHMARKS.md has the run)
# RL = RLOO (K 4 samples per prompt, leave-one-out baseline, no critic) on normalised RM scores, with the gold
# validation monitor keeping the best-gold checkpoint: the recipe that beat SFT in BENCHMARKS.md (session 6)
# validation = the eval's primary decoding (2 samples per prompt at the rollouts' T 1, paired seeds) on 64 prompts:
# greedy replies on 32 picked a step-48 checkpoint that lost on the test prompts (session 9)
RLOO_GOLD = ("ppo.samples_per_prompt=4", "ppo.baseline=rloo", "ppo.normalise_scores=true", "gold.spec=rule",
             "gold.every=8", "gold.prompts=tasks-heldout:8:977", "gold.samples=2", "gold.temperature=1.0")
# 24 RLOO iterations (384 episodes): the validation gold peaked at iteration 16 or 24 in every run (BENCHMARKS.md),
# and 32 SFT steps (2.4 epochs of the mix): what fits the 45-minute budget on 2 cores
BASE = DemoSizes(depth=0, pretrain_steps=0, sft_steps=32, demos_per_family=40, eval_per_family=25,
                 sample_prompts_per_family=40, k=4, seq_len=256, batch_size=8, rounds=1, rm_steps=60,
                 ppo_steps=24, ppo_batch=16, ppo_prompts_per_family=16, ppo_lr=1e-4, reply_tokens=32,
                 human_demos=32, chat_demos=64, sft_lr=5e-4, rm_lr=1e-3, rm_warmup=4, lora=True, rl=RLOO_GOLD,
                 ptx_coef=0.5, report_bias=False)
# with a GPU the same recipe gets the budget RL needs (thousands of PPO episodes, a better-fed RM)
BASE_GPU = replace(BASE, sft_steps=200, demos_per_family=200, human_demos=95, chat_demos=400,
                   sample_prompts_per_family=200,
                   rm_steps=400, ppo_steps=300, ppo_batch=64, ppo_prompts_per_family=200, ppo_lr=5e-5,
                   kl_coef=0.1, eval_per_family=50)
BASE_QUICK = DemoSizes(depth=0, pretrain_steps=0, sft_steps=6, demos_per_family=4, eval_per_family=1,
                       sample_prompts_per_family=2, k=2, rm_batch=2, seq_len=128, batch_size=4, rounds=1, rm_steps=2,
                       ppo_steps=2, ppo_batch=4, ppo_prompts_per_family=1, reply_tokens=8, human_demos=2, chat_demos=2,
                       ptx_coef=0.5, ptx_batch=1,
                       sft_lr=1e-3, lora=True, rl=("ppo.samples_per_prompt=2", "ppo.baseline=rloo",
                                                   "ppo.normalise_scores=true", "gold.spec=rule", "gold.every=1",
                                                   "gold.prompts=tasks-heldout:1:977"))


def _evaluated_kl(round_dir: Path) -> float | None:
    """KL to the reference of the round's evaluated checkpoint (the best-gold one when kept), re-measured on the
    eval prompts by its report; the run's final KL would describe the last iterate instead."""
    path = round_dir / "report" / "report.json"
    if not path.exists():
        return None
    models = json.loads(path.read_text(encoding="utf-8")).get("models", {})
    return next((m["kl"]["eval"] for m in models.values() if (m.get("kl") or {}).get("eval") is not None), None)


def _general_table(report_path: Path) -> dict:
    """Print the last round's general-chat section (open prompts outside the task suite: the alignment tax) and
    return it per model: held-out loss on human replies, general utility, distinct-2, repetition."""
    if not report_path.exists():
        return {}
    from rich.table import Table

    rep = json.loads(report_path.read_text(encoding="utf-8"))
    models = {lab: r["general"] for lab, r in rep["models"].items() if r.get("general")}
    if not models:
        return {}
    table = Table(title=f"general chat: {rep['general']['n']} held-out human-written conversations outside the task "
                        "suite (95% CI)")
    for col in ("model", "held-out loss on human replies", "general utility (rule)", "distinct-2", "repetition"):
        table.add_column(col, justify="left" if col == "model" else "right")

    def ci(v: dict) -> str:
        return f"{v['mean']:.3f} ({v['lo']:.3f}-{v['hi']:.3f})" if v.get("mean") is not None else "-"

    for lab, g in reversed(list(models.items())):  # base, SFT, ..., the round's policy
        table.add_row(lab, ci(g["loss"]), ci(g["utility"]), ci(g["distinct_2"]), ci(g["repetition"]))
    console.print(table)
    return {lab: {k: {x: g[k].get(x) for x in ("mean", "lo", "hi")} for k in ("loss", "utility", "distinct_2",
                                                                          "repetition")}
            for lab, g in models.items()} | {"delta": rep["general"]["delta"]}


def _chat_demos(sizes: DemoSizes) -> list[str]:
    """The general-chat demonstrations mixed into SFT beside the task suite's (and PPO-ptx's data)."""
    return [*([f"embedded:sft/oasst-best:{sizes.human_demos}"] if sizes.human_demos else []),
            *([f"embedded:sft/hh-chosen:{sizes.chat_demos}"] if sizes.chat_demos else [])]


def _ptx_sets(sizes: DemoSizes) -> list[str]:
    """PPO-ptx on the general-chat demonstrations SFT mixed in."""
    demos = _chat_demos(sizes)
    if not (sizes.ptx_coef and demos):
        return []
    return [f"ptx.coef={sizes.ptx_coef}", f"ptx.demos={','.join(demos)}", f"ptx.seq_len={sizes.seq_len}",
            f"ptx.batch_size={sizes.ptx_batch}"]


def _done(run_dir: Path) -> bool:
    m = read_manifest(run_dir) if run_dir.exists() else None
    return bool(m and m.get("status") == "completed")


def _stage(title: str) -> None:
    console.rule(f"[bold]{title}")


def _pretrain(out: Path, sizes: DemoSizes, quick: bool, timings: dict[str, float]) -> Path:
    """Steps 1-2 of the from-scratch demo: the embedded corpus prepared, a small Llama pretrained on it."""
    from chatforge.data.corpus import PrepareConfig, prepare
    from chatforge.stages import pretrain

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
    return base


def run(out: Path, quick: bool = False, base: str | None = None) -> dict:
    """The whole recipe into `out`; `base` = a pretrained chat model to start from instead of pretraining."""
    import torch

    from chatforge.stages import sft

    gpu = torch.cuda.is_available()
    sizes = (BASE_QUICK if quick else BASE_GPU if gpu else BASE) if base else (QUICK if quick else FULL)
    out = Path(out)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    if base:
        from chatforge.core.model import resolve_model_path

        _stage(f"1-2/5 start from the pretrained chat model {base} (no corpus, no pretraining)")
        start: str = str(resolve_model_path(base))
    else:
        start = str(_pretrain(out, sizes, quick, timings))
    lora = ["lora.enabled=true"] if sizes.lora else []

    _stage("3/5 supervised fine-tuning on demonstrations (task suite + human-written)")
    t = time.perf_counter()
    sft_dir = out / "sft"
    if not _done(sft_dir):
        cfg = load_config(SFTConfig, None, [
            f"train.max_steps={sizes.sft_steps}", f"train.seq_len={sizes.seq_len}",
            f"train.batch_size={sizes.batch_size}", f"train.checkpoint_every={max(10, sizes.sft_steps // 2)}",
            f"train.eval_every={max(10, sizes.sft_steps // 2)}", f"train.lr={sizes.sft_lr}",
            f"train.warmup_steps={min(20, sizes.sft_steps // 5)}", *lora])
        cfg.model = start
        cfg.data.paths = [f"tasks:{sizes.demos_per_family}", *_chat_demos(sizes)]
        sft.run(cfg, sft_dir)
    timings["sft"] = time.perf_counter() - t

    _stage("4/5 rounds of RLHF: sample K → simulated panel ranks → reward model → PPO")
    t = time.perf_counter()
    from chatforge.stages.loop import LoopConfig, rm_change_text
    from chatforge.stages.loop import run as run_loop

    lcfg = load_config(LoopConfig, None, [
        f"rounds={sizes.rounds}", f"prompts=tasks:{sizes.sample_prompts_per_family}", f"k={sizes.k}",
        f"sample_max_new_tokens={sizes.reply_tokens}", f"eval_max_new_tokens={sizes.reply_tokens}",
        f"eval_prompts=tasks-heldout:{sizes.eval_per_family}:1", f"algo_prompts=tasks:{sizes.ppo_prompts_per_family}",
        f"report_bias={str(sizes.report_bias).lower()}", f"eval_samples={0 if quick else 2}",
        f"report_general={4 if quick else 48}"])
    gold_prompts = next((x.split("=", 1)[1] for x in sizes.rl if x.startswith("gold.prompts=")),
                        "tasks-heldout:4:977" if any(x.startswith("gold.spec=") for x in sizes.rl) else None)
    lcfg.eval_exclude = gold_prompts
    lcfg.sft, lcfg.out = str(sft_dir), str(out / "loop")
    lcfg.baseline = start if base else None
    lcfg.rm_set = [f"train.max_steps={sizes.rm_steps}", f"train.batch_size={sizes.rm_batch}", f"train.seq_len={sizes.seq_len}",
                   "train.eval_every=0", f"train.checkpoint_every={sizes.rm_steps}", f"train.lr={sizes.rm_lr}",
                   f"train.warmup_steps={sizes.rm_warmup}", *lora,
                   # a real model costs ~100x more per token: train on each task's panel consensus once
                   *(["data.aggregate=bradley_terry"] if base else [])]
    rloo = "ppo.baseline=rloo" in sizes.rl
    lcfg.algo_set = [f"train.max_steps={sizes.ppo_steps}", f"train.batch_size={sizes.ppo_batch}",
                     f"train.checkpoint_every={sizes.ppo_steps}", f"train.lr={sizes.ppo_lr}",
                     f"rollout.max_new_tokens={sizes.reply_tokens}", f"ppo.kl_coef={sizes.kl_coef}", *lora,
                     *([f"ppo.minibatch_size={min(8, sizes.ppo_batch)}"] if rloo else
                       ["ppo.epochs=2", f"ppo.minibatch_size={max(2, sizes.ppo_batch // 2)}"]),
                     *(["critic.shared=true", "critic.lr=1e-3"] if sizes.lora and not rloo else []), *sizes.rl,
                     *_ptx_sets(sizes)]
    loop_summary = run_loop(lcfg)
    timings["rlhf_rounds"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start

    _stage("5/5 results: SFT vs each round on held-out prompts")
    from rich.table import Table

    def ci(wr: dict | None) -> str:
        if not wr:
            return "-"
        lo, hi = wr.get("ci_wilson") or wr["ci_bootstrap"]
        return f"{wr['win_rate']:.3f} ({lo:.3f}-{hi:.3f})"

    def gold(v: dict, decoding: str) -> dict | None:
        return v.get("gold", {}).get(decoding)

    table = Table(title="held-out task-suite prompts: gold = the panel's utility without noise (primary), "
                        "panel = the noisy labelers the RM learned from")
    cols = ["model", "task accuracy (greedy)", "gold win vs SFT, sampled (95% CI)", "gold win vs SFT, greedy",
            "panel win vs SFT, greedy", "own RM's score vs SFT, sampled (SFT stds, 95% CI)",
            "KL to SFT (eval)"] + ([f"gold win vs {Path(base).name}, sampled"] if base else [])
    for col in cols:
        table.add_column(col, justify="right" if col != "model" else "left")
    first = loop_summary["rounds"][0]
    rows = []
    if base:
        vb = first["sft_vs_baseline"]
        table.add_row(f"{Path(base).name} (untouched)", f"{vb['accuracy_baseline']['all']['accuracy']:.3f}",
                      "-", "-", "-", "-", "-", "-")
        rows.append({"model": base, "accuracy": vb["accuracy_baseline"]["all"]["accuracy"]})
    vb = first.get("sft_vs_baseline", {})
    table.add_row("SFT", f"{first['vs_sft']['accuracy_baseline']['all']['accuracy']:.3f}", "-", "-", "-", "0", "0",
                  *([ci(gold(vb, "sampled") or vb["win_rate"])] if base else []))
    rows.append({"model": "sft", "accuracy": first["vs_sft"]["accuracy_baseline"]["all"]["accuracy"],
                 **({"vs_base": vb} if base else {})})
    for res in loop_summary["rounds"]:
        v = res["vs_sft"]
        kl = _evaluated_kl(out / "loop" / f"round-{res['round']}")
        if kl is None:  # no report: the run's own KL over its last iterations
            kl = res["policy_metrics"].get("final_kl", res["policy_metrics"].get("objective/kl"))
        table.add_row(f"round {res['round']}" + (" (best-gold ckpt)" if str(res.get("policy", "")).endswith(
                          "best_gold") else ""), f"{v['accuracy_model']['all']['accuracy']:.3f}",
                      ci(gold(v, "sampled")), ci(gold(v, "greedy")), ci(v["win_rate"]),
                      rm_change_text(v["rm_score"]) if v.get("rm_score") else "-",
                      "-" if kl is None else f"{kl:.2f}",
                      *([ci(gold(res["vs_baseline"], "sampled") or res["vs_baseline"]["win_rate"])] if base else []))
        rows.append({"model": f"round-{res['round']}", "policy": res.get("policy"),
                     "accuracy": v["accuracy_model"]["all"]["accuracy"], "gold_sampled": gold(v, "sampled"),
                     "gold_greedy": gold(v, "greedy"), "win_rate_vs_sft": v["win_rate"]["win_rate"],
                     "ci": v["win_rate"]["ci_wilson"], "kl": kl, "rm_score": v.get("rm_score"), **({"vs_base": res["vs_baseline"]} if base else {})})
    console.print(table)
    general = _general_table(out / "loop" / f"round-{loop_summary['rounds'][-1]['round']}" / "report" / "report.json")
    curves = sorted((out / "loop").glob("round-*/report/curves-*-ppo.png"))
    if curves:
        console.print("gold and proxy against sqrt(KL) (over-optimisation): " + ", ".join(map(str, curves)))
    pretrained = start if base else str(Path(start) / "model")
    summary = {"out": str(out), "quick": quick, "base": base,
               "timings_s": {k: round(v, 1) for k, v in timings.items()}, "table": rows, "general": general,
               "artifacts": {
                   **({} if base else {"data": str(out / "data")}), "pretrained": pretrained,
                   "sft": str(sft_dir / "model"),
                   "rounds": [str(out / "loop" / f"round-{r['round']}") for r in loop_summary["rounds"]]}}
    (out / "demo.json").write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    console.print("artifacts: " + ", ".join(f"{k}={v}" for k, v in summary["artifacts"].items()))
    console.print(f"demo finished in {timings['total'] / 60:.1f} min; summary in {out / 'demo.json'}")
    return summary
