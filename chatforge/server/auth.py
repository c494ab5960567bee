"""API keys on the wire (`Authorization: Bearer cf-…`), per-key rate limits, and password hashing.

Keys are looked up by the SHA-256 of the token (the token is 256 random bits, so a fast hash is enough);
revoked keys are refused at once (no cache). The rate limit is a token bucket per key in this process:
`rate` requests per minute, bursts up to `rate`; past it, 429 with `Retry-After` (seconds until the next
request is allowed). With `--no-auth` every request is anonymous.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from dataclasses import dataclass

from fastapi import Request

from chatforge.server.errors import OpenAIError

LAST_USED_EVERY_S = 60  # write last_used_at at most this often per key (a write per request would contend)


@dataclass(frozen=True)
class KeyInfo:
    id: str
    name: str
    prefix: str
    store: bool
    rate_per_min: int | None
    user_id: str | None


class RateLimiter:
    """Token buckets keyed by key id; thread-safe; `check` returns 0 or the seconds to wait."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}  # id -> (tokens, last refill time)
        self._lock = threading.Lock()

    def check(self, key_id: str, rate_per_min: int, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        per_s = rate_per_min / 60.0
        with self._lock:
            tokens, last = self._buckets.get(key_id, (float(rate_per_min), now))
            tokens = min(float(rate_per_min), tokens + (now - last) * per_s)
            if tokens >= 1.0:
                self._buckets[key_id] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key_id] = (tokens, now)
            return (1.0 - tokens) / per_s


def _unauthorized(message: str) -> OpenAIError:
    return OpenAIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def _lookup(db, token: str, touch: dict[str, float]) -> KeyInfo | None:
    from chatforge.server.db import repo
    from chatforge.server.db.models import utcnow

    with db.session() as s:
        key = repo.find_key(s, token)
        if key is None:
            return None
        if key.revoked_at is None and time.monotonic() - touch.get(key.id, -1e9) > LAST_USED_EVERY_S:
            key.last_used_at = utcnow()
            touch[key.id] = time.monotonic()
        info = KeyInfo(key.id, key.name, key.prefix, key.store, key.rate_per_min, key.user_id)
        return info if key.revoked_at is None else KeyInfo("", "revoked", key.prefix, False, None, None)


async def api_key(request: Request) -> KeyInfo | None:
    """FastAPI dependency: the caller's key, None under --no-auth; 401 for missing/bad/revoked, 429 past its rate."""
    state = request.app.state
    if getattr(state, "no_auth", False):
        return None
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if not header:
        raise _unauthorized("Missing API key: send 'Authorization: Bearer <key>' (create one with "
                            "`chatforge keys create --name NAME`)")
    if scheme.lower() != "bearer" or not token:
        raise _unauthorized("Malformed Authorization header: expected 'Bearer <key>'")
    db = getattr(state, "db", None)
    if db is None:
        raise _unauthorized("This server has no key database; start it with --db URL or --no-auth")
    if not hasattr(state, "key_touch"):
        state.key_touch, state.rate_limiter = {}, RateLimiter()
    info = await asyncio.to_thread(_lookup, db, token, state.key_touch)
    if info is None:
        raise _unauthorized(f"Incorrect API key provided: {token[:6]}…")
    if not info.id:
        raise _unauthorized(f"API key {info.prefix}… has been revoked")
    if info.rate_per_min:
        wait = state.rate_limiter.check(info.id, info.rate_per_min)
        if wait > 0:
            retry = max(1, math.ceil(wait))
            raise OpenAIError(429, f"Rate limit reached for key {info.prefix}…: {info.rate_per_min} requests/min; "
                              f"retry in {retry}s", code="rate_limit_exceeded", headers={"Retry-After": str(retry)})
    return info


# ----------------------------------------------------------------------------- passwords (app accounts)


def _hasher():
    from argon2 import PasswordHasher

    return PasswordHasher()


def hash_password(password: str) -> str:
    """Argon2id hash (argon2-cffi defaults)."""
    return _hasher().hash(password)


def verify_password(password_hash: str | None, password: str) -> tuple[bool, str | None]:
    """(ok, new hash if the parameters changed and it should be re-saved). A missing hash still costs a
    verify (against a dummy), so a login cannot tell unknown accounts from wrong passwords by timing."""
    from argon2.exceptions import InvalidHashError, VerificationError

    ph = _hasher()
    if not password_hash:
        try:
            ph.verify(_dummy_hash(), password)
        except VerificationError:
            pass
        return False, None
    try:
        ph.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False, None
    return True, (ph.hash(password) if ph.check_needs_rehash(password_hash) else None)


_DUMMY: list[str] = []


def _dummy_hash() -> str:
    if not _DUMMY:
        _DUMMY.append(_hasher().hash("chatforge-dummy-password"))
    return _DUMMY[0]
