"""The web app over HTTP (FastAPI's client, real SQLite): accounts, CSRF, headers, ranking, import,
assignment with overlap, export that `rm train` reads, agreement, IDOR, injection strings."""

from __future__ import annotations

import json
import re

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from web_helpers import add_user, csrf_of, login, make_app, task_lines

from chatforge.data.formats import Comparison
from chatforge.server.web.models import AuditLog, Ranking, WebSession


@pytest.fixture
def env(web_db_url):
    app, sm = make_app(web_db_url)
    add_user(sm, "admin", "admin")
    for name in ("ann", "bob", "cat"):
        add_user(sm, name, "labeler")
    add_user(sm, "ulla", "user")
    return app, sm


def client(app) -> TestClient:
    return TestClient(app, base_url="http://127.0.0.1")


def import_campaign(c: TestClient, csrf: str, text: str, overlap: int = 2, name: str = "c1", ties: str = "1"):
    return c.post("/app/admin/campaigns", data={"csrf": csrf, "name": name, "overlap": str(overlap),
                                                "allow_ties": ties},
                  files={"tasks": ("tasks.jsonl", text.encode(), "application/json")}, follow_redirects=True)


def open_task(c: TestClient):
    r = c.get("/app/rank", follow_redirects=True)
    m = re.search(r'action="(/app/rank/asg_[0-9a-f]+)"', r.text)
    return r, (m.group(1) if m else None)


def test_login_session_cookie_rotation_logout_and_headers(env):
    app, sm = env
    c = client(app)
    r = c.get("/app/login")
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    assert r.headers["x-content-type-options"] == "nosniff" and r.headers["referrer-policy"] == "same-origin"
    assert "<script>" not in r.text and "onclick" not in r.text  # no inline script anywhere
    assert c.get("/app/", follow_redirects=False).status_code == 303  # login required
    c.cookies.set("cf_session", "planted-by-attacker", domain="127.0.0.1")  # session fixation: a planted id is never kept
    r = c.post("/app/login", data={"username": "ann", "password": "password-123"}, follow_redirects=False)
    assert r.status_code == 303
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Secure" not in cookie
    token = c.cookies.get("cf_session")
    assert token and token != "planted-by-attacker"
    csrf = csrf_of(c.get("/app/").text)
    assert c.post("/app/logout", data={}).status_code == 403  # CSRF on logout too
    assert c.post("/app/logout", data={"csrf": csrf}, follow_redirects=False).status_code == 303
    c.cookies.set("cf_session", token, domain="127.0.0.1")
    assert c.get("/app/", follow_redirects=False).status_code == 303  # the old session is dead
    with sm() as db:
        assert db.scalar(select(func.count()).select_from(WebSession)) == 0


def test_wrong_password_and_rate_limit(env):
    app, _ = env
    c = client(app)
    for _ in range(5):
        assert c.post("/app/login", data={"username": "ann", "password": "nope"}).status_code == 401
    r = c.post("/app/login", data={"username": "ann", "password": "password-123"})
    assert r.status_code == 429 and "Too many failed logins" in r.text
    assert c.post("/app/login", data={"username": "nobody", "password": "x"}).status_code == 401


def test_roles_and_csrf_on_admin(env):
    app, _ = env
    lab = client(app)
    login(lab, "ann")
    assert lab.get("/app/admin").status_code == 403
    assert lab.post("/app/admin/users", data={"csrf": "x", "username": "z", "password": "p" * 9}).status_code == 403
    usr = client(app)
    login(usr, "ulla")
    assert usr.get("/app/rank").status_code == 403
    adm = client(app)
    csrf = login(adm, "admin")
    r = adm.post("/app/admin/users", data={"username": "dan", "password": "secret-pass", "role": "labeler"})
    assert r.status_code == 403  # no token
    r = adm.post("/app/admin/users", data={"csrf": csrf, "username": "dan", "password": "secret-pass",
                                           "role": "labeler"}, follow_redirects=True)
    assert r.status_code == 200 and "dan" in r.text and "user.create" in r.text  # audit log shown
    login(client(app), "dan", "secret-pass")


