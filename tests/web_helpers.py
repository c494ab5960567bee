"""Shared pieces of the web-app tests: an app on a fresh database, logins, sample task files."""

from __future__ import annotations

import json
import re

from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, event
from sqlalchemy.orm import sessionmaker

import chatforge.server.web.models  # noqa: F401 - registers the web tables on Base
from chatforge.server.db.models import Base, User
from chatforge.server.web import install
from chatforge.server.web.security import hash_password


def make_app(url: str) -> tuple[FastAPI, sessionmaker]:
    engine = create_engine(url)
    if url.startswith("sqlite"):
        event.listen(engine, "connect", lambda c, _: c.execute("PRAGMA foreign_keys=ON"))
    Base.metadata.create_all(engine)
    sm = sessionmaker(engine, expire_on_commit=False)
    app = FastAPI()
    install(app, sm)
    return app, sm


def add_user(sm: sessionmaker, name: str, role: str, password: str = "password-123") -> None:
    with sm() as db:
        db.add(User(username=name, role=role, password_hash=hash_password(password)))
        db.commit()


def csrf_of(html: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', html)
    assert m, "page has no CSRF field"
    return m.group(1)


def login(client: TestClient, name: str, password: str = "password-123") -> str:
    r = client.post("/app/login", data={"username": name, "password": password}, follow_redirects=True)
    assert r.status_code == 200, r.text
    return csrf_of(r.text)


def task_lines(n: int = 3, k: int = 4, prefix: str = "t", content: str = "reply") -> str:
    lines = []
    for i in range(n):
        lines.append(json.dumps({
            "task_id": f"{prefix}{i}", "prompt": {"messages": [{"role": "user", "content": f"question {i}"}]},
            "responses": [{"response_id": f"r{j}", "content": f"{content} {j} of {i}", "policy": "run-1",
                           "params": {"temperature": 1.0}} for j in range(k)]}))
    return "\n".join(lines) + "\n"
