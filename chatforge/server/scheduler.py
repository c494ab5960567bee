"""Continuous batching: one thread owns a model and runs one decode step at a time for every active row.

Design (llama.cpp's slots, vLLM's scheduler loop, on top of core/generation's cache layers and sampler):

- A request with `n` choices becomes `n` rows. New requests wait in a bounded queue; at the start of each
  step the scheduler admits every waiting request that fits in `max_batch` rows (and a prefill token
  budget), prefills them together in one left-padded forward (the `n` rows of a request share one prefill:
  its cache rows are repeated), and merges their KV rows into the running batch by aligning the right
  edges (left-padding the shorter side). Position ids start at 0 at each row's first real token and an
  additive 4D mask hides padding, so a row computes what it computes alone.
- Then one sampling call and **one forward pass** for all rows (`[B, 1]` input ids), whatever mix of
  requests they belong to. Sampling params, random numbers and step counters are per-row tensors, so the
  step has no Python loop over rows except detokenisation (each row's text is its own). Rows that finished
  (stop id, stop string, max tokens) or whose client went away are dropped from the batch and the cache
  before the next forward, so a disconnect frees its slot within a step. Leading columns that are padding
  in every row are trimmed, and buffers grow by doubling.
- Sampling reuses `generation.sample`: each row draws its uniforms up front from its own generator seeded
  with `seed + choice index` (the engine's rule), so a reply depends on its prompt, params and seed, never
  on the batch.
- Text is tracked with the engine's `_TextTracker`, which holds back a possible stop-string prefix, so a
  streamed delta never shows part of a stop string.

The steps run in a StepThread, shared by all the schedulers of a server (one torch thread, see StepThread).

Events go back to the asyncio side through one `loop.call_soon_threadsafe` per step into each request's
queue: `("delta", index, text, tokens)` with `tokens` a list of (id, logprob, top) (empty unless logprobs
were asked for), `("done", index, finish_reason, completion_tokens)` and `("error", index, message)`.
"""

from __future__ import annotations

import functools
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import Cache

from chatforge.core.generation import (
    _additive,
    _left_pad,
    _PreallocatedLayer,
    _TextTracker,
    cache_kwargs,
    sample,
)

PREFILL_TOKENS = 4096  # padded prompt tokens prefilled in one step (bounds how long one step can stall decoding)


class QueueFull(Exception):
    """The wait queue is at its bound (the API answers 429)."""


@dataclass
class RowParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 16
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    top_logprobs: int | None = None  # None: no logprobs; k >= 0: the chosen token's log-prob and k alternatives


@dataclass(eq=False)  # compared by identity
class GenRequest:
    prompt_ids: list[int]
    params: RowParams
    n: int = 1
    loop: Any = None  # the asyncio loop that owns `events`
    events: Any = None  # asyncio.Queue
    cancelled: bool = False  # set by the API when the client went away (or the reply is complete)
    arrival: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    generated: int = 0
    open_rows: int = 0

    def emit(self, items: list[tuple]) -> None:
        if self.loop is not None and items:
            self.loop.call_soon_threadsafe(_deliver, [(self, items)])


def _deliver(batch: list[tuple[GenRequest, list[tuple]]]) -> None:
    """Runs on the asyncio loop: hand each request its events."""
    for req, items in batch:
        for it in items:
            req.events.put_nowait(it)


@dataclass
class _Row:
    req: GenRequest
    index: int  # choice index within its request
    tracker: _TextTracker
    n: int = 0  # tokens generated