def test_import_bad_line_names_it_and_imports_nothing(env):
    app, sm = env
    adm = client(app)
    csrf = login(adm, "admin")
    lines = task_lines(3).splitlines()
    bad = json.loads(lines[1])
    bad["responses"] = bad["responses"][:1]
    text = "\n".join([lines[0], json.dumps(bad), lines[2]])
    r = import_campaign(adm, csrf, text)
    assert r.status_code == 422 and "line 2" in r.text and "nothing imported" in r.text
    r = import_campaign(adm, csrf, "{not json\n")
    assert r.status_code == 422 and "line 1" in r.text
    r = adm.post("/app/admin/campaigns", data={"csrf": csrf, "name": "x", "overlap": "1"},
                 files={"tasks": ("t.jsonl", b"\xff\xfe bad", "application/json")})
    assert r.status_code == 422 and "UTF-8" in r.text
    assert "c1" not in adm.get("/app/admin").text


def _rank(c: TestClient, url: str, ranking: str, **extra) -> object:
    page = c.get(url).text
    data = {"csrf": csrf_of(page), "submit_key": re.search(r'name="submit_key" value="([^"]+)"', page).group(1),
            "ranking": ranking, "action": "submit", **extra}
    return c.post(url, data=data, follow_redirects=False), data


def test_overlap_ranking_export_and_agreement(env, tmp_path):
    app, sm = env
    adm = client(app)
    csrf = login(adm, "admin")
    r = import_campaign(adm, csrf, task_lines(3, 4), overlap=2)
    assert r.status_code == 200 and "3 tasks, overlap 2" in r.text
    cid = re.search(r"/app/admin/campaigns/(cmp_[0-9a-f]+)/export", r.text).group(1)
    seen: dict[str, list[str]] = {}
    for name in ("ann", "bob", "cat"):
        c = client(app)
        login(c, name)
        while True:
            page, url = open_task(c)
            if url is None:
                assert "No ranking tasks left" in page.text
                break
            tid = re.search(r"question (\d)", page.text).group(1)
            assert name not in seen.setdefault(tid, [])  # never twice to one labeler
            seen[tid].append(name)
            # rank by content: reply 0 best, 1 and 2 tied, 3 worst, whatever letters they got
            letters = {m.group(2): m.group(1) for m in re.finditer(r"Reply ([A-D])</h2>\s*<pre>reply (\d)", page.text)}
            resp, data = _rank(c, url, f"{letters['0']}, {letters['1']}={letters['2']}, {letters['3']}",
                               **{f"rating_{letters['0']}": "6", f"flag_{letters['3']}": "hallucination"})
            assert resp.status_code == 303
            assert c.post(url, data=data, follow_redirects=False).status_code == 303  # double submit
    assert sorted(len(v) for v in seen.values()) == [2, 2, 2]
    with sm() as db:
        assert db.scalar(select(func.count()).select_from(Ranking)) == 6  # double submits stored once
    raw = adm.get(f"/app/admin/campaigns/{cid}/export?kind=raw").text.splitlines()
    assert len(raw) == 6
    cmps = [Comparison.from_dict(json.loads(x)) for x in raw]
    assert all(cm.ranking == [["r0"], ["r1", "r2"], ["r3"]] for cm in cmps)
    assert all(cm.ratings == {"r0": 6} and cm.flags == {"r3": ["hallucination"]} for cm in cmps)
    assert all(len(cm.meta["shown_order"]) == 4 and cm.labeler in ("ann", "bob", "cat") for cm in cmps)
    cons = adm.get(f"/app/admin/campaigns/{cid}/export?kind=consensus").text.splitlines()
    assert len(cons) == 3 and json.loads(cons[0])["ranking"][0] == ["r0"]
    dash = adm.get(f"/app/admin/campaigns/{cid}").text
    assert re.search(r'id="pairwise">1.000<', dash) and re.search(r'id="kendall">1.000<', dash)
    assert re.search(r'id="alpha">1.000<', dash)
    out = tmp_path / "cmp.jsonl"
    out.write_text("\n".join(raw) + "\n")
    from chatforge.data.formats import read_comparisons
    assert len(read_comparisons(out)) == 6  # what `rm train --data` reads
    with sm() as db:
        assert db.scalar(select(func.count()).select_from(AuditLog).where(AuditLog.action == "campaign.import")) == 1


