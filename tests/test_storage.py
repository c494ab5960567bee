"""Storage on SQLite and on a real PostgreSQL: migrations from empty, keys, completions, feedback, export."""

import json

import pytest
from sqlalchemy import inspect, select

from chatforge.core.io import UserError
from chatforge.data.formats import read_comparisons, read_conversations
from chatforge.server.db import database_url, open_db, repo
from chatforge.server.db.migrate import current_revision, head_revision
from chatforge.server.db.models import ApiKey, Completion
from chatforge.server.export import export_feedback, scrub_pii

PROMPT = [{"role": "user", "content": "Write to me at bob@example.com or +1 415 555 0100."}]
TABLES = {"users", "api_keys", "conversations", "messages", "completions", "feedback", "alembic_version"}


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    url = str(tmp_path / "sub" / "cf.db") if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    d = open_db(url)
    yield d
    d.close()


def _store(db, run_id, texts, key=None, prompt=PROMPT, model="m"):
    return db.store_completion("chat", model, run_id, {"temperature": 1.0}, prompt,
                               [{"index": i, "content": t, "finish_reason": "stop"} for i, t in enumerate(texts)],
                               5, 3, key, None, 0.01)


def test_migrations_from_empty_and_idempotent(db):
    assert TABLES <= set(inspect(db.engine).get_table_names())  # the web app's tables: test_web_migrations
    assert current_revision(db.engine) == head_revision() is not None
    again = open_db(db.engine.url.render_as_string(hide_password=False))  # a second upgrade is a no-op
    assert current_revision(again.engine) == head_revision()
    again.close()


def test_sqlite_pragmas(tmp_path):
    d = open_db(tmp_path / "x.db")
    with d.engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert c.exec_driver_sql("PRAGMA busy_timeout").scalar() == 10_000
    assert database_url("postgresql://u@h/d") == "postgresql+psycopg://u@h/d"
    with pytest.raises(UserError, match="unsupported database"):
        open_db("mysql://u@h/d")


def test_keys_hashed_and_revoked(db):
    key, token = db.create_key("laptop", rate_per_min=5)
    assert token.startswith("cf-") and len(token) > 40 and key.prefix == token[:10]
    with db.session() as s:
        row = s.get(ApiKey, key.id)
        assert row.key_hash != token and token not in json.dumps([row.key_hash, row.prefix, row.name])
    assert db.find_key(token).id == key.id and db.find_key(token + "x") is None
    db.revoke_key(key.prefix)
    assert db.find_key(token).revoked_at is not None
    with pytest.raises(repo.NotFound):
        db.revoke_key("key_nope")
    with pytest.raises(repo.Invalid):
        db.create_key("x", rate_per_min=0)


def test_completion_round_trip_and_feedback_validation(db):
    k1, _ = db.create_key("a")
    k2, _ = db.create_key("b")
    cid = _store(db, "ppo-1", ["one", "two"], key=k1.id)
    with db.session() as s:
        c = s.get(Completion, cid)
        assert (c.prompt, c.choices[1]["content"], c.run_id, c.created_at.tzinfo is not None) == (PROMPT, "two", "ppo-1", True)
    fb = db.add_feedback(completion_id=cid, choice_index=1, rating=-1, api_key_id=k1.id, owner_key_id=k1.id)
    assert fb.policy == "ppo-1"
    with pytest.raises(repo.NotFound):  # another key cannot rate (or probe) k1's completions
        db.add_feedback(completion_id=cid, rating=1, owner_key_id=k2.id)
    with pytest.raises(repo.Invalid, match="choice_index"):
        db.add_feedback(completion_id=cid, choice_index=2, rating=1)
    other = _store(db, "ppo-1", ["x"], prompt=[{"role": "user", "content": "another prompt"}])
    with pytest.raises(repo.Invalid, match="different prompt"):
        db.add_feedback(completion_id=cid, rating=-1, preferred_completion_id=other)
    with pytest.raises(repo.Invalid, match="rating"):
        db.add_feedback(completion_id=cid, rating=0)


def test_users_and_conversations(db):
    from chatforge.server.auth import hash_password, verify_password

    with db.session() as s:
        u = repo.create_user(s, "alice", hash_password("pw"), "admin")
        conv = repo.create_conversation(s, user_id=u.id, title="t")
        m = repo.add_message(s, conv.id, "user", "hi")
        repo.add_message(s, conv.id, "assistant", "hello", parent_id=m.id)
    with db.session() as s:
        u = repo.user_by_name(s, "alice")
        assert u.role == "admin" and verify_password(u.password_hash, "pw")[0]
        assert not verify_password(u.password_hash, "nope")[0] and not verify_password(None, "pw")[0]
        with pytest.raises(repo.Invalid, match="exists"):
            repo.create_user(s, "alice", None)
        with pytest.raises(repo.Invalid, match="role"):
            repo.create_user(s, "bob", None, "boss")


