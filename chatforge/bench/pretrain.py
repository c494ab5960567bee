"""`chatforge bench pretrain`: training-step FLOP/s and MFU of the tiny CPU config vs the matmul peak.

The config is the default from-scratch model (depth 4, width 256, ~7M params with a 4096 vocab),
batch 8 x 256 tokens, fp32, AdamW: the same step the pretrain stage runs (lm_loss + optimizer_step).
Achieved FLOP/s = tokens/s * (6 N + 12 L d T) (PaLM appendix B); MFU = achieved / measured peak.
"""

from __future__ import annotations

import time

import torch

from chatforge.bench.common import bf16_supported, machine, matmul_peak, peak_rss_mb, print_table
from chatforge.config import ModelConfig, TrainConfig
from chatforge.core.model import build_model, count_params, flops_per_token
from chatforge.core.train import make_optimizer, make_scheduler, optimizer_step
from chatforge.stages.pretrain import lm_loss


class _VocabOnly:
    """Just enough of a tokenizer to size the model (the bench uses random token ids)."""

    def __init__(self, n: int):
        self.n, self.bos_token_id, self.eos_token_id, self.pad_token_id = n, 0, 1, 2

    def __len__(self) -> int:
        return self.n


def run(quick: bool = False, depth: int = 4, batch: int = 8, seq_len: int = 256, vocab: int = 4096,
        steps: int = 20) -> dict:
    if quick:
        depth, batch, seq_len, steps = 2, 4, 128, 5
    device = "cuda" if torch.cuda.is_available() else "cpu"
    peak32 = matmul_peak(torch.float32, device=device)
    peak16 = matmul_peak(torch.bfloat16, device=device) if bf16_supported(device) else None

    model = build_model(ModelConfig(depth=depth, max_seq_len=seq_len), _VocabOnly(vocab), seed=0).to(device).train()
    cfg = TrainConfig(max_steps=steps + 3, warmup_steps=1)
    opt = make_optimizer(model.parameters(), cfg, torch.device(device))
    sched = make_scheduler(opt, cfg)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, vocab, (steps + 3, batch, seq_len + 1), generator=g).to(device)

    def step(i: int) -> None:
        x, y = data[i, :, :-1], data[i, :, 1:]
        loss, _ = lm_loss(model, (x, y))
        loss.backward()
        optimizer_step(model, opt, sched, 1.0, loss.item())

    for i in range(3):  # warm-up: allocator, kernels
        step(i)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        step(3 + i)
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    tps = steps * batch * seq_len / dt
    fpt = flops_per_token(model, seq_len)
    achieved = tps * fpt
    res = {
        "bench": "pretrain", "machine": machine(), "params": count_params(model), "depth": depth,
        "batch": batch, "seq_len": seq_len, "dtype": "float32", "steps": steps,
        "tokens_per_sec": round(tps, 1), "step_ms": round(1000 * dt / steps, 1),
        "flops_per_token": fpt, "achieved_tflops": achieved / 1e12,
        "matmul_peak_fp32_tflops": peak32 / 1e12,
        "matmul_peak_bf16_tflops": None if peak16 is None else peak16 / 1e12,
        "mfu_vs_fp32_peak": achieved / peak32, "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    print_table("chatforge bench pretrain", [
        ("params", f"{res['params'] / 1e6:.2f}M"), ("batch x seq", f"{batch} x {seq_len}"),
        ("tokens/s", f"{tps:,.0f}"), ("step", f"{res['step_ms']} ms"),
        ("achieved", f"{achieved / 1e9:.1f} GFLOP/s"), ("fp32 matmul peak", f"{peak32 / 1e9:.1f} GFLOP/s"),
        ("bf16 matmul peak", "-" if peak16 is None else f"{peak16 / 1e9:.1f} GFLOP/s"),
        ("MFU (fp32)", f"{100 * res['mfu_vs_fp32_peak']:.1f}%"), ("peak RSS", f"{res['peak_rss_mb']:.0f} MB"),
    ])
    return res
