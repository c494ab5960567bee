"""Storage: SQLAlchemy 2 models, Alembic migrations shipped in the package, repository functions.

    from chatforge.server.db import open_db
    db = open_db("runs/chatforge.db")          # or postgresql+psycopg://user@host/db; migrates to head
    with db.session() as s:
        key, token = repo.create_key(s, "laptop", rate_per_min=60)
"""

from chatforge.server.db.database import Database, open_db
from chatforge.server.db.engine import DEFAULT_DB, database_url, make_engine

__all__ = ["DEFAULT_DB", "Database", "database_url", "make_engine", "open_db"]
