"""`chatforge bench rm`: reward-model training throughput, chatforge's K-wise step vs TRL's RewardTrainer.

Both train the same ~7M-parameter Llama sequence classifier (depth 4, width 256, vocab 4096, random
init, identical starting weights) on the same synthetic comparisons: P prompts x K=4 replies, prompt
and reply lengths fixed so neither side pays for padding. chatforge forwards each reply once per step
and trains on all C(4,2)=6 pairs per prompt; TRL gets the same comparisons expanded to (chosen,
rejected) pairs, the layout its collator expects, so each reply is forwarded 3 times. Both steps see
the same pairs per optimizer step (batch_prompts * 6), AdamW, clip 1.0, fp32 on CPU (bf16 autocast on a
GPU for both). The unit is pairs/s; the ratio is measured side by side in one process.
Needs `pip install trl==1.16.0` (the `bench` extra) for the TRL half; without it only chatforge runs.
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
from typing import Any

import torch

from chatforge.bench.common import machine, peak_rss_mb, print_table
from chatforge.config import ModelConfig, TrainConfig
from chatforge.core.model import count_params, llama_config_for
from chatforge.core.train import autocast, make_optimizer, make_scheduler, optimizer_step
from chatforge.data.rm_data import ComparisonLoader, RMExample, rm_loss

PAD_ID = 2


class _VocabOnly:
    def __init__(self, n: int):
        self.n, self.bos_token_id, self.eos_token_id, self.pad_token_id = n, 0, 1, PAD_ID

    def __len__(self) -> int:
        return self.n


def make_comparisons(n_prompts: int, k: int, prompt_len: int, reply_len: int, vocab: int, seed: int = 0,
                     low: int = 3) -> list[RMExample]:
    """Random-token comparisons, fully ranked in reply order (ids from `low` up, avoiding the specials)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_prompts):
        prompt = torch.randint(low, vocab, (prompt_len,), generator=g).tolist()
        seqs = [prompt + torch.randint(low, vocab, (reply_len,), generator=g).tolist() for _ in range(k)]
        pairs = [(a, b, 0.0) for a in range(k) for b in range(a + 1, k)]
        out.append(RMExample(f"t{i}", "bench", seqs, [str(j) for j in range(k)], [reply_len] * k, [""] * k, pairs, []))
    return out


def build_rm(depth: int, seq_len: int, vocab: int, seed: int = 0) -> Any:
    from transformers import LlamaForSequenceClassification

    cfg = llama_config_for(ModelConfig(depth=depth, max_seq_len=seq_len), _VocabOnly(vocab))
    cfg.num_labels, cfg.pad_token_id = 1, PAD_ID
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(cfg)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bench_chatforge(model: Any, examples: list[RMExample], batch_prompts: int, steps: int, warmup: int,
                    device: str, amp: torch.dtype | None, lr: float, pad_id: int = PAD_ID) -> dict:
    cfg = TrainConfig(max_steps=steps + warmup, warmup_steps=0, lr=lr, schedule="constant")
    dev = torch.device(device)
    model.to(dev).train()
    opt = make_optimizer(model.parameters(), cfg, dev)
    sched = make_scheduler(opt, cfg)
    loader = ComparisonLoader(examples, batch_prompts, pad_id, seed=0, device=dev)
    pairs_per_step = batch_prompts * len(examples[0].pairs)
    t0 = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            t0 = time.perf_counter()
        with autocast(amp, dev):
            loss, _, _ = rm_loss(model, next(loader))
        loss.backward()
        optimizer_step(model, opt, sched, 1.0, float(loss.detach()))
    _sync(device)
    dt = time.perf_counter() - t0
    return {"pairs_per_sec": steps * pairs_per_step / dt, "step_ms": 1000 * dt / steps,
            "sequences_per_step": batch_prompts * len(examples[0].seqs)}


