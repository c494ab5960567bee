"""OpenAI-compatible routes: thin wrappers that validate, submit to a scheduler and shape the reply.

Streams are server-sent events in OpenAI's chunk format: a role delta first, content deltas (each with its
choice `index`), the last chunk of a choice carries `finish_reason`, an optional usage chunk
(`stream_options.include_usage`), then `data: [DONE]`. `usage.completion_tokens` counts every generated
token, the end-of-turn token included (as vLLM does); `prompt_tokens` is the rendered prompt's length.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from chatforge.server.errors import OpenAIError
from chatforge.server.protocol import MAX_N, MAX_STOP, ChatCompletionRequest, CompletionRequest
from chatforge.server.scheduler import GenRequest, QueueFull, RowParams

try:
    from chatforge.server.auth import api_key
except ImportError:  # storage/auth not built in: every request is anonymous
    async def api_key(request: Request) -> Any:
        return None

router = APIRouter()
log = logging.getLogger("chatforge.server")
ROLES = ("system", "developer", "user", "assistant")
RETRY_AFTER_S = 1


@router.get("/health")
async def health(request: Request) -> dict:
    bad = [m.id for m in request.app.state.served if not m.scheduler.healthy()]
    if bad:
        raise OpenAIError(503, f"scheduler stopped for {', '.join(bad)}")
    return {"status": "ok", "models": [m.id for m in request.app.state.served]}


@router.get("/v1/models")
async def list_models(request: Request, key: Any = Depends(api_key)) -> dict:
    return {"object": "list", "data": [{"id": m.id, "object": "model", "created": m.created, "owned_by": "chatforge",
                                        "aliases": m.aliases, "run_id": m.run_id, "max_model_len": m.context}
                                       for m in request.app.state.served]}


def _served(request: Request, name: str) -> Any:
    m = request.app.state.models.get(name)
    if m is None:
        known = ", ".join(sorted(request.app.state.models))
        raise OpenAIError(404, f"The model '{name}' does not exist (served: {known})", param="model",
                          code="model_not_found")
    return m


def _content(msg: Any, i: int) -> str:
    c = msg.content
    if c is None:
        return ""
    if isinstance(c, str):
        return c
    parts = []
    for part in c:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise OpenAIError(400, f"messages[{i}].content: only text parts are supported, got "
                              f"'{part.get('type')}'", param=f"messages.{i}.content")
        parts.append(part["text"])
    return "".join(parts)


def _messages(body: ChatCompletionRequest) -> list[dict]:
    if not body.messages:
        raise OpenAIError(400, "messages must not be empty", param="messages")
    out = []
    for i, m in enumerate(body.messages):
        if m.role not in ROLES:
            raise OpenAIError(400, f"messages[{i}].role: unsupported role '{m.role}' (one of {', '.join(ROLES)})",
                              param=f"messages.{i}.role")
        out.append({"role": "system" if m.role == "developer" else m.role, "content": _content(m, i)})
    if out[-1]["role"] == "assistant":
        raise OpenAIError(400, "the last message must not be from the assistant (continuing a reply is not "
                          "supported)", param="messages")
    return out


def _params(request: Request, body: Any, m: Any, prompt_len: int, max_tokens: int | None,
            top_logprobs: int | None) -> RowParams:
    bad = body.unsupported()
    if bad:
        raise OpenAIError(400, f"'{bad}' is not supported by this server", param=bad, code="unsupported_parameter")
    seen = request.app.state.ignored_fields
    for name in sorted(set(body.model_extra or {}) - seen):  # harmless extras: ignored, logged once each
        seen.add(name)
        log.info("ignoring request field '%s' (no effect on the reply)", name)
    limit = min(MAX_N, request.app.state.max_batch)
    if body.n > limit:
        raise OpenAIError(400, f"n must be at most {limit}, got {body.n}", param="n")
    stop = body.stop_list()
    if len(stop) > MAX_STOP or any(not s for s in stop):
        raise OpenAIError(400, f"stop: at most {MAX_STOP} non-empty strings", param="stop")
    if prompt_len >= m.context:
        raise OpenAIError(400, f"the prompt is {prompt_len} tokens; this model's context is {m.context} tokens",
                          param="messages", code="context_length_exceeded")
    room = m.context - prompt_len
    if max_tokens is not None and max_tokens > room:
        raise OpenAIError(400, f"max_tokens is {max_tokens} but the context of {m.context} tokens leaves "
                          f"{room} after the {prompt_len}-token prompt", param="max_tokens",
                          code="context_length_exceeded")
    return RowParams(temperature=body.temperature, top_p=body.top_p, max_new_tokens=max_tokens or room,
                     seed=body.seed, stop=stop, top_logprobs=top_logprobs)


def _submit(m: Any, prompt_ids: list[int], params: RowParams, n: int) -> GenRequest:
    req = GenRequest(prompt_ids=prompt_ids, params=params, n=n, loop=asyncio.get_running_loop(),
                     events=asyncio.Queue())
    try:
        m.scheduler.submit(req)
    except QueueFull:
        raise OpenAIError(429, "the server is busy (request queue full); retry shortly", code="queue_full",
                          headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    return req


async def stream_chat(m: Any, messages: list[dict], max_tokens: int = 256, temperature: float = 0.7,
                      top_p: float = 0.95, seed: int | None = None) -> AsyncIterator[tuple]:
    """A reply of served model `m` through its scheduler (the web app's chat and drafts use it): yields
    ("delta", text) pieces and ends with ("done", finish_reason, prompt_tokens, completion_tokens)."""
    from chatforge.core.tokenizer import render_for_completion

    prompt_ids = render_for_completion(m.tok, messages)
    if len(prompt_ids) >= m.context:
        raise OpenAIError(400, f"the conversation is {len(prompt_ids)} tokens; the model's context is {m.context}",
                          code="context_length_exceeded")
    params = RowParams(temperature=temperature, top_p=top_p, max_new_tokens=min(max_tokens, m.context - len(prompt_ids)),
                       seed=seed)
    req = _submit(m, prompt_ids, params, 1)
    try:
        async for ev in _events(req):
            if ev[0] == "delta":
                if ev[2]:
                    yield ("delta", ev[2])
            else:
                yield ("done", ev[2], len(prompt_ids), ev[3])
    finally:
        req.cancelled = True  # the reader stopped (done or gone): the row leaves the batch at the next step


async def complete_chat(m: Any, messages: list[dict], **kw: Any) -> tuple[str, str, int, int]:
    """(text, finish_reason, prompt_tokens, completion_tokens) of one reply (see stream_chat)."""
    text, end = "", ("length", 0, 0)
    async for ev in stream_chat(m, messages, **kw):
        if ev[0] == "delta":
            text += ev[1]
        else:
            end = ev[1:]
    return text, end[0], end[1], end[2]


def _logprob_entries(tok: Any, entries: list[tuple]) -> list[dict]:
    from chatforge.core.tokenizer import token_bytes

    def one(i: int, lp: float) -> dict:
        raw = token_bytes(tok, i)  # exact even for part of a multi-byte character
        try:
            s = raw.decode("utf-8")
        except UnicodeDecodeError:  # OpenAI's spelling for a token that is not whole UTF-8 on its own
            s = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        return {"token": s, "logprob": lp, "bytes": list(raw)}

    return [{**one(i, lp), "top_logprobs": [one(j, v) for j, v in (top or [])]} for i, lp, top in entries]


async def _events(req: GenRequest) -> AsyncIterator[tuple]:
    done = 0
    while done < req.n:
        ev = await req.events.get()
        if ev[0] == "error":
            raise OpenAIError(500, f"generation failed: {ev[2]}")
        if ev[0] == "done":
            done += 1
        yield ev


async def _store(request: Request, key: Any, *, kind: str, m: Any, body: Any, prompt: Any, choices: list[dict],
                 usage: dict, started: float, cid: str) -> str:
    db = request.app.state.db
    if db is None or (key is not None and not getattr(key, "store", True)):
        return cid
    params = body.model_dump(exclude={"messages", "prompt", "model"}, exclude_none=True)
    kwargs = dict(kind=kind, model=m.id, run_id=m.run_id, params=params, prompt=prompt, choices=choices,
                  prompt_tokens=usage["prompt_tokens"], completion_tokens=usage["completion_tokens"],
                  api_key_id=getattr(key, "id", None), user=body.user, latency_s=time.perf_counter() - started)
    if "completion_id" in inspect.signature(db.store_completion).parameters:
        kwargs["completion_id"] = cid
    return await asyncio.to_thread(lambda: db.store_completion(**kwargs))


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _until_disconnected(request: Request) -> None:
    """Returns when the client has gone (the body is already read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _run(request: Request, key: Any, *, kind: str, body: Any, m: Any, prompt: Any, prompt_ids: list[int],
               params: RowParams, want_logprobs: bool) -> Any:
    started = time.perf_counter()
    req = _submit(m, prompt_ids, params, body.n)
    prefix = "chatcmpl" if kind == "chat" else "cmpl"
    cid, created = f"{prefix}-{uuid.uuid4().hex}", int(time.time())
    obj = "chat.completion" if kind == "chat" else "text_completion"
    texts, reasons = [""] * body.n, [None] * body.n
    lps: list[list[dict]] = [[] for _ in range(body.n)]
    ntok = [0] * body.n

    def usage() -> dict:
        c = sum(ntok)
        return {"prompt_tokens": len(prompt_ids), "completion_tokens": c, "total_tokens": len(prompt_ids) + c}

    def choices() -> list[dict]:
        return [{"index": i, "content": texts[i], "finish_reason": reasons[i]} for i in range(body.n)]

    if not body.stream:
        async def collect() -> None:
            async for ev in _events(req):
                if ev[0] == "delta":
                    texts[ev[1]] += ev[2]
                    if want_logprobs:
                        lps[ev[1]] += _logprob_entries(m.tok, ev[3])
                else:
                    reasons[ev[1]], ntok[ev[1]] = ev[2], ev[3]

        work, gone = asyncio.ensure_future(collect()), asyncio.ensure_future(_until_disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            req.cancelled = True  # finished, client gone, or handler cancelled: the rows leave at the next step
            gone.cancel()
            if not work.done():
                work.cancel()
        if not work.done() or work.cancelled():
            raise OpenAIError(499, "client closed the request")  # nobody reads this; ends the handler
        work.result()  # re-raises a generation error
        cid = await _store(request, key, kind=kind, m=m, body=body, prompt=prompt, choices=choices(),
                           usage=usage(), started=started, cid=cid)
        if kind == "chat":
            out = [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                    "logprobs": {"content": lps[i]} if want_logprobs else None, "finish_reason": reasons[i]}
                   for i in range(body.n)]
        else:
            out = [{"index": i, "text": texts[i], "logprobs": None, "finish_reason": reasons[i]} for i in range(body.n)]
        return {"id": cid, "object": obj, "created": created, "model": m.id, "choices": out, "usage": usage()}

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    chunk_obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def chunk(i: int, delta: dict | str, finish: str | None = None, logprobs: Any = None) -> str:
        if kind == "chat":
            choice = {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": i, "text": delta, "logprobs": None, "finish_reason": finish}
        c = {"id": cid, "object": chunk_obj, "created": created, "model": m.id, "choices": [choice]}
        if include_usage:
            c["usage"] = None
        return _sse(c)

    async def gen() -> AsyncIterator[str]:
        try:
            if kind == "chat":
                for i in range(body.n):
                    yield chunk(i, {"role": "assistant", "content": ""})
            async for ev in _events(req):
                i = ev[1]
                if ev[0] == "delta":
                    texts[i] += ev[2]
                    entries = _logprob_entries(m.tok, ev[3]) if want_logprobs else []
                    if ev[2] or entries:
                        lp = {"content": entries} if want_logprobs else None
                        yield chunk(i, {"content": ev[2]} if kind == "chat" else ev[2], logprobs=lp)
                else:
                    reasons[i], ntok[i] = ev[2], ev[3]
                    yield chunk(i, {} if kind == "chat" else "", finish=ev[2])
            if include_usage:
                yield _sse({"id": cid, "object": chunk_obj, "created": created, "model": m.id, "choices": [],
                            "usage": usage()})
        except OpenAIError as e:  # a 200 already went out: the error travels as a data chunk (vLLM does too)
            yield _sse({"error": {"message": e.message, "type": "server_error", "param": None, "code": None}})
        finally:
            req.cancelled = True  # the client went away (or we are done): leave the batch at the next step
        if all(r is not None for r in reasons):  # stored before [DONE], so feedback on it can follow at once
            await _store(request, key, kind=kind, m=m, body=body, prompt=prompt, choices=choices(), usage=usage(),
                         started=started, cid=cid)
        yield "data: [DONE]\n\n"

    return StreamingResponse(gen(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, key: Any = Depends(api_key)) -> Any:
    from chatforge.core.tokenizer import render_for_completion

    m = _served(request, body.model)
    messages = _messages(body)
    prompt_ids = render_for_completion(m.tok, messages)
    want = body.logprobs
    if body.top_logprobs and not want:
        raise OpenAIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    params = _params(request, body, m, len(prompt_ids), body.max_completion_tokens or body.max_tokens,
                     (body.top_logprobs or 0) if want else None)
    return await _run(request, key, kind="chat", body=body, m=m, prompt=messages, prompt_ids=prompt_ids,
                      params=params, want_logprobs=want)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, key: Any = Depends(api_key)) -> Any:
    m = _served(request, body.model)
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise OpenAIError(400, "prompt: one string per request is supported", param="prompt")
        prompt = prompt[0]
    if not prompt:
        raise OpenAIError(400, "prompt must not be empty", param="prompt")
    prompt_ids = list(m.tok(prompt)["input_ids"])
    params = _params(request, body, m, len(prompt_ids), body.max_tokens or 16, None)
    return await _run(request, key, kind="text", body=body, m=m, prompt=prompt, prompt_ids=prompt_ids,
                      params=params, want_logprobs=False)
