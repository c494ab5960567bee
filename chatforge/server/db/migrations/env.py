"""Alembic environment. `chatforge.server.db.migrate` hands over an open connection in
`config.attributes["connection"]`; without one, `sqlalchemy.url` is used (offline SQL or a bare URL)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

import chatforge.server.web.models  # noqa: F401 - the web app's tables live on the same Base
from chatforge.server.db.models import Base

config = context.config


def _configure(connection) -> None:
    # render_as_batch: SQLite cannot ALTER most things; batch mode copies the table (no-op on PostgreSQL).
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True,
                      compare_type=True)


connection = config.attributes.get("connection")
if context.is_offline_mode():
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=Base.metadata,
                      literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
elif connection is not None:
    _configure(connection)
    with context.begin_transaction():
        context.run_migrations()
else:
    engine = create_engine(config.get_main_option("sqlalchemy.url"))
    with engine.connect() as conn:
        _configure(conn)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()
