"""Accounts beyond login: one-time passwords that force a new one, invitation links, the `users` CLI, and
`serve --demo`'s setup (admin with a one-time password, a campaign sampled from the model)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from web_helpers import csrf_of, make_app

from chatforge.server.db.models import User
from chatforge.server.web.models import AuditLog, WebInvite
from chatforge.server.web.security import hash_password


def client(app) -> TestClient:
    return TestClient(app, base_url="http://127.0.0.1")


@pytest.fixture
def env(tmp_path):
    app, sm = make_app(f"sqlite:///{tmp_path / 'app.db'}")
    with sm() as db:
        db.add(User(username="admin", role="admin", password_hash=hash_password("one-time-pw"),
                    must_change_password=True))
        db.commit()
    return app, sm


def test_one_time_password_must_be_replaced_before_any_page(env):
    app, sm = env
    c = client(app)
    r = c.post("/app/login", data={"username": "admin", "password": "one-time-pw"}, follow_redirects=True)
    assert r.url.path == "/app/password" and "one-time password" in r.text
    assert c.get("/app/admin", follow_redirects=False).headers["location"] == "/app/password"
    assert c.get("/app/rank", follow_redirects=False).headers["location"] == "/app/password"
    csrf = csrf_of(r.text)
    for data, why in (({"current": "wrong", "new": "a-new-password", "again": "a-new-password"}, "current password"),
                      ({"current": "one-time-pw", "new": "one-time-pw", "again": "one-time-pw"}, "different"),
                      ({"current": "one-time-pw", "new": "short", "again": "short"}, "8 characters"),
                      ({"current": "one-time-pw", "new": "a-new-password", "again": "another-one"}, "differ")):
        r = c.post("/app/password", data={"csrf": csrf, **data})
        assert r.status_code == 422 and why in r.text
    assert c.post("/app/password", data={"current": "one-time-pw", "new": "a-new-password",
                                         "again": "a-new-password"}).status_code == 403  # CSRF
    r = c.post("/app/password", data={"csrf": csrf, "current": "one-time-pw", "new": "a-new-password",
                                      "again": "a-new-password"}, follow_redirects=True)
    assert r.url.path == "/app/admin" and r.status_code == 200
    with sm() as db:
        u = db.scalar(select(User).where(User.username == "admin"))
        assert u.must_change_password is False
    fresh = client(app)
    assert fresh.post("/app/login", data={"username": "admin", "password": "one-time-pw"}).status_code == 401
    r = fresh.post("/app/login", data={"username": "admin", "password": "a-new-password"}, follow_redirects=True)
    assert r.url.path == "/app/admin"


def test_invitation_link_works_once_and_gives_its_role(env):
    app, sm = env
    with sm() as db:
        db.scalar(select(User)).must_change_password = False
        db.commit()
    admin = client(app)
    r = admin.post("/app/login", data={"username": "admin", "password": "one-time-pw"}, follow_redirects=True)
    csrf = csrf_of(r.text)
    assert admin.post("/app/admin/invites", data={"role": "labeler"}).status_code == 403
    r = admin.post("/app/admin/invites", data={"csrf": csrf, "role": "labeler"})
    link = re.search(r'<code id="invite-link">([^<]+)</code>', r.text).group(1)
    path = link.removeprefix("http://127.0.0.1")
    guest = client(app)
    assert "invited as <strong>labeler</strong>" in guest.get(path).text
    r = guest.post(path, data={"username": "admin", "password": "password-123", "again": "password-123"})
    assert r.status_code == 422 and "taken" in r.text
    r = guest.post(path, data={"username": "lena", "password": "password-123", "again": "password-123"},
                   follow_redirects=True)
    assert r.status_code == 200 and "Hello, lena" in r.text and "Rank" in r.text  # logged in as a labeler
    again = client(app)
    assert again.get(path).status_code == 404  # used
    assert again.post(path, data={"username": "eve", "password": "password-123",
                                  "again": "password-123"}).status_code == 404
    assert client(app).get("/app/invite/not-a-token").status_code == 404
    with sm() as db:
        assert db.scalar(select(User).where(User.username == "lena")).role == "labeler"
        inv = db.scalar(select(WebInvite))
        assert inv.used_at is not None and inv.used_by is not None and len(inv.id) == 64  # a digest, not the token
        assert {a.action for a in db.scalars(select(AuditLog))} >= {"invite.create", "invite.accept"}


def _cli(*args, db):
    return subprocess.run([sys.executable, "-m", "chatforge.cli", "users", *args, "--db", db],
                          capture_output=True, text=True, timeout=120)


def test_users_cli_one_time_invite_list_and_force(tmp_path):
    db = str(tmp_path / "cf.db")
    r = _cli("create", "root", "--admin", "--one-time", db=db)
    assert r.returncode == 0, r.stderr
    otp = re.search(r"one-time password: (\S+)", r.stdout).group(1)
    assert "created user root" in r.stdout and "role admin" in r.stdout
    r = _cli("create", "root", "--password", "whatever-123", db=db)
    assert r.returncode == 1 and "exists" in r.stderr
    r = _cli("create", "bob", "--password", "short", db=db)
    assert r.returncode == 1 and "8 characters" in r.stderr
    r = _cli("list", "--json", db=db)
    import json

    rows = {u["username"]: u for u in json.loads(r.stdout)}
    assert rows["root"]["must_change_password"] is True and "bob" not in rows
    r = _cli("create", "root", "--password", "my-own-password", "--force", db=db)
    assert r.returncode == 0 and "reset user root" in r.stdout
    r = _cli("invite", "--role", "labeler", "--base-url", "http://host:9000/", db=db)
    assert re.fullmatch(r"http://host:9000/app/invite/[\w-]{20,}\n", r.stdout), r.stdout
    assert _cli("invite", "--role", "boss", db=db).returncode == 1
    from chatforge.server.auth import verify_password
    from chatforge.server.db import open_db

    with open_db(db).session() as s:
        root = s.scalar(select(User).where(User.username == "root"))
        assert verify_password(root.password_hash, "my-own-password")[0] and not root.must_change_password
        assert not verify_password(root.password_hash, otp)[0]


def test_serve_demo_setup_creates_admin_campaign_once(tmp_path, tiny_tokenizer, tiny_model_factory):
    from helpers import save_tiny_model

    from chatforge.server.app import load_served
    from chatforge.server.db import open_db
    from chatforge.server.web.demo import setup_demo
    from chatforge.server.web.models import Campaign, RankTask

    served = load_served(str(save_tiny_model(tmp_path / "m", tiny_tokenizer, tiny_model_factory)))
    db = open_db(f"sqlite:///{tmp_path / 'cf.db'}")
    info = setup_demo(db.sessions, served, n_prompts=3, k=3)
    assert info["password"] and info["tasks"] == 3
    with db.sessions() as s:
        admin = s.scalar(select(User).where(User.username == "admin"))
        assert admin.role == "admin" and admin.must_change_password
        tasks = list(s.scalars(select(RankTask)))
        assert all(1 <= len(t.data["responses"]) <= 3 and t.data["responses"][0]["policy"] == served.id for t in tasks)
        assert all(t.data["prompt"]["messages"][-1]["role"] == "user" for t in tasks)
    again = setup_demo(db.sessions, served, n_prompts=3, k=3)  # a restart: same campaign, a new one-time password
    assert again["campaign_id"] == info["campaign_id"] and again["password"] != info["password"]
    with db.sessions() as s:
        assert len(list(s.scalars(select(Campaign)))) == 1
        s.scalar(select(User)).must_change_password = False  # the admin chose a password: it is never replaced
        s.commit()
    assert setup_demo(db.sessions, served, n_prompts=3, k=3)["password"] is None
