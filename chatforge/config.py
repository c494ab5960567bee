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
    strategy: Literal["auto", "single", "ddp", "fsdp2"] = "auto"
    """auto = single for one process, ddp under torchrun; fsdp2 = fully_shard each decoder layer, then the root."""
    fsdp_cpu_offload: bool = False
    """fsdp2: keep sharded params, grads and AdamW state in CPU memory (CPUOffloadPolicy)."""
    fsdp_frozen: Literal["shard", "replicate"] = "shard"
    """fsdp2, RL stages: the frozen reference and reward model sharded like the trained models (least memory), or
    whole replicas on every rank (no all-gathers in their forwards)."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in backward (less memory, ~30 % more compute)."""


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
    ppo = getattr(cfg, "ppo", None)
    if isinstance(ppo, PPOAlgoConfig) and train is not None:
        k = ppo.samples_per_prompt
        if k < 1:
            problems.append("ppo.samples_per_prompt must be >= 1")
        elif train.batch_size % k:
            problems.append(f"ppo.samples_per_prompt={k} must divide train.batch_size={train.batch_size} "
                            "(the rollout batch counts replies: batch_size / K prompts per iteration)")
        if ppo.baseline in ("rloo", "both") and k < 2:
            problems.append(f"ppo.baseline={ppo.baseline} needs ppo.samples_per_prompt >= 2")
        if ppo.critic_warmup_iters < 0:
            problems.append("ppo.critic_warmup_iters must be >= 0")
        elif ppo.critic_warmup_iters and ppo.baseline == "rloo":
            problems.append("ppo.critic_warmup_iters needs a critic (ppo.baseline=critic or both)")
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


@dataclass
class RMDataConfig:
    paths: list[str] = field(default_factory=list)
    """Comparison JSONL paths or `embedded:NAME` (e.g. embedded:prefs/hh)."""
    val_fraction: float = 0.1
    """Held-out share of tasks, split by a hash of task_id (all labels of one task stay together)."""
    aggregate: Literal["none", "bradley_terry", "ranked_pairs", "borda"] = "none"
    """Several labelers on one task: `none` trains on each record as is; a method merges each task's
    labels into one consensus ranking first (chatforge.data.aggregate)."""


@dataclass
class RMLossConfig:
    mode: Literal["kwise", "pairs"] = "kwise"
    """kwise: each reply forwarded once per step (InstructGPT); pairs: TRL's chosen/rejected layout, same loss."""
    margin_scale: float = 0.0
    """Margin = margin_scale * (rating_better - rating_worse) when both replies are rated (0 = off)."""
    tie_weight: float = 0.0
    """Weight of (r_a - r_b)^2 for tied replies (0 = ties give no loss, only no pair)."""


@dataclass
class RMNormConfig:
    policy: str = ""
    """Fit the reward offset on this policy's replies; empty = the most common policy in the training data."""
    max_replies: int = 1024
    """Score at most this many distinct replies for the normalisation (the mean's standard error is then
    under std/32; scoring every reply of a large preference set takes longer than training on it)."""
    divide_std: bool = False
    """Also divide normalised rewards by their std (stored in reward_norm.json, applied by `rm score`)."""


@dataclass
class RMConfig:
    model: str | None = None
    """The model to start from (usually the SFT run): a run dir, HF dir, model name or hub id."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        max_steps=300, lr=3e-4, warmup_steps=20, batch_size=8, checkpoint_every=100, eval_every=50,
        eval_batches=32, seq_len=256))
    """train.batch_size counts comparisons (prompts); a micro-batch forwards all their replies."""
    data: RMDataConfig = field(default_factory=RMDataConfig)
    loss: RMLossConfig = field(default_factory=RMLossConfig)
    norm: RMNormConfig = field(default_factory=RMNormConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA on the trunk (the score head trains in full); the saved model/ has the adapters merged in."""
    log: LogConfig = field(default_factory=LogConfig)


@dataclass
class DPODataConfig:
    paths: list[str] = field(default_factory=list)
    """Comparison JSONL paths or `embedded:NAME` (e.g. embedded:prefs/hh); a K-wise ranking gives every implied pair."""
    val_fraction: float = 0.1
    """Held-out share of tasks, split by a hash of task_id (all pairs of one task stay together)."""
    aggregate: str = "none"
    """Several labelers on one task: `none` uses each record as is; another name (e.g. bradley_terry) merges them."""
    layout: Literal["pairs", "packed"] = "packed"
    """pairs: TRL's batch (chosen half, rejected half; the prompt is forwarded twice); packed: the prompt once
    per pair, several pairs per row with no padding, replies masked from each other (same loss, fewer tokens)."""
    ref_batch_size: int = 16
    """Pairs per forward pass when precomputing the reference log-probs."""


