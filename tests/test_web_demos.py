"""Demonstrations in the web app over HTTP: prompt-set import (a bad line names it, nothing imported),
writing several turns with autosave, an idempotent submit, revisions kept, DESIGN export that `sft` reads,
"draft with the model" on a served tiny model, IDOR, CSRF and escaping."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from web_helpers import add_user, login, make_app

from chatforge.data.formats import read_conversations
from chatforge.server.web.demos import demo_conversations
from chatforge.server.web.models import Demonstration, DemoRevision, PromptSet, SetPrompt

PROMPTS = (json.dumps({"id": "p1", "messages": [{"role": "user", "content": "How do I boil an egg?"}]}) + "\n"
           + json.dumps("Name three primes.") + "\n")


def client(app) -> TestClient:
    return TestClient(app, base_url="http://127.0.0.1")


@pytest.fixture
def env(tmp_path):
    app, sm = make_app(f"sqlite:///{tmp_path / 'app.db'}")
    for name, role in (("admin", "admin"), ("ann", "labeler"), ("bob", "labeler"), ("ulla", "user")):
        add_user(sm, name, role)
    return app, sm


def import_prompts(c, csrf, text, name="set1"):
    return c.post("/app/admin/prompts", data={"csrf": csrf, "name": name},
                  files={"prompts": ("prompts.jsonl", text.encode(), "application/json")})


def fields(html: str) -> dict[str, str]:
    """The demo form's turn fields and hidden inputs, as the browser would post them."""
    out = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', html))
    for name, body in re.findall(r'<textarea name="(turn_content_\d+)"[^>]*>(.*?)</textarea>', html, re.S):
        out[name] = body.replace("&lt;", "<").replace("&gt;", ">").replace("&#39;", "'").replace("&amp;", "&")
    return out


def test_prompt_set_import_bad_line_and_good(env):
    app, sm = env
    admin = client(app)
    csrf = login(admin, "admin")
    r = import_prompts(admin, csrf, PROMPTS + '{"messages": [{"role": "assistant", "content": "x"}]}\n', "bad")
    assert r.status_code == 422 and "prompts.jsonl" in r.text and ":3" in r.text and "nothing imported" in r.text
    assert import_prompts(admin, "", PROMPTS).status_code == 403
    r = import_prompts(admin, csrf, PROMPTS)
    assert r.status_code == 200 and "set1" in r.text
    assert import_prompts(admin, csrf, PROMPTS).status_code == 422  # the name is taken
    with sm() as db:
        assert db.scalar(select(func.count()).select_from(PromptSet)) == 1
        ids = [p.prompt_id for p in db.scalars(select(SetPrompt).order_by(SetPrompt.created_at))]
        assert len(ids) == 2 and ids[0] == "p1" and ids[1]  # a prompt without an id gets a stable one


