"""Keys and feedback through the live app: bad / revoked keys, rate limits, no-store keys, and the round trip
chat → thumbs + a preferred regenerate → `export feedback` → `rm train` on the export."""

import json
import subprocess
import sys

import pytest
from helpers import save_tiny_model

from chatforge.server.db import open_db


@pytest.fixture(scope="module")
def tiny_dir(tiny_tokenizer, tiny_model_factory, tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", tiny_tokenizer, tiny_model_factory)


@pytest.fixture
def server(tiny_dir, tmp_path):
    """(TestClient, db url) for an app with storage on, serving the tiny model as "tiny"."""
    from fastapi.testclient import TestClient

    from chatforge.core.model import load_model_and_tokenizer
    from chatforge.server.app import ServedModel, create_app

    model, tok, _ = load_model_and_tokenizer(str(tiny_dir))
    url = f"sqlite:///{tmp_path / 'cf.db'}"
    app = create_app([ServedModel(id="tiny", model=model.eval(), tok=tok, run_id="sft-tiny", aliases=["tiny"],
                                  context=512)], db_url=url, max_batch=4, queue_size=8)
    with TestClient(app) as client:
        yield client, url


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 6,
        "temperature": 1.0}


def _auth(token):
    return {"Authorization": f"Bearer {token}"}


def test_bad_revoked_and_rate_limited_keys(server):
    client, url = server
    db = open_db(url)
    key, token = db.create_key("limited", rate_per_min=2)
    _, other = db.create_key("other")
    r = client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = client.post("/v1/chat/completions", json=CHAT, headers=_auth("cf-not-a-key"))
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert client.post("/v1/chat/completions", json=CHAT, headers={"Authorization": token}).status_code == 401
    assert client.post("/v1/chat/completions", json=CHAT, headers=_auth(token)).status_code == 200
    assert client.get("/v1/models", headers=_auth(token)).status_code == 200
    r = client.post("/v1/chat/completions", json=CHAT, headers=_auth(token))  # third in a minute
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(r.headers["Retry-After"]) <= 30
    assert client.get("/v1/models", headers=_auth(other)).status_code == 200  # limits are per key
    db.revoke_key(key.id)
    r = client.post("/v1/chat/completions", json=CHAT, headers=_auth(token))
    assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]
    assert db.list_keys()[0].last_used_at is not None


def test_no_store_key_keeps_nothing_and_feedback_errors(server):
    client, url = server
    db = open_db(url)
    _, private = db.create_key("private", store=False)
    _, token = db.create_key("normal")
    cid = client.post("/v1/chat/completions", json=CHAT, headers=_auth(private)).json()["id"]
    r = client.post("/v1/feedback", json={"completion_id": cid, "rating": 1}, headers=_auth(private))
    assert r.status_code == 404 and r.json()["error"]["param"] == "completion_id"
    with db.session() as s:
        from sqlalchemy import func, select

        from chatforge.server.db.models import Completion

        assert s.scalar(select(func.count()).select_from(Completion)) == 0
    mine = client.post("/v1/chat/completions", json=CHAT, headers=_auth(token)).json()["id"]
    assert client.post("/v1/feedback", json={"completion_id": mine, "rating": 1},
                       headers=_auth(private)).status_code == 404  # not yours: not found
    for bad, param in (({"rating": 2}, "rating"), ({"rating": 1, "choice_index": 3}, "choice_index"),
                       ({"rating": 1, "edited_content": " "}, "edited_content")):
        r = client.post("/v1/feedback", json={"completion_id": mine, **bad}, headers=_auth(token))
        assert r.status_code in (400, 422) and r.json()["error"]["param"] == param, r.json()


def test_feedback_round_trip_to_reward_model(server, tiny_dir, tmp_path):
    client, url = server
    _, token = open_db(url).create_key("rater")
    h = _auth(token)
    prompts = ["Tell me a story.", "Say something nice.", "What is the sun?"]
    posted = 0
    for i, p in enumerate(prompts):
        body = {**CHAT, "messages": [{"role": "user", "content": p}], "n": 2, "seed": i}
        first = client.post("/v1/chat/completions", json=body, headers=h).json()
        assert first["usage"]["completion_tokens"] > 0
        regen = client.post("/v1/chat/completions", json={**body, "n": 1, "seed": 100 + i}, headers=h).json()
        for fb in ({"completion_id": first["id"], "choice_index": 0, "rating": 1},
                   {"completion_id": first["id"], "choice_index": 1, "rating": -1, "reason": "dull"},
                   {"completion_id": first["id"], "choice_index": 1, "rating": -1,
                    "preferred_completion_id": regen["id"]},
                   {"completion_id": regen["id"], "rating": 1, "edited_content": f"A better reply {i}."}):
            r = client.post("/v1/feedback", json=fb, headers=h)
            assert r.status_code == 200, r.text
            assert r.json()["id"].startswith("fb_") and r.json()["policy"] == "sft-tiny"
            posted += 1
    out = tmp_path / "export"
    res = subprocess.run([sys.executable, "-m", "chatforge.cli", "export", "feedback", "--db", url, "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["feedback_events"] == posted
    # per prompt: liked > disliked (thumbs), regenerate > disliked (preferred), liked vs regenerate: both +1, no
    # pair; edit > original (edit)
    assert report["comparisons_by_signal"] == {"edit": 3, "preferred": 3, "thumbs": 3}, report
    assert report["demonstrations"] == 3
    rm_out = tmp_path / "rm"
    sets = ["train.max_steps=3", "train.batch_size=2", "train.seq_len=64", "train.warmup_steps=1",
            "train.eval_every=3", "train.checkpoint_every=3", "log.tensorboard=false", "train.threads=1"]
    res = subprocess.run([sys.executable, "-m", "chatforge.cli", "rm", "train", "--model", str(tiny_dir), "--data",
                          str(out / "comparisons.jsonl"), "--out", str(rm_out), *sum([["--set", s] for s in sets], [])],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    manifest = json.loads((rm_out / "manifest.json").read_text())
    assert manifest["status"] == "completed" and (rm_out / "model" / "config.json").exists()
    from chatforge.data.sft_data import load_conversations

    demos = load_conversations([str(out / "demonstrations.jsonl")])  # what `chatforge sft --data` reads
    assert sorted(d["messages"][-1]["content"] for d in demos) == [f"A better reply {i}." for i in range(3)]