def test_export_rules(db, tmp_path):
    """Thumbs pairs, a preferred regenerate overriding thumbs, an even split dropped, latest rating per
    rater, edits as demonstrations, PII masked, de-duplication, and --max-policy-age."""
    old = _store(db, "sft-0", ["old reply"], prompt=[{"role": "user", "content": "Say hi."}])  # older version
    a = _store(db, "ppo-1", ["good reply", "bad reply"])
    b = _store(db, "ppo-1", ["regenerated reply"])
    c = _store(db, "ppo-1", ["contested reply"])
    add = lambda **kw: db.add_feedback(**kw)  # noqa: E731
    add(completion_id=a, choice_index=0, rating=-1, user="u1")
    add(completion_id=a, choice_index=0, rating=1, user="u1")  # u1 changed their mind: +1 counts
    add(completion_id=a, choice_index=0, rating=1, user="u2")
    add(completion_id=a, choice_index=0, rating=1, user="u5")
    add(completion_id=a, choice_index=1, rating=-1, user="u1", reason="call me at (415) 555-0100")
    add(completion_id=a, choice_index=1, rating=-1, user="u2")
    add(completion_id=c, rating=1, user="u1")
    add(completion_id=c, rating=-1, user="u2")  # even split: no label
    add(completion_id=a, choice_index=0, rating=-1, user="u3", preferred_completion_id=b)  # a chosen regenerate
    # thumbs (net) say a:0 > a:1; u4 compared the two directly and chose a:1, which decides the pair
    add(completion_id=a, choice_index=0, rating=-1, user="u4", preferred_completion_id=a, preferred_choice_index=1)
    add(completion_id=old, rating=-1, user="u1", edited_content="Mail bob@example.com instead.")
    rep = export_feedback(db, tmp_path / "out")
    cmps = read_comparisons(tmp_path / "out" / "comparisons.jsonl")
    demos = read_conversations(tmp_path / "out" / "demonstrations.jsonl")
    pairs = {(c.ranking[0][0], c.ranking[1][0]): c for c in cmps}
    assert pairs[(f"{a}:1", f"{a}:0")].meta["signal"] == "preferred" and (f"{a}:0", f"{a}:1") not in pairs
    assert pairs[(f"{b}:0", f"{a}:0")].meta["signal"] == "preferred"
    assert not any(f"{c}:0" in k for k in pairs), "an even split must give no pair"
    assert rep["conflicting_replies"] == 1 and rep["thumbs_overridden_by_preference"] == 1
    assert rep["comparisons_by_signal"] == {"edit": 1, "preferred": 2}
    assert len(demos) == 1 and demos[0].messages[-1].content == "Mail [email] instead."
    text = (tmp_path / "out" / "comparisons.jsonl").read_text() + (tmp_path / "out" / "feedback.jsonl").read_text()
    assert "bob@example.com" not in text and "555 0100" not in text and "555-0100" not in text and "[phone]" in text
    ev = json.loads((tmp_path / "out" / "feedback.jsonl").read_text().splitlines()[0])
    assert {"conversation_id", "message_id", "rating", "reason", "policy", "created_at"} <= set(ev)
    assert rep["policy_ages"] == {"ppo-1": 0, "sft-0": 1}
    young = export_feedback(db, tmp_path / "young", max_policy_age=0)
    assert young["demonstrations"] == 0 and young["comparisons"] == 2 and young["dropped_policy_age"] == 1
    first = (tmp_path / "out" / "comparisons.jsonl").read_bytes()
    export_feedback(db, tmp_path / "out")
    assert (tmp_path / "out" / "comparisons.jsonl").read_bytes() == first  # deterministic


def test_scrub_pii_keeps_plain_numbers():
    assert scrub_pii("x a.b-c@mail.co.uk y") == "x [email] y"
    assert scrub_pii("call 020 7946 0958 now") == "call [phone] now"
    assert scrub_pii("in 2024 we had 12345 users, 3.14") == "in 2024 we had 12345 users, 3.14"


def test_key_opt_out_has_no_rows(db):
    k, _ = db.create_key("private", store=False)
    assert db.list_keys()[0].store is False
    with db.session() as s:
        assert s.scalar(select(Completion).where(Completion.api_key_id == k.id)) is None


def test_loop_uses_feedback_as_label_source(tmp_path):
    from chatforge.server.rounds import DBFeedback, loop_sources
    from chatforge.stages.loop import LoopConfig, _feedback

    url = str(tmp_path / "cf.db")
    d = open_db(url)
    src = loop_sources(LoopConfig(feedback_db=url))["feedback"]
    assert isinstance(src, DBFeedback) and "feedback" not in loop_sources(LoopConfig())
    empty = _feedback(tmp_path / "round-1", src)
    assert empty == [] and (tmp_path / "round-1" / "feedback" / "report.json").exists()
    a = _store(d, "ppo-1", ["liked", "disliked"])
    d.add_feedback(completion_id=a, choice_index=0, rating=1)
    d.add_feedback(completion_id=a, choice_index=1, rating=-1)
    (path,) = _feedback(tmp_path / "round-2", src)
    assert [c.ranking for c in read_comparisons(path)] == [[[f"{a}:0"], [f"{a}:1"]]]
    assert _feedback(tmp_path / "round-3", None) == []
