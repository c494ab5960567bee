"""Shared pieces of the web-app tests: an app on a fresh database, logins, sample task files."""

from __future__ import annotations

import json
import re

from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.orm import sessionmaker

from chatforge.server.db import open_db
from chatforge.server.db.models import User
from chatforge.server.web import install
from chatforge.server.web.security import hash_password


def tiny_served_models(tok, names: tuple[str, ...] = ("tiny-a", "tiny-b")) -> list:  # noqa: ANN001
    """Tiny random Llama chat models (one per name, seeded by position) served under run ids run-<name>."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from chatforge.server.app import ServedModel

    out = []
    for seed, name in enumerate(names):
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                          tie_word_embeddings=True, initializer_range=0.3)
        out.append(ServedModel(id=name, model=LlamaForCausalLM(cfg).eval(), tok=tok, run_id=f"run-{name}",
                               aliases=[name], context=256))
    return out


def make_app(url: str) -> tuple[FastAPI, sessionmaker]:
    """The web app alone (no model) on a database built by the real migrations."""
    db = open_db(url)
    app = FastAPI()
    install(app, db.sessions)
    return app, db.sessions


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
