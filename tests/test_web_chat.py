"""Chat and arena in the web app over HTTP, on the real server (create_app) with two tiny served models:
streamed chat, thumbs with reasons, regenerate + prefer / continue -> comparisons, edit -> demonstration,
all read back by `export feedback`; arena votes with both versions and hidden names; the Bradley-Terry
leaderboard against a hand case; IDOR, CSRF and escaping."""

from __future__ import annotations

import json
import math
import re

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from web_helpers import add_user, login, tiny_served_models

from chatforge.server.db.models import Completion, Conversation, Feedback, Message
from chatforge.server.export import export_feedback
from chatforge.server.web.arena import leaderboard

XSS = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def served_app(tiny_tokenizer, tmp_path_factory):
    from chatforge.server.app import create_app

    models = tiny_served_models(tiny_tokenizer)
    app = create_app(models, db_url=f"sqlite:///{tmp_path_factory.mktemp('chat') / 'app.db'}", no_auth=True)
    for name in ("ulla", "vera"):
        add_user(app.state.db.sessions, name, "user")
    with pytest.MonkeyPatch.context() as mp, TestClient(app, base_url="http://127.0.0.1") as c:
        mp.setattr("chatforge.server.web.chat.MAX_REPLY_TOKENS", 24)  # short replies: a fast test in the context
        yield app, c  # (the lifespan stops the schedulers at the end)


def client(app) -> TestClient:
    return TestClient(app, base_url="http://127.0.0.1")


def new_chat(c: TestClient, csrf: str, model: str = "tiny-a") -> str:
    r = c.post("/app/chat", data={"csrf": csrf, "model": model}, follow_redirects=False)
    assert r.status_code == 303, r.text
    return r.headers["location"].rsplit("/", 1)[1]


def sse(text: str) -> list[dict]:
    return [json.loads(line[len("data: "):]) for line in text.split("\n\n") if line.startswith("data: ")]


def parent_of(html: str) -> str:
    m = re.search(r'name="parent" value="([^"]*)"', html)
    assert m, "no send form"
    return m.group(1)


def assistant_ids(html: str) -> list[str]:
    return re.findall(r'<article class="turn assistant" id="msg-(msg_[0-9a-f]+)"', html)


