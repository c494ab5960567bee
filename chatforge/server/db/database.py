"""`Database`: an engine, a session factory, and the repository calls the server makes in one line."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from chatforge.server.db import repo
from chatforge.server.db.engine import make_engine


class Database:
    """One database. `session()` is a unit of work (commit on success, rollback on error); objects
    stay readable after it closes (expire_on_commit off), so they can be returned from a thread."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.sessions = sessionmaker(engine, expire_on_commit=False)

    @property
    def url(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        with self.sessions.begin() as s:
            yield s

    def store_completion(self, kind: str, model: str, run_id: str | None, params: dict, prompt: Any,
                         choices: list[dict], prompt_tokens: int, completion_tokens: int, api_key_id: str | None,
                         user: str | None, latency_s: float, completion_id: str | None = None, **kw: Any) -> str:
        with self.session() as s:
            return repo.store_completion(s, kind, model, run_id, params, prompt, choices, prompt_tokens,
                                         completion_tokens, api_key_id, user, latency_s, completion_id, **kw)

    def create_key(self, name: str, rate_per_min: int | None = None, store: bool = True,
                   user_id: str | None = None) -> tuple[Any, str]:
        with self.session() as s:
            return repo.create_key(s, name, rate_per_min, store, user_id)

    def list_keys(self, include_revoked: bool = True) -> list[Any]:
        with self.session() as s:
            return repo.list_keys(s, include_revoked)

    def revoke_key(self, ref: str) -> Any:
        with self.session() as s:
            return repo.revoke_key(s, ref)

    def find_key(self, token: str) -> Any:
        with self.session() as s:
            return repo.find_key(s, token)

    def add_feedback(self, **kw: Any) -> Any:
        with self.session() as s:
            return repo.add_feedback(s, **kw)

    def close(self) -> None:
        self.engine.dispose()


def open_db(url: str | Path | None = None, upgrade: bool = True) -> Database:
    """Open (and by default migrate to the latest revision) the database at `url` (see engine.py)."""
    from chatforge.server.db.migrate import upgrade as run_upgrade

    engine = make_engine(url)
    if upgrade:
        try:
            run_upgrade(engine)
        except Exception as e:
            from sqlalchemy.exc import OperationalError

            from chatforge.core.io import UserError

            if isinstance(e, OperationalError):
                raise UserError(f"cannot open database {engine.url.render_as_string(hide_password=True)}: "
                                f"{e.orig}") from None
            raise
    return Database(engine)
