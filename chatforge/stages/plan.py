"""`chatforge plan`: per-rank memory of a training stage for each strategy, before any GPU is rented.

    chatforge plan --model smollm2-135m-instruct --stage ppo --gpus 8 --gpu-mem 80
    chatforge plan --model runs/sft --stage sft --seq-len 2048 --batch 8 --lora --measure

For every choice of strategy (single / ddp / fsdp2), CPU offload and activation checkpointing the estimate
adds, per rank: weights of every model the stage holds (trained and frozen), gradients, AdamW state (two
fp32 moments), activations of one micro-batch, the logits, and for RL stages the rollout KV cache; it says
which choices fit `--gpu-mem`. Activations follow Korthikanti et al. 2022 ("Reducing Activation
Recomputation", sec. 4), counted for a Llama block (SwiGLU MLP, grouped-query attention): saved tensors per
token per layer are the two norm inputs/outputs, q/k/v, the attention output, o_proj's input and the four
MLP intermediates; without a fused (flash) kernel, attention also keeps its score and probability matrices.
With checkpointing a layer keeps only its input, plus one layer's full activations during recompute.
`--measure` runs a few real optimizer steps of the plan's single-process configuration on this machine's
CPU and prints the peak of live tensors beside the estimate (tests/test_plan.py holds them within 25 %).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from chatforge.core.io import UserError

GIB = 1024**3
STAGES = ("pretrain", "sft", "rm", "dpo", "ppo", "grpo")


@dataclass
class Geometry:
    """What the estimate needs from a Hugging Face decoder config."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def layer_params(self) -> int:
        h, d = self.hidden, self.head_dim
        attn = h * self.heads * d * 2 + h * self.kv_heads * d * 2  # q, o and k, v projections
        return attn + 3 * h * self.intermediate + 2 * h  # SwiGLU (gate, up, down) + two RMSNorms

    def params(self) -> int:
        embed = self.vocab * self.hidden * (1 if self.tied else 2)
        return embed + self.layers * self.layer_params() + self.hidden


def geometry_of(config: Any) -> Geometry:
    """From a transformers config object or a config.json dict."""
    get = (lambda k, d=None: config.get(k, d)) if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size") if get(k) is None]
    if missing:
        raise UserError(f"model config lacks {', '.join(missing)}: plan needs a decoder-only (Llama-style) config")
    heads = get("num_attention_heads")
    return Geometry(hidden=get("hidden_size"), layers=get("num_hidden_layers"), heads=heads,
                    kv_heads=get("num_key_value_heads") or heads,
                    intermediate=get("intermediate_size") or 4 * get("hidden_size"), vocab=get("vocab_size"),
                    tied=bool(get("tie_word_embeddings", False)))


def load_geometry(model: str) -> Geometry:
    """A model spec (name, run dir, HF dir) or a path to a config.json."""
    p = Path(model)
    if p.is_file():
        try:
            return geometry_of(json.loads(p.read_text(encoding="utf-8")))
        except json.JSONDecodeError as e:
            raise UserError(f"{p}: not a JSON config ({e})") from None
    from chatforge.core.model import resolve_model_path

    cfg = resolve_model_path(model) / "config.json"
    if not cfg.exists():
        raise UserError(f"{model}: no config.json at {cfg}")
    return geometry_of(json.loads(cfg.read_text(encoding="utf-8")))


@dataclass
class PlanInput:
    stage: str = "sft"
    gpus: int = 1
    gpu_mem_gb: float = 80.0
    batch: int = 8
    """Micro-batch rows per rank (RL: the minibatch trained per step)."""
    seq_len: int = 1024
    lora: bool = False
    lora_rank: int = 16
    bf16: bool = True
    """bf16 compute (GPU): activations and the gathered layers in bf16; params, grads and AdamW stay fp32."""
    flash: bool = True
    """A fused attention kernel (flash / mem-efficient SDPA on GPU): no s x s score matrices kept."""
    rollout_batch: int = 64
    """RL: replies generated at once per rank (the KV cache)."""
    reply_tokens: int = 256
    shared_critic: bool = False
    """PPO: the value head on the policy's trunk instead of a separate critic model."""


@dataclass
class Estimate:
    strategy: str
    offload: bool
    checkpointing: bool
    weights: float
    grads: float
    optimizer: float
    activations: float
    kv_cache: float
    cpu: float
    """GiB held in CPU memory per rank (offloaded params, grads, optimizer)."""
    supported: bool = True
    note: str = ""
    total: float = field(init=False)
    fits: bool = False

    def __post_init__(self) -> None:
        self.total = self.weights + self.grads + self.optimizer + self.activations + self.kv_cache


