"""Reward sources for RL (PPO, GRPO) and evaluation: text in, one float per reply out.

Every source implements `RewardSource.score(prompts, replies, finished)`, where `prompts` are prompt
conversations (`{"id", "messages", "meta"}` dicts), `replies` the decoded reply texts and `finished`
which replies ended (False: cut off at max_new_tokens; the labelers and the `rule` utility penalise that,
and a reward model scores such a reply without the end-of-turn tokens). A reward model with another
tokenizer than the policy just re-tokenises (the RM's chat template renders prompt + reply its own way).
RL stages call `score_rollout`, which skips decode → render → re-tokenise when the RM shares the policy's
token ids and chat template: it scores the sampled ids directly (prompt ids + reply ids + the template's
end-of-turn suffix when the reply ended), as TRL does. The two paths agree whenever the sampled reply is
the canonical tokenisation of its text (tested); the id path scores exactly what the policy produced
(including special tokens the text path would drop).

`--reward` specs (`make_reward_source`):

    RUN_DIR | HF_DIR | NAME   a reward model from `chatforge rm train` (normalised with its reward_norm.json)
    tasks                     the task-suite checkers: correctness in [0, 1] (prompts must be suite prompts)
    rule                      the simulated `rule` labeler's utility with no noise (correctness, format, clean
                              ending, brevity): the oracle an RM trained on that panel approximates, i.e. an
                              upper bound for RLHF with that panel
    keyword:WORD[,WORD...]    toy: +1 per occurrence of each keyword (substring) in the reply (tests, demos)
    ensemble:mean|min:A,B...  several reward models scoring every reply, each normalised its own way, combined by
                              their mean or worst case (min; Coste et al. 2024: a worst-case ensemble of RMs is
                              over-optimised later than any one of them); members must share one tokenizer
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Protocol

import torch

from chatforge.core.io import UserError
from chatforge.core.tokenizer import assistant_turn_suffix, stop_token_ids


class RewardSource(Protocol):
    """Scores replies to prompts; higher is better."""

    name: str

    def score(self, prompts: list[dict], replies: list[str], finished: list[bool] | None = None) -> list[float]:
        """`finished[i]` False: reply i was cut off at max_new_tokens (None: every reply ended)."""
        ...


class RMReward:
    """A trained reward model (`chatforge rm train` run dir, HF dir or name), frozen, on `device`.

    Scores are normalised with the RM's stored offset (SFT replies score ~0), as `rm score` does.
    """

    def __init__(self, spec: str, device: torch.device | str = "cpu", batch_size: int = 16):
        from chatforge.core.model import resolve_model_path
        from chatforge.core.reward_model import load_reward_model

        self.name = f"rm:{spec}"
        self.path: Path = resolve_model_path(spec)
        self.model, self.tok, self.norm = load_reward_model(spec, device)
        self.model.requires_grad_(False)
        self.batch_size = batch_size
        self.turn_suffix = assistant_turn_suffix(self.tok)
        self._ids_ok: dict[int, bool] = {}  # id(policy tokenizer) -> can score its ids directly

    def score(self, prompts: list[dict], replies: list[str], finished: list[bool] | None = None) -> list[float]:
        from chatforge.core.reward_model import score_texts

        with torch.no_grad():
            return score_texts(self.model, self.tok, [p["messages"] for p in prompts], list(replies), self.norm,
                               self.batch_size, finished=finished)

    def accepts_ids_of(self, tok: Any) -> bool:
        """True when sequences rendered by `tok` are what this RM's tokenizer and template would render."""
        key = id(tok)
        if key not in self._ids_ok:
            self._ids_ok[key] = (self.turn_suffix is not None and same_token_ids(tok, self.tok)
                                 and getattr(tok, "chat_template", None) == getattr(self.tok, "chat_template", None))
        return self._ids_ok[key]

    def score_ids(self, seqs: list[list[int]]) -> list[float]:
        """Normalised scores of whole rendered conversations given as this RM's token ids."""
        from chatforge.core.reward_model import score_token_ids

        with torch.no_grad():
            return score_token_ids(self.model, seqs, self.norm, self.batch_size)


class TaskReward:
    """The task-suite checkers (`chatforge.data.tasks`): correctness of each reply in [0, 1].

    A prompt outside the suite gets `missing` (counted in `n_missing`); RL stages drop such prompts up
    front (`rollout.keep_scorable`).
    """

    name = "tasks"

    def __init__(self, missing: float = 0.0):
        self.missing = missing
        self.n_missing = 0

    def score(self, prompts: list[dict], replies: list[str], finished: list[bool] | None = None) -> list[float]:
        from chatforge.data.tasks import check_conversation

        out = []
        for p, r in zip(prompts, replies, strict=True):
            s = check_conversation(p, r)
            if s is None:
                self.n_missing += 1
                s = self.missing
            out.append(float(s))
        return out


class RuleReward:
    """The `rule` labeler's noise-free utility (`stages.label.rule_utility`) as a reward."""

    name = "rule"

    def score(self, prompts: list[dict], replies: list[str], finished: list[bool] | None = None) -> list[float]:
        from chatforge.data.utility import rule_utility

        ended = finished if finished is not None else [True] * len(replies)
        return [float(rule_utility(p, r, truncated=not e)) for p, r, e in zip(prompts, replies, ended, strict=True)]


