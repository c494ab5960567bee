"""People in the loop: `loop --set labeler=app` pushes a round's tasks into the web app, three labeler
accounts rank them through the app's own HTTP forms on a live server, the loop trains the round's RM and
PPO policy on what they submitted, registers the new version, and the server answers with it."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi.testclient import TestClient
from helpers import live, save_tiny_model
from sqlalchemy import func, select

from chatforge.core.io import UserError
from chatforge.server.app import create_app
from chatforge.server.auth import hash_password
from chatforge.server.db import open_db, repo
from chatforge.server.rounds import loop_sources
from chatforge.server.web.models import Campaign
from chatforge.stages.loop import load_loop_config
from chatforge.stages.loop import run as run_loop

LABELERS = ("ann", "bob", "cat")
PASSWORD = "password-123"


def rank_all(base: str, name: str) -> int:
    """Log in as `name` and rank every task the app gives, best first by the reply's length (ties when
    equal), through the same forms a browser posts. Returns the number submitted."""
    n = 0
    with httpx.Client(base_url=base, follow_redirects=True, timeout=30) as c:
        r = c.post("/app/login", data={"username": name, "password": PASSWORD})
        assert r.status_code == 200, r.text
        while True:
            r = c.get("/app/rank")
            m = re.search(r'action="(/app/rank/asg_[0-9a-f]+)"', r.text)
            if m is None:
                assert "No ranking tasks left" in r.text
                return n
            csrf = re.search(r'name="csrf" value="([^"]+)"', r.text).group(1)
            key = re.search(r'name="submit_key" value="([^"]+)"', r.text).group(1)
            replies = re.findall(r'id="reply-([A-Z])">\s*<h2>Reply [A-Z]</h2>\s*<pre>(.*?)</pre>', r.text, re.S)
            assert len(replies) >= 2, r.text[:2000]
            by_len: dict[int, list[str]] = {}
            for letter, text in replies:
                by_len.setdefault(len(text), []).append(letter)
            ranking = ", ".join("=".join(g) for _, g in sorted(by_len.items(), reverse=True))
            r = c.post(m.group(1), data={"csrf": csrf, "submit_key": key, "ranking": ranking, "rating_A": "5"})
            assert r.status_code == 200, r.text
            n += 1


@pytest.fixture
def setup(tmp_path, tiny_tokenizer, tiny_model_factory, monkeypatch):
    monkeypatch.setenv("CHATFORGE_REGISTRY", str(tmp_path / "registry.json"))
    sft = save_tiny_model(tmp_path / "sft", tiny_tokenizer, tiny_model_factory)
    url = f"sqlite:///{tmp_path / 'app.db'}"
    db = open_db(url)
    with db.session() as s:
        for name in LABELERS:
            repo.create_user(s, name, hash_password(PASSWORD), "labeler")
    cfg = load_loop_config(None, [
        f"sft={sft}", f"out={tmp_path / 'loop'}", "rounds=1", "prompts=tasks:1", "k=3", "labeler=app", f"db={url}",
        "app.overlap=2", "app.poll_s=0.1", "app.deadline_s=0.5", "sample_max_new_tokens=6", "eval_max_new_tokens=6",
        "eval_prompts=tasks-heldout:1:1", "algo_prompts=tasks:1", "report=false",
        "rm_set=[train.max_steps=2,train.batch_size=4,train.seq_len=64,train.eval_every=0,log.tensorboard=false]",
        "algo_set=[train.max_steps=1,train.batch_size=4,ppo.minibatch_size=2,rollout.max_new_tokens=6,log.tensorboard=false]"])
    return cfg, db, url


def test_one_round_ranked_by_people_through_the_app(setup, tmp_path):
    cfg, db, url = setup
    rdir = tmp_path / "loop" / "round-1"
    # nobody ranks before the deadline: a clear stop, the campaign stays, the loop can resume
    with pytest.raises(UserError, match="0 of 8 tasks ranked"):
        run_loop(cfg, **loop_sources(cfg))
    state = json.loads((rdir / "app.json").read_text())
    assert state["tasks"] == 8 and state["overlap"] == 2

    app = create_app([cfg.sft], db_url=url, no_auth=True)
    with live(app) as base:
        with ThreadPoolExecutor(len(LABELERS)) as pool:  # all three at once, as people would
            done = dict(zip(LABELERS, pool.map(lambda n: rank_all(base, n), LABELERS), strict=True))
    assert sum(done.values()) == 16 and max(done.values()) <= 8  # each task to 2 different labelers

    res = run_loop(cfg, **loop_sources(cfg))  # resumes at the same campaign, never imports it twice
    with db.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Campaign)) == 1
    cmps = [json.loads(x) for x in (rdir / "comparisons.jsonl").read_text().splitlines()]
    assert len(cmps) == 16 and {c["labeler"] for c in cmps} <= set(LABELERS)
    assert all(c["meta"]["source"] == "app" and c["meta"]["campaign"] == state["campaign_id"] or
               c["meta"]["campaign"].startswith("loop round 1") for c in cmps)
    per_task = {}
    for c in cmps:
        per_task.setdefault(c["task_id"], set()).add(c["labeler"])
    assert len(per_task) == 8 and all(len(v) == 2 for v in per_task.values())
    rm = json.loads((rdir / "rm" / "manifest.json").read_text())
    assert rm["status"] == "completed" and str(rdir / "comparisons.jsonl") in rm["config"]["data"]["paths"]
    assert res["rounds"][0]["round"] == 1

    # the new version is in the registry, and the server answers with it by its run id
    reg = json.loads((tmp_path / "registry.json").read_text())
    policy = next(rid for rid, e in reg["runs"].items() if e["path"].endswith("round-1/policy"))
    with TestClient(create_app([policy], db_url=url, no_auth=True)) as c:
        ids = [m["id"] for m in c.get("/v1/models").json()["data"]]
        assert policy in ids
        r = c.post("/v1/chat/completions", json={"model": policy, "max_tokens": 4,
                                                 "messages": [{"role": "user", "content": "What is 2 + 3?"}]})
        assert r.status_code == 200 and r.json()["model"] == policy


def test_app_labeler_needs_a_database(tmp_path):
    cfg = load_loop_config(None, ["labeler=app", f"sft={tmp_path}"])
    with pytest.raises(UserError, match="needs the app's database"):
        loop_sources(cfg)
    with pytest.raises(UserError, match="labeler=app needs the web app"):
        from chatforge.stages.loop import _labels

        _labels(cfg, 1, tmp_path / "tasks.jsonl", tmp_path / "out.jsonl", None)