def _models(stage: str, lora: bool, shared_critic: bool) -> tuple[int, int]:
    """(trained, frozen) full copies of the network the stage holds. With LoRA the reference is the same
    weights with the adapters off, so it costs no copy."""
    trained, frozen = {"pretrain": (1, 0), "sft": (1, 0), "rm": (1, 0), "dpo": (1, 1), "grpo": (1, 1),
                       "ppo": (1 if shared_critic else 2, 2)}[stage]  # ppo: policy + critic; reference + RM
    if lora and stage in ("dpo", "grpo", "ppo"):
        frozen -= 1
    return trained, frozen


def activation_bytes(g: Geometry, tokens: int, seq_len: int, act_bytes: int, flash: bool, checkpointing: bool,
                     lm_head: bool = True) -> float:
    """Saved-for-backward bytes of one micro-batch of `tokens` tokens (rows of `seq_len`)."""
    h, f, kvd = g.hidden, g.intermediate, g.kv_heads * g.head_dim
    gqa = 2 * h if g.kv_heads < g.heads else 0  # k and v expanded to every head (repeat_kv) are saved too
    # two RMSNorms (fp32 input, rsqrt, normalised), q and the attention output, k and v, RoPE's rotated
    # halves of q and k, o_proj's input, SwiGLU's gate, silu(gate), up and their product
    per_token = 6 * h + 2 * h + 2 * kvd + gqa + 2 * (h + kvd) + h + 4 * f
    # without a fused kernel (eager attention), s softmax probabilities per token per head, saved in fp32 and, in
    # bf16, once more as the cast that multiplies v; dropout at p 0 returns its input and saves nothing
    attn = 0 if flash else g.heads * seq_len * (4 + (act_bytes if act_bytes < 4 else 0))
    layer = tokens * (per_token * act_bytes + attn)
    body = (layer + g.layers * tokens * h * act_bytes) if checkpointing else g.layers * layer
    # the logits, upcast to fp32 for the loss, and log-softmax's output (fp32)
    head = tokens * g.vocab * (act_bytes + 8) if lm_head else tokens * 4
    return body + head


def estimate(g: Geometry, p: PlanInput) -> list[Estimate]:
    """Every strategy x offload x checkpointing choice for `p`, cheapest-in-speed first."""
    if p.stage not in STAGES:
        raise UserError(f"--stage {p.stage}: choose one of {', '.join(STAGES)}")
    if p.gpus < 1:
        raise UserError("--gpus must be >= 1")
    n_params = g.params()
    trained, frozen = _models(p.stage, p.lora, p.shared_critic)
    lora_params = g.layers * 4 * p.lora_rank * (2 * g.hidden) if p.lora else 0  # q, k, v, o adapters (A and B)
    trainable = lora_params * trained if p.lora else n_params * trained
    base_copies = trained + frozen  # with LoRA the trained models' base weights are frozen too
    act_b = 2 if p.bf16 else 4
    rows_per_step = p.batch * (2 if p.stage in ("dpo", "rm") else 1)  # chosen + rejected
    tokens = rows_per_step * p.seq_len
    rl = p.stage in ("ppo", "grpo")
    kv = (2 * g.layers * g.kv_heads * g.head_dim * p.rollout_batch * (p.seq_len + p.reply_tokens) * act_b
          if rl else 0.0)
    layer_gathered = g.layer_params() * act_b * 2  # FSDP2: the current and the prefetched layer, unsharded
    out: list[Estimate] = []
    choices = [("single" if p.gpus == 1 else "ddp", False)] + ([("fsdp2", False), ("fsdp2", True)])
    for strategy, offload in choices:
        for ckpt in (False, True):
            acts = activation_bytes(g, tokens, p.seq_len, act_b, p.flash, ckpt)
            acts *= trained if p.stage == "ppo" else 1  # ppo trains the critic's forward too
            w_full = base_copies * n_params * 4 + (lora_params * trained * 4 if p.lora else 0)
            grads = trainable * 4
            opt = trainable * 8
            if strategy == "ddp":
                grads *= 2  # DDP's reduction buckets hold a second copy of the gradients
            cpu = 0.0
            if strategy == "fsdp2":
                shard = 1 / p.gpus
                # every model sharded, the frozen ones too (train.fsdp_frozen=shard, the default)
                if offload:
                    cpu = (w_full + grads + opt) * shard
                    w, grads, opt = layer_gathered * base_copies, 0.0, 0.0
                else:
                    w, grads, opt = w_full * shard + layer_gathered * base_copies, grads * shard, opt * shard
            else:
                w = w_full
            note = ""
            supported = not (strategy == "fsdp2" and p.gpus == 1)
            if not supported:
                note = "train.strategy=fsdp2 needs several processes (torchrun); it is refused on one GPU"
            e = Estimate(strategy, offload, ckpt, w / GIB, grads / GIB, opt / GIB, acts / GIB, kv / GIB,
                         cpu / GIB, supported, note)
            e.fits = supported and e.total <= p.gpu_mem_gb
            out.append(e)
    return out