class StepThread:
    """The one thread that runs the decode steps of every scheduler attached to it, one step each in turn.

    A server's models share one StepThread: besides interleaving their forwards fairly (two concurrent forwards
    would oversubscribe the cores anyway), one torch thread means one OpenMP pool. libgomp throttles idle
    workers' spinning once the process holds more OpenMP threads than CPUs, which made every small parallel op
    pay a futex wake-up (server.app.off_main_thread has the measurement)."""

    def __init__(self, name: str = "scheduler"):
        self.schedulers: list[Scheduler] = []
        self.wake = threading.Event()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def attach(self, sched: Scheduler) -> None:
        with self.lock:
            self.schedulers.append(sched)
        if not self.thread.is_alive():
            self.thread.start()

    def detach(self, sched: Scheduler) -> None:
        """Stop stepping `sched`; the thread ends with the last one (joined, so its OpenMP pool is freed)."""
        with self.lock:
            if sched in self.schedulers:
                self.schedulers.remove(sched)
            last = not self.schedulers
        self.wake.set()
        if last and self.thread.is_alive() and threading.current_thread() is not self.thread:
            self.thread.join(timeout=10)

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self.lock:
                    if not self.schedulers:
                        return
                    busy = [s for s in self.schedulers if s.has_work()]
                if not busy:
                    self.wake.wait(0.5)
                    self.wake.clear()
                    continue
                for sched in busy:
                    sched.step_or_fail()


