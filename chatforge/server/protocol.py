"""Request bodies of the OpenAI-compatible endpoints (pydantic), and which fields are refused or ignored.

Supported (chat): model, messages, temperature, top_p, max_tokens / max_completion_tokens, n, stop, seed,
logprobs, top_logprobs, stream, stream_options.include_usage, user.
Supported (completions): model, prompt (a string or a list of one string), temperature, top_p,
max_tokens, n, stop, seed, stream, stream_options.include_usage, user.

Refused with a 400 that names the field (they would change the output and are not implemented):
`UNSUPPORTED` below, `presence_penalty` / `frequency_penalty` when nonzero, `logit_bias` when non-empty,
`best_of` > 1, `echo` true, `suffix`, and non-text message content parts.

Ignored (harmless, no effect on the reply; each logged once): `IGNORED` below and any other unknown field.
`user` is stored with the completion (it does not change the reply).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

MAX_N = 16  # choices per request
MAX_STOP = 4  # stop strings per request, as OpenAI

UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "response_format", "audio", "modalities",
               "prediction", "web_search_options", "min_p", "top_k", "repetition_penalty", "guided_json",
               "guided_regex", "guided_choice", "guided_grammar", "reasoning_effort")
IGNORED = ("store", "metadata", "service_tier", "parallel_tool_calls", "prompt_cache_key", "safety_identifier")


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None

    def unsupported(self) -> str | None:
        """The first field that would change the output and is not supported, else None."""
        extra = self.model_extra or {}
        for name in UNSUPPORTED:
            if extra.get(name) is not None:
                return name
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                return name
        if self.logit_bias:
            return "logit_bias"
        return None

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatCompletionRequest(_Common):
    messages: list[Message]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(_Common):
    prompt: str | list[str]
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> str | None:
        for name, bad in (("logprobs", self.logprobs is not None), ("echo", self.echo),
                          ("best_of", (self.best_of or 1) > 1), ("suffix", self.suffix is not None)):
            if bad:
                return name
        return super().unsupported()
