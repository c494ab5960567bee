"""Typed configs: dataclasses per stage, loaded from YAML, overridden with `--set a.b=c`.

Every field has a type hint and a default; nested groups are dataclasses (`model.`, `train.`,
`data.`, `log.`). Unknown keys are errors that list the valid keys. Values from YAML and `--set`
are checked against the field's type (int, float, str, bool, Optional[...], Literal[...], list).
The resolved config (`to_dict`) is what goes into a run's manifest.json.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from chatforge.core.io import UserError

# ----------------------------------------------------------------------------- shared groups


@dataclass
class ModelConfig:
    """What model to train. `from` continues an existing model; otherwise a Llama sized by `depth`."""

    depth: int = 4
    """The one size dial (nanochat-style): width = depth * aspect, heads = width / head_dim."""
    aspect: int = 64
    """Width per unit of depth."""
    head_dim: int = 64
    """Attention head size; heads = width // head_dim (at least 1)."""
    mlp_ratio: float = 4.0
    """MLP hidden size = mlp_ratio * width (rounded to a multiple of 32)."""
    max_seq_len: int = 256
    """Context length (max_position_embeddings)."""
    tie_embeddings: bool = False
    from_: str | None = None
    """Continue from a local HF model dir, a run dir, a model name or a hub id (YAML key `from`)."""