@dataclass
class DPOLossConfig:
    type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    """sigmoid = DPO (Rafailov et al.), ipo = IPO (Azar et al., length-averaged log-probs), hinge = SLiC."""
    beta: float = 0.1
    """KL strength (DPO's beta; IPO's tau)."""
    label_smoothing: float = 0.0
    """cDPO: assumed probability that a preference label is flipped (sigmoid loss only)."""


@dataclass
class DPOConfig:
    policy: str | None = None
    """The model to start from (usually the SFT run): a run dir, HF dir, model name or hub id. It is also the
    frozen reference (its log-probs are precomputed once; with LoRA the adapters are off)."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        max_steps=200, lr=5e-5, warmup_steps=10, batch_size=8, checkpoint_every=100, eval_every=50,
        eval_batches=16, seq_len=256, weight_decay=0.0))
    """train.batch_size counts preference pairs; a micro-batch forwards 2 * batch_size sequences."""
    data: DPODataConfig = field(default_factory=DPODataConfig)
    loss: DPOLossConfig = field(default_factory=DPOLossConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    log: LogConfig = field(default_factory=LogConfig)


@dataclass
class RolloutConfig:
    """How RL stages sample replies (the shared KV-cache engine)."""

    max_new_tokens: int = 64
    """Reply length limit; a reply that hits it without ending its turn is penalised (ppo.missing_eot_penalty)."""
    temperature: float = 1.0
    """Sampling temperature; ratios and KL use log softmax(logits / temperature), TRL's convention."""
    top_k: int = 0
    top_p: float = 1.0
    forward_batch_size: int = 16
    """Rows per no-grad forward when computing rollout log-probs, reference log-probs and values."""
    compile: bool = False
    """Sample with the engine's compile=True (one torch.compile'd decode step; ~20 s to compile per batch shape
    on CPU, then faster decoding for small models: see BENCHMARKS.md)."""


@dataclass
class RLGuardConfig:
    """Reward-hacking guards: each warns with the numbers it saw; `stop` also ends the run (checkpoint kept)."""

    max_kl: float = 25.0
    """Warn when the mean KL to the reference per reply (nats) exceeds this (0 = off)."""
    min_entropy: float = 0.05
    """Warn when the policy's mean per-token entropy (nats) falls below this (0 = off)."""
    window: int = 10
    """Iterations over which score and reply length are compared (and a guard's repeat warnings are muted)."""
    length_growth: float = 1.5
    """Warn when the score rose while mean reply length grew by this factor over the window (0 = off)."""
    max_duplicate_rate: float = 0.5
    """Warn when more than this share of reply pairs (different prompts) are near duplicates (1 = off)."""
    stop: bool = False
    """Stop the run when a guard fires, instead of only warning."""


@dataclass
class PPOAlgoConfig:
    epochs: int = 4
    """PPO epochs over each rollout batch."""
    minibatch_size: int = 8
    """Replies per optimizer step (divides train.batch_size); train.grad_accum splits it into micro-batches."""
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    vf_coef: float = 0.1
    """Weight of the value loss."""
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    kl_coef: float = 0.05
    """beta: per-token reward -beta * KL(policy || reference); the initial value when kl_target is set."""
    kl_estimator: Literal["k1", "k2", "k3", "abs"] = "k1"
    kl_target: float | None = None
    """Set to use the adaptive KL controller (Ziegler et al.): steer the KL per reply toward this many nats."""
    kl_horizon: float = 10000.0
    """Adaptive KL controller horizon (samples)."""
    missing_eot_penalty: float = 1.0
    """Subtracted from the score of a reply that hit rollout.max_new_tokens without ending its turn."""
    samples_per_prompt: int = 1
    """K replies per prompt (rows prompt-major); train.batch_size counts replies, so it must divide by K."""
    baseline: Literal["critic", "rloo", "both"] = "critic"
    """critic: GAE on a learned value model (InstructGPT); rloo: REINFORCE with the leave-one-out mean of the
    prompt's other samples as baseline, no critic (RLOO); both: subtract that mean from each score, then GAE
    with the critic. rloo and both need samples_per_prompt >= 2."""
    normalise_scores: bool = False
    """Divide RM scores by the RM's SFT-reply std (reward_norm.json), so rewards, kl_coef and the value clip
    are in units of that std (the critic from the RM is scaled the same way)."""
    critic_warmup_iters: int = 0
    """Value-only iterations first: the critic learns the returns before the policy moves (0 = off)."""