class KeywordReward:
    """Toy reward: `per_hit` for every case-insensitive occurrence of each keyword (a substring) in the reply.

    Dense enough that a tiny random policy finds it; used by tests and the CPU demo.
    """

    def __init__(self, keywords: list[str], per_hit: float = 1.0):
        if not keywords or any(not k for k in keywords):
            raise UserError("keyword reward needs at least one non-empty keyword: keyword:WORD[,WORD...]")
        self.name = "keyword:" + ",".join(keywords)
        self.per_hit = per_hit
        self.pattern = re.compile("|".join(re.escape(k) for k in keywords), re.IGNORECASE)

    def score(self, prompts: list[dict], replies: list[str], finished: list[bool] | None = None) -> list[float]:
        return [self.per_hit * len(self.pattern.findall(r)) for r in replies]


def combine_scores(per_source: list[list[float]], how: str) -> torch.Tensor:
    """[sources, N] scores -> [N]: the mean, or the minimum (worst case) over the ensemble."""
    t = torch.tensor(per_source, dtype=torch.float32)
    return t.mean(dim=0) if how == "mean" else t.min(dim=0).values


class EnsembleReward:
    """Reward sources that all score every reply (each RM with its own normalisation), combined by mean or min."""

    def __init__(self, members: list[Any], combine: str):
        if combine not in ("mean", "min"):
            raise UserError(f"ensemble combine must be mean or min, not '{combine}'")
        if len(members) < 2:
            raise UserError("an ensemble needs at least two reward sources")
        rms = [m for m in members if isinstance(m, RMReward)]
        for first, m in zip(rms, rms[1:]):
            if m.tok.get_vocab() != first.tok.get_vocab():
                raise UserError(f"ensemble members {first.path} and {m.path} have different tokenizers: an "
                                "ensemble's reward models must share one (e.g. heads trained on one trunk)")
        self.members, self.combine = members, combine
        self.name = f"ensemble:{combine}:" + ",".join(m.name.removeprefix("rm:") for m in members)

    def score(self, prompts: list[dict], replies: list[str], finished: list[bool] | None = None) -> list[float]:
        return combine_scores([m.score(prompts, replies, finished) for m in self.members], self.combine).tolist()


def reward_models(reward: Any) -> list[RMReward]:
    """The reward models inside a reward source: itself, each member of an ensemble, or none."""
    members = reward.members if isinstance(reward, EnsembleReward) else [reward]
    return [m for m in members if isinstance(m, RMReward)]


def divide_by_sft_std(reward: Any) -> None:
    """Scores in units of each RM's SFT-reply std from now on (`ppo.normalise_scores`); in an ensemble every
    member by its own, so a worst case compares like with like. An RM without a stored std is left as is."""
    for rm in reward_models(reward):
        if rm.norm.std > 0:
            rm.norm = dataclasses.replace(rm.norm, divide_std=True)


def make_reward_source(spec: str, device: torch.device | str = "cpu", batch_size: int = 16) -> RewardSource:
    """Build the reward source named by a `--reward` spec (see the module docstring)."""
    if not spec:
        raise UserError("a reward is required: --reward RM_RUN|tasks|rule|keyword:WORD|ensemble:min:RM,RM")
    if spec.startswith("ensemble:"):
        combine, _, members = spec.removeprefix("ensemble:").partition(":")
        if combine not in ("mean", "min") or not members:
            raise UserError(f"reward spec '{spec}': expected ensemble:mean:RM,RM... or ensemble:min:RM,RM...")
        parts = [m for m in members.split(",") if m]
        if any(m.startswith("ensemble:") for m in parts):
            raise UserError(f"reward spec '{spec}': ensembles do not nest")
        return EnsembleReward([make_reward_source(m, device, batch_size) for m in parts], combine)
    if spec == "tasks":
        return TaskReward()
    if spec == "rule":
        return RuleReward()
    if spec.startswith("keyword:"):
        return KeywordReward([k for k in spec[len("keyword:"):].split(",") if k])
    return RMReward(spec, device, batch_size)


def score_rollout(reward: RewardSource, tok: Any, ro: Any) -> list[float]:
    """Scores of a `core.rollout.Rollout` sampled with tokenizer `tok`: token ids straight into an RM that
    shares them (and its template), else `reward.score` on the decoded texts; an ensemble scores with each member."""
    if isinstance(reward, EnsembleReward):
        return combine_scores([score_rollout(m, tok, ro) for m in reward.members], reward.combine).tolist()
    if isinstance(reward, RMReward) and reward.accepts_ids_of(tok):
        from chatforge.core.reward_model import score_length

        stops = set(stop_token_ids(tok))
        seqs = []
        for prompt, reply, ended in zip(ro.prompt_ids, ro.token_ids, ro.ended.tolist(), strict=True):
            body = reply[:-1] if ended and reply and reply[-1] in stops else reply  # the stop token is not text
            # a reply cut off at the length limit never ended its turn: no end-of-turn suffix (data/rm_data.py)
            seqs.append(prompt + body + (reward.turn_suffix if ended else []))  # type: ignore[operator]
        if max(map(len, seqs)) <= score_length(reward.model, None):  # too long: the text path cuts old turns
            return reward.score_ids(seqs)
    return reward.score(ro.prompts, ro.texts, [bool(e) for e in ro.ended.tolist()])


def same_token_ids(tok_a: Any, tok_b: Any) -> bool:
    """True when every token of `tok_a` has the same id in `tok_b` (b may add tokens, e.g. an RM's pad)."""
    vb = tok_b.get_vocab()
    return all(vb.get(t) == i for t, i in tok_a.get_vocab().items())
