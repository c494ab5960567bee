"""The generation engine: batched sampling with a KV cache, token ids in, token ids out.

Used by `chat` (streaming), `sample` (K replies per prompt), evaluation, PPO/GRPO rollouts and the
OpenAI-compatible server. The caller renders the chat (`render_for_completion`) and passes the stop
ids (`stop_token_ids`); the engine never decides formatting.

How it works (and why it beats `transformers.generate` on small models, see `chatforge bench generate`):

- Prompts are left-padded into one batch and prefilled once, keeping only the last position's logits
  (`logits_to_keep=1`). With `num_samples=K` each prompt is prefilled once and its KV cache repeated
  K times (as nanochat's Engine does) for `sample --k K` and GRPO groups.
- The KV cache is a transformers `Cache` whose layers write into buffers allocated once for
  prompt + max_new_tokens and return views of the filled prefix: no `torch.cat` per step (what
  `DynamicCache` does) and no attention over empty slots (what `StaticCache` does).
- The additive 4D attention mask and the position ids are built once; each step passes slices, so
  transformers skips its per-step mask construction. Position ids start at 0 at each row's first real
  token, so a left-padded row computes exactly what it computes alone.
- Sampling is inverse-CDF with one uniform number per row and step, drawn up front from that row's
  own `torch.Generator`: a row's reply depends only on its prompt, params and seed, never on what
  else is in the batch, and there is no per-step full-vocab `torch.multinomial` (exponential noise).
- Rows that finished are fed the pad id and ignored; once half of the batch has finished, those rows
  are dropped from the batch and the KV cache. The only per-step host sync is the "how many done?"
  check (plus decoding, only for rows that have stop strings).

Models whose attention is not plain full attention (sliding windows, hybrid layers) or that use a
kernel which cannot take a 4D mask fall back to a `DynamicCache` and a 2D padding mask, which is
slower but correct.

Log-probs: every returned log-prob is log softmax of the model's raw logits (temperature 1, no
top-k/top-p) at the sampled token -- exactly what a later forward pass over prompt + reply gives,
which is the quantity PPO ratios, KL penalties and evaluation need. It is *not* the probability the
sampler used when temperature/top-k/top-p changed the distribution.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import types
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache

from chatforge.core.io import UserError
from chatforge.core.log import warn


@dataclass
class SamplingParams:
    """How to sample one reply. temperature 0 means greedy; top_k 0 and top_p 1 mean no filtering."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 128
    seed: int | None = None  # None: a fresh seed from torch's global RNG
    stop: list[str] = field(default_factory=list)  # stop strings, not included in the returned text

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise UserError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if any(not s for s in self.stop):
            raise UserError("stop strings must be non-empty")


@dataclass
class Generation:
    """One reply. `token_ids` include the stop token (end-of-turn/eos) when one ended the reply; `text`
    (only when a tokenizer was given) excludes it and is cut before a matched stop string.
    `logprobs[i]` is the raw-model log-prob of `token_ids[i]` (see the module docstring)."""

    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    text: str | None
    finish_reason: str  # "stop" (stop id or stop string) | "length" (max_new_tokens)


# ---------------------------------------------------------------------------------------------------
# Sampling: pure functions over a (rows, vocab) float tensor of logits