@dataclass
class CriticConfig:
    init: Literal["auto", "reward", "policy"] = "auto"
    """Value model start: the reward model (InstructGPT), the policy with a zero-initialised value head, or
    auto = the RM when the reward is one whose tokenizer matches the policy, else the policy."""
    shared: bool = False
    """A value head on the policy's own trunk (one forward, shared gradients) instead of a separate critic."""
    lr: float | None = None
    """Critic learning rate (none = train.lr)."""
    adapter: bool = False
    """With lora.enabled: the critic is its own LoRA adapter + value head on the policy's frozen base, so one
    copy of the weights serves policy, reference (adapters off) and critic (single process)."""


@dataclass
class PTXConfig:
    """PPO-ptx (InstructGPT): add coef * LM loss on pretraining batches to every policy update."""

    coef: float = 0.0
    """ptx_coef (0 = plain PPO)."""
    data: str | None = None
    """A `chatforge data prepare` dir tokenised with the policy's tokenizer (this or `demos` when coef > 0)."""
    demos: list[str] = field(default_factory=list)
    """Or demonstrations (`sft --data` specs): the LM loss on their assistant tokens, chat-templated and packed as
    SFT packs them. For a pretrained chat model whose pretraining corpus is not at hand, this is what keeps its
    general chat while RL chases the RM (the alignment tax)."""
    batch_size: int = 4
    seq_len: int = 128


@dataclass
class GoldConfig:
    """Over-optimisation monitor of an RL run: proxy vs gold on validation prompts against KL."""

    spec: str | None = None
    """The gold judge as a reward spec (`rule`, `tasks`, an RM); none = off."""
    every: int = 10
    """Measure every N iterations (and at iteration 0)."""
    prompts: str = "tasks-heldout:4:977"
    """Validation prompts (a draw no test set uses); the best-gold policy is kept in best_gold/."""
    samples: int = 1
    """Replies per validation prompt (more than 1 needs temperature > 0; the seeds repeat at every measurement)."""
    temperature: float = 0.0
    """Decoding of the validation replies: 0 = greedy; the rollouts' temperature measures the policy RL trains."""


