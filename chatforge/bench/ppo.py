"""`chatforge bench ppo`: PPO iterations/s, chatforge's PPO stage vs TRL 1.12's PPOTrainer.

Both sides load the same models from a temp dir: a ~7M-parameter random-init Llama policy (depth 4,
width 256, a 4096-token BPE trained here on task-suite + oasst text), the frozen reference (the same
weights), and a 1-label Llama sequence classifier sharing the policy's trunk as the reward model (the
value model/critic starts from it on both sides, as in InstructGPT and TRL's examples). Prompts are the
task-suite train prompts rendered by chatforge's chat template; both sides get the same token ids.
One iteration: rollout of `batch` prompts (sampling, temperature 1, up to `reply_len` new tokens,
stop at the end-of-turn token), log-probs, reference log-probs, values, RM scores (minus 1.0 for
replies without an end of turn), k1 KL penalty 0.05, GAE (gamma 1, lambda 0.95), then `epochs` x
`minibatches` optimizer steps (clipped policy + 0.1 x clipped value loss). fp32, `threads` threads.

- chatforge: the real stage, `chatforge.stages.ppo.run`, with log_every=1; iteration time is the gap
  between metrics.jsonl timestamps after `warmup` iterations (so model loading is not counted).
- TRL 1.12.0 `trl.experimental.ppo.PPOTrainer` (TRL 1.16 no longer ships it) in its own venv,
  benchmarks/trl112/.venv (`bash benchmarks/trl112/setup.sh`), as a subprocess running
  benchmarks/trl112/run_ppo.py; timed between `on_step_end` callbacks after the same warm-up.
Runs alternate (chatforge, TRL, repeated `rounds` times); the best round of each is reported.
Without the TRL venv only chatforge runs and the result says why.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from chatforge.bench.common import machine, peak_rss_mb, print_table
from chatforge.config import LogConfig, ModelConfig, PPOAlgoConfig, PPOConfig, RolloutConfig, TrainConfig
from chatforge.core.model import build_model, count_params, save_model
from chatforge.core.tokenizer import end_of_turn_id, render_for_completion

TRL_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "trl112"
TRL_PYTHON = TRL_DIR / ".venv" / "bin" / "python"


def make_workdir(work: Path, depth: int, vocab: int, seq_len: int, n_per_family: int, reply_len: int) -> dict:
    """Save policy/, rm/ and prompts.json under `work`; returns facts about them."""
    from transformers import LlamaForSequenceClassification

    from chatforge.bench.sft import conversation_texts
    from chatforge.core.tokenizer import train_tokenizer
    from chatforge.data.sft_data import load_conversations
    from chatforge.stages.sample import load_prompts

    convs = load_conversations([f"tasks:{n_per_family}", "embedded:sft/oasst-best"])
    tok = train_tokenizer(conversation_texts(convs), vocab, work / "tokenizer")
    policy = build_model(ModelConfig(depth=depth, max_seq_len=seq_len), tok, seed=0)
    save_model(policy, tok, work / "policy")
    cfg = policy.config.__class__.from_dict(policy.config.to_dict())
    cfg.num_labels, cfg.pad_token_id, cfg.architectures = 1, tok.pad_token_id, None
    torch.manual_seed(1)
    rm = LlamaForSequenceClassification(cfg)
    rm.model.load_state_dict(policy.model.state_dict())  # RM = policy trunk + a fresh score head
    save_model(rm, tok, work / "rm")

    spec = f"tasks:{n_per_family}"
    prompts = load_prompts(spec)
    ids = [render_for_completion(tok, p["messages"]) for p in prompts]
    ids = [x for x in ids if len(x) + reply_len <= seq_len]  # what chatforge's prepare_prompts keeps
    (work / "prompts.json").write_text(json.dumps({"prompt_ids": ids, "stop_token_id": end_of_turn_id(tok)}),
                                       encoding="utf-8")
    return {"params": count_params(policy), "rm_params": count_params(rm), "prompts": len(ids), "prompt_spec": spec,
            "mean_prompt_tokens": sum(map(len, ids)) / len(ids), "vocab": len(tok)}


def bench_chatforge(work: Path, prompt_spec: str, batch: int, minibatches: int, epochs: int, reply_len: int,
                    steps: int, warmup: int, threads: int, lr: float) -> dict:
    """Run the real PPO stage; iterations/s from the metrics.jsonl timestamps after warm-up."""
    from chatforge.core.log import console
    from chatforge.stages.ppo import run as ppo_run

    cfg = PPOConfig(
        policy=str(work / "policy"), reward=str(work / "rm"), prompts=prompt_spec,
        train=TrainConfig(max_steps=warmup + steps, lr=lr, warmup_steps=0, schedule="constant", batch_size=batch,
                          checkpoint_every=0, eval_every=0, log_every=1, weight_decay=0.0, threads=threads,
                          dtype="float32", seed=0),
        rollout=RolloutConfig(max_new_tokens=reply_len, temperature=1.0, forward_batch_size=batch),
        ppo=PPOAlgoConfig(epochs=epochs, minibatch_size=batch // minibatches),
        log=LogConfig(tensorboard=False, progress=False),
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        with console.capture():  # the per-iteration lines would drown the table
            ppo_run(cfg, out, resume=False)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    times = {r["step"]: r["time"] for r in rows}
    dt = times[warmup + steps] - times[warmup]
    timed = [r for r in rows if r["step"] > warmup]
    return {"steps_per_sec": steps / dt, "step_ms": 1000 * dt / steps,
            "reply_tokens_per_step": sum(r["ppo/reply_length"] for r in timed) / len(timed) * batch,
            "eot_rate": sum(r["ppo/eot_rate"] for r in timed) / len(timed)}


def bench_trl(work: Path, batch: int, minibatches: int, epochs: int, reply_len: int, steps: int, warmup: int,
              threads: int, lr: float) -> dict:
    """TRL 1.12 in its own venv, as a subprocess; raises RuntimeError with its stderr tail on failure."""
    cmd = [str(TRL_PYTHON), str(TRL_DIR / "run_ppo.py"), "--workdir", str(work), "--steps", str(steps),
           "--warmup", str(warmup), "--batch", str(batch), "--minibatches", str(minibatches), "--epochs", str(epochs),
           "--response-length", str(reply_len), "--threads", str(threads), "--lr", str(lr)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"TRL 1.12 runner failed (exit {p.returncode}): {p.stderr.strip()[-2000:]}")
    return json.loads(lines[-1])


def run(quick: bool = False, depth: int = 4, batch: int = 8, minibatches: int = 2, epochs: int = 1,
        reply_len: int = 32, seq_len: int = 256, vocab: int = 4096, n_per_family: int = 20, steps: int = 6,
        warmup: int = 2, rounds: int = 2, threads: int = 2, lr: float = 1e-5) -> dict:
    """PPO iterations/s of chatforge and TRL 1.12 on identical models, prompts and settings."""
    if quick:
        depth, batch, reply_len, seq_len, vocab, n_per_family, steps, warmup, rounds = 1, 4, 8, 128, 512, 3, 1, 1, 1
    if threads > 0:
        torch.set_num_threads(threads)
    res: dict[str, Any] = {
        "bench": "ppo", "machine": machine(), "depth": depth, "batch": batch, "minibatches": minibatches,
        "epochs": epochs, "reply_len": reply_len, "dtype": "float32", "steps": steps, "warmup": warmup,
        "rounds": rounds, "unit": "PPO iterations (rollout + update of one batch) per second",
    }
    have_trl = TRL_PYTHON.exists()
    cf_runs: list[dict] = []
    trl_runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        res.update(make_workdir(work, depth, vocab, seq_len, n_per_family, reply_len))
        for _ in range(rounds):
            cf_runs.append(bench_chatforge(work, res["prompt_spec"], batch, minibatches, epochs, reply_len, steps,
                                           warmup, threads, lr))
            if have_trl:
                try:
                    trl_runs.append(bench_trl(work, batch, minibatches, epochs, reply_len, steps, warmup, threads, lr))
                except RuntimeError as e:
                    res["trl_error"] = str(e)
                    have_trl = False
    res["chatforge"] = max(cf_runs, key=lambda r: r["steps_per_sec"])
    res["chatforge"]["rounds_steps_per_sec"] = [r["steps_per_sec"] for r in cf_runs]
    if trl_runs:
        res["trl"] = max(trl_runs, key=lambda r: r["steps_per_sec"])
        res["trl"]["rounds_steps_per_sec"] = [r["steps_per_sec"] for r in trl_runs]
        res["speedup_vs_trl"] = res["chatforge"]["steps_per_sec"] / res["trl"]["steps_per_sec"]
    else:
        res["trl"], res["speedup_vs_trl"] = None, None
        res["note"] = res.get("trl_error") or (f"TRL 1.12 venv not found at {TRL_PYTHON}: run "
                                               "`bash benchmarks/trl112/setup.sh` for the side-by-side")
    res["peak_rss_mb"] = round(peak_rss_mb(), 1)
    _print(res)
    return res


def _print(res: dict) -> None:
    cf = res["chatforge"]
    rows = [("policy / RM params", f"{res['params'] / 1e6:.2f}M / {res['rm_params'] / 1e6:.2f}M"),
            ("batch / minibatches / epochs", f"{res['batch']} / {res['minibatches']} / {res['epochs']}"),
            ("reply tokens (max)", str(res["reply_len"])),
            ("chatforge ppo", f"{cf['steps_per_sec']:.3f} it/s ({cf['step_ms']:.0f} ms/it)")]
    if res["trl"]:
        rows += [(f"TRL {res['trl']['trl_version']} PPOTrainer",
                  f"{res['trl']['steps_per_sec']:.3f} it/s ({res['trl']['step_ms']:.0f} ms/it)"),
                 ("speedup", f"{res['speedup_vs_trl']:.2f}x")]
    else:
        rows.append(("TRL 1.12", res["note"][:200]))
    print_table("chatforge bench ppo", rows)


if __name__ == "__main__":  # python -m chatforge.bench.ppo [--quick]
    print(json.dumps(run(quick="--quick" in sys.argv), default=str))