class Scheduler:
    """Owns `model`'s decoding, run by a StepThread (its own unless one is shared: `stepper`); `submit` from any
    thread, events come back per request."""

    def __init__(self, model: Any, tok: Any, stop_ids: list[int], *, max_batch: int = 32, queue_size: int = 64,
                 metrics: Any = None, model_name: str = "model", stepper: StepThread | None = None):
        self.model, self.tok = model, tok
        self.max_batch, self.queue_size, self.model_name = max_batch, queue_size, model_name
        self.metrics = metrics.for_model(model_name, max_batch) if metrics is not None else None
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.stop_ids = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=self.device)
        self.waiting: queue.Queue[GenRequest] = queue.Queue()
        self.rows: list[_Row] = []
        self.cache: Cache | None = None
        # Per-row tensors, aligned with `rows` on dim 0:
        self.valid = torch.zeros(0, 0, dtype=torch.bool, device=self.device)  # (B, cap) real positions
        self.pos = torch.zeros(0, dtype=torch.long, device=self.device)  # next position id
        self.logits: torch.Tensor | None = None  # (B, V) next-token logits
        self.temp = torch.zeros(0, device=self.device)
        self.top_p = torch.zeros(0, device=self.device)
        self.uni = torch.zeros(0, 1, device=self.device)  # (B, U) the rows' uniforms, one per step
        self.count = torch.zeros(0, dtype=torch.long, device=self.device)  # tokens generated
        self.max_new = torch.zeros(0, dtype=torch.long, device=self.device)
        self.steps = 0
        self._stop = False
        self.stepper = stepper if stepper is not None else StepThread(f"scheduler-{model_name}")
        self.stepper.attach(self)

    # ------------------------------------------------------------------------------------------ public

    def submit(self, req: GenRequest) -> None:
        if self._stop:
            raise RuntimeError("the scheduler is shut down")
        if self.waiting.qsize() >= self.queue_size:
            raise QueueFull
        self.waiting.put(req)
        self._gauges()
        self.stepper.wake.set()

    def close(self) -> None:
        self._stop = True
        self.stepper.detach(self)

    def healthy(self) -> bool:
        return self.stepper.thread.is_alive() and not self._stop

    def has_work(self) -> bool:
        return bool(self.rows) or not self.waiting.empty()

    @property
    def running(self) -> int:
        return len({id(r.req) for r in self.rows})

    # ------------------------------------------------------------------------------------------ loop

    def step_or_fail(self) -> None:
        try:
            self._step()
        except Exception as e:  # never let one bad step kill the server: fail the active requests
            self._fail_all(f"{type(e).__name__}: {e}")

    def _fail_all(self, msg: str) -> None:
        for req in {id(r.req): r.req for r in self.rows}.values():
            req.emit([("error", 0, msg)])
        self.rows, self.cache, self.logits = [], None, None
        self._select(torch.zeros(0, dtype=torch.long, device=self.device))
        self._gauges()

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.running.set(self.running)
            self.metrics.waiting.set(self.waiting.qsize())
            self.metrics.rows.set(len(self.rows))

    def _step(self) -> None:
        self._drop([i for i, r in enumerate(self.rows) if r.req.cancelled], abort=True)
        self._admit()
        self._gauges()
        if not self.rows:
            return
        tok, lps, tops = self._sample()
        self.count += 1
        hit = torch.isin(tok, self.stop_ids)
        length = self.count >= self.max_new
        if self.metrics is not None:
            self.metrics.batch_size.observe(len(self.rows))
        now = time.perf_counter()
        toks, hits, lengths = tok.tolist(), hit.tolist(), length.tolist()
        out: dict[int, tuple[GenRequest, list[tuple]]] = {}
        finished: dict[int, str] = {}
        for i, r in enumerate(self.rows):  # detokenise each row (text is per row) and build its events
            req, t = r.req, toks[i]
            r.n += 1
            req.generated += 1
            if req.first_token is None:
                req.first_token = now
                if self.metrics is not None:
                    self.metrics.ttft.observe(now - req.arrival)
            reason = "stop" if hits[i] or r.tracker.push(t) else ("length" if lengths[i] else None)
            if reason is not None:
                r.tracker.finish()
            text = r.tracker.pop_delta(final=reason is not None)
            entry = [(t, lps[i], tops[i] if tops is not None else None)] if lps is not None else []
            evs = out.setdefault(id(req), (req, []))[1]
            evs.append(("delta", r.index, text, entry))
            if reason is not None:
                evs.append(("done", r.index, reason, r.n))
                finished[i] = reason
        by_loop: dict[int, tuple[Any, list]] = {}
        for req, evs in out.values():
            if req.loop is not None:
                by_loop.setdefault(id(req.loop), (req.loop, []))[1].append((req, evs))
        for loop, batch in by_loop.values():
            loop.call_soon_threadsafe(_deliver, batch)
        if finished:
            keep = torch.ones(len(toks), dtype=torch.bool, device=self.device)
            keep[list(finished)] = False
            tok = tok[keep]
            self._drop(sorted(finished), reasons=finished)
        if not self.rows:
            self._gauges()
            return
        self._forward(tok)
        self.steps += 1

    # ------------------------------------------------------------------------------------------ pieces

    def _sample(self) -> tuple[torch.Tensor, list[float] | None, list | None]:
        assert self.logits is not None
        logits = self.logits
        u = self.uni.gather(1, self.count.clamp_max(self.uni.shape[1] - 1)[:, None]).squeeze(1)
        top_p = self.top_p if bool((self.top_p < 1).any()) else None
        if bool((self.temp <= 0).all()):
            tok = logits.argmax(dim=-1)
        else:
            tok = sample(logits, self.temp, u, None, top_p)
        ks = [r.req.params.top_logprobs for r in self.rows]
        if all(k is None for k in ks):
            return tok, None, None
        lsm = torch.log_softmax(logits, dim=-1)  # raw model log-probs (temperature 1), as the engine reports
        lp = lsm.gather(1, tok[:, None]).squeeze(1).tolist()
        k = max(k or 0 for k in ks)
        if k == 0:
            return tok, lp, None
        v, ix = lsm.topk(k, dim=-1)
        vl, il = v.tolist(), ix.tolist()
        tops = [list(zip(il[i][: ks[i] or 0], vl[i][: ks[i] or 0], strict=True)) for i in range(len(ks))]
        return tok, lp, tops

    def _select(self, keep: torch.Tensor) -> None:
        """Keep batch positions `keep` of every per-row tensor (not the cache, not `rows`)."""
        self.valid, self.pos, self.temp, self.top_p = self.valid[keep], self.pos[keep], self.temp[keep], self.top_p[keep]
        self.uni, self.count, self.max_new = self.uni[keep], self.count[keep], self.max_new[keep]
        if self.logits is not None:
            self.logits = self.logits[keep]

    def _drop(self, idx: list[int], abort: bool = False, reasons: dict[int, str] | None = None) -> None:
        """Remove rows `idx` from the batch and the cache; close requests whose last row left."""
        if not idx:
            return
        gone = set(idx)
        for i in idx:
            r = self.rows[i]
            r.req.open_rows -= 1
            if r.req.open_rows == 0:
                self._finish(r.req, "abort" if abort else (reasons or {}).get(i, "stop"))
        keep = [i for i in range(len(self.rows)) if i not in gone]
        self.rows = [self.rows[i] for i in keep]
        self._select(torch.tensor(keep, dtype=torch.long, device=self.device))
        if not keep:
            self.cache, self.logits = None, None
            return
        assert self.cache is not None
        self.cache.batch_select_indices(torch.tensor(keep, dtype=torch.long, device=self.device))
        self._trim()

    def _finish(self, req: GenRequest, reason: str) -> None:
        if self.metrics is None:
            return
        now = time.perf_counter()
        self.metrics.e2e.observe(now - req.arrival)
        self.metrics.prompt_tokens.inc(len(req.prompt_ids))
        self.metrics.generation_tokens.inc(req.generated)
        if req.first_token is not None and req.generated > req.n:
            self.metrics.tpot.observe((now - req.first_token) / (req.generated / req.n - 1))
        self.metrics.success.labels(finished_reason=reason).inc()

    def _length(self) -> int:
        assert self.cache is not None
        return self.cache.layers[0].length

    def _trim(self) -> None:
        """Drop leading columns that are padding in every row (after long rows left)."""
        if self.cache is None:
            return
        length = self._length()
        real = self.valid[:, :length].any(0)
        shift = int(real.float().argmax())  # first column with a real token in some row
        if shift < 16:
            return
        for layer in self.cache.layers:
            layer.key_buf = layer.key_buf[:, :, shift:].clone()
            layer.value_buf = layer.value_buf[:, :, shift:].clone()
            layer.max_len -= shift
            layer.length -= shift
            layer._refresh_views()
        self.valid = self.valid[:, shift:].clone()

    def _grow(self, need: int) -> None:
        """Make every buffer hold at least `need` positions (doubling, so growth is amortised)."""
        assert self.cache is not None
        cap = self.cache.layers[0].max_len
        if need <= cap:
            return
        new = max(need, 2 * cap)
        for layer in self.cache.layers:
            for name in ("key_buf", "value_buf"):
                buf = getattr(layer, name)
                b, h, _, d = buf.shape
                grown = buf.new_zeros(b, h, new, d)
                grown[:, :, :cap] = buf
                setattr(layer, name, grown)
            layer.max_len = new
            layer._refresh_views()
        v = torch.zeros(self.valid.shape[0], new, dtype=torch.bool, device=self.device)
        v[:, :cap] = self.valid
        self.valid = v

    def _forward(self, tok: torch.Tensor) -> None:
        """One decode step for every row: the only model call on the hot path."""
        length = self._length()
        self._grow(length + 1)
        self.valid[:, length] = True
        mask = _additive(self.valid[:, : length + 1], self.dtype)[:, None, None, :]
        out = self.model(input_ids=tok[:, None], attention_mask=mask, position_ids=self.pos[:, None],
                         use_cache=True, **cache_kwargs(self.model, self.cache))
        self.logits = out.logits[:, -1].float()
        self.pos = self.pos + 1

    # ------------------------------------------------------------------------------------------ admission

    def _admit(self) -> None:
        """Move waiting requests into the batch: as many as fit, prefilled together, merged once."""
        take: list[GenRequest] = []
        rows, width = len(self.rows), 0
        while True:
            try:
                req = self.waiting.queue[0]
            except IndexError:
                break
            if req.cancelled:
                self.waiting.get_nowait()
                continue
            w = max(width, len(req.prompt_ids))
            fits = rows + req.n <= self.max_batch and w * (len(take) + 1) <= PREFILL_TOKENS
            if take and not fits or not take and self.rows and rows + req.n > self.max_batch:
                break
            self.waiting.get_nowait()
            take.append(req)
            rows, width = rows + req.n, w
        if not take:
            return
        try:
            self._join(take)
        except Exception as e:  # a failed prefill fails those requests only
            for req in take:
                req.emit([("error", 0, f"{type(e).__name__}: {e}")])
            if any(r.req in take for r in self.rows):  # failed half-way through the merge: start clean
                self._fail_all(f"{type(e).__name__}: {e}")

    def _prefill(self, prompts: list[list[int]]) -> tuple[Cache, torch.Tensor, torch.Tensor]:
        """One left-padded forward over `prompts`: (cache, last-position logits, (R, W) real positions)."""
        ids, valid = _left_pad(prompts, self.pad_id, max(len(p) for p in prompts))
        ids, valid = ids.to(self.device), valid.to(self.device)
        w = ids.shape[1]
        positions = (valid.cumsum(1) - 1).clamp_min(0)
        allowed = torch.ones(w, w, dtype=torch.bool, device=self.device).tril()[None] & valid[:, None, :]
        allowed |= torch.eye(w, dtype=torch.bool, device=self.device)[None]  # pad rows: never all masked
        cache = Cache(layer_class_to_replicate=functools.partial(_PreallocatedLayer, w))
        out = self.model(input_ids=ids, attention_mask=_additive(allowed, self.dtype)[:, None],
                         position_ids=positions, use_cache=True, logits_to_keep=1,
                         **cache_kwargs(self.model, cache))
        return cache, out.logits[:, -1].float(), valid

    def _uniforms(self, req: GenRequest, width: int) -> torch.Tensor:
        """(n, width) uniforms of a request's rows; row j from its own generator seeded seed + j."""
        p = req.params
        u = torch.zeros(req.n, width)
        if p.temperature > 0:
            base = p.seed if p.seed is not None else int(torch.randint(0, 2**62, ()).item())
            for j in range(req.n):
                g = torch.Generator().manual_seed(base + j)
                u[j, : p.max_new_tokens] = torch.rand(p.max_new_tokens, generator=g)
        return u.to(self.device)

    def _join(self, reqs: list[GenRequest]) -> None:
        cache, logits, valid = self._prefill([r.prompt_ids for r in reqs])
        rep = torch.tensor([i for i, r in enumerate(reqs) for _ in range(r.n)], dtype=torch.long,
                           device=self.device)
        if len(rep) != len(reqs):
            cache.batch_select_indices(rep)
            logits, valid = logits[rep], valid[rep]
        k, w = len(rep), valid.shape[1]
        width = max(max(r.params.max_new_tokens for r in reqs), self.uni.shape[1])
        uni = torch.cat([self._uniforms(r, width) for r in reqs])
        if self.uni.shape[1] < width:
            self.uni = torch.nn.functional.pad(self.uni, (0, width - self.uni.shape[1]))

        def per_row(name: str, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor([getattr(r.params, name) for r in reqs for _ in range(r.n)], dtype=dtype,
                                device=self.device)

        for r in reqs:
            r.open_rows = r.n
            self.rows += [_Row(r, j, _TextTracker(self.tok, list(r.params.stop))) for j in range(r.n)]
        self.temp = torch.cat([self.temp, per_row("temperature", torch.float32)])
        self.top_p = torch.cat([self.top_p, per_row("top_p", torch.float32)])
        self.max_new = torch.cat([self.max_new, per_row("max_new_tokens", torch.long)])
        self.count = torch.cat([self.count, torch.zeros(k, dtype=torch.long, device=self.device)])
        self.uni = torch.cat([self.uni, uni])
        self.pos = torch.cat([self.pos, valid.sum(1)])
        if self.cache is None:
            self.cache, self.logits, self.valid = cache, logits, valid
            return
        assert self.logits is not None
        self.logits = torch.cat([self.logits, logits])
        old_len = self._length()
        length = max(old_len, w)
        cap = length + max(self.cache.layers[0].max_len - old_len, 16)  # keep the old spare room
        b_old = self.valid.shape[0]
        for old, add in zip(self.cache.layers, cache.layers, strict=True):
            for name in ("key_buf", "value_buf"):
                a, n = getattr(old, name), getattr(add, name)
                merged = a.new_zeros(b_old + k, a.shape[1], cap, a.shape[3])
                merged[:b_old, :, length - old_len : length] = a[:, :, :old_len]
                merged[b_old:, :, length - w : length] = n[:, :, :w]
                setattr(old, name, merged)
            old.max_len, old.length = cap, length
            old._refresh_views()
        merged_valid = torch.zeros(b_old + k, cap, dtype=torch.bool, device=self.device)
        merged_valid[:b_old, length - old_len : length] = self.valid[:, :old_len]
        merged_valid[b_old:, length - w : length] = valid
        self.valid = merged_valid
