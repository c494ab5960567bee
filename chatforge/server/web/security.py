"""Passwords (argon2), server-side sessions, CSRF tokens, login rate limiting, security headers."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import defaultdict, deque
from datetime import datetime, timedelta, timezone

from sqlalchemy import delete, select
from sqlalchemy.orm import Session
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatforge.server.auth import hash_password  # noqa: F401 - re-exported for the pages
from chatforge.server.auth import verify_password as check_password
from chatforge.server.db.models import User
from chatforge.server.web.models import WebInvite, WebSession

SESSION_COOKIE = "cf_session"
SESSION_TTL = timedelta(hours=12)
LOGIN_MAX_FAILS = 5  # per (client, username) within LOGIN_WINDOW_S
LOGIN_WINDOW_S = 300.0


def verify_password(db: Session, user: User | None, password: str) -> bool:
    """True when `password` matches an active user's hash (an unknown or inactive user still costs one
    verify, see server.auth); rehashes in place when argon2's parameters changed."""
    ok, new_hash = check_password(user.password_hash if user is not None and user.is_active else None, password)
    if ok and new_hash:
        user.password_hash = new_hash
    return ok


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_session(db: Session, user: User, old_token: str | None = None) -> tuple[str, WebSession]:
    """A fresh session for `user` (rotation: any pre-login session is deleted, so a planted id is useless)."""
    if old_token:
        db.execute(delete(WebSession).where(WebSession.id == _digest(old_token)))
    token = secrets.token_urlsafe(32)
    row = WebSession(id=_digest(token), user_id=user.id, csrf=secrets.token_urlsafe(32),
                     expires_at=datetime.now(timezone.utc) + SESSION_TTL)
    db.add(row)
    return token, row


def load_session(db: Session, token: str | None) -> tuple[WebSession, User] | None:
    """The live session and its active user for a cookie value, or None."""
    if not token:
        return None
    row = db.get(WebSession, _digest(token))
    if row is None or row.expires_at < datetime.now(timezone.utc):
        return None
    user = db.get(User, row.user_id)
    if user is None or not user.is_active:
        return None
    return row, user


def end_session(db: Session, token: str | None) -> None:
    if token:
        db.execute(delete(WebSession).where(WebSession.id == _digest(token)))


def csrf_ok(session: WebSession | None, submitted: str | None) -> bool:
    return bool(session and submitted and hmac.compare_digest(session.csrf, submitted))


def user_by_name(db: Session, username: str) -> User | None:
    return db.scalar(select(User).where(User.username == username))


class LoginLimiter:
    """Failed logins per key in a sliding window; in-process (one server process owns its limiter)."""

    def __init__(self, max_fails: int = LOGIN_MAX_FAILS, window_s: float = LOGIN_WINDOW_S):
        self.max_fails, self.window_s = max_fails, window_s
        self._fails: dict[str, deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def _trim(self, key: str, now: float) -> deque[float]:
        q = self._fails[key]
        while q and q[0] < now - self.window_s:
            q.popleft()
        return q

    def retry_after(self, key: str) -> int:
        """Seconds until `key` may try again; 0 when it may now."""
        now = time.monotonic()
        with self._lock:
            q = self._trim(key, now)
            return int(q[0] + self.window_s - now) + 1 if len(q) >= self.max_fails else 0

    def fail(self, key: str) -> None:
        with self._lock:
            self._fails[key].append(time.monotonic())

    def reset(self, key: str) -> None:
        with self._lock:
            self._fails.pop(key, None)


CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
]


class SecurityHeaders:
    """Pure ASGI middleware (streams pass through untouched) adding the headers to /app responses."""

    def __init__(self, app: ASGIApp, prefix: str = "/app"):
        self.app, self.prefix = app, prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [h for h in HEADERS if h[0] not in names]
            await send(message)

        await self.app(scope, receive, send_with_headers)


MIN_PASSWORD = 8
INVITE_TTL = timedelta(days=7)


def password_problem(password: str, again: str | None = None) -> str:
    """Why a new password is refused ('' when it is fine)."""
    if len(password) < MIN_PASSWORD:
        return f"a password needs at least {MIN_PASSWORD} characters"
    if again is not None and again != password:
        return "the two passwords differ"
    return ""


def one_time_password() -> str:
    """A random password to print once (the account must set its own at the first login)."""
    return secrets.token_urlsafe(12)


def create_invite(db: Session, actor: User | None, role: str, ttl: timedelta = INVITE_TTL) -> str:
    """A one-use invitation token for `role` (only its digest is stored)."""
    token = secrets.token_urlsafe(24)
    db.add(WebInvite(id=_digest(token), role=role, created_by=actor.id if actor else None,
                     expires_at=datetime.now(timezone.utc) + ttl))
    return token


def open_invite(db: Session, token: str) -> WebInvite | None:
    """The unused, unexpired invite behind `token`, or None."""
    row = db.get(WebInvite, _digest(token)) if token else None
    if row is None or row.used_at is not None or row.expires_at < datetime.now(timezone.utc):
        return None
    return row
