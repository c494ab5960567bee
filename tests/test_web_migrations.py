"""The web app's tables come with the migrations: from empty, from the serving schema (0001) with data
in it, on SQLite and PostgreSQL; head equals the models (autogenerate finds nothing to add)."""

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import column, func, insert, inspect, select, table

import chatforge.server.web.models  # noqa: F401 - registers the web tables on Base
from chatforge.server.db import open_db, repo
from chatforge.server.db.migrate import current_revision, head_revision, upgrade
from chatforge.server.db.models import Base, Completion, Feedback, User, utcnow

WEB_TABLES = {"web_sessions", "web_audit_log", "web_campaigns", "web_rank_tasks", "web_assignments", "web_rankings",
              "web_invites"}


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    return f"sqlite:///{tmp_path / 'cf.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")


def test_empty_to_head_has_every_model_table_and_no_drift(url):
    db = open_db(url)
    try:
        assert current_revision(db.engine) == head_revision()
        names = set(inspect(db.engine).get_table_names())
        assert WEB_TABLES <= names and set(Base.metadata.tables) <= names
        with db.engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
        assert diff == [], f"models and migrations differ (write a revision): {diff}"
    finally:
        db.close()


def test_upgrade_from_serving_schema_keeps_its_rows(url):
    db = open_db(url, upgrade=False)
    try:
        upgrade(db.engine, "0001")
        assert not WEB_TABLES & set(inspect(db.engine).get_table_names())
        with db.session() as s:  # users as 0001 knew them (later revisions add columns the model has now)
            users_0001 = table("users", *(column(c) for c in ("id", "username", "role", "is_active", "display_name",
                                                             "created_at")))
            s.execute(insert(users_0001).values(id="usr_alice", username="alice", role="labeler", is_active=True,
                                                display_name="", created_at=utcnow()))
            conv = repo.create_conversation(s, user_id="usr_alice", title="t")
            repo.add_message(s, conv.id, "user", "hi")
        cid = db.store_completion("chat", "m", "run-1", {"temperature": 1.0}, [{"role": "user", "content": "hi"}],
                                  [{"index": 0, "content": "hello", "finish_reason": "stop"}], 2, 1, None, None, 0.01)
        with db.session() as s:
            repo.add_feedback(s, cid, 1, reason="helpful")
            before = {t: s.scalar(select(func.count()).select_from(t.__table__)) for t in (User, Completion, Feedback)}
        before_rev, after_rev = upgrade(db.engine)
        assert (before_rev, after_rev) == ("0001", head_revision())
        assert WEB_TABLES <= set(inspect(db.engine).get_table_names())
        with db.session() as s:
            after = {t: s.scalar(select(func.count()).select_from(t.__table__)) for t in (User, Completion, Feedback)}
            assert after == before and before[User] == 1 and before[Completion] == 1
            alice = repo.user_by_name(s, "alice")
            assert alice.role == "labeler" and alice.must_change_password is False  # the new column's default
    finally:
        db.close()
