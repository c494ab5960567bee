"""`chatforge bench sft`: SFT training throughput, chatforge's packed step vs TRL's SFTTrainer.

Both sides train the same ~7M-parameter Llama (depth 4, width 256, a 4096-token byte-level BPE trained
here on the conversations themselves, random init, identical starting weights) on the same conversations
(task-suite demonstrations + `embedded:sft/oasst-best`), rendered once by chatforge's renderer so both see
identical token ids and the same assistant-only loss mask. Batch 8 rows of at most 256 tokens, fp32 on
CPU (bf16 autocast on a GPU for both), AdamW (beta2 0.95, wd 0.1), clip 1.0, constant LR.

- chatforge: `pack` (first-fit decreasing, one row holds several conversations with their own positions
  and a block-diagonal mask) → `RowLoader` → `lm_step_fn(sft_loss)`, the exact step `chatforge sft` runs.
- TRL `SFTTrainer`, given the same pre-tokenised conversations (`input_ids` + `labels` that are -100 off
  assistant tokens, which is what its `assistant_only_loss` produces), in two settings:
  `packed`: packing=True, packing_strategy="bfd" (its padding-free mode: the batch is one flattened
  sequence, documents separated through position_ids) and `padded`: packing=False (one conversation per
  row, right-padded to the longest in the batch). gradient_checkpointing=False (SFTConfig defaults to True).
  The speedup is against the faster of the two.

Unit: tokens/s = non-pad input tokens (ids != pad) that went through forward+backward per second, counted
the same way on both sides from the batches the step consumed. Runs alternate (chatforge, TRL packed,
TRL padded, repeated `rounds` times, in one process) and the best round of each is reported.
Needs `pip install trl==1.16.0` for the TRL half; without it only chatforge runs.
"""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from chatforge.bench.common import machine, peak_rss_mb, print_table
from chatforge.config import ModelConfig, TrainConfig
from chatforge.core.distributed import DistInfo
from chatforge.core.model import build_model, count_params
from chatforge.core.tokenizer import IGNORE_INDEX, train_tokenizer
from chatforge.core.train import lm_step_fn, make_optimizer, make_scheduler
from chatforge.data.sft_data import RowLoader, load_conversations, pack, render_examples, sft_loss

TRL_SETTINGS = {"packed": {"packing": True, "packing_strategy": "bfd"}, "padded": {"packing": False}}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def conversation_texts(convs: list[dict]) -> Iterator[str]:
    for c in convs:
        for m in c["messages"]:
            yield m["content"]


def prepare(n_per_family: int, vocab: int, seq_len: int, tmp: Path) -> tuple[Any, list[tuple[list[int], list[int]]]]:
    """(tokenizer, rendered examples as (inputs, targets)) for the benchmark conversations."""
    convs = load_conversations([f"tasks:{n_per_family}", "embedded:sft/oasst-best"])
    tok = train_tokenizer(conversation_texts(convs), vocab, tmp / "tokenizer")
    examples, _ = render_examples(tok, convs, seq_len, "turns")
    return tok, examples


class _Counting:
    """Wraps a batch iterator and counts the non-pad input tokens it hands out."""

    def __init__(self, it: Iterator[dict], pad_id: int):
        self.it, self.pad_id, self.tokens = it, pad_id, 0

    def __iter__(self) -> _Counting:
        return self

    def __next__(self) -> dict:
        b = next(self.it)
        self.tokens += int((b["input_ids"] != self.pad_id).sum())
        return b


def bench_chatforge(model: Any, tok: Any, examples: list, batch: int, seq_len: int, steps: int, warmup: int,
                    device: str, amp: torch.dtype | None, lr: float) -> dict:
    """chatforge's SFT step: packed rows, block-diagonal mask, assistant-only loss."""
    cfg = TrainConfig(max_steps=steps + warmup, warmup_steps=0, lr=lr, schedule="constant", batch_size=batch,
                      seq_len=seq_len)
    info = DistInfo(device=torch.device(device))
    model.to(info.device).train()
    opt = make_optimizer(model.parameters(), cfg, info.device)
    sched = make_scheduler(opt, cfg)
    rows = pack(examples, seq_len, True)
    loader = _Counting(RowLoader(rows, batch, tok.pad_token_id, seed=0, device=info.device), tok.pad_token_id)
    step = lm_step_fn(model, opt, sched, loader, sft_loss, cfg, info, amp)
    t0, tok0, loss = 0.0, 0, float("nan")
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            t0, tok0 = time.perf_counter(), loader.tokens
        loss = step(i)["train/loss"]
    _sync(device)
    dt = time.perf_counter() - t0
    n = loader.tokens - tok0
    return {"tokens_per_sec": n / dt, "step_ms": 1000 * dt / steps, "tokens_per_step": n / steps,
            "rows": len(rows), "final_loss": loss}


def trl_rows(examples: list[tuple[list[int], list[int]]]) -> list[dict]:
    """TRL's pre-tokenised layout over exactly chatforge's input tokens: TRL shifts labels inside the model,
    so labels[t] = targets[t-1]; the last target (usually the end-of-turn token) has no input left to
    predict it from, a one-token difference in loss, none in compute."""
    return [{"input_ids": inputs, "labels": [IGNORE_INDEX] + targets[:-1]} for inputs, targets in examples]


