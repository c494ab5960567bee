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
- Rows that finished are fed the pad id and ignored; the only per-step host sync is the "all done?"
  check (and decoding, only for rows that have stop strings).

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
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
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
class _State:
    """Per-row results as the loop runs; rows are prompt-major (prompt i, sample j -> i * K + j)."""

    tokens: torch.Tensor  # (R, N) sampled ids; pad after a row finished
    logprobs: torch.Tensor  # (R, N)
    lengths: torch.Tensor  # (R,) tokens generated, stop token included
    done: torch.Tensor  # (R,) bool
    stopped: torch.Tensor  # (R,) bool: finished by a stop id or stop string
    trackers: list[_TextTracker | None]


def _row_uniforms(params: list[SamplingParams], seeds: list[int], n: int) -> torch.Tensor:
    """(R, n) uniforms; row r's come from its own generator, so they do not depend on the batch."""
    out = torch.zeros(len(params), n)
    for r, (p, s) in enumerate(zip(params, seeds, strict=True)):
        if p.temperature > 0:
            out[r, : p.max_new_tokens] = torch.rand(p.max_new_tokens, generator=torch.Generator().manual_seed(s))
    return out


def _row_seeds(params: list[SamplingParams], num_samples: int) -> list[int]:
    """Seed of each row: sample j of a prompt with seed s uses s + j (so it can be replayed alone)."""
    seeds = []
    for p in params:
        base = p.seed if p.seed is not None else int(torch.randint(0, 2**62, ()).item())
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


def _decode_steps(model: Any, prompts: list[list[int]], params: list[SamplingParams], stop_token_ids: list[int],
                  pad_id: int, tokenizer: Any, num_samples: int, track_all: bool) -> Iterator[_State]:
    """Prefill, then sample one token per row per step; yields the state after every step."""
    device = next(model.parameters()).device
    k = num_samples
    row_params = [p for p in params for _ in range(k)]
    n_new = max(p.max_new_tokens for p in row_params)
    ids, valid = _left_pad(prompts, pad_id, max(len(p) for p in prompts) + n_new)
    width = ids.shape[1]
    ids, valid = ids.to(device), valid.to(device)
    positions = (valid.cumsum(1) - 1).clamp_min(0)
    fast = uses_fast_path(model)
    dtype = model.dtype

    # 1. Prefill every distinct prompt once; keep only the last position's logits.
    if fast:
        cache: Cache = Cache(layer_class_to_replicate=functools.partial(_PreallocatedLayer, valid.shape[1]))
        causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
        allowed = causal[None] & valid[:, None, :width]
        allowed |= torch.eye(width, dtype=torch.bool, device=device)[None]  # pad rows: no all-masked row
        prefill_mask = _additive(allowed, dtype)[:, None]
    else:
        cache = DynamicCache(config=model.config)
        prefill_mask = valid[:, :width].long()
    out = model(input_ids=ids, attention_mask=prefill_mask, position_ids=positions[:, :width],
                past_key_values=cache, use_cache=True, logits_to_keep=1)
    logits = out.logits[:, -1].float()

    # 2. Repeat the prefilled cache for K samples per prompt.
    if k > 1:
        cache.batch_repeat_interleave(k)
        logits, valid, positions = (t.repeat_interleave(k, dim=0) for t in (logits, valid, positions))
    step_mask = _additive(valid, dtype)[:, None, None, :] if fast else valid.long()

    # 3. Per-row sampling settings as tensors; filters only if some row uses them.
    rows = len(row_params)
    temperature = torch.tensor([p.temperature for p in row_params], device=device)
    top_k = torch.tensor([p.top_k for p in row_params], device=device)
    top_p = torch.tensor([p.top_p for p in row_params], device=device)
    use_k, use_p = bool((top_k > 0).any()), bool((top_p < 1).any())
    if all(p.temperature == 0 for p in row_params):
        mode = "greedy"
    elif all(p.temperature == 1 for p in row_params) and not (use_k or use_p):
        mode = "plain"
    else:
        mode = "mixed"
    max_new = torch.tensor([p.max_new_tokens for p in row_params], device=device)
    uniforms = _row_uniforms(row_params, _row_seeds(params, k), n_new).to(device)
    stop_ids = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long, device=device)

    state = _State(
        tokens=torch.full((rows, n_new), pad_id, dtype=torch.long, device=device),
        logprobs=torch.zeros(rows, n_new, device=device),
        lengths=torch.zeros(rows, dtype=torch.long, device=device),
        done=torch.zeros(rows, dtype=torch.bool, device=device),
        stopped=torch.zeros(rows, dtype=torch.bool, device=device),
        trackers=[_TextTracker(tokenizer, p.stop) if (p.stop or track_all) else None for p in row_params],
    )
    any_tracker = any(t is not None for t in state.trackers)

    # 4. Decode: sample, record, stop checks, then one forward step for all rows.
    for step in range(n_new):
        tok, logprob = _next_tokens(logits, temperature, uniforms[:, step], top_k if use_k else None,
                                    top_p if use_p else None, mode)
        active = ~state.done
        tok = tok.masked_fill(state.done, pad_id)  # finished rows keep feeding pad, ignored
        state.tokens[:, step] = tok
        state.logprobs[:, step] = logprob.masked_fill(state.done, 0.0)
        state.lengths += active.long()
        hit = torch.isin(tok, stop_ids) & active
        if any_tracker:
            _push_text(state, tok.tolist(), active.tolist(), hit)
        state.stopped |= hit
        state.done |= hit | (state.lengths >= max_new)
        yield state
        if step == n_new - 1 or bool(state.done.all()):
            break
        t = width + step
        mask = step_mask[..., : t + 1] if fast else step_mask[:, : t + 1]
        out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=positions[:, t : t + 1],
                    past_key_values=cache, use_cache=True)
        logits = out.logits[:, -1].float()


