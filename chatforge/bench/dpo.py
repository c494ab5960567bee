"""`chatforge bench dpo`: pairs/s of chatforge's DPO step vs TRL's `DPOTrainer`, side by side in one process.

Same everything: a ~7M Llama (depth 4, width 256, random init) with a 4,096-token BPE trained on the
embedded HH-RLHF text, the same HH preference pairs as token ids (TRL's tokenisation step is skipped,
its collator gets `prompt_ids`/`chosen_ids`/`rejected_ids` directly), the same batches in the same
order (TRL's random sampler is replaced by a sequential one), fp32, AdamW, no gradient checkpointing
and no bf16 on either side (TRL's defaults turn both on; we turn them off so both run the same math).

Measured: wall time per optimizer step after warm-up, including collation, for
- chatforge, data.layout=pairs (TRL's collator layout) and data.layout=packed;
- TRL with `precompute_ref_log_probs=False` (its default: a reference forward every step) and =True.
Reference precompute time is reported separately for both (it is paid once per run).
tokens/s counts real tokens in the TRL layout (prompt twice per pair), so it is proportional to pairs/s.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from chatforge.bench.common import machine, matmul_peak, peak_rss_mb, print_table
from chatforge.config import ModelConfig, TrainConfig
from chatforge.core.distributed import DistInfo
from chatforge.core.model import build_model, count_params, flops_per_token
from chatforge.core.train import lm_step_fn, make_optimizer, make_scheduler
from chatforge.data.pref_data import PrefPair, build_pairs, collate, compute_reference

BETA, LR = 0.1, 1e-5


def _setup(root: Path, depth: int, vocab: int, seq_len: int, n_pairs: int) -> tuple[Path, Any, list[PrefPair]]:
    """(model dir, tokenizer, pairs): a BPE on HH text, a random Llama saved as an HF dir, HH pairs that fit."""
    from chatforge.core.tokenizer import train_tokenizer
    from chatforge.data.embedded import embedded_path
    from chatforge.data.formats import read_comparisons

    cmps = read_comparisons(embedded_path("prefs/hh"))
    texts = [m.content for c in cmps[:3000] for m in c.prompt] + [r.content for c in cmps[:3000] for r in c.responses]
    tok = train_tokenizer(texts, vocab_size=vocab, out_dir=root / "tokenizer")
    model = build_model(ModelConfig(depth=depth, max_seq_len=seq_len), tok, seed=0)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    pairs, _ = build_pairs(tok, cmps[: 4 * n_pairs], seq_len)
    if len(pairs) < n_pairs:
        raise RuntimeError(f"only {len(pairs)} HH pairs fit in {seq_len} tokens; need {n_pairs}")
    return root / "model", tok, pairs[:n_pairs]


def _load(model_dir: Path, device: str) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _chatforge_stepper(model_dir: Path, pairs: list[PrefPair], pad_id: int, batch: int, n_steps: int, layout: str,
                       device: str) -> tuple[Callable[[], None], dict]:
    """The stage's own step (lm_step_fn around dpo_loss) over sequential batches; reference precomputed first."""
    from chatforge.config import DPOLossConfig
    from chatforge.stages.dpo import dpo_loss, make_loss

    model = _load(model_dir, device)
    pairs = [PrefPair(p.task_id, p.prompt, p.chosen, p.rejected) for p in pairs]
    _sync(device)
    t0 = time.perf_counter()
    model.eval()
    for p, (c, r) in zip(pairs, compute_reference(model, pairs, pad_id, 16, layout, torch.device(device))):
        p.ref_chosen, p.ref_rejected = c, r
    _sync(device)
    ref_s = time.perf_counter() - t0
    model.train()
    cfg = TrainConfig(max_steps=n_steps, lr=LR, warmup_steps=0, schedule="constant", weight_decay=0.0)
    opt = make_optimizer(model.parameters(), cfg, torch.device(device))
    sched = make_scheduler(opt, cfg)
    loss_fn, average = make_loss(DPOLossConfig(type="sigmoid", beta=BETA))
    batches = (collate(pairs[i * batch:(i + 1) * batch], pad_id, layout, torch.device(device)) for i in range(n_steps))

    def micro_loss(m: Any, b: dict) -> tuple[torch.Tensor, int]:
        loss, _, n_tokens = dpo_loss(m, b, loss_fn, BETA, average)
        return loss, n_tokens

    step = lm_step_fn(model, opt, sched, batches, micro_loss, cfg, DistInfo(device=torch.device(device)), None)
    return lambda: step(0), {"ref_precompute_s": ref_s}