@dataclass
class PPOConfig:
    policy: str | None = None
    """The model to train (usually the SFT run): a run dir, HF dir, model name or hub id."""
    reward: str | None = None
    """An RM run dir/HF dir/name, `tasks` (task-suite checkers) or `keyword:WORD[,WORD]` (toy)."""
    prompts: str | None = None
    """Prompt JSONL or tasks:N[:SEED]."""
    reference: str | None = None
    """The frozen KL reference; none = the policy model as loaded (with LoRA: the policy with adapters off)."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        max_steps=200, lr=1e-5, warmup_steps=0, schedule="constant", batch_size=16, checkpoint_every=50,
        eval_every=0, log_every=1, weight_decay=0.0))
    """train.max_steps counts PPO iterations; train.batch_size is prompts per rank per iteration."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    ppo: PPOAlgoConfig = field(default_factory=PPOAlgoConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    ptx: PTXConfig = field(default_factory=PTXConfig)
    guards: RLGuardConfig = field(default_factory=RLGuardConfig)
    gold: GoldConfig = field(default_factory=GoldConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA on the policy and on the critic (unless critic.shared)."""
    log: LogConfig = field(default_factory=LogConfig)


@dataclass
class GRPOAlgoConfig:
    group_size: int = 4
    """K replies per prompt (the group whose mean is the baseline)."""
    epochs: int = 1
    """Passes over each rollout batch (TRL's num_iterations)."""
    minibatch_size: int = 16
    """Replies per optimizer step (divides train.batch_size * group_size)."""
    clip_range: float = 0.2
    beta: float = 0.0
    """KL penalty weight (0 = no reference model is loaded, TRL's default)."""
    kl_estimator: Literal["k1", "k2", "k3", "abs"] = "k3"
    scale: Literal["group", "batch", "none"] = "group"
    """Advantage = (r - group mean) / std of the group (GRPO), of the batch, or not divided (Dr. GRPO)."""


@dataclass
class GRPOConfig:
    policy: str | None = None
    """The model to train (usually the SFT run): a run dir, HF dir, model name or hub id."""
    reward: str | None = None
    """An RM run dir/HF dir/name, `tasks` (task-suite checkers) or `keyword:WORD[,WORD]` (toy)."""
    prompts: str | None = None
    """Prompt JSONL or tasks:N[:SEED]."""
    reference: str | None = None
    """The KL reference when grpo.beta > 0; none = the policy model as loaded (LoRA: adapters off)."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        max_steps=200, lr=1e-5, warmup_steps=0, schedule="constant", batch_size=8, checkpoint_every=50,
        eval_every=0, log_every=1, weight_decay=0.0))
    """train.max_steps counts iterations; train.batch_size is prompts per rank per iteration (x group_size rows)."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    grpo: GRPOAlgoConfig = field(default_factory=GRPOAlgoConfig)
    guards: RLGuardConfig = field(default_factory=RLGuardConfig)
    gold: GoldConfig = field(default_factory=GoldConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    log: LogConfig = field(default_factory=LogConfig)


@dataclass
class BoNAlgoConfig:
    n: int = 8
    """Replies sampled per prompt; the reward picks the best (best-of-n, rejection sampling)."""
    rounds: int = 1
    """Sample -> pick -> SFT, repeated; round r samples from round r-1's model (RAFT, Llama 2's rejection sampling)."""
    prompts_per_round: int = 128
    """Prompts drawn (without replacement while they last) for each round."""
    ensemble: list[str] = field(default_factory=list)
    """Further reward sources scored beside `reward`; combined by `combine` (Coste et al. 2024)."""
    combine: Literal["mean", "min"] = "mean"
    """How ensemble scores combine: mean, or min = worst case (conservative against one RM's errors)."""
    require_end_of_turn: bool = True
    """Only replies that ended their turn can be picked (a cut-off reply is a bad demonstration)."""


@dataclass
class BoNConfig:
    """`chatforge bon`: best-of-n distillation = sample n, the reward picks, SFT on the picks, repeat."""

    policy: str | None = None
    """The model to improve (usually the SFT run)."""
    reward: str | None = None
    """An RM run dir/HF dir/name, `tasks`, `rule` or `keyword:WORD` (as for ppo)."""
    prompts: str | None = None
    """Prompt JSONL or tasks:N[:SEED]."""
    bon: BoNAlgoConfig = field(default_factory=BoNAlgoConfig)
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(max_new_tokens=32))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        max_steps=40, lr=5e-4, warmup_steps=4, batch_size=8, seq_len=256, checkpoint_every=0, eval_every=0))
    """The SFT step of each round (train.max_steps per round)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    log: LogConfig = field(default_factory=LogConfig)


@dataclass
class EvalConfig:
    """`chatforge eval` settings; defaults keep a CPU run to a minute or two for a small model."""

    model: str = ""
    """The model to evaluate (run dir, HF dir or model name)."""
    baselines: list[str] = field(default_factory=list)
    """Models to compare against; the first is "the" baseline for bias deltas."""
    reward: str | None = None
    """Reward model: scores replies, judges win rates, and is evaluated on `comparisons`."""
    judge: str = "rule"
    """Win-rate judge: a labeler spec (rule, panel:rule*5:temperature=0.5, judge:base_url=...), rm or none."""
    data_dir: str | None = None
    """Prepared data dir for held-out LM loss (default: the one in the model's lineage)."""
    sft_data: str | None = None
    """SFT validation conversations: tasks:N (held-out demonstrations) or a conversation file."""
    comparisons: list[str] = field(default_factory=list)
    """Held-out comparison files for RM accuracy."""
    comparisons_split: Literal["all", "val"] = "all"
    """val: only the RM's own validation split of `comparisons` (they are its training data, as in a loop round)."""
    prompts: str = "tasks-heldout:10"
    """Eval prompts: tasks-heldout:N[:SEED] or a prompt JSONL."""
    train_prompts: list[str] = field(default_factory=list)
    """Extra training prompt specs to check eval prompts against (manifests are read automatically)."""
    previous: str | None = None
    """The previous round's report dir: linked, and its headline numbers compared."""
    bias: bool = True
    bias_max_examples: int = 40
    """Winogender triples and BBQ examples per model (deterministic subsample; 0 = all)."""
    bias_bold_per_group: int = 2
    """BOLD prompts per group (the generating probe)."""
    bias_new_tokens: int = 32
    kl: bool = True
    """Re-measure each RL model's KL to its reference on the eval prompts (sampled replies at T 1)."""
    bias_file: str | None = None
    """A CrowS-Pairs-format CSV of your own (sent_more, sent_less, stereo_antistereo, bias_type): runs the
    CrowS-Pairs probe on it beside the embedded probes (every row, no subsample)."""
    general: list[str] = field(default_factory=lambda: ["embedded:sft/oasst-best", "embedded:sft/self-instruct"])
    """Human-written conversations outside the task suite (OpenAssistant, self-instruct): every model's held-out
    loss on their assistant replies, and its own replies to their prompts scored by the rule labeler's general
    utility, distinct-2 and repetition (the alignment tax). Conversations whose user turns occur in any model's
    training data are left out; [] turns the section off."""
    general_n: int = 48
    """Conversations for the general-chat section (taken in turn from each `general` source)."""
    general_max_new_tokens: int = 96
    max_new_tokens: int = 48
    temperature: float = 0.0
    batch_size: int = 16
    lm_batches: int = 8
    """Batches of val windows for the held-out LM loss."""
    seq_len: int = 256
    n_boot: int = 1000
    samples: int = 6
    """Example prompts shown with every model's reply."""
    seed: int = 0