def test_write_multi_turn_autosave_submit_revise_export(env, tmp_path):
    app, sm = env
    admin = client(app)
    import_prompts(admin, login(admin, "admin"), PROMPTS)
    ann = client(app)
    csrf = login(ann, "ann")
    with sm() as db:
        pid = db.scalar(select(SetPrompt.id).where(SetPrompt.prompt_id == "p1"))
    assert ann.post("/app/write/new", data={"prompt_id": pid}).status_code == 403  # CSRF
    r = ann.post("/app/write/new", data={"csrf": csrf, "prompt_id": pid}, follow_redirects=True)
    url = r.url.path
    assert "How do I boil an egg?" in r.text and url.startswith("/app/write/dem_")
    f = fields(r.text)
    assert f["turn_role_0"] == "user" and f["turn_role_1"] == "assistant" and f["turn_content_1"] == ""
    # typing is saved server-side: a reload shows it
    f["turn_content_1"] = "Put it in boiling water for 8 minutes. <script>alert(1)</script>"
    assert ann.post(url + "/draft", data={k: v for k, v in f.items() if k != "csrf"}).status_code == 403
    assert ann.post(url + "/draft", data=f).json() == {"saved": True}
    page = ann.get(url).text
    assert "8 minutes" in page and "<script>alert(1)</script>" not in page and "&lt;script&gt;" in page
    # an empty assistant turn cannot be submitted
    f2 = fields(page)
    r = ann.post(url, data={**f2, "action": "submit", "turn_content_1": "  "})
    assert r.status_code == 422 and "empty" in r.text
    # add a user turn and an assistant turn, then submit twice with the same form: one revision
    r = ann.post(url, data={**f2, "action": "add"}, follow_redirects=True)
    f3 = fields(r.text)
    assert f3["turn_role_2"] == "user"
    f3["turn_content_2"] = "And soft-boiled?"
    r = ann.post(url, data={**f3, "action": "add"}, follow_redirects=True)
    f4 = fields(r.text)
    assert f4["turn_role_3"] == "assistant"
    f4["turn_content_3"] = "About 6 minutes."
    for _ in range(2):
        r = ann.post(url, data={**f4, "action": "submit"}, follow_redirects=True)
        assert r.status_code == 200 and "Submitted" in r.text
    with sm() as db:
        assert db.scalar(select(func.count()).select_from(DemoRevision)) == 1
    # revise: a new form (new submit key), a new revision; the first is kept
    f5 = fields(ann.get(url).text)
    assert f5["submit_key"] != f4["submit_key"]
    f5["turn_content_3"] = "About 6 minutes, then cold water."
    ann.post(url, data={**f5, "action": "submit"})
    with sm() as db:
        revs = list(db.scalars(select(DemoRevision).order_by(DemoRevision.revision)))
        assert [r.revision for r in revs] == [1, 2] and revs[0].messages[3]["content"] == "About 6 minutes."
        (conv,) = demo_conversations(db)
    assert [m.role for m in conv.messages] == ["user", "assistant", "user", "assistant"]
    assert conv.messages[-1].content == "About 6 minutes, then cold water."
    assert conv.meta["author"] == "ann" and conv.meta["revision"] == 2 and conv.meta["prompt_set"] == "set1"
    # another trainer cannot open, autosave or submit it (404, not 403)
    bob = client(app)
    bcsrf = login(bob, "bob")
    assert bob.get(url).status_code == 404
    assert bob.post(url + "/draft", data={**f5, "csrf": bcsrf}).status_code == 404
    assert client(app).get("/app/write", follow_redirects=False).status_code == 303  # login required
    ulla = client(app)
    login(ulla, "ulla")
    assert ulla.get("/app/write").status_code == 403  # users chat; labelers and admins write
    # the CLI export is what `sft --data` reads
    out = tmp_path / "demos.jsonl"
    url_db = str(sm.kw["bind"].url)
    r = subprocess.run([sys.executable, "-m", "chatforge.cli", "export", "demos", "--db", url_db, "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "wrote 1 demonstrations" in r.stdout, r.stderr
    (back,) = read_conversations(out)
    assert back.messages[-1].content == "About 6 minutes, then cold water." and back.meta["author"] == "ann"
    admin_dl = admin.get("/app/admin/demos/export")
    assert admin_dl.status_code == 200 and json.loads(admin_dl.text.splitlines()[0])["id"] == conv.id


def test_draft_with_the_model_keeps_both_versions(tmp_path, tiny_tokenizer, tiny_model_factory):
    from helpers import save_tiny_model
    from web_helpers import add_user as add

    from chatforge.server.app import create_app

    path = save_tiny_model(tmp_path / "m", tiny_tokenizer, tiny_model_factory)
    url = f"sqlite:///{tmp_path / 'cf.db'}"
    app = create_app([str(path)], db_url=url, no_auth=True)
    add(app.state.db.sessions, "ann", "labeler")
    with TestClient(app, base_url="http://127.0.0.1") as c:
        csrf = login(c, "ann")
        r = c.post("/app/write/new", data={"csrf": csrf}, follow_redirects=True)
        url_demo = r.url.path
        f = fields(r.text)
        assert "Draft with the model" in r.text
        r = c.post(url_demo, data={**f, "action": "model"})
        assert r.status_code == 422 and "write the turns before" in r.text
        f["turn_content_0"] = "Tell me about Lily."
        r = c.post(url_demo, data={**f, "action": "model"}, follow_redirects=True)
        drafted = fields(r.text)["turn_content_1"]
        with app.state.db.sessions() as db:
            d = db.scalar(select(Demonstration))
            assert d.model_drafts == [{"turn": 1, "content": drafted, "model": app.state.served[0].id}]
        f = fields(r.text)
        f["turn_content_1"] = "Lily is a girl who likes to play outside."  # the trainer's edit
        c.post(url_demo, data={**f, "action": "submit"})
        with app.state.db.sessions() as db:
            rev = db.scalar(select(DemoRevision))
            assert rev.messages[1]["content"] == "Lily is a girl who likes to play outside."
            assert rev.model_drafts[0]["content"] == drafted  # both versions stored