def test_bad_rankings_keep_the_form_and_revisions(env):
    app, sm = env
    adm = client(app)
    import_campaign(adm, login(adm, "admin"), task_lines(1, 3), overlap=1, ties="0")
    c = client(app)
    login(c, "ann")
    _, url = open_task(c)
    for bad, msg in [("A, B", "leaves out reply C"), ("A, B, Z", "unknown reply"), ("A, A, B, C", "twice"),
                     ("A=B, C", "does not allow ties")]:
        resp, _ = _rank(c, url, bad, comment="keep me")
        assert resp.status_code == 422 and msg in resp.text and "keep me" in resp.text
    assert _rank(c, url, "A, B, C")[0].status_code == 303
    assert _rank(c, url, "C, B, A")[0].status_code == 303  # a revision
    resp, _ = _rank(c, url, "", not_rankable="1")
    assert resp.status_code == 303
    with sm() as db:
        revs = sorted(r.revision for r in db.scalars(select(Ranking)))
    assert revs == [1, 2, 3]
    # the skip path needs a reason
    adm2 = client(app)
    import_campaign(adm2, login(adm2, "admin"), task_lines(1, 2, prefix="s"), overlap=1, name="c2")
    _, url2 = open_task(c)
    page = c.get(url2).text
    r = c.post(url2, data={"csrf": csrf_of(page), "action": "skip", "skip_reason": ""})
    assert r.status_code == 422 and "say why" in r.text
    r = c.post(url2, data={"csrf": csrf_of(page), "action": "skip", "skip_reason": "off topic"},
               follow_redirects=True)
    assert "No ranking tasks left" in r.text


def test_idor_and_csrf_on_ranking(env):
    app, _ = env
    adm = client(app)
    import_campaign(adm, login(adm, "admin"), task_lines(1, 2), overlap=2)
    ann, bob = client(app), client(app)
    login(ann, "ann")
    login(bob, "bob")
    _, url = open_task(ann)
    assert bob.get(url).status_code == 404  # another labeler's assignment
    csrf_bob = csrf_of(bob.get("/app/").text)
    assert bob.post(url, data={"csrf": csrf_bob, "ranking": "A, B"}).status_code == 404
    page = ann.get(url).text
    assert ann.post(url, data={"ranking": "A, B"}).status_code == 403  # no CSRF token
    assert ann.post(url, data={"ranking": "A, B", "csrf": csrf_bob}).status_code == 403  # someone else's token
    assert ann.post(url, data={"ranking": "A, B", "csrf": csrf_of(page)}, follow_redirects=False).status_code == 303


XSS = ['<script>alert(1)</script>', '<img src=x onerror=alert(1)>', 'javascript:alert(1)']
SQLI = ["' OR '1'='1", "x'; DROP TABLE users; --", 'admin"--']


def test_payloads_are_escaped_and_sql_strings_are_data(env):
    app, sm = env
    adm = client(app)
    csrf = login(adm, "admin")
    text = task_lines(1, 3, content=XSS[0] + XSS[1] + SQLI[1]).replace("question 0", XSS[1] + SQLI[0])
    r = import_campaign(adm, csrf, text, overlap=1, name=XSS[0] + SQLI[1])
    assert r.status_code == 200 and "<script>alert" not in r.text and "&lt;script&gt;" in r.text
    for name in SQLI + XSS:
        r = adm.post("/app/admin/users", data={"csrf": csrf, "username": name, "password": "long-enough",
                                               "role": "labeler"}, follow_redirects=True)
        assert r.status_code == 200
    assert "<img src=x" not in adm.get("/app/admin").text
    for name in SQLI:  # the injection strings are usernames like any other, and log in
        assert client(app).post("/app/login", data={"username": name, "password": "long-enough"},
                                follow_redirects=False).status_code == 303
    assert client(app).post("/app/login", data={"username": SQLI[0], "password": SQLI[0]}).status_code == 401
    c = client(app)
    login(c, "ann")
    _, url = open_task(c)
    page = c.get(url).text
    assert "<script>alert" not in page and "<img src=x" not in page and "&lt;img src=x onerror" in page
    resp, _ = _rank(c, url, "A, B, C", comment=XSS[0] + SQLI[1])
    assert resp.status_code == 303
    with sm() as db:
        assert db.scalar(select(Ranking.comment)) == XSS[0] + SQLI[1]


def test_static_files_served_with_headers(env):
    app, _ = env
    c = client(app)
    r = c.get("/app/static/app.js")
    assert r.status_code == 200 and "keydown" in r.text and r.headers["x-content-type-options"] == "nosniff"
    assert c.get("/app/static/..%2Fmodels.py").status_code == 404
    assert c.get("/app/static/models.py").status_code == 404


