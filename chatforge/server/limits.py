"""Request-body limits as a pure ASGI middleware: a body over `max_bytes` is a 413, one that takes longer
than `timeout_s` to arrive (a slow or stalled client) is a 408; both in OpenAI's error shape, and neither
holds up anyone else (the wait is an await, not a thread)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from fastapi import HTTPException

from chatforge.server.errors import error_body

MAX_BODY_BYTES = 4 * 1024 * 1024
BODY_TIMEOUT_S = 30.0


class BodyLimits:
    def __init__(self, app: Any, max_bytes: int = MAX_BODY_BYTES, timeout_s: float = BODY_TIMEOUT_S):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await _reply(send, 413, f"request body is {int(length)} bytes; the limit is {self.max_bytes}")
            return
        deadline = time.monotonic() + self.timeout_s
        state = {"done": False, "seen": 0}

        async def limited() -> dict:
            if state["done"]:
                return await receive()
            try:
                msg = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.001))
            except TimeoutError:
                raise HTTPException(408, f"request body not received within {self.timeout_s:g} s") from None
            if msg["type"] == "http.request":
                state["seen"] += len(msg.get("body", b""))
                if state["seen"] > self.max_bytes:
                    raise HTTPException(413, f"request body is over the limit of {self.max_bytes} bytes")
                state["done"] = not msg.get("more_body", False)
            else:
                state["done"] = True
            return msg

        await self.app(scope, limited, send)


async def _reply(send: Any, status: int, message: str) -> None:
    body = json.dumps(error_body(status, message)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