def bench_trl(model: Any, tok: Any, examples: list, batch: int, seq_len: int, steps: int, warmup: int,
              device: str, bf16: bool, lr: float, setting: str) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    stamps: list[float] = []
    marks: list[int] = []
    pad_id = tok.pad_token_id

    class Counting(SFTTrainer):
        tokens = 0

        def training_step(self, model: Any, inputs: dict, *args: Any, **kw: Any) -> torch.Tensor:
            Counting.tokens += int((inputs["input_ids"] != pad_id).sum())
            return super().training_step(model, inputs, *args, **kw)

    class Timer(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            _sync(device)
            stamps.append(time.perf_counter())
            marks.append(Counting.tokens)

    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(
            output_dir=tmp, per_device_train_batch_size=batch, max_steps=warmup + steps, learning_rate=lr,
            lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.1, adam_beta2=0.95, max_grad_norm=1.0,
            max_length=seq_len, gradient_checkpointing=False, bf16=bf16, use_cpu=device == "cpu",
            logging_strategy="no", save_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0,
            seed=0, **TRL_SETTINGS[setting],
        )
        trainer = Counting(model=model, args=args, train_dataset=Dataset.from_list(trl_rows(examples)),
                           processing_class=tok, callbacks=[Timer()])
        out = trainer.train()
    dt = stamps[-1] - stamps[warmup - 1]
    n = marks[-1] - marks[warmup - 1]
    return {"tokens_per_sec": n / dt, "step_ms": 1000 * dt / steps, "tokens_per_step": n / steps,
            "final_loss": float(out.training_loss), "settings": TRL_SETTINGS[setting]}


def _best(runs: list[dict]) -> dict:
    return max(runs, key=lambda r: r["tokens_per_sec"]) | {"rounds_tokens_per_sec": [r["tokens_per_sec"] for r in runs]}


def run(quick: bool = False, depth: int = 4, batch: int = 8, seq_len: int = 256, vocab: int = 4096,
        n_per_family: int = 40, steps: int = 10, warmup: int = 2, rounds: int = 2, lr: float = 1e-4,
        threads: int = 2) -> dict:
    """Tokens/s of chatforge's SFT step and TRL's SFTTrainer on identical data and weights."""
    if quick:
        depth, batch, seq_len, vocab, n_per_family, steps, warmup, rounds = 1, 4, 128, 512, 5, 2, 1, 1
    if threads > 0:
        torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
    with tempfile.TemporaryDirectory() as tmp:
        tok, examples = prepare(n_per_family, vocab, seq_len, Path(tmp))
    base = build_model(ModelConfig(depth=depth, max_seq_len=seq_len), tok, seed=0)
    res: dict[str, Any] = {
        "bench": "sft", "machine": machine(), "params": count_params(base), "depth": depth, "batch": batch,
        "seq_len": seq_len, "vocab": len(tok), "conversations": len(examples), "dtype": "bfloat16" if bf16 else "float32",
        "steps": steps, "warmup": warmup, "rounds": rounds, "unit": "non-pad input tokens per second",
        "chatforge_settings": {"packing": "first-fit decreasing, block-diagonal mask", "loss": "assistant tokens only"},
    }
    try:
        import trl

        res["trl_version"] = trl.__version__
    except ImportError:
        trl = None
    cf_runs: list[dict] = []
    trl_runs: dict[str, list[dict]] = {s: [] for s in TRL_SETTINGS}
    for _ in range(rounds):
        cf_runs.append(bench_chatforge(copy.deepcopy(base), tok, examples, batch, seq_len, steps, warmup, device,
                                       torch.bfloat16 if bf16 else None, lr))
        if trl is not None:
            for s in TRL_SETTINGS:
                trl_runs[s].append(bench_trl(copy.deepcopy(base), tok, examples, batch, seq_len, steps, warmup,
                                             device, bf16, lr, s))
    res["chatforge"] = _best(cf_runs)
    if trl is not None:
        res["trl"] = {s: _best(r) for s, r in trl_runs.items()}
        best = max(res["trl"].values(), key=lambda r: r["tokens_per_sec"])
        res["speedup_vs_trl"] = res["chatforge"]["tokens_per_sec"] / best["tokens_per_sec"]
        res["speedup_vs_trl_by_setting"] = {s: res["chatforge"]["tokens_per_sec"] / r["tokens_per_sec"]
                                            for s, r in res["trl"].items()}
    else:
        res["trl"], res["speedup_vs_trl"] = None, None
        res["note"] = "TRL not installed: only chatforge ran (pip install trl==1.16.0 for the side-by-side)"
    res["peak_rss_mb"] = round(peak_rss_mb(), 1)
    _print(res)
    return res


def _print(res: dict) -> None:
    cf = res["chatforge"]
    rows = [("params", f"{res['params'] / 1e6:.2f}M"), ("batch x max len", f"{res['batch']} x {res['seq_len']}"),
            ("conversations", str(res["conversations"])),
            ("chatforge (packed)", f"{cf['tokens_per_sec']:,.0f} tok/s ({cf['step_ms']:.0f} ms/step, "
                                   f"{cf['tokens_per_step']:.0f} tok/step)")]
    if res["trl"]:
        for s, r in res["trl"].items():
            rows.append((f"TRL {res['trl_version']} SFTTrainer ({s})",
                         f"{r['tokens_per_sec']:,.0f} tok/s ({r['step_ms']:.0f} ms/step, {r['tokens_per_step']:.0f} tok/step)"))
        rows.append(("speedup vs best TRL", f"{res['speedup_vs_trl']:.2f}x"))
    else:
        rows.append(("TRL", "not installed (pip install trl==1.16.0)"))
    print_table("chatforge bench sft", rows)
