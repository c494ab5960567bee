"""`chatforge bench pretrain [--device cpu|cuda]`: training-step FLOP/s and MFU of a from-scratch Llama.

CPU (the default there): the tiny config (depth 4, width 256, ~7M params with a 4096 vocab), batch 8 x 256
tokens, fp32, AdamW, MFU against the measured fp32 matmul peak.
CUDA (the default when a GPU is present): a GPT-2-small-sized config (depth 12, width 768, 32k vocab, ~163M
params) at batch 16 x 1024 tokens under bf16 autocast, TF32 matmuls, SDPA attention, fused AdamW and
`torch.compile`, MFU against the GPU's dense bf16 peak (looked up by device name, else a measured large GEMM);
peak memory from `torch.cuda.max_memory_allocated`. Same step as the pretrain stage (lm_loss + optimizer_step).
Achieved FLOP/s = tokens/s * (6 N + 12 L d T) (PaLM appendix B); MFU = achieved / peak.
"""

from __future__ import annotations

import time

import torch

from chatforge.bench.common import bf16_supported, machine, matmul_peak, peak_rss_mb, print_table
from chatforge.config import ModelConfig, TrainConfig
from chatforge.core.io import UserError
from chatforge.core.model import build_model, count_params, flops_per_token
from chatforge.core.train import make_optimizer, make_scheduler, optimizer_step
from chatforge.stages.pretrain import lm_loss

# Dense (no sparsity) bf16 tensor-core peak, TFLOP/s, from the vendors' datasheets; first match on the
# device name wins, so the specific names come before the general ones.
BF16_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4),
                    ("A100", 312.0), ("L40S", 362.1), ("L4", 121.0))


def gpu_bf16_peak(name: str) -> float | None:
    """The datasheet dense bf16 peak (FLOP/s) of a GPU by its `torch.cuda.get_device_name()`, or None."""
    return next((tf * 1e12 for key, tf in BF16_PEAK_TFLOPS if key in name), None)


class _VocabOnly:
    """Just enough of a tokenizer to size the model (the bench uses random token ids)."""

    def __init__(self, n: int):
        self.n, self.bos_token_id, self.eos_token_id, self.pad_token_id = n, 0, 1, 2

    def __len__(self) -> int:
        return self.n


def run(quick: bool = False, device: str = "auto", depth: int | None = None, batch: int | None = None,
        seq_len: int | None = None, vocab: int | None = None, steps: int | None = None,
        compile: bool | None = None) -> dict:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise UserError(f"--device {device}: choose cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible to torch (torch.cuda.is_available() is False)")
    gpu = device == "cuda"
    d = dict(depth=12, batch=16, seq_len=1024, vocab=32768, steps=30) if gpu else \
        dict(depth=4, batch=8, seq_len=256, vocab=4096, steps=20)
    if quick:
        d.update(depth=2, batch=4, seq_len=128, steps=5)
    depth, batch, seq_len, vocab, steps = (v if v is not None else d[k] for k, v in (
        ("depth", depth), ("batch", batch), ("seq_len", seq_len), ("vocab", vocab), ("steps", steps)))
    compile = gpu if compile is None else compile
    bf16 = gpu and torch.cuda.is_bf16_supported()
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True  # Ampere+: fp32 matmuls outside autocast on tensor cores
        torch.backends.cudnn.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats()
    peak32 = matmul_peak(torch.float32, device=device)
    peak16 = matmul_peak(torch.bfloat16, device=device, n=8192 if gpu else 2048) if bf16_supported(device) else None
    name = torch.cuda.get_device_name() if gpu else "cpu"
    sheet = gpu_bf16_peak(name) if gpu else None
    ref_peak = (sheet or peak16) if bf16 else peak32

    model = build_model(ModelConfig(depth=depth, max_seq_len=seq_len), _VocabOnly(vocab), seed=0).to(device).train()
    cfg = TrainConfig(max_steps=steps + 5, warmup_steps=1)
    opt = make_optimizer(model.parameters(), cfg, torch.device(device))
    sched = make_scheduler(opt, cfg)
    fwd = torch.compile(model) if compile else model
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, vocab, (steps + 5, batch, seq_len + 1), generator=g)
    data = data.pin_memory().to(device, non_blocking=True) if gpu else data

    def step(i: int) -> None:
        x, y = data[i, :, :-1], data[i, :, 1:]
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
            loss, _ = lm_loss(fwd, (x, y))
        loss.backward()
        optimizer_step(model, opt, sched, 1.0, loss.item())

    for i in range(5 if compile else 3):  # warm-up: compilation, allocator, kernels
        step(i)
    if gpu:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        step(5 + i)
    if gpu:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    tps = steps * batch * seq_len / dt
    fpt = flops_per_token(model, seq_len)
    achieved = tps * fpt
    res = {
        "bench": "pretrain", "machine": machine(), "device": name, "params": count_params(model), "depth": depth,
        "batch": batch, "seq_len": seq_len, "vocab": vocab, "dtype": "bfloat16 autocast" if bf16 else "float32",
        "compile": compile, "steps": steps,
        "tokens_per_sec": round(tps, 1), "step_ms": round(1000 * dt / steps, 1),
        "flops_per_token": fpt, "achieved_tflops": achieved / 1e12,
        "matmul_peak_fp32_tflops": peak32 / 1e12,
        "matmul_peak_bf16_tflops": None if peak16 is None else peak16 / 1e12,
        "datasheet_bf16_tflops": None if sheet is None else sheet / 1e12,
        "mfu_vs_fp32_peak": achieved / peak32, "peak_rss_mb": round(peak_rss_mb(), 1),
        "mfu": achieved / ref_peak,
        "mfu_against": ("datasheet bf16 peak" if sheet else "measured bf16 GEMM") if bf16 else "measured fp32 GEMM",
    }
    if gpu:
        res["peak_gpu_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print_table("chatforge bench pretrain", [
        ("device", name), ("params", f"{res['params'] / 1e6:.2f}M"), ("batch x seq", f"{batch} x {seq_len}"),
        ("dtype / compile", f"{res['dtype']} / {compile}"),
        ("tokens/s", f"{tps:,.0f}"), ("step", f"{res['step_ms']} ms"),
        ("achieved", f"{achieved / 1e9:.1f} GFLOP/s"), ("fp32 matmul peak", f"{peak32 / 1e9:.1f} GFLOP/s"),
        ("bf16 matmul peak", "-" if peak16 is None else f"{peak16 / 1e9:.1f} GFLOP/s"),
        (f"MFU ({res['mfu_against']})", f"{100 * res['mfu']:.1f}%"), ("peak RSS", f"{res['peak_rss_mb']:.0f} MB"),
        *([("peak GPU memory", f"{res['peak_gpu_mem_gib']} GiB")] if gpu else []),
    ])
    return res