def test_chat_stream_thumbs_regenerate_prefer_edit_export(served_app, tmp_path):
    app, _ = served_app
    c = client(app)
    csrf = login(c, "ulla")
    cid = new_chat(c, csrf)
    # Turn 1, streamed as server-sent events; the <script> in the message comes back escaped.
    r = c.post(f"/app/chat/{cid}/send", data={"csrf": csrf, "content": f"Hello {XSS}", "parent": ""},
               headers={"accept": "text/event-stream"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse(r.text)
    assert events[-1]["done"] and events[-1]["url"] == f"/app/chat/{cid}"
    streamed = "".join(e.get("delta", "") for e in events)
    page = c.get(f"/app/chat/{cid}").text
    assert XSS not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    first = events[-1]["message_id"]
    with app.state.db.session() as s:
        m1 = s.get(Message, first)
        comp = s.get(Completion, m1.completion_id)
        assert m1.content == streamed and comp.choices[0]["content"] == streamed
        assert comp.model == "tiny-a" and comp.run_id == "run-tiny-a" and comp.conversation_id == cid
        assert comp.prompt == [{"role": "user", "content": f"Hello {XSS}"}]
    # Thumbs down with reason chips and a comment.
    r = c.post(f"/app/chat/{cid}/messages/{first}/thumbs",
               data={"csrf": csrf, "rating": "down", "chips": ["too long", "wrong facts", "bogus"], "reason": "meh"})
    assert r.status_code == 200 and "Rated" in r.text
    # Regenerate (plain form post: waits, redirects): a sibling of the first reply.
    r = c.post(f"/app/chat/{cid}/messages/{first}/regenerate", data={"csrf": csrf}, follow_redirects=True)
    assert r.status_code == 200 and "reply 2 of 2" in r.text
    second = assistant_ids(r.text)[-1]
    assert second != first and parent_of(r.text) == second
    # Prefer the second over the first: one comparison event; preferring twice adds nothing.
    for _ in range(2):
        assert c.post(f"/app/chat/{cid}/messages/{second}/prefer", data={"csrf": csrf}).status_code == 200
    # Turn 2 continues from the first reply instead (shown with ?show=): continuing prefers it.
    page = c.get(f"/app/chat/{cid}?show={first}").text
    assert "reply 1 of 2" in page and parent_of(page) == first
    r = c.post(f"/app/chat/{cid}/send", data={"csrf": csrf, "content": "And then?", "parent": first},
               follow_redirects=True)
    assert r.status_code == 200 and "And then?" in r.text
    third = assistant_ids(r.text)[-1]
    # Edit the turn-2 reply: stored as feedback with edited_content, shown as the user's edit.
    r = c.post(f"/app/chat/{cid}/messages/{third}/edit", data={"csrf": csrf, "content": "The end. " + XSS},
               follow_redirects=True)
    assert "(your edit)" in r.text and XSS not in r.text
    with app.state.db.session() as s:
        fbs = list(s.scalars(select(Feedback).where(Feedback.user_id.is_not(None)).order_by(Feedback.created_at)))
        comps = {m.id: m.completion_id for m in s.scalars(select(Message).where(Message.conversation_id == cid))}
    kinds = [(f.rating, f.reason, f.preferred_completion_id is not None, f.edited_content) for f in fbs]
    assert kinds == [(-1, "too long; wrong facts; meh", False, None),  # the unknown chip is dropped
                     (-1, "preferred", True, None),  # on the first reply: the second is preferred
                     (-1, "continued with another reply", True, None),  # on the second: continued with the first
                     (-1, "edited", False, "The end. " + XSS)]
    assert fbs[1].completion_id == comps[first] and fbs[1].preferred_completion_id == comps[second]
    assert fbs[2].completion_id == comps[second] and fbs[2].preferred_completion_id == comps[first]
    assert all(f.policy == "run-tiny-a" for f in fbs)
    # `chatforge export feedback` reads all of it: the edit is a demonstration of the whole conversation.
    report = export_feedback(app.state.db, tmp_path / "out", scrub=None)
    demos = [json.loads(x) for x in (tmp_path / "out" / "demonstrations.jsonl").read_text().splitlines()]
    mine = [d for d in demos if d["meta"]["completion_id"] == comps[third]]
    assert [m["content"] for m in mine[0]["messages"]] == [f"Hello {XSS}", streamed, "And then?", "The end. " + XSS]
    assert report["comparisons_by_signal"].get("edit", 0) >= 1
    # ulla preferred the second, then continued with the first: her latest word counts, the first wins.
    comparisons = [json.loads(x) for x in (tmp_path / "out" / "comparisons.jsonl").read_text().splitlines()]
    pref = [x for x in comparisons if x["meta"]["signal"] == "preferred"]
    assert [[ids[0].split(":")[0] for ids in x["ranking"]] for x in pref] == [[comps[first], comps[second]]]


def test_chat_idor_csrf_and_bad_input(served_app):
    app, _ = served_app
    ulla, vera = client(app), client(app)
    cu, cv = login(ulla, "ulla"), login(vera, "vera")
    cid = new_chat(ulla, cu)
    r = ulla.post(f"/app/chat/{cid}/send", data={"csrf": cu, "content": "secret question", "parent": ""},
                  follow_redirects=True)
    mid = assistant_ids(r.text)[-1]
    # Another user: every chat URL is a 404, and the list does not show it.
    assert vera.get(f"/app/chat/{cid}").status_code == 404
    for action in ("thumbs", "regenerate", "prefer", "edit"):
        r = vera.post(f"/app/chat/{cid}/messages/{mid}/{action}", data={"csrf": cv, "rating": "up", "content": "x"})
        assert r.status_code == 404, action
    assert vera.post(f"/app/chat/{cid}/send", data={"csrf": cv, "content": "hi", "parent": mid}).status_code == 404
    assert "secret question" not in vera.get("/app/chat").text
    # CSRF missing on every POST: 403.
    posts = ["/app/chat", f"/app/chat/{cid}/send", *(f"/app/chat/{cid}/messages/{mid}/{a}" for a in
                                                     ("thumbs", "regenerate", "prefer", "edit")),
             "/app/arena"]
    for url in posts:
        assert ulla.post(url, data={"content": "x", "rating": "up", "prompt": "x"}).status_code == 403, url
    # Bad input: an empty message, a rating that is neither up nor down, a parent from nowhere.
    assert ulla.post(f"/app/chat/{cid}/send", data={"csrf": cu, "content": " ", "parent": mid}).status_code == 422
    assert ulla.post(f"/app/chat/{cid}/send", data={"csrf": cu, "content": "x", "parent": ""}).status_code == 422
    assert ulla.post(f"/app/chat/{cid}/messages/{mid}/thumbs", data={"csrf": cu, "rating": "7"}).status_code == 422
    assert ulla.post(f"/app/chat/{cid}/send", data={"csrf": cu, "content": "x", "parent": "msg_nope"}).status_code == 404
    assert ulla.get("/app/chat/conv_nope").status_code == 404


def test_arena_vote_hidden_names_both_versions_and_leaderboard(served_app):
    app, _ = served_app
    c, other = client(app), client(app)
    csrf, co = login(c, "ulla"), login(other, "vera")
    r = c.post("/app/arena", data={"csrf": csrf, "prompt": f"Tell me a story {XSS}"}, follow_redirects=True)
    assert r.status_code == 200
    bid = re.search(r'action="/app/arena/(conv_[0-9a-f]+)/vote"', r.text).group(1)
    assert "tiny-a" not in r.text and "tiny-b" not in r.text  # anonymous before the vote
    assert XSS not in r.text and "&lt;script&gt;" in r.text
    assert other.get(f"/app/arena/{bid}").status_code == 404  # IDOR
    assert other.post(f"/app/arena/{bid}/vote", data={"csrf": co, "vote": "a"}).status_code == 404
    assert c.post(f"/app/arena/{bid}/vote", data={"vote": "a"}).status_code == 403  # CSRF
    assert c.post(f"/app/arena/{bid}/vote", data={"csrf": csrf, "vote": "maybe"}).status_code == 422
    r = c.post(f"/app/arena/{bid}/vote", data={"csrf": csrf, "vote": "a"}, follow_redirects=True)
    assert "tiny-a" in r.text and "tiny-b" in r.text and "Your vote: A is better" in r.text
    assert c.post(f"/app/arena/{bid}/vote", data={"csrf": csrf, "vote": "a"}).status_code == 200  # double submit
    assert c.post(f"/app/arena/{bid}/vote", data={"csrf": csrf, "vote": "b"}).status_code == 409
    with app.state.db.session() as s:
        meta = s.get(Conversation, bid).meta
        fbs = list(s.scalars(select(Feedback).where(Feedback.completion_id.in_(
            [meta["completion_a"], meta["completion_b"]]))))
    assert {meta["version_a"], meta["version_b"]} == {"run-tiny-a", "run-tiny-b"} and meta["vote"] == "a"
    by_comp = {f.completion_id: f for f in fbs}
    assert len(fbs) == 2 and by_comp[meta["completion_a"]].rating == 1
    lose = by_comp[meta["completion_b"]]
    assert lose.rating == -1 and lose.preferred_completion_id == meta["completion_a"]
    assert {f.policy for f in fbs} == {"run-tiny-a", "run-tiny-b"}  # both model versions on the events
    page = c.get("/app/leaderboard").text
    winner = meta["version_a"]
    assert page.index(winner) < page.index(meta["version_b"]) and "95 % interval" in page


def test_leaderboard_bradley_terry_hand_case():
    votes = [("A", "B", "a")] * 8 + [("A", "B", "b")] * 2
    rows = leaderboard(votes, n_boot=200)
    assert [r["version"] for r in rows] == ["A", "B"]
    a, b = rows
    assert 3.6 < math.exp(a["strength"] - b["strength"]) < 4.05  # MLE: 8/2 = 4 (a tiny prior shrinks it)
    assert a["lo"] < a["rating"] < a["hi"] and b["lo"] < b["rating"] < b["hi"]
    assert a["battles"] == b["battles"] == 10 and a["wins"] == 8
    # Ties count half: 1 win + 2 ties each way is an even match.
    even = leaderboard([("A", "B", "a"), ("A", "B", "b"), ("A", "B", "tie"), ("B", "A", "bad")], n_boot=50)
    assert abs(even[0]["strength"] - even[1]["strength"]) < 1e-6
    assert leaderboard([]) == []


@pytest.fixture(scope="module")
def live_app(tiny_tokenizer, tmp_path_factory):
    """A second app under a real uvicorn for the browser (its own schedulers and database)."""
    from helpers import live

    from chatforge.server.app import create_app

    models = tiny_served_models(tiny_tokenizer)
    app = create_app(models, db_url=f"sqlite:///{tmp_path_factory.mktemp('live') / 'app.db'}", no_auth=True)
    add_user(app.state.db.sessions, "ulla", "user")
    with pytest.MonkeyPatch.context() as mp, live(app) as base:
        mp.setattr("chatforge.server.web.chat.MAX_REPLY_TOKENS", 24)
        yield app, base


def test_chat_and_arena_in_a_real_browser(live_app, tmp_path):
    """chat.js in chromium: Ctrl+Enter sends, the reply streams in, thumbs with a chip, regenerate, prefer;
    an arena vote by keyboard; a <script> in the message never runs; the chat fits a phone."""
    from web_browser import PHONE, artifacts_dir, launch_chromium, no_horizontal_scroll

    app, base = live_app
    pw, browser = launch_chromium()
    shots = artifacts_dir(tmp_path)
    try:
        page = browser.new_page(viewport=PHONE)
        dialogs: list[str] = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        streamed: list[str] = []  # posts made by chat.js's fetch (a plain form post has no such Accept)
        page.on("request", lambda r: streamed.append(r.url.rsplit("/", 1)[1])
                if "text/event-stream" in r.headers.get("accept", "") else None)
        page.goto(base + "/app/login")  # by keyboard: name, Tab, password, Enter
        page.focus("input[name=username]")
        page.keyboard.type("ulla")
        page.keyboard.press("Tab")
        page.keyboard.type("password-123")
        page.keyboard.press("Enter")
        page.wait_for_url(base + "/app/")
        page.goto(base + "/app/chat")
        page.focus("button[accesskey=n]")
        page.keyboard.press("Enter")
        page.wait_for_selector("#send-form")
        page.focus("textarea[name=content]")
        page.keyboard.type(f"Hi {XSS} <img src=x onerror=alert(2)>")
        page.keyboard.press("Control+Enter")
        page.wait_for_selector(".reply-tools")  # streamed, then the page reloads with the stored reply
        assert page.locator("article.turn.user pre").first.inner_text() == f"Hi {XSS} <img src=x onerror=alert(2)>"
        assert no_horizontal_scroll(page)
        page.screenshot(path=str(shots / "chat.png"), full_page=True)
        page.click("details.thumbs summary")
        page.check("input[name=chips][value='too long']")
        page.click("button[value=down]")
        page.wait_for_selector("details.thumbs summary:has-text('Rated')")
        page.click("form[action$='/regenerate'] button")
        page.wait_for_selector("text=reply 2 of 2")
        page.click("text=Prefer this reply")
        page.wait_for_load_state()
        page.goto(base + "/app/arena")
        page.fill("textarea[name=prompt]", "Tell me a story")
        page.click("text=Ask both models")
        page.wait_for_selector("form.votes")
        assert "tiny-" not in page.inner_text("main")
        page.focus("button[value=b]")
        page.keyboard.press("Enter")
        page.wait_for_selector("text=Your vote: B is better")
        assert "tiny-a" in page.inner_text("main") and "tiny-b" in page.inner_text("main")
        page.screenshot(path=str(shots / "arena.png"), full_page=True)
        assert dialogs == []  # no payload ran
        assert streamed == ["send", "regenerate"]
    finally:
        browser.close()
        pw.stop()
    with app.state.db.session() as s:
        fbs = list(s.scalars(select(Feedback).order_by(Feedback.created_at)))
    assert [(f.rating, f.reason) for f in fbs][:2] == [(-1, "too long"), (-1, "preferred")]
    assert len(fbs) == 4  # + the arena vote's two events