def _push_text(state: _State, toks: list[int], active: list[bool], hit: torch.Tensor) -> None:
    """Feed this step's tokens to the rows' text trackers; mark rows whose stop string completed."""
    hit_rows = hit.tolist()
    for r, tracker in enumerate(state.trackers):
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


def _finish(state: _State, prompts: list[list[int]], num_samples: int, tokenizer: Any) -> list[list[Generation]]:
    tokens, logprobs = state.tokens.tolist(), state.logprobs.tolist()
    lengths, stopped = state.lengths.tolist(), state.stopped.tolist()
    results: list[list[Generation]] = []
    for i, prompt in enumerate(prompts):
        group = []
        for r in range(i * num_samples, (i + 1) * num_samples):
            ids, n = tokens[r][: lengths[r]], lengths[r]
            tracker = state.trackers[r]
            if tracker is not None and tracker.matched:
                text = tracker.text
            elif tokenizer is not None:
                body = ids[:-1] if stopped[r] else ids  # the stop token is not part of the text
                text = tokenizer.decode(body, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            else:
                text = None
            group.append(Generation(prompt_ids=list(prompt), token_ids=ids, logprobs=logprobs[r][:n], text=text,
                                    finish_reason="stop" if stopped[r] else "length"))
        results.append(group)
    return results


@torch.inference_mode()
def generate(model: Any, prompts: list[list[int]], params: SamplingParams | list[SamplingParams], *,
             stop_token_ids: list[int], pad_id: int, tokenizer: Any = None,
             num_samples: int = 1) -> list[list[Generation]]:
    """Generate `num_samples` replies for each prompt (token ids) in one batch.

    `params` is one SamplingParams for all prompts or one per prompt. Returns, per prompt, a list of
    `num_samples` Generations. Sample j of a prompt with seed s uses seed s + j, so it equals a
    num_samples=1 call with seed s + j. `text` is filled only when `tokenizer` is given (needed
    for stop strings).
    """
    if num_samples < 1:
        raise UserError(f"num_samples must be >= 1, got {num_samples}")
    if not prompts:
        return []
    plist = _as_param_list(params, len(prompts))
    _check_inputs(model, prompts, plist, tokenizer)
    was_training = model.training
    model.eval()
    try:
        steps = _decode_steps(model, prompts, plist, stop_token_ids, pad_id, tokenizer, num_samples, False)
        final = deque(steps, maxlen=1).pop()  # run the loop to the end, keep the last state
        return _finish(final, prompts, num_samples, tokenizer)
    finally:
        model.train(was_training)


@torch.inference_mode()
def stream(model: Any, prompt_ids: list[int], params: SamplingParams, *, stop_token_ids: list[int],
           tokenizer: Any, pad_id: int | None = None) -> Iterator[str]:
    """Yield text deltas of one reply as it is generated (for `chat` and server streaming).

    Text that might be the beginning of a stop string is held back until it is clear. The
    concatenated deltas equal `generate(...)`'s text for the same params and seed. The generator's
    return value (`StopIteration.value`, or `final = yield from stream(...)`) is the Generation.
    """
    plist = [params]
    _check_inputs(model, [prompt_ids], plist, tokenizer)
    pad = pad_id if pad_id is not None else (tokenizer.pad_token_id or 0)
    was_training = model.training
    model.eval()
    try:
        state = None
        for state in _decode_steps(model, [prompt_ids], plist, stop_token_ids, pad, tokenizer, 1, True):
            tracker = state.trackers[0]
            assert tracker is not None
            if bool(state.done[0]):
                tracker.finish()
                break
            delta = tracker.pop_delta()
            if delta:
                yield delta
        assert state is not None and state.trackers[0] is not None
        delta = state.trackers[0].pop_delta(final=True)
        if delta:
            yield delta
        return _finish(state, [prompt_ids], 1, tokenizer)[0][0]
    finally:
        model.train(was_training)
