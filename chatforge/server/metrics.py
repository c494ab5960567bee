"""Prometheus metrics with the names a vLLM user knows (`vllm:` -> `chatforge:`), one registry per app.

Every series carries `model_name` (vLLM's label). Counters get prometheus-client's `_total` suffix, so
the exposed names are e.g. `chatforge:prompt_tokens_total`, `chatforge:request_success_total{finished_reason}`.
`chatforge:batch_size` (rows in the batch at each decode step) is what shows batching is real: its
mean, `_sum / _count`, is above 1 exactly when requests share forward passes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass
class ModelMetrics:
    """The series of one served model (children with `model_name` bound)."""

    running: Any
    waiting: Any
    rows: Any
    ttft: Any
    tpot: Any
    e2e: Any
    prompt_tokens: Any
    generation_tokens: Any
    success: Any  # still labelled by finished_reason
    batch_size: Any


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        m = ["model_name"]
        self._running = Gauge("chatforge:num_requests_running", "Requests with rows in the running batch.", m,
                              registry=r)
        self._waiting = Gauge("chatforge:num_requests_waiting", "Requests waiting to join the batch.", m,
                              registry=r)
        self._rows = Gauge("chatforge:num_batch_rows", "Rows (sequences) in the running batch; a request with "
                           "n choices has n rows.", m, registry=r)
        self._slots = Gauge("chatforge:max_num_seqs", "Rows the batch may hold (--max-batch).", m, registry=r)
        self._ttft = Histogram("chatforge:time_to_first_token_seconds", "Time to first token.", m,
                               buckets=_LATENCY, registry=r)
        self._tpot = Histogram("chatforge:time_per_output_token_seconds", "Time per output token after the "
                               "first (per request, averaged over its choices).", m, buckets=_LATENCY, registry=r)
        self._e2e = Histogram("chatforge:e2e_request_latency_seconds", "End-to-end request latency.", m,
                              buckets=_LATENCY, registry=r)
        self._prompt = Counter("chatforge:prompt_tokens", "Prefilled prompt tokens.", m, registry=r)
        self._gen = Counter("chatforge:generation_tokens", "Generated tokens.", m, registry=r)
        self._success = Counter("chatforge:request_success", "Finished requests by reason (stop, length, abort).",
                                [*m, "finished_reason"], registry=r)
        self._batch = Histogram("chatforge:batch_size", "Rows in the batch at each decode step.", m,
                                buckets=_BATCH, registry=r)

    def for_model(self, name: str, max_batch: int) -> ModelMetrics:
        self._slots.labels(name).set(max_batch)
        for reason in ("stop", "length", "abort"):  # exposed at 0 from the start
            self._success.labels(model_name=name, finished_reason=reason)
        return ModelMetrics(
            running=self._running.labels(name), waiting=self._waiting.labels(name), rows=self._rows.labels(name),
            ttft=self._ttft.labels(name), tpot=self._tpot.labels(name), e2e=self._e2e.labels(name),
            prompt_tokens=self._prompt.labels(name), generation_tokens=self._gen.labels(name),
            success=_Bound(self._success, name),
            batch_size=self._batch.labels(name))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Bound:
    """`success.labels(finished_reason=...)` with model_name already bound."""

    def __init__(self, counter: Any, name: str):
        self.counter, self.name = counter, name

    def labels(self, finished_reason: str) -> Any:
        return self.counter.labels(model_name=self.name, finished_reason=finished_reason)
