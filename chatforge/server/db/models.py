"""The tables: API keys, app users, conversations and messages, every stored completion, feedback.

SQLAlchemy 2 typed declarative models; portable types only (SQLite and PostgreSQL). Ids are short
prefixed strings (`key_…`, `usr_…`, `conv_…`, `msg_…`, `chatcmpl-…`/`cmpl-…`, `fb_…`) so they can go
on the wire as they are. The web app extends this schema with its own tables (campaigns, tasks, …)
through further Alembic revisions; the columns it needs from the start (users and their roles,
conversations with messages linked to the completion that produced them) are here.
"""

from __future__ import annotations

import enum
import secrets
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Integer, MetaData, String, Text, false
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_id(prefix: str, nbytes: int = 12) -> str:
    return f"{prefix}{secrets.token_hex(nbytes)}"


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite drops the zone; put it back on read)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value


class Role(str, enum.Enum):
    """App account roles: admins manage everything, labelers do labeling tasks, users chat."""

    admin = "admin"
    labeler = "labeler"
    user = "user"


ROLES = tuple(r.value for r in Role)


# Named constraints, so later Alembic revisions can alter them (SQLite batch mode needs the names).
NAMING = {"ix": "ix_%(column_0_label)s", "uq": "uq_%(table_name)s_%(column_0_name)s",
          "ck": "ck_%(table_name)s_%(constraint_name)s", "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
          "pk": "pk_%(table_name)s"}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON, list[Any]: JSON}


class ApiKey(Base):
    """An API key. Only the SHA-256 of the secret is stored; `prefix` is shown in listings."""

    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("key_", 8))
    name: Mapped[str] = mapped_column(String(200))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    prefix: Mapped[str] = mapped_column(String(16))
    rate_per_min: Mapped[int | None] = mapped_column(Integer, default=None)  # None: unlimited
    store: Mapped[bool] = mapped_column(Boolean, default=True)  # False: completions are not stored
    user_id: Mapped[str | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)
    last_used_at: Mapped[datetime | None] = mapped_column(default=None)


class User(Base):
    """An account of the web app (argon2 password hash); `role` is one of ROLES; `username` logs in."""

    __tablename__ = "users"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("usr_", 8))
    username: Mapped[str] = mapped_column(String(100), unique=True, index=True)
    email: Mapped[str | None] = mapped_column(String(320), unique=True, default=None)
    display_name: Mapped[str] = mapped_column(String(200), default="")
    role: Mapped[str] = mapped_column(String(16), default=Role.user.value)
    password_hash: Mapped[str | None] = mapped_column(String(255), default=None)
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)
    must_change_password: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    """Set for a one-time password (`users create --one-time`, `serve --demo`): every page asks for a new one."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Conversation(Base):
    """A chat in the web app (or an API client's thread); messages hang off it."""

    __tablename__ = "conversations"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("conv_"))
    user_id: Mapped[str | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"), index=True,
                                                default=None)
    api_key_id: Mapped[str | None] = mapped_column(ForeignKey("api_keys.id", ondelete="SET NULL"), default=None)
    title: Mapped[str] = mapped_column(String(300), default="")
    model: Mapped[str | None] = mapped_column(String(200), default=None)
    meta: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Message(Base):
    """One turn. `parent_id` makes a tree (regenerates are siblings); an assistant turn links the
    completion (and choice) that produced it, so feedback on either reaches the same reply."""

    __tablename__ = "messages"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("msg_"))
    conversation_id: Mapped[str] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"), index=True)
    parent_id: Mapped[str | None] = mapped_column(ForeignKey("messages.id", ondelete="SET NULL"), default=None)
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text)
    completion_id: Mapped[str | None] = mapped_column(ForeignKey("completions.id", ondelete="SET NULL"),
                                                      index=True, default=None)
    choice_index: Mapped[int | None] = mapped_column(Integer, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Completion(Base):
    """Every served completion: model version, parameters, prompt, all choices, token counts, timing."""

    __tablename__ = "completions"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(8))  # "chat" | "text"
    model: Mapped[str] = mapped_column(String(200))
    run_id: Mapped[str | None] = mapped_column(String(200), index=True, default=None)
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    prompt: Mapped[Any] = mapped_column(JSON)  # chat: [{"role", "content"}, ...]; text: a string
    choices: Mapped[list[Any]] = mapped_column(default=list)  # [{"index", "content", "finish_reason"}]
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    api_key_id: Mapped[str | None] = mapped_column(ForeignKey("api_keys.id", ondelete="SET NULL"), index=True,
                                                   default=None)
    user: Mapped[str | None] = mapped_column(String(200), default=None)  # the request's `user` field
    user_id: Mapped[str | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"), default=None)
    conversation_id: Mapped[str | None] = mapped_column(ForeignKey("conversations.id", ondelete="SET NULL"),
                                                        default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    latency_s: Mapped[float] = mapped_column(Float, default=0.0)


class Feedback(Base):
    """A thumbs up/down (rating ±1) on one choice of a completion, optionally with the alternative the
    rater preferred (e.g. after a regenerate: `preferred_completion_id` / `preferred_choice_index`) and/or
    the reply as the rater edited it. `policy` is the rated reply's model version (run id, else model name),
    copied at write time so the event stands alone (DESIGN.md feedback event). The web app sets
    `message_id` when the thumbs were given on a chat message."""

    __tablename__ = "feedback"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("fb_"))
    completion_id: Mapped[str] = mapped_column(ForeignKey("completions.id", ondelete="CASCADE"), index=True)
    choice_index: Mapped[int] = mapped_column(Integer, default=0)
    message_id: Mapped[str | None] = mapped_column(ForeignKey("messages.id", ondelete="SET NULL"), default=None)
    rating: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str | None] = mapped_column(Text, default=None)
    policy: Mapped[str] = mapped_column(String(200), default="")
    preferred_completion_id: Mapped[str | None] = mapped_column(
        ForeignKey("completions.id", ondelete="SET NULL"), default=None)
    preferred_choice_index: Mapped[int | None] = mapped_column(Integer, default=None)
    edited_content: Mapped[str | None] = mapped_column(Text, default=None)
    api_key_id: Mapped[str | None] = mapped_column(ForeignKey("api_keys.id", ondelete="SET NULL"), default=None)
    user_id: Mapped[str | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"), default=None)
    user: Mapped[str | None] = mapped_column(String(200), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