def _trl_stepper(model_dir: Path, tok: Any, pairs: list[PrefPair], batch: int, n_steps: int, precompute: bool,
                 device: str, root: Path) -> tuple[Callable[[], None], dict]:
    """One DPOTrainer step: its dataloader + collator, `training_step` (TRL's compute_loss, accelerate's backward),
    then clip, AdamW step, scheduler step and zero_grad as Trainer's inner loop does them."""
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from trl import DPOConfig, DPOTrainer

    os.environ.setdefault("TQDM_DISABLE", "1")  # TRL's precompute progress bar

    class PreTokenized(DPOTrainer):
        def _prepare_dataset(self, dataset: Any, *args: Any, **kwargs: Any) -> Any:
            return dataset  # already prompt_ids / chosen_ids / rejected_ids

    data = Dataset.from_dict({"prompt_ids": [p.prompt for p in pairs], "chosen_ids": [p.chosen for p in pairs],
                              "rejected_ids": [p.rejected for p in pairs]})
    args = DPOConfig(
        output_dir=str(root / f"trl-{int(precompute)}"), per_device_train_batch_size=batch, max_steps=n_steps,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        beta=BETA, loss_type=["sigmoid"], precompute_ref_log_probs=precompute, precompute_ref_batch_size=16,
        max_length=None, bf16=False, gradient_checkpointing=False, use_cpu=device == "cpu", save_strategy="no",
        report_to=[], disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )
    t0 = time.perf_counter()
    trainer = PreTokenized(model=_load(model_dir, device), args=args, train_dataset=data, processing_class=tok)
    init_s = time.perf_counter() - t0
    trainer._get_train_sampler = lambda *a, **k: SequentialSampler(trainer.train_dataset)  # same order as ours
    loader = iter(trainer.get_train_dataloader())
    trainer.create_optimizer_and_scheduler(num_training_steps=n_steps)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's inner loop, which we step by hand
    model = trainer.model

    def step() -> None:
        trainer.training_step(model, next(loader))
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        model.zero_grad(set_to_none=True)

    return step, {"init_s": init_s}


def _round_robin(steppers: dict[str, Callable[[], None]], n_steps: int, device: str) -> dict[str, list[float]]:
    """Step every trainer once per round, rotating the order: load bursts on a shared machine hit all alike."""
    times: dict[str, list[float]] = {k: [] for k in steppers}
    names = list(steppers)
    for r in range(n_steps):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t = time.perf_counter()
            steppers[name]()
            _sync(device)
            times[name].append(time.perf_counter() - t)
    return times


def run(quick: bool = False, depth: int = 4, batch: int = 8, seq_len: int = 256, vocab: int = 4096,
        steps: int = 8, warmup: int = 2) -> dict:
    """Time chatforge's and TRL's DPO steps round-robin on the same batches; returns the JSON result."""
    import transformers

    if quick:
        depth, batch, seq_len, vocab, steps, warmup = 2, 4, 128, 1024, 3, 1
    try:
        import trl
    except ImportError:  # the peer is optional: report chatforge alone
        trl = None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n = warmup + steps
    with tempfile.TemporaryDirectory(prefix="chatforge-bench-dpo-") as tmp:
        root = Path(tmp)
        model_dir, tok, pairs = _setup(root, depth, vocab, seq_len, n * batch)
        steppers, extra = {}, {}
        for layout in ("pairs", "packed"):
            steppers[f"chatforge_{layout}"], extra[f"chatforge_{layout}"] = _chatforge_stepper(
                model_dir, pairs, tok.pad_token_id, batch, n, layout, device)
        if trl is not None:
            for pre in (False, True):
                name = f"trl_precompute_{str(pre).lower()}"
                steppers[name], extra[name] = _trl_stepper(model_dir, tok, pairs, batch, n, pre, device, root)
        times = {k: v[warmup:] for k, v in _round_robin(steppers, n, device).items()}
        bare = _load(model_dir, "cpu")
        params, fpt = count_params(bare), flops_per_token(bare, seq_len)
    measured = pairs[warmup * batch:]
    tokens = sum(p.tokens for p in measured)
    peak = matmul_peak(torch.float32, device=device)
    res: dict[str, Any] = {
        "bench": "dpo", "machine": machine(), "params": params, "depth": depth, "vocab": vocab, "batch_pairs": batch,
        "seq_len": seq_len, "steps": steps, "dtype": "float32", "device": device,
        "transformers": transformers.__version__, "trl": getattr(trl, "__version__", None),
        "mean_pair_tokens_trl_layout": round(tokens / len(measured), 1), "matmul_peak_fp32_tflops": peak / 1e12,
    }
    for name, ts in times.items():
        res[name] = {"pairs_per_sec": round(len(measured) / sum(ts), 3), "tokens_per_sec": round(tokens / sum(ts), 1),
                     "step_ms_median": round(1000 * statistics.median(ts), 1),
                     **{k: round(v, 3) for k, v in extra[name].items()}}
    res["chatforge_pairs"]["mfu_vs_fp32_peak"] = res["chatforge_pairs"]["tokens_per_sec"] * fpt / peak
    for ours in ("pairs", "packed"):
        for peer in ("trl_precompute_false", "trl_precompute_true"):
            if peer in times:
                mine = times[f"chatforge_{ours}"]
                res[f"speedup_{ours}_vs_{peer}"] = {
                    "throughput": round(sum(times[peer]) / sum(mine), 3),
                    "median_per_step": round(statistics.median(b / a for a, b in zip(mine, times[peer])), 3)}
    res["peak_rss_mb"] = round(peak_rss_mb(), 1)
    rows = [("model", f"{params / 1e6:.2f}M params, depth {depth}, vocab {vocab}"),
            ("batch", f"{batch} pairs, <= {seq_len} tokens, {res['mean_pair_tokens_trl_layout']:.0f} tok/pair")]
    rows += [(name, f"{res[name]['pairs_per_sec']:.2f} pairs/s, {res[name]['tokens_per_sec']:,.0f} tok/s, "
                    f"{res[name]['step_ms_median']:.0f} ms/step") for name in times]
    rows += [(k, f"{v['throughput']:.2f}x (per-step median {v['median_per_step']:.2f}x)")
             for k, v in res.items() if k.startswith("speedup_")]
    rows.append(("MFU (chatforge pairs, fp32)", f"{100 * res['chatforge_pairs']['mfu_vs_fp32_peak']:.1f}%"))
    print_table("chatforge bench dpo", rows)
    return res
