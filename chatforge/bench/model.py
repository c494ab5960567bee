"""`chatforge bench model --model NAME`: the engine, SFT, RM and PPO steps on a real pretrained model.

The other benches use the tiny from-scratch Llama so that they can run side by side with a peer; this
one measures what a user of a real base model gets (default: the built-in SmolLM2-135M-Instruct):

- generation: the engine (eager and compile=True) vs `transformers.generate` at batch 8 and 32
  (`bench.generate`, same prompts and sampling, alternated);
- SFT step, full fine-tuning and LoRA: tokens/s and MFU (packed task-suite + OpenAssistant
  demonstrations rendered with the model's own chat template);
- reward-model step (LoRA trunk + score head, K-wise, K=4): pairs/s, tokens/s and MFU;
- PPO iteration (LoRA policy, value head on the policy's trunk, LoRA RM): seconds per iteration.

MFU counts 6·N FLOPs per trained token for full fine-tuning (forward 2N, backward 4N) and 4·N for
LoRA (no weight gradients for the frozen N; the adapters' own FLOPs are negligible), plus attention
(`core.model.flops_per_token`); N excludes the embedding table unless it is tied to the LM head. The
peak is a measured fp32 GEMM rate on this machine.
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from chatforge.bench.common import machine, matmul_peak, peak_rss_mb, print_table

DEFAULT_MODEL = "smollm2-135m-instruct"


def _sft_examples(tok: Any, seq_len: int, n_per_family: int) -> list:
    from chatforge.data.sft_data import load_conversations, render_examples

    convs = load_conversations([f"tasks:{n_per_family}", "embedded:sft/oasst-best:64"])
    return render_examples(tok, convs, seq_len)[0]


def bench_sft(model: Any, tok: Any, seq_len: int, batch: int, steps: int, warmup: int, lora: bool,
              n_per_family: int) -> dict:
    from chatforge.bench.sft import bench_chatforge
    from chatforge.config import LoraConfig
    from chatforge.core.model import apply_lora

    m = copy.deepcopy(model)
    if lora:
        m = apply_lora(m, LoraConfig(enabled=True))
    return bench_chatforge(m, tok, _sft_examples(tok, seq_len, n_per_family), batch, seq_len, steps, warmup,
                           "cpu" if not torch.cuda.is_available() else "cuda", None, 1e-4)


def bench_rm(model_dir: Path, batch_prompts: int, k: int, prompt_len: int, reply_len: int, steps: int,
             warmup: int) -> dict:
    from chatforge.bench.rm import bench_chatforge, make_comparisons
    from chatforge.config import LoraConfig
    from chatforge.core.model import apply_lora, flops_per_token
    from chatforge.stages.rm import init_reward_model

    rm, tok, _ = init_reward_model(str(model_dir), seed=0)
    flops = flops_per_token(rm, prompt_len + reply_len)  # no LM head: the trunk's matmuls only
    rm = apply_lora(rm, LoraConfig(enabled=True), task_type="SEQ_CLS")
    # ordinary token ids: specials sit at the low end, and a pad the RM added sits at the very end
    high = tok.pad_token_id if tok.pad_token_id >= len(tok) - 1 else len(tok)
    examples = make_comparisons(batch_prompts * (warmup + steps), k, prompt_len, reply_len, high,
                                low=min(100, high // 2))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    res = bench_chatforge(rm, examples, batch_prompts, steps, warmup, device, None, 1e-4, pad_id=tok.pad_token_id)
    res["tokens_per_sec"] = res["pairs_per_sec"] / (k * (k - 1) / 2) * k * (prompt_len + reply_len)
    res["train_flops_per_token"] = flops
    return res


def bench_ppo(model_dir: Path, work: Path, batch: int, reply_len: int, steps: int, warmup: int) -> dict:
    """The real PPO stage, LoRA policy + shared value head, a LoRA-trained RM on the same trunk."""
    from chatforge.config import LogConfig, PPOConfig, load_config
    from chatforge.core.log import console
    from chatforge.stages.ppo import run as ppo_run
    from chatforge.stages.rm import RewardNorm, init_reward_model, save_reward_model

    rm_dir = work / "rm"
    if not rm_dir.exists():
        rm, tok, _ = init_reward_model(str(model_dir), seed=0)
        save_reward_model(rm, tok, RewardNorm(mean=0.0, std=1.0, n=0, policy=""), rm_dir)
        del rm
    cfg = load_config(PPOConfig, None, [
        f"train.max_steps={warmup + steps}", f"train.batch_size={batch}", "train.checkpoint_every=0",
        "train.lr=1e-4", f"rollout.max_new_tokens={reply_len}", "ppo.epochs=1", f"ppo.minibatch_size={batch // 2}",
        "lora.enabled=true", "critic.shared=true", f"rollout.forward_batch_size={batch}"])
    cfg.policy, cfg.reward, cfg.prompts = str(model_dir), str(rm_dir), "tasks:4"
    cfg.log = LogConfig(tensorboard=False, progress=False)
    out = work / "ppo"
    with console.capture():
        ppo_run(cfg, out, resume=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    times = {r["step"]: r["time"] for r in rows}
    dt = times[warmup + steps] - times[warmup]
    timed = [r for r in rows if r["step"] > warmup]
    return {"seconds_per_iteration": dt / steps, "batch": batch, "reply_tokens_max": reply_len,
            "mean_reply_tokens": sum(r["ppo/reply_length"] for r in timed) / len(timed)}


def run(quick: bool = False, model_path: str | None = None, batch: int | None = None, threads: int = 2,
        seq_len: int = 256) -> dict:
    """All four measurements on one model; returns the JSON result."""
    from chatforge.bench import generate as gen_bench
    from chatforge.core.model import (
        count_params,
        flops_per_token,
        load_model_and_tokenizer,
        resolve_model_path,
    )

    torch.set_num_threads(threads)
    spec = model_path or DEFAULT_MODEL
    model_dir = resolve_model_path(spec)
    model, tok, _ = load_model_and_tokenizer(spec)
    n_params = count_params(model)
    sft_batch = batch or (2 if quick else 8)
    steps, warmup = (1, 1) if quick else (3, 1)
    if quick:
        seq_len = min(seq_len, 128)
    res: dict[str, Any] = {"bench": "model", "machine": machine(), "model": spec, "params": n_params,
                           "dtype": "float32", "threads": threads}
    peak = matmul_peak()
    res["fp32_matmul_peak_gflops"] = round(peak / 1e9, 1)
    flops = flops_per_token(model, seq_len)  # forward + backward, full fine-tuning (6N + attention)

    # generation
    res["generate"] = {}
    for b in ([2] if quick else [8, 32]):
        g = gen_bench.run(model_path=str(model_dir), batch=b, new_tokens=16 if quick else 64,
                          repeats=1 if quick else 2, threads=threads)
        res["generate"][f"batch_{b}"] = {k: g[k] for k in (
            "hf_tokens_per_sec", "chatforge_tokens_per_sec", "speedup", "compiled_tokens_per_sec",
            "speedup_compiled", "compile_s")}

    # SFT: full and LoRA
    for name, lora, mult in (("sft_full", False, 1.0), ("sft_lora", True, 4 / 6)):
        r = bench_sft(model, tok, seq_len, sft_batch, steps, warmup, lora, 2 if quick else 20)
        r["mfu"] = r["tokens_per_sec"] * flops * mult / peak
        res[name] = r

    # reward model (LoRA) and PPO (LoRA)
    k, plen, rlen = 4, (32 if quick else 96), (16 if quick else 32)
    r = bench_rm(model_dir, 1 if quick else 2, k, plen, rlen, steps, warmup)
    r["mfu"] = r["tokens_per_sec"] * r["train_flops_per_token"] * (4 / 6) / peak
    res["rm_lora"] = r
    with tempfile.TemporaryDirectory() as tmp:
        res["ppo_lora"] = bench_ppo(model_dir, Path(tmp), 2 if quick else 8, 8 if quick else 32, steps, warmup)
    res["peak_rss_mb"] = round(peak_rss_mb(), 1)

    rows = [("model", f"{spec} ({n_params / 1e6:.1f}M params, fp32, {threads} threads)"),
            ("fp32 matmul peak", f"{res['fp32_matmul_peak_gflops']:.0f} GFLOP/s")]
    for key, g in res["generate"].items():
        rows.append((f"generate {key.replace('_', ' ')}", f"HF {g['hf_tokens_per_sec']:,.0f} | engine "
                     f"{g['chatforge_tokens_per_sec']:,.0f} ({g['speedup']:.2f}x) | compiled "
                     f"{g['compiled_tokens_per_sec']:,.0f} ({g['speedup_compiled']:.2f}x) tok/s"))
    for key in ("sft_full", "sft_lora"):
        rows.append((key.replace("_", " "), f"{res[key]['tokens_per_sec']:,.0f} tok/s, MFU {res[key]['mfu']:.1%}"))
    rows.append(("rm (LoRA, K=4)", f"{res['rm_lora']['pairs_per_sec']:.2f} pairs/s, "
                                   f"{res['rm_lora']['tokens_per_sec']:,.0f} tok/s, MFU {res['rm_lora']['mfu']:.1%}"))
    rows.append(("ppo iteration (LoRA)", f"{res['ppo_lora']['seconds_per_iteration']:.1f} s "
                                         f"(batch {res['ppo_lora']['batch']}, <= {res['ppo_lora']['reply_tokens_max']} "
                                         "new tokens)"))
    print_table("chatforge bench model", rows)
    return res