def settings_for(e: Estimate) -> list[str]:
    """The --set overrides that select an estimate's choice."""
    s = [f"train.strategy={e.strategy}"]
    if e.offload:
        s.append("train.fsdp_cpu_offload=true")
    if e.checkpointing:
        s.append("train.activation_checkpointing=true")
    return s


def run(model: str, p: PlanInput, as_json: bool = False) -> dict:
    """Estimate, print a table (or JSON) and the recommended choice."""
    from rich.table import Table

    from chatforge.core.log import console

    g = load_geometry(model)
    rows = estimate(g, p)
    best = next((e for e in rows if e.fits), None)
    result = {"model": model, "params": g.params(), "input": asdict(p), "estimates": [asdict(e) for e in rows],
              "recommended": settings_for(best) if best else None}
    if as_json:
        print(json.dumps(result, indent=2))
        return result
    t = Table(title=f"{p.stage} on {p.gpus} x {p.gpu_mem_gb:g} GiB, {g.params() / 1e6:.1f}M params, micro-batch "
                    f"{p.batch} x {p.seq_len} tokens{', LoRA' if p.lora else ''} (GiB per rank)")
    for col in ("strategy", "offload", "act. ckpt", "weights", "grads", "AdamW", "activations", "KV cache",
                "total", "CPU", "fits"):
        t.add_column(col, justify="left" if col == "strategy" else "right")
    for e in rows:
        t.add_row(e.strategy, "yes" if e.offload else "-", "yes" if e.checkpointing else "-", f"{e.weights:.2f}",
                  f"{e.grads:.2f}", f"{e.optimizer:.2f}", f"{e.activations:.2f}", f"{e.kv_cache:.2f}",
                  f"{e.total:.2f}", f"{e.cpu:.2f}", "yes" if e.fits else ("n/a" if not e.supported else "no"))
    from rich.console import Console

    Console(width=max(console.width, 120)).print(t)  # eleven numeric columns: never truncate them
    if any(not e.supported for e in rows):
        console.print(next(e.note for e in rows if not e.supported))
    if best:
        console.print("fits: " + " ".join(f"--set {s}" for s in settings_for(best)))
    else:
        console.print("[red]nothing fits: use more GPUs, LoRA, a smaller micro-batch (train.grad_accum keeps the "
                      "global batch) or a shorter sequence")
    return result


# ----------------------------------------------------------------------------- measured on this machine


def measure_peak(model: str, p: PlanInput, steps: int = 2) -> dict:
    """Peak live tensor memory of `steps` real AdamW steps of the plan's single-process choice (fp32, no
    checkpointing) on CPU, in a fresh process: the allocator's own count (the profiler's memory events, the CPU
    analogue of torch.cuda.max_memory_allocated), so imported libraries, thread pools and malloc's arenas, which
    differ between machines, are not counted as training memory."""
    import subprocess
    import sys

    code = _MEASURE.format(model=json.dumps(str(model)), batch=p.batch, seq=p.seq_len, steps=steps,
                           lora=p.lora, rank=p.lora_rank)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise UserError(f"measuring {model} failed: {r.stderr[-2000:]}")
    measured = json.loads(r.stdout.strip().splitlines()[-1])
    est = estimate(load_geometry(model), PlanInput(**{**asdict(p), "gpus": 1, "bf16": False, "flash": False}))[0]
    return {"measured_gib": measured["peak_bytes"] / GIB, "estimated_gib": est.total, "estimate": asdict(est)}


_MEASURE = """
import json, torch
from torch.profiler import ProfilerActivity, profile
from transformers import AutoConfig, AutoModelForCausalLM
from peft import LoraConfig, get_peft_model
from chatforge.core.model import resolve_model_path
from pathlib import Path
torch.manual_seed(0)
spec = Path({model})
cfg = AutoConfig.from_pretrained(spec.parent if spec.is_file() else resolve_model_path(str(spec)))
with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    if {lora}:
        model = get_peft_model(model, LoraConfig(r={rank}, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    model.train()
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, ({batch}, {seq}))
    for _ in range({steps}):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
# every allocation (+bytes) and free (-bytes) in time order: the running sum's maximum is the peak of live tensors
events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
live = peak = 0
for _, nbytes in events:
    live += nbytes
    peak = max(peak, live)
print(json.dumps({{"peak_bytes": peak}}))
"""
