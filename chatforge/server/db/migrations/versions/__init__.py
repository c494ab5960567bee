"""Alembic revisions, oldest first by `down_revision`; the web app adds its own on top of 0001."""
