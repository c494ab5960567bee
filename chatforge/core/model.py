"""Models are Hugging Face causal LMs: a small Llama sized by `depth`, or any existing model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from chatforge.config import ModelConfig
from chatforge.core.io import UserError, atomic_dir


def llama_config_for(cfg: ModelConfig, tok: Any) -> Any:
    """nanochat's size dial: width = depth * aspect; heads from head_dim; MLP from mlp_ratio."""
    from transformers import LlamaConfig

    width = cfg.depth * cfg.aspect
    heads = max(1, width // cfg.head_dim)
    if width % heads:
        raise UserError(f"model width {width} is not divisible by {heads} heads; change model.aspect/head_dim")
    ffn = max(32, int(round(cfg.mlp_ratio * width / 32)) * 32)
    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=width,
        intermediate_size=ffn,
        num_hidden_layers=cfg.depth,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=cfg.tie_embeddings,
    )


def build_model(cfg: ModelConfig, tok: Any, seed: int) -> Any:
    """A freshly initialised Llama (deterministic under `seed`)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config_for(cfg, tok))
    return model


def resolve_model_path(spec: str) -> Path:
    """A name, path, run dir or hub id -> a local HF model dir (see core/hub.py)."""
    from chatforge.core.hub import resolve_model

    return Path(resolve_model(spec))


def load_model(spec: str, dtype: torch.dtype = torch.float32) -> Any:
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(spec)
    try:
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    except Exception as e:
        raise UserError(f"cannot load model from {path}: {e}") from e


def load_model_and_tokenizer(spec: str, dtype: torch.dtype = torch.float32) -> tuple[Any, Any, Path]:
    from chatforge.core.tokenizer import load_tokenizer

    path = resolve_model_path(spec)
    model = load_model(str(path), dtype)
    tok = load_tokenizer(path)
    if len(tok) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tok))
    return model, tok, path


# Inference precisions for the engine, `chat` and `serve`. On CPU, decoding one stream is bound by reading the
# weights each token, so 16-bit weights halve the bytes; whether that is faster depends on the CPU's 16-bit matmul
# (BENCHMARKS.md: on an AMD EPYC with AVX-512 BF16, SmolLM2 decodes fp16 3x and bf16 1.9x as fast as fp32; on an
# Intel dev machine bf16 was slower). fp16 keeps bf16's held-out loss on SmolLM2 (within 1 % of fp32, measured);
# int8 dynamic quantisation of every Linear raised it by 73 %, so it is not offered.
PRECISIONS = ("fp32", "bf16", "fp16")
PRECISION_OF_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # torch's names, as --dtype takes
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def precision_of_dtype(dtype: str) -> str:
    """The PRECISIONS name of a --dtype value (torch's name, or the precision itself); a clear error otherwise."""
    precision = PRECISION_OF_DTYPE.get(dtype, dtype)
    if precision not in PRECISIONS:
        raise UserError(f"--dtype must be {', '.join(PRECISION_OF_DTYPE)}, not '{dtype}'")
    return precision


def for_inference(model: Any, precision: str = "fp32") -> Any:
    """The model in eval mode at `precision` (one of PRECISIONS)."""
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, not '{precision}'")
    model.eval()
    if precision in _DTYPES:
        return model.to(_DTYPES[precision])
    return model


def count_params(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def unwrap(model: Any) -> Any:
    """The bare HF model under DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def peft_lora_config(cfg: Any, task_type: str = "CAUSAL_LM") -> Any:
    """A peft LoraConfig from our LoraConfig (`target_modules` "all-linear" or a comma list)."""
    from peft import LoraConfig as PeftLora

    targets: Any = cfg.target_modules
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    return PeftLora(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                    task_type=task_type)


def apply_lora(model: Any, cfg: Any, task_type: str = "CAUSAL_LM") -> Any:
    """Wrap `model` with LoRA adapters (peft); only adapter weights (and, for SEQ_CLS, the score head) train."""
    import warnings

    from peft import get_peft_model

    with warnings.catch_warnings():  # peft 0.21 reads transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, peft_lora_config(cfg, task_type))


def merged(model: Any) -> Any:
    """The plain HF model to save: a peft wrapper's adapters merged in (a copy), anything else as is."""
    bare = unwrap(model)
    if hasattr(bare, "merge_and_unload") and hasattr(bare, "peft_config"):
        import copy

        bare = copy.deepcopy(bare).merge_and_unload()  # final model/ loads with no peft import
    return bare


ADAPTER_DIR = "adapter"
"""Inside a LoRA run's model/: the adapter alone (peft's files) and `base.json` naming the model it adapts, so
`serve` can keep one copy of a base shared by several adapters. model/ itself is the merged model."""


def lora_adapter(model_dir: str | Path) -> tuple[Path, Path] | None:
    """(adapter dir, base model dir) of a merged LoRA model that kept its adapter, while that base exists."""
    import json

    adir = Path(model_dir) / ADAPTER_DIR
    try:
        base = Path(json.loads((adir / "base.json").read_text(encoding="utf-8"))["base"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (adir, base) if (adir / "adapter_config.json").exists() and (base / "config.json").exists() else None


def _save_adapter(bare: Any, out_dir: Path) -> None:
    """A causal-LM peft model's adapter into out_dir/adapter (see ADAPTER_DIR)."""
    import json

    cfg = next(iter(getattr(bare, "peft_config", {}).values()), None)
    task = str(getattr(cfg, "task_type", "") or "")
    if cfg is None or not task.endswith("CAUSAL_LM") or not cfg.base_model_name_or_path:
        return
    base = Path(cfg.base_model_name_or_path)
    if not (base / "config.json").exists():  # a hub id or a moved dir: nothing to share
        return
    bare.save_pretrained(out_dir / ADAPTER_DIR, safe_serialization=True)
    (out_dir / ADAPTER_DIR / "base.json").write_text(json.dumps({"base": str(base.resolve())}), encoding="utf-8")


def save_model(model: Any, tok: Any, out_dir: Path, is_main: bool = True, extra: dict[str, str] | None = None) -> None:
    """save_pretrained (safetensors) + tokenizer (+ `extra` text files), atomically: loadable with plain
    transformers. An FSDP2-sharded model is gathered first (every rank calls this; `is_main` writes). A LoRA
    model is saved merged, with its adapter beside it in ADAPTER_DIR."""
    from chatforge.core.distributed import full_state_dict, is_sharded

    bare = unwrap(model)
    state = full_state_dict(bare) if is_sharded(bare) else None
    if not is_main:
        return
    with atomic_dir(out_dir) as tmp:
        if state is not None:
            bare.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        else:
            merged(model).save_pretrained(tmp, safe_serialization=True)
            _save_adapter(bare, tmp)
        tok.save_pretrained(tmp)
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")


def flops_per_token(model: Any, seq_len: int) -> float:
    """Training FLOPs per token: 6 * N (non-embedding params) + attention 12 * L * d * T (PaLM app. B)."""
    cfg = unwrap(model).config
    bare = unwrap(model)
    n = count_params(bare)
    has_lm_head = getattr(bare, "get_output_embeddings", lambda: None)() is not None  # a classifier has none
    if not (has_lm_head and getattr(cfg, "tie_word_embeddings", False)):  # a tied matrix still does the lm_head matmul
        n -= bare.get_input_embeddings().weight.numel()
    layers, width = cfg.num_hidden_layers, cfg.hidden_size
    return 6 * n + 12 * layers * width * seq_len
