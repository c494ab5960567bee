"""The web app's tables, on the storage package's declarative Base: sessions, audit log, campaigns,
ranking tasks, assignments and rankings (every revision kept)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Boolean, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from chatforge.server.db.models import Base, new_id, utcnow


class WebSession(Base):
    """A server-side login session. Only the SHA-256 of the cookie value is stored."""

    __tablename__ = "web_sessions"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256(cookie token)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    csrf: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column()


class AuditLog(Base):
    """One admin action (who, what, on which object), written in the same transaction as the action."""

    __tablename__ = "web_audit_log"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    actor_id: Mapped[str | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"), default=None)
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(200), default="")
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class WebInvite(Base):
    """An invitation link: whoever opens it first picks a username and password and gets `role`.
    Only the SHA-256 of the token is stored; it works once and until `expires_at`."""

    __tablename__ = "web_invites"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256(token)
    role: Mapped[str] = mapped_column(String(16))
    created_by: Mapped[str | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column()
    used_at: Mapped[datetime | None] = mapped_column(default=None)
    used_by: Mapped[str | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"), default=None)


class Campaign(Base):
    """A set of ranking tasks, each to be ranked by `overlap` different labelers."""

    __tablename__ = "web_campaigns"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("cmp_", 6))
    name: Mapped[str] = mapped_column(String(200))
    overlap: Mapped[int] = mapped_column(Integer, default=1)
    allow_ties: Mapped[bool] = mapped_column(Boolean, default=True)
    guidelines: Mapped[str] = mapped_column(Text, default="")
    created_by: Mapped[str | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class RankTask(Base):
    """One imported ranking task (DESIGN format, kept verbatim in `data`)."""

    __tablename__ = "web_rank_tasks"
    __table_args__ = (UniqueConstraint("campaign_id", "task_id"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("tsk_", 8))
    campaign_id: Mapped[str] = mapped_column(ForeignKey("web_campaigns.id", ondelete="CASCADE"), index=True)
    task_id: Mapped[str] = mapped_column(String(200))
    data: Mapped[dict[str, Any]] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Assignment(Base):
    """A task given to one labeler (never twice: unique pair), with the reply order shown to them."""

    __tablename__ = "web_assignments"
    __table_args__ = (UniqueConstraint("task_id", "user_id"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("asg_", 8))
    task_id: Mapped[str] = mapped_column(ForeignKey("web_rank_tasks.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    shown_order: Mapped[list[Any]] = mapped_column()  # response ids, in the order shown
    status: Mapped[str] = mapped_column(String(16), default="open")  # open | done | skipped
    skip_reason: Mapped[str] = mapped_column(Text, default="")
    draft: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    done_at: Mapped[datetime | None] = mapped_column(default=None)


class Ranking(Base):
    """One submitted ranking of an assignment; a revision adds a row (`revision` counts up), and
    `submit_key` makes a double submit of the same form a no-op."""

    __tablename__ = "web_rankings"
    __table_args__ = (UniqueConstraint("assignment_id", "revision"), UniqueConstraint("submit_key"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    assignment_id: Mapped[str] = mapped_column(ForeignKey("web_assignments.id", ondelete="CASCADE"), index=True)
    revision: Mapped[int] = mapped_column(Integer, default=1)
    submit_key: Mapped[str] = mapped_column(String(64))
    ranking: Mapped[list[Any]] = mapped_column()  # [[ids best, ties together], ...]
    not_rankable: Mapped[bool] = mapped_column(Boolean, default=False)
    ratings: Mapped[dict[str, Any]] = mapped_column(default=dict)
    flags: Mapped[dict[str, Any]] = mapped_column(default=dict)
    comment: Mapped[str] = mapped_column(Text, default="")
    shown_order: Mapped[list[Any]] = mapped_column()
    seconds: Mapped[float | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class PromptSet(Base):
    """Prompts imported for demonstration writing (DESIGN prompt format, one row per prompt)."""

    __tablename__ = "web_prompt_sets"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("pst_", 6))
    name: Mapped[str] = mapped_column(String(200), unique=True)
    guidelines: Mapped[str] = mapped_column(Text, default="")
    created_by: Mapped[str | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class SetPrompt(Base):
    """One prompt of a set: the conversation so far, ending with a user turn."""

    __tablename__ = "web_prompts"
    __table_args__ = (UniqueConstraint("set_id", "prompt_id"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("prm_", 8))
    set_id: Mapped[str] = mapped_column(ForeignKey("web_prompt_sets.id", ondelete="CASCADE"), index=True)
    prompt_id: Mapped[str] = mapped_column(String(200))
    messages: Mapped[list[Any]] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Demonstration(Base):
    """A conversation a trainer writes playing both sides. `draft` holds the turns as last typed (saved as
    they type); each submit adds a DemoRevision, so a revised demonstration keeps its history."""

    __tablename__ = "web_demos"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("dem_", 8))
    author_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    prompt_id: Mapped[str | None] = mapped_column(ForeignKey("web_prompts.id", ondelete="SET NULL"), default=None)
    draft: Mapped[list[Any]] = mapped_column(default=list)  # [{"role", "content"}]
    model_drafts: Mapped[list[Any]] = mapped_column(default=list)  # [{"turn", "content", "model"}]: what the model wrote
    status: Mapped[str] = mapped_column(String(16), default="draft")  # draft | submitted
    revision: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class DemoRevision(Base):
    """A submitted version of a demonstration; `submit_key` makes a double submit store one row."""

    __tablename__ = "web_demo_revisions"
    __table_args__ = (UniqueConstraint("demo_id", "revision"), UniqueConstraint("submit_key"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    demo_id: Mapped[str] = mapped_column(ForeignKey("web_demos.id", ondelete="CASCADE"), index=True)
    revision: Mapped[int] = mapped_column(Integer)
    submit_key: Mapped[str] = mapped_column(String(64))
    messages: Mapped[list[Any]] = mapped_column()
    model_drafts: Mapped[list[Any]] = mapped_column(default=list)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
