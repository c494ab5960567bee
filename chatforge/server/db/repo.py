"""Repository functions: every read and write the server, the CLI and the web app make, on a Session.

Errors a client can cause raise `NotFound` or `Invalid` (with the offending field in `param`); the routes
map them to OpenAI-shaped 404/400 bodies.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from chatforge.server.db.models import (
    ROLES,
    ApiKey,
    Completion,
    Conversation,
    Feedback,
    Message,
    User,
    new_id,
    utcnow,
)

TOKEN_PREFIX = "cf-"
TOKEN_BYTES = 32  # 256 bits: a single SHA-256 is enough (no brute force over this space; argon2 is for passwords)
SHOWN_PREFIX = 10  # characters of the token kept in clear for `keys list`


class NotFound(LookupError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class Invalid(ValueError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------- API keys


def create_key(s: Session, name: str, rate_per_min: int | None = None, store: bool = True,
               user_id: str | None = None) -> tuple[ApiKey, str]:
    """A new key and its secret token (shown once; only its SHA-256 is kept)."""
    if not name.strip():
        raise Invalid("a key needs a name", "name")
    if rate_per_min is not None and rate_per_min < 1:
        raise Invalid(f"rate must be at least 1 request/min, got {rate_per_min}", "rate")
    token = TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)
    key = ApiKey(id=new_id("key_", 8), name=name, key_hash=hash_token(token), prefix=token[:SHOWN_PREFIX],
                 rate_per_min=rate_per_min, store=store, user_id=user_id, created_at=utcnow())
    s.add(key)
    s.flush()
    return key, token


def list_keys(s: Session, include_revoked: bool = True) -> list[ApiKey]:
    q = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
    if not include_revoked:
        q = q.where(ApiKey.revoked_at.is_(None))
    return list(s.scalars(q))


def find_key(s: Session, token: str) -> ApiKey | None:
    """The key whose secret is `token` (revoked ones included: the caller says why it is refused)."""
    return s.scalar(select(ApiKey).where(ApiKey.key_hash == hash_token(token)))


def revoke_key(s: Session, ref: str) -> ApiKey:
    """Revoke by id (key_…) or by the token prefix shown in `keys list`; revoking twice is a no-op."""
    key = s.get(ApiKey, ref)
    if key is None:
        hits = list(s.scalars(select(ApiKey).where(ApiKey.prefix == ref)))
        if len(hits) > 1:
            raise Invalid(f"prefix {ref!r} matches {len(hits)} keys; use the key id", "id")
        key = hits[0] if hits else None
    if key is None:
        raise NotFound(f"no API key {ref!r} (see `chatforge keys list`)", "id")
    if key.revoked_at is None:
        key.revoked_at = utcnow()
    return key


# ----------------------------------------------------------------------------- users


def create_user(s: Session, username: str, password_hash: str | None, role: str = "user",
                email: str | None = None, display_name: str = "") -> User:
    if role not in ROLES:
        raise Invalid(f"role {role!r} is not one of {', '.join(ROLES)}", "role")
    if not username.strip():
        raise Invalid("a user needs a name", "username")
    if s.scalar(select(User).where(User.username == username)) is not None:
        raise Invalid(f"user {username!r} already exists", "username")
    user = User(id=new_id("usr_", 8), username=username, email=email, display_name=display_name or username,
                role=role, password_hash=password_hash, created_at=utcnow())
    s.add(user)
    s.flush()
    return user


def user_by_name(s: Session, username: str) -> User | None:
    return s.scalar(select(User).where(User.username == username))


# ----------------------------------------------------------------------------- conversations (web app)


def create_conversation(s: Session, user_id: str | None = None, title: str = "", model: str | None = None,
                        api_key_id: str | None = None) -> Conversation:
    conv = Conversation(id=new_id("conv_"), user_id=user_id, api_key_id=api_key_id, title=title, model=model,
                        meta={}, created_at=utcnow(), updated_at=utcnow())
    s.add(conv)
    s.flush()
    return conv


def add_message(s: Session, conversation_id: str, role: str, content: str, parent_id: str | None = None,
                completion_id: str | None = None, choice_index: int | None = None) -> Message:
    if s.get(Conversation, conversation_id) is None:
        raise NotFound(f"no conversation {conversation_id!r}", "conversation_id")
    msg = Message(id=new_id("msg_"), conversation_id=conversation_id, parent_id=parent_id, role=role,
                  content=content, completion_id=completion_id, choice_index=choice_index, created_at=utcnow())
    s.add(msg)
    s.flush()
    return msg


# ----------------------------------------------------------------------------- completions


def store_completion(s: Session, kind: str, model: str, run_id: str | None, params: dict, prompt: Any,
                     choices: list[dict], prompt_tokens: int, completion_tokens: int, api_key_id: str | None,
                     user: str | None, latency_s: float, completion_id: str | None = None,
                     user_id: str | None = None, conversation_id: str | None = None) -> str:
    """Store one served completion (all its choices); returns its id."""
    cid = completion_id or f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{secrets.token_hex(16)}"
    s.add(Completion(id=cid, kind=kind, model=model, run_id=run_id, params=params, prompt=prompt,
                     choices=[{"index": c["index"], "content": c["content"], "finish_reason": c.get("finish_reason")}
                              for c in choices],
                     prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, api_key_id=api_key_id,
                     user=user, user_id=user_id, conversation_id=conversation_id, created_at=utcnow(),
                     latency_s=latency_s))
    s.flush()
    return cid


def get_completion(s: Session, completion_id: str) -> Completion | None:
    return s.get(Completion, completion_id)


def policy_of(c: Completion) -> str:
    """The model version a completion came from: its registry run id, else the served model name."""
    return c.run_id or c.model


# ----------------------------------------------------------------------------- feedback


def _choice(c: Completion, index: int, param: str) -> dict:
    for ch in c.choices:
        if ch["index"] == index:
            return ch
    raise Invalid(f"completion {c.id} has {len(c.choices)} choice(s); {param} {index} is out of range", param)


def add_feedback(s: Session, completion_id: str, rating: int, choice_index: int = 0, reason: str | None = None,
                 preferred_completion_id: str | None = None, preferred_choice_index: int | None = None,
                 edited_content: str | None = None, api_key_id: str | None = None, user_id: str | None = None,
                 user: str | None = None, message_id: str | None = None,
                 owner_key_id: str | None = None) -> Feedback:
    """Record thumbs (rating ±1) on one choice, optionally a preferred alternative and/or an edit.

    `owner_key_id`: when set, only completions made with that key (or with no key) can be rated, so one
    client cannot read or rate another's completions by id. A preferred alternative must answer the same
    prompt (it is a regenerate), and may not be the rated reply itself.
    """
    if rating not in (1, -1):
        raise Invalid(f"rating must be 1 or -1, got {rating!r}", "rating")
    c = s.get(Completion, completion_id)
    if c is None or (owner_key_id is not None and c.api_key_id not in (None, owner_key_id)):
        raise NotFound(f"no stored completion {completion_id!r} (keys created with --no-store keep none)",
                       "completion_id")
    _choice(c, choice_index, "choice_index")
    if edited_content is not None and not edited_content.strip():
        raise Invalid("edited_content is empty", "edited_content")
    if preferred_completion_id is not None:
        p = s.get(Completion, preferred_completion_id)
        if p is None or (owner_key_id is not None and p.api_key_id not in (None, owner_key_id)):
            raise NotFound(f"no stored completion {preferred_completion_id!r}", "preferred_completion_id")
        preferred_choice_index = preferred_choice_index or 0
        _choice(p, preferred_choice_index, "preferred_choice_index")
        if p.kind != c.kind or p.prompt != c.prompt:
            raise Invalid("preferred_completion_id answers a different prompt (it must be a regenerate of the "
                          "same messages)", "preferred_completion_id")
        if p.id == c.id and preferred_choice_index == choice_index:
            raise Invalid("a reply cannot be preferred over itself", "preferred_choice_index")
    elif preferred_choice_index is not None:
        raise Invalid("preferred_choice_index needs preferred_completion_id", "preferred_choice_index")
    fb = Feedback(id=new_id("fb_"), completion_id=c.id, choice_index=choice_index, message_id=message_id,
                  rating=rating, reason=reason, policy=policy_of(c), preferred_completion_id=preferred_completion_id,
                  preferred_choice_index=preferred_choice_index, edited_content=edited_content,
                  api_key_id=api_key_id, user_id=user_id, user=user, created_at=utcnow())
    s.add(fb)
    s.flush()
    return fb