@dataclass
class TrainConfig:
    """The optimisation loop shared by every training stage."""

    max_steps: int = 600
    """Optimizer steps."""
    batch_size: int = 8
    """Sequences per micro-batch per process."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    seq_len: int = 256
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    """Final LR as a fraction of lr (cosine and WSD)."""
    warmup_steps: int = 30
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    decay_fraction: float = 0.2
    """WSD: fraction of steps spent in the final linear decay."""
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    """Clip the global grad norm to this (0 = off)."""
    seed: int = 1337
    checkpoint_every: int = 200
    """Save a resumable checkpoint every N steps (0 = only at the end)."""
    keep_checkpoints: int = 2
    eval_every: int = 100
    """Validation loss every N steps (0 = only at the end)."""
    eval_batches: int = 8
    log_every: int = 10
    compile: bool = False
    """torch.compile the model (GPU recommended)."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N"""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Autocast dtype; auto = bf16 on a GPU that supports it, fp32 on CPU."""
    threads: int = 0
    """torch CPU threads (0 = leave torch's default)."""


@dataclass
class LogConfig:
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "chatforge"
    progress: bool = True


# ----------------------------------------------------------------------------- stages


@dataclass
class PretrainDataConfig:
    dir: str | None = None
    """A `chatforge data prepare` output dir; none = prepare the embedded corpus into OUT/data."""
    vocab_size: int = 4096
    """Tokenizer size when the embedded corpus is prepared on the fly."""


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    log: LogConfig = field(default_factory=LogConfig)


# ----------------------------------------------------------------------------- machinery

_ALIASES = {"from": "from_"}  # YAML/CLI keys that are Python keywords


def _field_name(key: str) -> str:
    return _ALIASES.get(key, key)


def _key_name(name: str) -> str:
    return {v: k for k, v in _ALIASES.items()}.get(name, name)


def valid_keys(cls: type, prefix: str = "") -> list[str]:
    """All dotted keys of a config class (leaves only)."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        name = prefix + _key_name(f.name)
        if dataclasses.is_dataclass(t):
            keys += valid_keys(t, name + ".")
        else:
            keys.append(name)
    return keys


def _coerce(value: Any, t: Any, key: str) -> Any:
    """Check/convert `value` (from YAML or a `--set` string) to type `t`."""
    origin = typing.get_origin(t)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(t)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except UserError as e:
                errors.append(str(e))
        raise UserError(errors[0] if errors else f"config key '{key}': bad value {value!r}")
    if origin is Literal:
        choices = typing.get_args(t)
        if value not in choices:
            raise UserError(f"config key '{key}': {value!r} is not one of {list(choices)}")
        return value
    if origin is list:
        (inner,) = typing.get_args(t) or (Any,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v != ""] if not value.startswith("[") else yaml.safe_load(value)
        if not isinstance(value, list):
            raise UserError(f"config key '{key}': expected a list, got {value!r}")
        return [_coerce(v, inner, key) if inner is not Any else v for v in value]
    if t is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise UserError(f"config key '{key}': expected true/false, got {value!r}")
    if t is int:
        if isinstance(value, bool):
            raise UserError(f"config key '{key}': expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                try:
                    f = float(value)
                    if f.is_integer():
                        return int(f)
                except ValueError:
                    pass
        raise UserError(f"config key '{key}': expected an integer, got {value!r}")
    if t is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"config key '{key}': expected a number, got {value!r}")
    if t is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"config key '{key}': expected a string, got {value!r}")
    return value


def _set(cfg: Any, dotted: str, value: Any, root_cls: type) -> None:
    parts = dotted.split(".")
    obj = cfg
    for i, part in enumerate(parts):
        name = _field_name(part)
        hints = typing.get_type_hints(type(obj))
        if name not in hints:
            prefix = ".".join(parts[:i])
            raise UserError(
                f"unknown config key '{dotted}'. Valid keys: {', '.join(valid_keys(root_cls))}"
                if not prefix
                else f"unknown config key '{dotted}'. Valid keys under '{prefix}': "
                + ", ".join(valid_keys(type(obj), prefix + "."))
            )
        t = hints[name]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(t):
                if not isinstance(value, dict):
                    raise UserError(f"config key '{dotted}' is a group; set its keys: {valid_keys(t, dotted + '.')}")
                for k, v in value.items():
                    _set(cfg, f"{dotted}.{k}", v, root_cls)
            else:
                setattr(obj, name, _coerce(value, t, dotted))
        else:
            if not dataclasses.is_dataclass(t):
                raise UserError(f"config key '{'.'.join(parts[: i + 1])}' is not a group (in '{dotted}')")
            obj = getattr(obj, name)


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out += _flatten(v, key + ".")
        else:
            out.append((key, v))
    return out


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | None = None) -> Any:
    """Build `cls()` defaults, apply the YAML file, then each `key=value` override, type-checked."""
    cfg = cls()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise UserError(f"{p}: invalid YAML: {e}") from None
        if not isinstance(data, dict):
            raise UserError(f"{p}: expected a mapping of config keys at the top level")
        for key, value in _flatten(data):
            try:
                _set(cfg, key, value, cls)
            except UserError as e:
                raise UserError(f"{p}: {e}") from None
    for item in overrides or []:
        if "=" not in item:
            raise UserError(f"--set expects key=value, got '{item}'")
        key, value = item.split("=", 1)
        _set(cfg, key.strip(), yaml.safe_load(value) if value.strip() else "", cls)
    validate(cfg)
    return cfg


def validate(cfg: Any) -> None:
    """Collect every range problem and raise once (litgpt's validate_args)."""
    problems = []
    train = getattr(cfg, "train", None)
    if train is not None:
        for name in ("max_steps", "batch_size", "grad_accum", "seq_len"):
            if getattr(train, name) < 1:
                problems.append(f"train.{name} must be >= 1")
        if train.lr <= 0:
            problems.append("train.lr must be > 0")
        if not 0 <= train.min_lr_ratio <= 1:
            problems.append("train.min_lr_ratio must be in [0, 1]")
        if train.checkpoint_every < 0 or train.eval_every < 0:
            problems.append("train.checkpoint_every and train.eval_every must be >= 0")
    model = getattr(cfg, "model", None)
    if isinstance(model, ModelConfig) and model.depth < 1:
        problems.append("model.depth must be >= 1")
    if problems:
        raise UserError("invalid config: " + "; ".join(problems))


def to_dict(cfg: Any) -> dict:
    """The resolved config as plain data (YAML keys, e.g. `from` not `from_`)."""

    def conv(obj: Any) -> Any:
        if dataclasses.is_dataclass(obj):
            return {_key_name(f.name): conv(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        if isinstance(obj, list):
            return [conv(v) for v in obj]
        return obj

    return conv(cfg)


@dataclass
class LoraConfig:
    """LoRA adapters via peft (reference model = adapters off)."""

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: str = "all-linear"
    """peft target_modules: 'all-linear' or a comma-separated list of module names."""


@dataclass
class SFTDataConfig:
    paths: list[str] = field(default_factory=list)
    """Conversation JSONL paths, `embedded:NAME` or `tasks:N` (N task-suite demonstrations per family)."""
    val_fraction: float = 0.05
    packing: bool = True
    truncation: Literal["turns", "drop"] = "turns"
    """Too-long conversations: drop trailing turns until they fit ("turns") or skip them ("drop")."""


@dataclass
class SFTConfig:
    model: str | None = None
    """The model to fine-tune: a run dir, HF dir, model name or hub id."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        max_steps=300, lr=1e-3, warmup_steps=20, checkpoint_every=100, eval_every=100, seq_len=256))
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    log: LogConfig = field(default_factory=LogConfig)
