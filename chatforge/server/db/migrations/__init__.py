"""Alembic migrations for the chatforge database (run by `chatforge db upgrade` and on `serve` start)."""
