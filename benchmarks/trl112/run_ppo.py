"""The TRL 1.12 side of `chatforge bench ppo`: PPOTrainer on models and prompts chatforge saved to disk.

Runs inside benchmarks/trl112/.venv (see setup.sh): TRL 1.12 still ships `trl.experimental.ppo.PPOTrainer`;
1.16, chatforge's pinned TRL, no longer does.
Prints one JSON line: steps/s over the timed PPO updates (each = rollout of `batch` prompts, reply of
`response_length` tokens, logprob/ref/value/reward passes, `epochs` x `minibatches` optimizer steps).

    benchmarks/trl112/.venv/bin/python benchmarks/trl112/run_ppo.py --workdir DIR [--steps 8 ...]

DIR holds policy/ (AutoModelForCausalLM + tokenizer), rm/ (1-label AutoModelForSequenceClassification)
and prompts.json ({"prompt_ids": [[...], ...], "stop_token_id": N}).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--minibatches", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--response-length", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--kl-coef", type=float, default=0.05)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    import torch

    if a.threads > 0:
        torch.set_num_threads(a.threads)
    import transformers
    import trl
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    work = Path(a.workdir)
    spec = json.loads((work / "prompts.json").read_text(encoding="utf-8"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(work / "policy", padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(work / "policy", dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(work / "policy", dtype=torch.float32)
    rm = AutoModelForSequenceClassification.from_pretrained(work / "rm", num_labels=1, dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(work / "rm", num_labels=1, dtype=torch.float32)
    data = Dataset.from_dict({"input_ids": spec["prompt_ids"]})

    stamps: list[float] = []

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001, ANN003
            if device == "cuda":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        args = PPOConfig(
            output_dir=tmp, per_device_train_batch_size=a.batch, gradient_accumulation_steps=1,
            num_mini_batches=a.minibatches, num_ppo_epochs=a.epochs, total_episodes=(a.warmup + a.steps) * a.batch,
            response_length=a.response_length, temperature=a.temperature, stop_token_id=spec["stop_token_id"],
            missing_eos_penalty=1.0, kl_coef=a.kl_coef, learning_rate=a.lr, lr_scheduler_type="constant",
            local_rollout_forward_batch_size=a.batch, num_sample_generations=0, report_to=[], save_strategy="no",
            logging_strategy="no", use_cpu=device == "cpu", bf16=False, seed=a.seed, dataloader_num_workers=0,
            disable_tqdm=True, gradient_checkpointing=False,
        )
        trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=rm,
                             value_model=value, train_dataset=data, eval_dataset=data, callbacks=[Timer()])
        trainer.train()
    dt = stamps[-1] - stamps[a.warmup - 1]
    print(json.dumps({"steps_per_sec": a.steps / dt, "step_ms": 1000 * dt / a.steps, "steps": a.steps,
                      "updates_run": len(stamps), "trl_version": trl.__version__,
                      "transformers_version": transformers.__version__, "torch_version": torch.__version__,
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
