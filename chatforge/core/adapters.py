"""One frozen base, several LoRA adapters: policy, reference, critic and reward model on one copy of the weights.

InstructGPT's PPO holds four models: the policy, the frozen SFT reference, the value model (critic) and the
reward model. With LoRA they can all be one frozen base plus small named adapters (peft multi-adapter):

    role        what runs                                          trains
    policy      base + "policy" adapter -> lm_head                 yes
    reference   base with every adapter off -> lm_head             no
    critic      base + "critic" adapter -> hidden -> value head    yes
    reward      base + "reward" adapter -> hidden -> score head    no (a trained RM's adapter + head)

so a 135M-parameter base costs 135M parameters once instead of four times. `SharedBase` builds that
PeftModel and switches roles with a context manager:

    shared = SharedBase(model, LoraConfig(r=16, alpha=32))        # wraps `model` in place, no copy
    policy = shared.model                                         # a PeftModel; "policy" is active by default
    with shared.role("reference"):                                # == policy.disable_adapter()
        ref_logits = policy(**inputs).logits
    values = shared.values(inputs, n_response)                    # critic adapter + value head, [B, T]
    rewards = shared.rewards(input_ids, attention_mask)           # reward adapter + score head, [B]
    critic = shared.critic_module()                               # drop-in for ppo.TokenValueModel
    reward = SharedReward(shared, tok)                            # a RewardSource on the reward adapter

peft's `set_adapter` also flips `requires_grad` (only the active adapter trains); `SharedBase` undoes that
after every switch, so the policy and critic adapters both stay trainable while one forward uses one of them.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch

from chatforge.config import LoraConfig
from chatforge.core.io import UserError
from chatforge.core.model import peft_lora_config

ADAPTERS = ("policy", "critic", "reward")
ROLES = ("policy", "reference", "critic", "reward")
HEADS = ("critic", "reward")


class SharedBase(torch.nn.Module):
    """A causal LM wrapped once by peft with named LoRA adapters, plus a 1-output head per scoring role.

    `trainable` lists the adapters (and their heads) that keep `requires_grad`; the base is always frozen.
    The critic head starts at zero (values 0, as ppo.ValueHead); the reward head from N(0, 1/(d+1))
    (Stiennon et al. 2020) until a trained one is loaded.
    """

    def __init__(self, base: Any, lora: LoraConfig, adapters: tuple[str, ...] = ADAPTERS,
                 trainable: tuple[str, ...] = ("policy", "critic"), seed: int = 0):
        super().__init__()
        from peft import get_peft_model

        unknown = [a for a in (*adapters, *trainable) if a not in ADAPTERS]
        if unknown or "policy" not in adapters or not set(trainable) <= set(adapters):
            raise ValueError(f"adapters must include 'policy' and be among {ADAPTERS}, trainable among adapters; "
                             f"got adapters={adapters} trainable={trainable}")
        self.adapters, self.trainable = tuple(adapters), set(trainable)
        torch.manual_seed(seed)  # LoRA A matrices are drawn at random
        self.model = get_peft_model(base, peft_lora_config(lora), adapter_name="policy")
        for name in adapters:
            if name != "policy":
                self.model.add_adapter(name, peft_lora_config(lora))
        hidden = base.config.get_text_config().hidden_size
        self.heads = torch.nn.ModuleDict({h: torch.nn.Linear(hidden, 1) for h in HEADS if h in adapters})
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, head in self.heads.items():
                head.bias.zero_()
                if name == "critic":
                    head.weight.zero_()
                else:
                    head.weight.copy_(torch.randn(head.weight.shape, generator=g) / math.sqrt(hidden + 1))
        self._active = "policy"
        self._activate("policy")

    # ------------------------------------------------------------------------------------- switching

    def _activate(self, name: str) -> None:
        self.model.set_adapter(name)
        for adapter in self.adapters:  # peft froze every other adapter; restore our own choice
            self.model.set_requires_grad(adapter, requires_grad=adapter in self.trainable)
        for name_, head in self.heads.items():
            head.requires_grad_(name_ in self.trainable)
        self._active = name

    @contextlib.contextmanager
    def role(self, name: str) -> Iterator[None]:
        """Run the body as `name` (policy, reference, critic, reward); restores the previous adapter."""
        if name not in ROLES or (name != "reference" and name not in self.adapters):
            raise ValueError(f"unknown role '{name}'; this SharedBase has {('reference', *self.adapters)}")
        if name == "reference":
            with self.model.disable_adapter():
                yield
            return
        previous = self._active
        self._activate(name)
        try:
            yield
        finally:
            self._activate(previous)

    @property
    def active(self) -> str:
        return self._active

    # ------------------------------------------------------------------------------------- forwards

    def trunk(self) -> Any:
        """The bare transformer (no lm_head) inside the peft wrapper; its LoRA layers follow the active role."""
        causal = self.model.get_base_model()
        return getattr(causal, causal.base_model_prefix)

    def hidden_states(self, role: str, **inputs: torch.Tensor) -> torch.Tensor:
        """Last hidden states [B, L, H] of the trunk under `role`."""
        with self.role(role):
            return self.trunk()(**inputs, use_cache=False).last_hidden_state

    def values(self, inputs: dict[str, torch.Tensor], n_response: int) -> torch.Tensor:
        """Critic values [B, T] at the positions that predict the T reply tokens (the log-prob alignment)."""
        hidden = self.hidden_states("critic", **inputs)[:, -(n_response + 1): -1]
        return self.heads["critic"](hidden).squeeze(-1).float()

    def rewards(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Reward [B] at each row's last real token (attention mask, so any padding side and pad id work)."""
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
        hidden = self.hidden_states("reward", input_ids=input_ids, attention_mask=attention_mask,
                                    position_ids=position_ids)
        cols = torch.arange(input_ids.shape[1], device=input_ids.device)
        last = (cols * attention_mask.long()).argmax(dim=1)
        pooled = hidden[torch.arange(len(hidden), device=hidden.device), last]
        return self.heads["reward"](pooled).squeeze(-1).float()

    def critic_module(self) -> torch.nn.Module:
        """A module with ppo.TokenValueModel's call signature `critic(inputs, n_response) -> [B, T]`."""
        return _CriticView(self)

    # ------------------------------------------------------------------------------------- bookkeeping

    def parameters_of(self, name: str) -> list[torch.nn.Parameter]:
        """The adapter's LoRA parameters plus its head (what an optimizer for that role should get)."""
        params = [p for n, p in self.model.named_parameters() if "lora_" in n and f".{name}." in n]
        if name in self.heads:
            params += list(self.heads[name].parameters())
        return params

    def base_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The frozen base weights (every parameter that belongs to no adapter)."""
        return {n: p for n, p in self.model.named_parameters() if "lora_" not in n}

    def init_critic_from_reward(self) -> None:
        """Start the critic as a copy of the reward model (InstructGPT): adapter weights and head."""
        if "critic" not in self.adapters or "reward" not in self.adapters:
            raise ValueError("init_critic_from_reward needs both a critic and a reward adapter")
        named = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, p in named.items():
                if "lora_" in n and ".critic." in n:
                    p.copy_(named[n.replace(".critic.", ".reward.")])
            self.heads["critic"].load_state_dict(self.heads["reward"].state_dict())

    def load_adapter_state(self, name: str, lora_state: dict[str, torch.Tensor],
                           head_state: dict[str, torch.Tensor] | None = None) -> None:
        """Load an adapter's weights (peft's `get_peft_model_state_dict` naming) and optionally its head."""
        from peft import set_peft_model_state_dict

        try:
            result = set_peft_model_state_dict(self.model, lora_state, adapter_name=name)
        except RuntimeError as e:  # shape mismatch: the adapter was trained on another architecture or size
            first = str(e).strip().splitlines()[-1].strip()
            raise UserError(f"adapter '{name}' does not fit this base (trained on another model?): {first}") from None
        missing = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        if missing:
            raise UserError(f"adapter '{name}': {len(missing)} weights did not match this base (e.g. {missing[0]}); "
                            "was it trained on another model?")
        if head_state is not None:
            self.heads[name].load_state_dict(head_state)
        self._activate(self._active)


class SharedReward:
    """A RewardSource (core/rewards.py) scoring with the reward role of a SharedBase: text in, floats out.

    Renders prompt + reply the way `rm score` does (data/rm_data.render_scored) and subtracts the RM's stored
    normalisation offset when one is given (a `RewardNorm`).
    """

    def __init__(self, shared: SharedBase, tok: Any, norm: Any = None, batch_size: int = 16,
                 seq_len: int | None = None):
        self.name = "rm:shared-base reward adapter"
        self.shared, self.tok, self.norm, self.batch_size = shared, tok, norm, batch_size
        cfg = shared.model.get_base_model().config.get_text_config()
        self.seq_len = seq_len or getattr(cfg, "max_position_embeddings", 2048)

    @torch.no_grad()
    def score(self, prompts: list[dict], replies: list[str], finished: list[bool] | None = None) -> list[float]:
        from chatforge.data.rm_data import pad_batch, render_scored

        ended = finished if finished is not None else [True] * len(replies)
        seqs = [render_scored(self.tok, p["messages"], r, self.seq_len, e)[0]
                for p, r, e in zip(prompts, replies, ended, strict=True)]
        device = next(self.shared.parameters()).device
        out: list[float] = []
        for i in range(0, len(seqs), self.batch_size):
            batch = {k: v.to(device) for k, v in pad_batch(seqs[i: i + self.batch_size], 0).items()}
            out += self.shared.rewards(batch["input_ids"], batch["attention_mask"], batch["position_ids"]).tolist()
        return [self.norm.apply(x) for x in out] if self.norm is not None else out


class _CriticView(torch.nn.Module):
    """The critic role of a SharedBase as its own module (for code that takes a separate critic).

    The SharedBase is held without registering it as a submodule, and `parameters()` yields only the critic's
    adapter and head, so an optimizer built from `critic.parameters()` never touches the policy's weights.
    """

    def __init__(self, shared: SharedBase):
        super().__init__()
        object.__setattr__(self, "shared", shared)

    def parameters(self, recurse: bool = True) -> Iterator[torch.nn.Parameter]:
        yield from self.shared.parameters_of("critic")

    def forward(self, inputs: dict[str, torch.Tensor], n_response: int) -> torch.Tensor:
        return self.shared.values(inputs, n_response)
