"""Exports of what people ranked: filters (campaign, labeler, dates, model version), consensus, the TRL and
OpenAssistant formats (read back by `convert`), and `chatforge export rankings` with bad filters."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select

from chatforge.core.io import UserError
from chatforge.data.convert import oasst_tree_to_comparisons
from chatforge.data.formats import RankingTask, read_comparisons
from chatforge.server.db import open_db, repo
from chatforge.server.web import campaigns as cp
from chatforge.server.web import exports
from chatforge.server.web.models import Campaign


def _task(i: int, policy: str) -> RankingTask:
    return RankingTask.from_dict({
        "task_id": f"t{i}", "prompt": {"messages": [{"role": "user", "content": f"question {i}"}]},
        "responses": [{"response_id": f"r{j}", "content": f"reply {j}", "policy": policy} for j in range(3)]}, "x", i)


@pytest.fixture
def db(tmp_path):
    d = open_db(f"sqlite:///{tmp_path / 'cf.db'}")
    with d.session() as s:
        users = {n: repo.create_user(s, n, None, "labeler") for n in ("ann", "bob")}
        for name, policy in (("first", "run-a"), ("second", "run-b")):
            c = Campaign(name=name, overlap=2)
            s.add(c)
            s.flush()
            cp.import_tasks(s, c, [_task(i, policy) for i in range(2)])
        for n, u in users.items():
            while (a := cp.next_assignment(s, u)) is not None:
                order = ["r0", "r1", "r2"] if n == "ann" else ["r1", "r0", "r2"]  # they disagree on r0 vs r1
                cp.submit_ranking(s, a, f"{a.id}-{n}", [[x] for x in order], False, {}, {}, "", 3.0)
    return d


def test_filters_and_consensus(db):
    with db.sessions() as s:
        assert len(exports.rankings(s)) == 8
        first = exports.rankings(s, campaign="first")
        assert len(first) == 4 and {c.meta["campaign"] for c in first} == {"first"}
        cid = s.scalar(select(Campaign.id).where(Campaign.name == "second"))
        assert len(exports.rankings(s, campaign=cid)) == 4  # by id too
        ann = exports.rankings(s, labeler="ann")
        assert len(ann) == 4 and all(c.labeler == "ann" and c.ranking[0] == ["r0"] for c in ann)
        assert len(exports.rankings(s, model_version="run-b")) == 4
        assert exports.rankings(s, model_version="run-z") == []
        now = datetime.now(timezone.utc)
        assert len(exports.rankings(s, since=now - timedelta(hours=1), until=now + timedelta(hours=1))) == 8
        assert exports.rankings(s, since=now + timedelta(hours=1)) == []
        cons = exports.rankings(s, campaign="first", consensus=True)
        assert len(cons) == 2 and all(sorted(c.meta["labelers"]) == ["ann", "bob"] for c in cons)
        assert all(c.ranking[-1] == ["r2"] for c in cons)  # both put r2 last
        with pytest.raises(UserError, match="no campaign 'nope' \\(campaigns: 'first', 'second'\\)"):
            exports.rankings(s, campaign="nope")
        with pytest.raises(UserError, match="no user 'zed'"):
            exports.rankings(s, labeler="zed")
    with pytest.raises(UserError, match="not an ISO date"):
        exports.parse_when("yesterday", "--since")


def test_trl_and_oasst_formats(db):
    with db.sessions() as s:
        comps = exports.rankings(s, labeler="ann")
    trl = exports.ranking_rows(comps, "trl")
    assert len(trl) == 4 * 3  # 3 ordered pairs per ranking of 3 distinct groups
    assert trl[0]["prompt"][0]["role"] == "user" and trl[0]["chosen"][0]["content"] == "reply 0"
    trees = exports.ranking_rows(comps, "oasst")
    back = [c for t in trees for c in oasst_tree_to_comparisons(t, include_synthetic=True)]
    assert [c.ranking for c in back] == [c.ranking for c in comps]
    assert [c.prompt[-1].content for c in back] == [c.prompt[-1].content for c in comps]
    with pytest.raises(UserError, match="--format must be one of"):
        exports.ranking_rows(comps, "csv")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "chatforge.cli", "export", "rankings", *args],
                          capture_output=True, text=True, timeout=120)


def test_export_rankings_cli(db, tmp_path):
    url = str(db.engine.url)
    out = tmp_path / "cons.jsonl"
    r = _cli("--db", url, "--out", str(out), "--campaign", "second", "--consensus")
    assert r.returncode == 0, r.stderr
    assert "wrote 2 consensus comparisons" in r.stdout and len(read_comparisons(out)) == 2
    r = _cli("--db", url, "--out", str(tmp_path / "x.jsonl"), "--campaign", "nope")
    assert r.returncode == 1 and "no campaign 'nope'" in r.stderr and not (tmp_path / "x.jsonl").exists()
    r = _cli("--db", url, "--out", str(tmp_path / "t.jsonl"), "--format", "trl", "--labeler", "bob")
    rows = [json.loads(x) for x in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert r.returncode == 0 and len(rows) == 12 and all(set(x) == {"prompt", "chosen", "rejected"} for x in rows)