def filtered_probs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor | None,
                   top_p: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row probabilities after temperature, then top-k, then top-p (HF's order).

    Returns (probs, order): without filtering, probs over the vocab and order None; with filtering,
    probs in descending-logit order (zeros for dropped tokens) and the vocab ids of that order.
    `temperature` must be > 0 here; `top_k` 0 and `top_p` 1 disable a filter for a row.
    """
    scaled = logits / temperature[:, None]
    if top_k is None and top_p is None:
        return torch.softmax(scaled, dim=-1), None
    sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    rank = torch.arange(probs.shape[-1], device=probs.device)[None, :]
    if top_k is not None:
        k = torch.where(top_k > 0, top_k, probs.shape[-1])
        probs = probs.masked_fill(rank >= k[:, None], 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    if top_p is not None:
        # Keep the smallest prefix whose mass reaches top_p: drop a token once the mass before it does.
        mass_before = torch.cumsum(probs, dim=-1) - probs
        probs = probs.masked_fill(mass_before >= top_p[:, None], 0.0)
    return probs, order


def sample(logits: torch.Tensor, temperature: torch.Tensor, uniforms: torch.Tensor,
           top_k: torch.Tensor | None = None, top_p: torch.Tensor | None = None) -> torch.Tensor:
    """Sample one token id per row by inverse CDF with the given uniforms in [0, 1).

    Rows with temperature 0 take the argmax. Passing `top_k`/`top_p` as None skips the full-vocab
    sort, which is most of the sampling cost when no row filters.
    """
    probs, order = filtered_probs(logits, temperature.clamp_min(1e-5), top_k, top_p)
    idx = _inverse_cdf(torch.cumsum(probs, dim=-1), uniforms)
    picked = idx if order is None else order.gather(1, idx[:, None]).squeeze(1)
    return torch.where(temperature <= 0, logits.argmax(dim=-1), picked)


def _inverse_cdf(cdf: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """First index whose cumulative mass exceeds u * total (cdf may be unnormalised); zero-mass
    tokens are never picked."""
    target = uniforms[:, None].to(cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, target, right=True).clamp_max(cdf.shape[-1] - 1).squeeze(1)


def _next_tokens(logits: torch.Tensor, temperature: torch.Tensor, uniforms: torch.Tensor,
                 top_k: torch.Tensor | None, top_p: torch.Tensor | None, mode: str
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step's tokens and their raw log-probs, sharing passes over the vocab.

    mode "greedy": every row is greedy; "plain": every row samples at temperature 1 without filters,
    so exp(logits - max) is both the unnormalised CDF input and the log-partition; "mixed": anything.
    """
    top, greedy = logits.max(dim=-1)
    shifted = logits - top[:, None]
    if mode == "plain":
        cdf = torch.cumsum(shifted.exp(), dim=-1)
        tok, log_z = _inverse_cdf(cdf, uniforms), cdf[:, -1].log()
    else:
        tok = greedy if mode == "greedy" else sample(logits, temperature, uniforms, top_k, top_p)
        log_z = shifted.exp().sum(dim=-1).log()
    return tok, shifted.gather(1, tok[:, None]).squeeze(1) - log_z


# ---------------------------------------------------------------------------------------------------
# KV cache: preallocated buffers that hand out views of the filled prefix


class _PreallocatedLayer(CacheLayerMixin):
    """One layer's keys/values in buffers sized for the whole generation, written in place.

    `update` returns views of the first `length` positions, so attention never sees empty slots and
    nothing is concatenated per step.
    """

    is_sliding = False

    def __init__(self, max_len: int):
        super().__init__()
        self.max_len = max_len
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        self.key_buf = key_states.new_zeros(b, h, self.max_len, d)
        self.value_buf = value_states.new_zeros(b, h, self.max_len, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.max_len:
            raise RuntimeError(f"KV cache overflow: {end} > {self.max_len} positions")
        self.key_buf[:, :, self.length:end] = key_states
        self.value_buf[:, :, self.length:end] = value_states
        self.length = end
        self._refresh_views()
        return self.keys, self.values

    def _refresh_views(self) -> None:
        self.keys = self.key_buf[:, :, : self.length]
        self.values = self.value_buf[:, :, : self.length]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.max_len

    def reset(self) -> None:
        self.length = 0
        if self.is_initialized:
            self._refresh_views()

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.key_buf = self.key_buf.repeat_interleave(repeats, dim=0)
            self.value_buf = self.value_buf.repeat_interleave(repeats, dim=0)
            self._refresh_views()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.key_buf = self.key_buf[indices]
            self.value_buf = self.value_buf[indices]
            self._refresh_views()


class _StaticLayer(_PreallocatedLayer):
    """For compiled decoding: writes at a position held in a tensor and returns the whole buffers, so every
    decode step has the same shapes (one graph); the additive mask hides the slots not written yet."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.cumulative_length = torch.zeros(1, dtype=torch.long, device=key_states.device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        where = torch.arange(key_states.shape[-2], device=key_states.device) + self.cumulative_length
        self.key_buf.index_copy_(2, where, key_states)
        self.value_buf.index_copy_(2, where, value_states)
        self.cumulative_length.add_(key_states.shape[-2])
        return self.key_buf, self.value_buf

    def _refresh_views(self) -> None:
        self.keys, self.values = self.key_buf, self.value_buf

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.max_len, 0


_COMPILED: dict[tuple, Any] = {}  # (id(model), has LoRA) -> its compiled decode step


_STEP_SERIAL = itertools.count()


def _own_code(fn: Any) -> Any:
    """`fn` with a code object of its own. torch.compile caches graphs per code object, and an entry built
    without module guards must never be replayed for another model (or a LoRA model for a plain one)."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{next(_STEP_SERIAL)}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def _has_lora(model: Any) -> bool:
    """True for a model with peft LoRA layers (whose adapters can be switched or turned off)."""
    return any(hasattr(m, "lora_A") for m in model.modules())


def _compiled_step(model: Any) -> Any:
    """One decode step of `model` under torch.compile (static shapes), built once per model.

    The step takes the rows' "real position" flags and the current position `t` as a tensor and builds
    the additive mask inside the graph, so nothing but sampling runs eagerly between steps. Two options
    make the call itself cheap on CPU, where a small model's step is ~5 ms: the C++ wrapper (the graph's
    launcher is compiled code, not Python) and no guards on the model's modules (their attributes are
    not re-checked every call). Skipping those guards is safe for a plain model because the engine always
    runs it in eval mode; weights are graph inputs, so in-place updates (PPO) are seen. It is not safe for
    a LoRA model, whose adapters can be switched or turned off (PPO's reference) by module flags that only
    those guards see, so LoRA models keep them. The entry keeps its model alive.
    """
    lora = _has_lora(model)
    key = (id(model), lora)
    if key not in _COMPILED:
        dtype = model.dtype

        def step(tok: torch.Tensor, valid: torch.Tensor, t: torch.Tensor, positions: torch.Tensor,
                 cache: Cache) -> torch.Tensor:
            upto = torch.arange(valid.shape[-1], device=valid.device)
            mask = torch.where(valid & (upto <= t), 0.0, torch.finfo(dtype).min).to(dtype)
            return model(input_ids=tok, attention_mask=mask, position_ids=positions, use_cache=True,
                         **cache_kwargs(model, cache)).logits[:, -1].float()

        options: dict[str, Any] = {}
        if not lora:
            options["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
        if next(model.parameters()).device.type == "cpu":
            options["cpp_wrapper"] = True
        _COMPILED.clear()  # one model at a time: a stale entry would keep its model alive
        _COMPILED[key] = torch.compile(_own_code(step), dynamic=False, options=options)
    return _COMPILED[key]


def cache_kwargs(model: Any, cache: Cache) -> dict[str, Cache]:
    """The KV cache as the keyword this transformers version's forward takes.

    transformers 5.2x renamed `past_key_values` to `cache` and warns on the old name (removed in 5.40);
    earlier 5.x only know `past_key_values`. Read the base model's signature once per class.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = _CACHE_KWARG.get(type(base))
    if name is None:
        params = inspect.signature(base.forward).parameters
        name = _CACHE_KWARG[type(base)] = "cache" if "cache" in params else "past_key_values"
    return {name: cache}


_CACHE_KWARG: dict[type, str] = {}


def _text_config(model: Any) -> Any:
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def uses_fast_path(model: Any) -> bool:
    """True when the model takes our preallocated cache and a prebuilt 4D mask (plain full attention
    with an sdpa/eager kernel, e.g. Llama, SmolLM2, Qwen2 without sliding windows)."""
    cfg = _text_config(model)
    impl = getattr(model.config, "_attn_implementation", None)
    layer_types = getattr(cfg, "layer_types", None) or []
    return (
        impl in ("sdpa", "eager")
        and not getattr(cfg, "is_encoder_decoder", False)
        and not getattr(cfg, "sliding_window", None)
        and all(t == "full_attention" for t in layer_types)
    )


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool "may attend" -> additive float mask (0 / dtype min); works for both sdpa and eager."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
        ~allowed, torch.finfo(dtype).min
    )


# ---------------------------------------------------------------------------------------------------
# Incremental detokenization and stop strings


class _TextTracker:
    """Decodes one row's reply incrementally and finds stop strings.

    Uses the prefix/read offset trick (TGI, HF TextStreamer): decode a short window of recent ids and
    emit only the new suffix, holding back text that ends in an incomplete UTF-8 sequence. Text that
    could be the start of a stop string is held back from `pop_delta` (litgpt's generate_fn does the
    same), so a stream never shows part of a stop string.
    """

    def __init__(self, tokenizer: Any, stop: list[str]):
        self.tok, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.prefix_offset = self.read_offset = 0
        self.text = ""  # stable decoded text (cut before a stop string once one matched)
        self.emitted = 0  # chars of `text` already handed out by pop_delta
        self.matched = False

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> bool:
        """Add one token; True if a stop string is now complete (the text is cut before it)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return False  # nothing printable yet (partial UTF-8 or an empty piece)
        before = len(self.text)
        self.text += full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._find_stop(before)

    def _find_stop(self, before: int) -> bool:
        if not self.stop:
            return False
        start = max(0, before - max(len(s) for s in self.stop) + 1)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.matched = True
        return self.matched

    def finish(self) -> None:
        """Flush text held back for incomplete UTF-8 at the end of the reply."""
        if self.matched:
            return
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        before = len(self.text)
        self.text += full[len(prefix) :]
        self.prefix_offset = self.read_offset = len(self.ids)
        self._find_stop(before)

    def pop_delta(self, final: bool = False) -> str:
        """New text since the last call, minus a tail that might still grow into a stop string."""
        end = len(self.text)
        if not final and not self.matched:
            for n in range(min(end - self.emitted, max((len(s) for s in self.stop), default=0)), 0, -1):
                if any(s.startswith(self.text[end - n :]) for s in self.stop):
                    end -= n
                    break
        delta = self.text[self.emitted : end]
        self.emitted = end
        return delta


# ---------------------------------------------------------------------------------------------------
# The decode loop


@dataclass
class _Rows:
    """Per-row tensors of the rows still in the batch (prompt i, sample j is row i * K + j).

    Every field is indexed by batch position on dim 0, so `select` can drop finished rows at once.
    """

    ids: torch.Tensor  # (r,) original row index
    tokens: torch.Tensor  # (r, N) sampled ids; pad after a row finished
    logprobs: torch.Tensor  # (r, N)
    lengths: torch.Tensor  # (r,) tokens generated, stop token included
    done: torch.Tensor  # (r,) bool
    stopped: torch.Tensor  # (r,) bool: finished by a stop id or stop string
    temperature: torch.Tensor  # (r,)
    top_k: torch.Tensor  # (r,)
    top_p: torch.Tensor  # (r,)
    max_new: torch.Tensor  # (r,)
    uniforms: torch.Tensor  # (r, N) the row's random numbers, one per step
    positions: torch.Tensor  # (r, L) position ids (0 at the row's first real token)
    step_mask: torch.Tensor  # (r, 1, 1, L) additive mask, or (r, L) padding mask on the fallback path

    def select(self, idx: torch.Tensor) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name)[idx])


@dataclass
class _Reply:
    token_ids: list[int]
    logprobs: list[float]
    stopped: bool
    tracker: _TextTracker | None


@dataclass
class _State:
    rows: _Rows
    trackers: list[_TextTracker | None]  # aligned with `rows`
    finished: dict[int, _Reply] = field(default_factory=dict)  # original row index -> reply


def _retire(state: _State, which: torch.Tensor) -> torch.Tensor:
    """Move the rows flagged in `which` into `state.finished`; return the batch positions kept."""
    rows = state.rows
    gone = which.nonzero().squeeze(1)
    ids, lengths, stopped = rows.ids[gone].tolist(), rows.lengths[gone].tolist(), rows.stopped[gone].tolist()
    tokens, logprobs = rows.tokens[gone].tolist(), rows.logprobs[gone].tolist()
    for j, pos in enumerate(gone.tolist()):
        n = lengths[j]
        state.finished[ids[j]] = _Reply(tokens[j][:n], logprobs[j][:n], stopped[j], state.trackers[pos])
    keep = (~which).nonzero().squeeze(1)
    rows.select(keep)
    state.trackers = [state.trackers[i] for i in keep.tolist()]
    return keep


def _row_uniforms(params: list[SamplingParams], seeds: list[int], n: int) -> torch.Tensor:
    """(R, n) uniforms; row r's come from its own generator, so they do not depend on the batch."""
    out = torch.zeros(len(params), n)
    for r, (p, s) in enumerate(zip(params, seeds, strict=True)):
        if p.temperature > 0:
            g = torch.Generator().manual_seed(s)
            out[r, : p.max_new_tokens] = torch.rand(p.max_new_tokens, generator=g)
    return out


def _row_seeds(params: list[SamplingParams], num_samples: int) -> list[int]:
    """Seed of each row: sample j of a prompt with seed s uses s + j (so it can be replayed alone)."""
    seeds = []
    for p in params:
        base = p.seed if p.seed is not None else _fresh_seed()
        seeds += [base + j for j in range(num_samples)]
    return seeds


def _left_pad(prompts: list[list[int]], pad_id: int, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P) left-padded ids and a (B, total) bool mask of real positions (generated ones are real)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    valid = torch.ones(len(prompts), total, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        valid[i, : width - len(p)] = False
    return ids, valid


def _check_inputs(model: Any, prompts: list[list[int]], params: list[SamplingParams], tokenizer: Any) -> None:
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise UserError(f"prompt {i} is empty (render it with render_for_completion first)")
    if tokenizer is None and any(p.stop for p in params):
        raise UserError("stop strings need a tokenizer: pass tokenizer= to generate")
    limit = getattr(_text_config(model), "max_position_embeddings", None)
    longest = max(len(p) for p in prompts) + max(p.max_new_tokens for p in params)
    if limit and longest > limit:
        warn(f"prompt + max_new_tokens = {longest} exceeds the model's max_position_embeddings ({limit})")


def _prefill(model: Any, prompts: list[list[int]], pad_id: int, total: int, num_samples: int,
             static: bool = False) -> tuple[Cache, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run every distinct prompt once, then repeat its cache for the samples.

    Returns (cache, last-position logits, position ids, per-step mask), the last three with one row
    per sample. `static` (compiled decoding): the cache and every mask span all `total` positions, and
    the per-step mask is returned as bool (B, 1, 1, total) "real position" flags.
    """
    device, dtype, fast = next(model.parameters()).device, model.dtype, uses_fast_path(model)
    ids, valid = _left_pad(prompts, pad_id, total)
    ids, valid, width = ids.to(device), valid.to(device), ids.shape[1]
    positions = (valid.cumsum(1) - 1).clamp_min(0)
    if fast:
        span = total if static else width
        layer = _StaticLayer if static else _PreallocatedLayer
        cache: Cache = Cache(layer_class_to_replicate=functools.partial(layer, total))
        causal = torch.ones(width, span, dtype=torch.bool, device=device).tril()
        allowed = causal[None] & valid[:, None, :span]
        allowed[:, :, :width] |= torch.eye(width, dtype=torch.bool, device=device)[None]  # pad rows: not all masked
        mask = _additive(allowed, dtype)[:, None]
    else:
        cache = DynamicCache(config=model.config)
        mask = valid[:, :width].long()
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions[:, :width],
                use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))
    logits = out.logits[:, -1].float()
    if num_samples > 1:
        cache.batch_repeat_interleave(num_samples)
        logits, valid, positions = (t.repeat_interleave(num_samples, 0) for t in (logits, valid, positions))
    if static:
        step_mask = valid[:, None, None, :]
    else:
        step_mask = _additive(valid, dtype)[:, None, None, :] if fast else valid.long()
    return cache, logits, positions, step_mask


def _init_rows(row_params: list[SamplingParams], seeds: list[int], n_new: int, pad_id: int,
               positions: torch.Tensor, step_mask: torch.Tensor) -> _Rows:
    device, r = positions.device, len(row_params)

    def col(name: str) -> torch.Tensor:
        return torch.tensor([getattr(p, name) for p in row_params], device=device)

    return _Rows(
        ids=torch.arange(r, device=device),
        tokens=torch.full((r, n_new), pad_id, dtype=torch.long, device=device),
        logprobs=torch.zeros(r, n_new, device=device),
        lengths=torch.zeros(r, dtype=torch.long, device=device),
        done=torch.zeros(r, dtype=torch.bool, device=device),
        stopped=torch.zeros(r, dtype=torch.bool, device=device),
        temperature=col("temperature").float(), top_k=col("top_k"), top_p=col("top_p").float(),
        max_new=col("max_new_tokens"), uniforms=_row_uniforms(row_params, seeds, n_new).to(device),
        positions=positions, step_mask=step_mask,
    )


def _sampling_mode(row_params: list[SamplingParams]) -> tuple[str, bool, bool]:
    """("greedy" | "plain" | "mixed", any top-k, any top-p): decided once, so no per-step checks."""
    use_k, use_p = any(p.top_k > 0 for p in row_params), any(p.top_p < 1 for p in row_params)
    if all(p.temperature == 0 for p in row_params):
        return "greedy", use_k, use_p
    if all(p.temperature == 1 for p in row_params) and not (use_k or use_p):
        return "plain", use_k, use_p
    return "mixed", use_k, use_p


def _decode_steps(model: Any, prompts: list[list[int]], params: list[SamplingParams],
                  stop_token_ids: list[int], pad_id: int, tokenizer: Any, num_samples: int,
                  track_all: bool, compile: bool = False) -> Iterator[_State]:
    """Prefill, then sample one token per row per step; yields the state after every step.

    When at least half of the rows in the batch have finished, they are retired into
    `state.finished` and dropped from the batch and the KV cache, so long replies do not keep
    paying for short ones. After the last step every row is in `state.finished`.
    `compile`: decode steps run one torch.compile'd graph of static shapes (cache and mask span the
    whole length, rounded up to a multiple of 64 so nearby lengths share a graph; no retiring).
    """
    row_params = [p for p in params for _ in range(num_samples)]
    n_new = max(p.max_new_tokens for p in row_params)
    # lockstep: an FSDP2-sharded model all-gathers its weights in every forward, a collective, so every rank
    # runs as many decode steps as the slowest one (finished ranks feed pads) and rows are not retired
    lockstep = _sharded_across_ranks(model)
    if lockstep:  # every rank runs the longest rank's number of steps (each row still stops at its own limit)
        n_new = _max_over_ranks(n_new, next(model.parameters()).device)
    width = max(len(p) for p in prompts)
    static = compile and uses_fast_path(model)
    total = -(-(width + n_new) // 64) * 64 if static else width + n_new
    cache, logits, positions, step_mask = _prefill(model, prompts, pad_id, total, num_samples, static)
    fast = step_mask.dim() == 4
    if static:
        compiled = _compiled_step(model)
    rows = _init_rows(row_params, _row_seeds(params, num_samples), n_new, pad_id, positions, step_mask)
    mode, use_k, use_p = _sampling_mode(row_params)
    stop_ids = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long, device=logits.device)
    trackers = [_TextTracker(tokenizer, p.stop) if (p.stop or track_all) else None for p in row_params]
    state = _State(rows=rows, trackers=trackers)
    any_tracker = any(t is not None for t in trackers)

    for step in range(n_new):
        rows = state.rows
        tok, logprob = _next_tokens(logits, rows.temperature, rows.uniforms[:, step],
                                    rows.top_k if use_k else None, rows.top_p if use_p else None, mode)
        active = ~rows.done
        tok = tok.masked_fill(rows.done, pad_id)  # finished rows keep feeding pad, ignored
        rows.tokens[:, step] = tok
        rows.logprobs[:, step] = logprob.masked_fill(rows.done, 0.0)
        rows.lengths += active.long()
        hit = torch.isin(tok, stop_ids) & active
        if any_tracker:
            _push_text(state.trackers, tok.tolist(), active.tolist(), hit)
        rows.stopped |= hit
        rows.done |= hit | (rows.lengths >= rows.max_new)
        yield state
        n_done = int(rows.done.sum())  # the one host sync per step
        if step == n_new - 1 or (n_done == len(rows.done) and not lockstep):
            break
        if lockstep and not _any_rank_busy(n_done < len(rows.done), tok.device):
            break
        t = width + step
        if static:
            t_now = torch.tensor(t, device=tok.device)
            logits = compiled(tok[:, None], rows.step_mask, t_now, rows.positions[:, t : t + 1], cache)
            continue
        if 2 * n_done >= len(rows.done) and not lockstep:
            keep = _retire(state, rows.done)
            cache.batch_select_indices(keep)
            tok, rows = tok[keep], state.rows
        mask = rows.step_mask[..., : t + 1] if fast else rows.step_mask[:, : t + 1]
        out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=rows.positions[:, t : t + 1],
                    use_cache=True, **cache_kwargs(model, cache))
        logits = out.logits[:, -1].float()
    _retire(state, torch.ones_like(state.rows.done))


def _sharded_across_ranks(model: Any) -> bool:
    from chatforge.core.distributed import is_sharded

    return torch.distributed.is_available() and torch.distributed.is_initialized() and is_sharded(model)


def _max_over_ranks(value: int, device: torch.device) -> int:
    t = torch.tensor([value], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


def _any_rank_busy(busy: bool, device: torch.device) -> bool:
    return bool(_max_over_ranks(int(busy), device))


def _push_text(trackers: list[_TextTracker | None], toks: list[int], active: list[bool],
               hit: torch.Tensor) -> None:
    """Feed this step's tokens to the rows' text trackers; mark rows whose stop string completed."""
    hit_rows = hit.tolist()
    for r, tracker in enumerate(trackers):
        if tracker is None or not active[r] or hit_rows[r]:
            continue  # stop-id tokens are not text
        if tracker.push(toks[r]):
            hit[r] = True


def _as_param_list(params: SamplingParams | list[SamplingParams], n: int) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * n
    if len(params) != n:
        raise UserError(f"got {len(params)} SamplingParams for {n} prompts")
    return list(params)


def _to_generation(reply: _Reply, prompt: list[int], tokenizer: Any) -> Generation:
    if reply.tracker is not None and reply.tracker.matched:
        text: str | None = reply.tracker.text
    elif tokenizer is not None:
        body = reply.token_ids[:-1] if reply.stopped else reply.token_ids  # the stop token is not text
        text = tokenizer.decode(body, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    else:
        text = None
    return Generation(prompt_ids=list(prompt), token_ids=reply.token_ids, logprobs=reply.logprobs, text=text,
                      finish_reason="stop" if reply.stopped else "length")


def generate(model: Any, prompts: list[list[int]], params: SamplingParams | list[SamplingParams], *,
             stop_token_ids: list[int], pad_id: int, tokenizer: Any = None, num_samples: int = 1,
             batch_size: int | None = None, compile: bool = False) -> list[list[Generation]]:
    """Generate `num_samples` replies for each prompt (token ids).

    `params` is one SamplingParams for all prompts or one per prompt. Returns, per prompt, a list of
    `num_samples` Generations. Sample j of a prompt with seed s uses seed s + j, so it equals a
    num_samples=1 call with seed s + j. `text` is filled only when `tokenizer` is given (needed
    for stop strings). `batch_size` caps the prompts run together (the KV cache for prompt +
    max_new_tokens is allocated up front); prompts are grouped by length to save padding, and
    because every row has its own seed the results do not depend on the grouping.
    `compile=True` runs the decode steps as one torch.compile'd graph (models on the fast path; the first
    call per batch shape pays the compile, ~20 s on CPU): worth it for long sampling jobs on small models.
    """
    # a sharded model's all-gather buffers outlive the call: inference tensors could not be reused in training
    with torch.no_grad() if _sharded_across_ranks(model) else torch.inference_mode():
        return _generate(model, prompts, params, stop_token_ids=stop_token_ids, pad_id=pad_id, tokenizer=tokenizer,
                         num_samples=num_samples, batch_size=batch_size, compile=compile)


def _generate(model: Any, prompts: list[list[int]], params: SamplingParams | list[SamplingParams], *,
              stop_token_ids: list[int], pad_id: int, tokenizer: Any, num_samples: int, batch_size: int | None,
              compile: bool) -> list[list[Generation]]:
    if num_samples < 1:
        raise UserError(f"num_samples must be >= 1, got {num_samples}")
    if batch_size is not None and batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    if not prompts:
        return []
    plist = _as_param_list(params, len(prompts))
    _check_inputs(model, prompts, plist, tokenizer)
    if batch_size is not None and len(prompts) > batch_size:
        plist = _fix_seeds(plist)  # a seed drawn per chunk would differ from one drawn per prompt
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        results: list[list[Generation]] = [[] for _ in prompts]
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            out = generate(model, [prompts[i] for i in idx], [plist[i] for i in idx],
                           stop_token_ids=stop_token_ids, pad_id=pad_id, tokenizer=tokenizer,
                           num_samples=num_samples, compile=compile)
            for i, group in zip(idx, out, strict=True):
                results[i] = group
        return results
    was_training = model.training
    model.eval()
    try:
        steps = _decode_steps(model, prompts, plist, stop_token_ids, pad_id, tokenizer, num_samples, False, compile)
        final = deque(steps, maxlen=1).pop()  # run the loop to the end, keep the last state
    finally:
        model.train(was_training)
    k = num_samples
    return [[_to_generation(final.finished[i * k + j], p, tokenizer) for j in range(k)]
            for i, p in enumerate(prompts)]


def _fix_seeds(params: list[SamplingParams]) -> list[SamplingParams]:
    return [p if p.seed is not None else replace(p, seed=_fresh_seed()) for p in params]


def _fresh_seed() -> int:
    return int(torch.randint(0, 2**62, ()).item())


@torch.inference_mode()
def stream(model: Any, prompt_ids: list[int], params: SamplingParams, *, stop_token_ids: list[int],
           tokenizer: Any, pad_id: int | None = None) -> Iterator[str]:
    """Yield text deltas of one reply as it is generated (for `chat` and server streaming).

    Text that might be the beginning of a stop string is held back until it is clear. The
    concatenated deltas equal `generate(...)`'s text for the same params and seed. The generator's
    return value (`StopIteration.value`, or `final = yield from stream(...)`) is the Generation.
    """
    _check_inputs(model, [prompt_ids], [params], tokenizer)
    pad = pad_id if pad_id is not None else (tokenizer.pad_token_id or 0)
    was_training = model.training
    model.eval()
    try:
        state = None
        for state in _decode_steps(model, [prompt_ids], [params], stop_token_ids, pad, tokenizer, 1, True):
            if state.trackers and not bool(state.rows.done[0]):
                delta = state.trackers[0].pop_delta()
                if delta:
                    yield delta
    finally:
        model.train(was_training)
    assert state is not None
    reply = state.finished[0]
    assert reply.tracker is not None
    reply.tracker.finish()
    delta = reply.tracker.pop_delta(final=True)
    if delta:
        yield delta
    return _to_generation(reply, prompt_ids, tokenizer)
