"""Database URLs and engines: SQLite (WAL, foreign keys, busy timeout) by default, PostgreSQL by URL.

    runs/chatforge.db                       a path: SQLite (the directory is created)
    sqlite:///runs/chatforge.db             the same, as a URL
    postgresql+psycopg://user@host/dbname   PostgreSQL through psycopg 3 (postgresql:// and
                                            postgres:// are taken to mean the same driver)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.pool import StaticPool

from chatforge.core.io import UserError

DEFAULT_DB = "runs/chatforge.db"
SQLITE_BUSY_MS = 10_000  # a writer waits this long for another one (serve + `keys create` at once)


def database_url(url: str | Path | None) -> str:
    """Normalise what a user typed for --db into an SQLAlchemy URL (see the module docstring)."""
    url = str(url or DEFAULT_DB)
    if "://" not in url:
        return f"sqlite:///{url}"
    for old in ("postgres://", "postgresql://"):
        if url.startswith(old):  # psycopg 3 is the driver we ship; psycopg2 is not installed
            return "postgresql+psycopg://" + url[len(old):]
    return url


def _sqlite_pragmas(dbapi_conn: Any, _: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")  # SQLite ignores FOREIGN KEY clauses unless asked
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_MS}")
    cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer, the writer never blocks readers
    cur.execute("PRAGMA synchronous=NORMAL")  # safe with WAL: a crash may lose the last commit, never corrupt
    cur.close()


def make_engine(url: str | Path | None) -> Engine:
    """An engine for `url`; a clear error for an unknown scheme or an unreachable server."""
    url = database_url(url)
    try:
        u = make_url(url)
    except Exception as e:
        raise UserError(f"--db {url!r} is not a database URL ({e})") from None
    backend = u.get_backend_name()
    if backend == "sqlite":
        memory = u.database in (None, "", ":memory:")
        if not memory:
            Path(u.database).parent.mkdir(parents=True, exist_ok=True)
        # check_same_thread off: the pool hands a connection to one thread at a time (routes use to_thread).
        kw: dict[str, Any] = {"connect_args": {"check_same_thread": False}}
        if memory:
            kw["poolclass"] = StaticPool  # one shared in-memory database, not one per connection
        engine = create_engine(u, **kw)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if backend == "postgresql":
        if u.get_driver_name() != "psycopg":
            raise UserError(f"--db {url!r}: use postgresql+psycopg:// (psycopg 3 is the supported driver)")
        return create_engine(u, pool_pre_ping=True)
    raise UserError(f"--db {url!r}: unsupported database '{backend}' (use a SQLite path or postgresql+psycopg://)")