def bench_trl(model: Any, examples: list[RMExample], batch_prompts: int, steps: int, warmup: int, device: str,
              bf16: bool, lr: float) -> dict:
    from datasets import Dataset
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    rows = [{"chosen_ids": ex.seqs[b], "rejected_ids": ex.seqs[w]} for ex in examples for b, w, _ in ex.pairs]
    pairs_per_step = batch_prompts * len(examples[0].pairs)
    vocab = model.config.vocab_size
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({f"t{i}": i for i in range(vocab)}, "t0")),
                                  bos_token="t0", eos_token="t1", pad_token=f"t{PAD_ID}")
    stamps: list[float] = []

    class Timer(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            _sync(device)
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        args = RewardConfig(
            output_dir=tmp, per_device_train_batch_size=pairs_per_step, max_steps=warmup + steps, learning_rate=lr,
            lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.1, adam_beta2=0.95, max_grad_norm=1.0,
            gradient_checkpointing=False, bf16=bf16, use_cpu=device == "cpu", logging_strategy="no",
            save_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0, seed=0,
            max_length=None, remove_unused_columns=False,
        )
        trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                                callbacks=[Timer()])
        trainer.train()
    dt = stamps[-1] - stamps[warmup - 1]
    return {"pairs_per_sec": steps * pairs_per_step / dt, "step_ms": 1000 * dt / steps,
            "sequences_per_step": 2 * pairs_per_step}


def run(quick: bool = False, depth: int = 4, batch_prompts: int = 4, k: int = 4, prompt_len: int = 64,
        reply_len: int = 64, vocab: int = 4096, steps: int = 10, warmup: int = 2, lr: float = 1e-4) -> dict:
    """Pairs/s of both trainers on identical data and weights; returns the JSON result."""
    if quick:
        depth, batch_prompts, prompt_len, reply_len, steps = 2, 2, 32, 32, 4
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
    n_prompts = batch_prompts * (warmup + steps)
    examples = make_comparisons(n_prompts, k, prompt_len, reply_len, vocab)
    base = build_rm(depth, prompt_len + reply_len, vocab)
    res: dict[str, Any] = {
        "bench": "rm", "machine": machine(), "params": count_params(base), "depth": depth, "k": k,
        "batch_prompts": batch_prompts, "pairs_per_step": batch_prompts * math.comb(k, 2),
        "seq_len": prompt_len + reply_len, "dtype": "bfloat16" if bf16 else "float32", "steps": steps,
    }
    res["chatforge"] = bench_chatforge(copy.deepcopy(base), examples, batch_prompts, steps, warmup, device,
                                       torch.bfloat16 if bf16 else None, lr)
    try:
        import trl

        res["trl_version"] = trl.__version__
        res["trl"] = bench_trl(copy.deepcopy(base), examples, batch_prompts, steps, warmup, device, bf16, lr)
        res["speedup_vs_trl"] = res["chatforge"]["pairs_per_sec"] / res["trl"]["pairs_per_sec"]
    except ImportError:
        res["trl"] = None
        res["speedup_vs_trl"] = None
    res["peak_rss_mb"] = round(peak_rss_mb(), 1)
    rows = [("params", f"{res['params'] / 1e6:.2f}M"), ("K / pairs per step", f"{k} / {res['pairs_per_step']}"),
            ("seq len", str(res["seq_len"])),
            ("chatforge K-wise", f"{res['chatforge']['pairs_per_sec']:,.1f} pairs/s "
                                 f"({res['chatforge']['sequences_per_step']} seqs/step)")]
    if res["trl"]:
        rows += [(f"TRL {res['trl_version']} RewardTrainer", f"{res['trl']['pairs_per_sec']:,.1f} pairs/s "
                                                           f"({res['trl']['sequences_per_step']} seqs/step)"),
                 ("speedup", f"{res['speedup_vs_trl']:.2f}x")]
    else:
        rows.append(("TRL", "not installed (pip install trl==1.16.0)"))
    print_table("chatforge bench rm", rows)
    return res