def ann_on_a_task(app, tasks: str) -> tuple[TestClient, str, str]:
    """The admin imports `tasks` (overlap 1); ann logs in and opens the first: (her client, its URL, the page)."""
    adm = client(app)
    import_campaign(adm, login(adm, "admin"), tasks, overlap=1)
    c = client(app)
    login(c, "ann")
    _, url = open_task(c)
    return c, url, c.get(url).text


def test_session_that_ends_mid_task_keeps_the_draft_and_comes_back(env):
    """The session expires while a labeler works: the submit goes to the login page (which says why and comes
    back to the task), nothing is stored from the stale form, and the autosaved draft is there after login."""
    from datetime import timedelta

    from chatforge.server.db.models import utcnow

    app, sm = env
    c, url, page = ann_on_a_task(app, task_lines(1, 3))
    assert c.post(url + "/draft", data={"csrf": csrf_of(page), "ranking": "B, A", "comment": "half done"}).json()
    with sm() as db:
        for s in db.scalars(select(WebSession)):
            s.expires_at = utcnow() - timedelta(seconds=1)
        db.commit()
    r = c.post(url, data={"csrf": csrf_of(page), "ranking": "B, A, C", "action": "submit"},
               headers={"referer": "http://127.0.0.1" + url}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == f"/app/login?next={url}&expired=1"
    r2 = c.post(url + "/draft", data={"csrf": csrf_of(page), "comment": "x"}, follow_redirects=False)
    assert r2.status_code == 303  # not saved
    login_page = c.get(r.headers["location"]).text
    assert "Your session ended" in login_page and f'name="next" value="{url}"' in login_page
    with sm() as db:
        assert db.scalar(select(func.count()).select_from(Ranking)) == 0
    r = c.post("/app/login", data={"username": "ann", "password": "password-123", "next": url},
               follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == url
    back = c.get(url).text
    assert "half done" in back and 'value="B, A"' in back
    # `next` never leaves the app (no open redirect)
    for evil in ("//evil.example/x", "https://evil.example/", "/app/..//evil.example", "/app\\\\evil"):
        r = c.post("/app/login", data={"username": "ann", "password": "password-123", "next": evil},
                   follow_redirects=False)
        assert r.headers["location"] == "/app/", evil


def test_task_reassigned_or_deleted_mid_labeling_says_so(env):
    from chatforge.server.db.models import User
    from chatforge.server.web.models import Assignment, RankTask

    app, sm = env
    c, url, page = ann_on_a_task(app, task_lines(2, 3))
    aid = url.rsplit("/", 1)[1]
    with sm() as db:  # an admin hands the task to bob while ann has it open
        a = db.get(Assignment, aid)
        a.user_id = db.scalar(select(User.id).where(User.username == "bob"))
        db.commit()
    r = c.post(url, data={"csrf": csrf_of(page), "ranking": "A, B, C", "action": "submit"})
    assert r.status_code == 404 and "reassigned" in r.text
    _, url2 = open_task(c)
    page = c.get(url2).text
    with sm() as db:  # the task is deleted while ann has it open
        task_id = db.get(Assignment, url2.rsplit("/", 1)[1]).task_id
        db.delete(db.get(RankTask, task_id))
        db.commit()
    r = c.post(url2, data={"csrf": csrf_of(page), "ranking": "A, B, C", "action": "submit"})
    assert r.status_code == 404 and ("deleted" in r.text or "reassigned" in r.text)
    with sm() as db:
        assert db.scalar(select(func.count()).select_from(Ranking)) == 0


def test_a_labeler_never_ranks_their_own_demonstration(env):
    app, sm = env
    rows = [json.loads(x) for x in task_lines(2, 3).splitlines()]
    rows[0]["responses"][1]["policy"] = "human:ann"  # ann wrote one of task t0's replies
    adm = client(app)
    assert import_campaign(adm, login(adm, "admin"), "\n".join(json.dumps(r) for r in rows) + "\n",
                           overlap=2).status_code == 200
    c = client(app)
    login(c, "ann")
    seen = []
    for _ in range(3):
        page, url = open_task(c)
        if url is None:
            break
        seen.append(re.search(r"question (\d)", c.get(url).text).group(1))
        assert _rank(c, url, "A, B, C")[0].status_code == 303
    assert seen == ["1"], seen  # t1 only; t0 holds her own reply
    b = client(app)
    login(b, "bob")
    _, url = open_task(b)
    assert url is not None  # t0 is still open to everyone else
