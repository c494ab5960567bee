"""`chatforge bench labelers`: the feedback web app's ranking flow under N concurrent labelers.

The web app (the same routes, error handlers and body limits as `chatforge serve`, without a model) runs under
uvicorn in a subprocess on 127.0.0.1 and a free port, on the given database (default: a temp SQLite file).
This process creates an admin and N labeler accounts, the admin imports a campaign of ranking tasks (K = 4
replies each, in the `chatforge sample` task format) through /app/admin/campaigns, and then N threads, one
httpx client and cookie jar each, all start at once: log in, then T times: ask for the next task
(GET /app/rank), open it, now and then save a draft, submit a ranking with the page's CSRF token and submit
key, and for about 10 % of submissions send the same form again (half right after the answer, half racing the
first request from a second connection), which must store nothing twice.

Afterwards the database is counted: lost = acknowledged submissions (303) without a stored ranking for that
(labeler, task); duplicated = stored ranking rows beyond one per (labeler, task); overfilled = tasks with more
labelers than the overlap; plus p50/p95/max latency per request kind, requests/s over the load phase, the
5xx count and the server's log errors ("database is locked", tracebacks).

    chatforge bench labelers [--db postgresql+psycopg://user@host/db] [--labelers 50] [--tasks-per-labeler 4]
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from chatforge.bench.common import wait_until_up
from chatforge.core.io import UserError

PASSWORD = "load-test-pass-123"
K = 4  # replies per task
KINDS = ("login", "next", "open", "draft", "submit", "resubmit")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def task_lines(n: int, k: int = K, prefix: str = "lt") -> str:
    """`n` ranking tasks in the `chatforge sample` format; the prompt names the task id (the client reads it)."""
    lines = []
    for i in range(n):
        lines.append(json.dumps({
            "task_id": f"{prefix}{i}",
            "prompt": {"messages": [{"role": "user", "content": f"load-test task {prefix}{i}: say something"}]},
            "responses": [{"response_id": f"r{j}", "content": f"reply {j} to task {prefix}{i}", "policy": "bench",
                           "params": {"temperature": 1.0}} for j in range(k)]}))
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the server (a subprocess)


def build_app(db_url: str) -> Any:
    """The web part of `server.app.create_app` (error handlers, body limits, /app pages) on `db_url`."""
    from fastapi import FastAPI

    from chatforge.server.db import open_db
    from chatforge.server.errors import install_error_handlers
    from chatforge.server.limits import BodyLimits
    from chatforge.server.web import install

    db = open_db(db_url)
    app = FastAPI(title="chatforge")
    install_error_handlers(app)
    app.add_middleware(BodyLimits)
    app.state.db = db
    install(app, db.sessions)
    return app


def _serve(db_url: str, port: int) -> None:
    import uvicorn

    uvicorn.run(build_app(db_url), host="127.0.0.1", port=port, log_level="warning", access_log=False)


def _start_server(db_url: str, port: int, log: Path) -> subprocess.Popen:

    out = log.open("w")
    proc = subprocess.Popen([sys.executable, "-m", "chatforge.bench.labelers", "--serve", db_url, str(port)],
                            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    out.close()
    return wait_until_up(proc, f"http://127.0.0.1:{port}/app/login", 120, "the web app", log.read_text)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=20)


# ----------------------------------------------------------------------------- setup


def _setup_accounts(db_url: str, names: list[str]) -> None:
    """Admin + labelers straight into the database (one argon2 hash shared: they all have one password)."""
    from chatforge.server.db import open_db
    from chatforge.server.db.models import User
    from chatforge.server.web.security import hash_password

    db = open_db(db_url)
    try:
        h = hash_password(PASSWORD)
        with db.sessions() as s:
            s.add(User(username="bench-admin", role="admin", password_hash=h))
            for n in names:
                s.add(User(username=n, role="labeler", password_hash=h))
            s.commit()
    finally:
        db.close()


def _csrf(html: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', html)
    if not m:
        raise RuntimeError("page has no CSRF field")
    return m.group(1)


def _import_campaign(base: str, n_tasks: int, overlap: int) -> str:
    import httpx

    with httpx.Client(base_url=base, timeout=120) as c:
        r = c.post("/app/login", data={"username": "bench-admin", "password": PASSWORD}, follow_redirects=True)
        r.raise_for_status()
        r = c.post("/app/admin/campaigns", data={"csrf": _csrf(r.text), "name": "load test", "overlap": str(overlap),
                                                 "allow_ties": "1"},
                   files={"tasks": ("tasks.jsonl", task_lines(n_tasks).encode(), "application/json")},
                   follow_redirects=False)
        if r.status_code != 303:
            raise UserError(f"campaign import answered {r.status_code}: {r.text[:500]}")
        return r.headers["location"].rsplit("/", 1)[1]


# ----------------------------------------------------------------------------- one labeler


class Recorder:
    """Latencies and statuses of every request, from all client threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.samples: dict[str, list[float]] = defaultdict(list)
        self.status: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        self.errors: list[str] = []

    def call(self, kind: str, fn: Any, *args: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        try:
            r = fn(*args, **kw)
        except Exception as e:  # a transport error (timeout, reset): counted as status 0
            with self.lock:
                self.status[kind][0] += 1
                self.errors.append(f"{kind}: {type(e).__name__}: {e}")
            return None
        dt = time.perf_counter() - t0
        with self.lock:
            self.samples[kind].append(dt)
            self.status[kind][r.status_code] += 1
            if r.status_code >= 500:
                self.errors.append(f"{kind} {r.status_code}: {r.text[:300]}")
        return r

    def problem(self, msg: str) -> None:
        with self.lock:
            self.errors.append(msg)


def _twin(base: str, cookies: Any, url: str, data: dict, rec: Recorder, out: dict) -> None:
    import httpx

    with httpx.Client(base_url=base, timeout=60, cookies=cookies) as c:
        out["r"] = rec.call("resubmit", c.post, url, data=data)


def _labeler(base: str, name: str, *args: Any) -> None:
    rec: Recorder = args[-2]
    try:
        _labeler_flow(base, name, *args)
    except Exception as e:  # a page without the expected fields, a broken barrier: reported, not raised
        rec.problem(f"{name}: {type(e).__name__}: {e}")


def _labeler_flow(base: str, name: str, tasks: int, seed: int, resubmit: float, draft: float, deadline: float,
                  start: threading.Barrier, rec: Recorder, out: dict) -> None:
    """One labeler's session. `start` is waited on twice: all log in at once, then all start ranking at once."""
    import httpx

    rng = random.Random(seed)
    me = out[name] = {"acked": [], "tasks_seen": [], "resubmits": 0, "resubmit_ok": 0, "starved": False,
                      "timed_out": False}
    with httpx.Client(base_url=base, timeout=60, follow_redirects=False) as c:
        start.wait()
        r = rec.call("login", c.post, "/app/login", data={"username": name, "password": PASSWORD})
        ok = r is not None and r.status_code == 303
        if not ok:
            rec.problem(f"{name}: login answered {getattr(r, 'status_code', None)}")
        start.wait()
        if not ok:
            return
        for _ in range(tasks):
            if time.monotonic() > deadline:
                me["timed_out"] = True
                return
            r = rec.call("next", c.get, "/app/rank")
            if r is None:
                return
            if r.status_code == 200 and "No ranking tasks left" in r.text:
                me["starved"] = True
                return
            loc = r.headers.get("location", "")
            if r.status_code != 303 or not loc.startswith("/app/rank/asg_"):
                rec.problem(f"{name}: next task answered {r.status_code} {loc}")
                return
            r = rec.call("open", c.get, loc)
            if r is None or r.status_code != 200:
                rec.problem(f"{name}: opening {loc} answered {getattr(r, 'status_code', None)}")
                return
            page = r.text
            tid = re.search(r"load-test task (\w+):", page).group(1)
            me["tasks_seen"].append(tid)
            letters = re.findall(r"Reply ([A-Z])</h2>", page)
            csrf = _csrf(page)
            order = letters[:]
            rng.shuffle(order)
            if rng.random() < draft:
                d = rec.call("draft", c.post, f"{loc}/draft", data={"csrf": csrf, "ranking": ", ".join(order[:2]),
                                                                   "comment": "half done"})
                if d is not None and (d.status_code != 200 or not d.json().get("saved")):
                    rec.problem(f"{name}: draft answered {d.status_code}")
            data = {"csrf": csrf, "submit_key": re.search(r'name="submit_key" value="([^"]+)"', page).group(1),
                    "started": re.search(r'name="started" value="([^"]+)"', page).group(1),
                    "ranking": ", ".join(order), "action": "submit", f"rating_{order[0]}": str(rng.randint(4, 7)),
                    "comment": f"{name} on {tid}"}
            again = rng.random() < resubmit
            racing = again and rng.random() < 0.5
            twin: dict = {}
            if racing:  # a double click: the same form from a second connection at the same moment
                th = threading.Thread(target=_twin, args=(base, c.cookies, loc, data, rec, twin))
                th.start()
            r = rec.call("submit", c.post, loc, data=data)
            if racing:
                th.join()
            if r is not None and r.status_code == 303:
                me["acked"].append({"aid": loc.rsplit("/", 1)[1], "task": tid, "key": data["submit_key"]})
            else:
                rec.problem(f"{name}: submit answered {getattr(r, 'status_code', None)}")
            if again:
                if not racing:
                    twin["r"] = rec.call("resubmit", c.post, loc, data=data)
                me["resubmits"] += 1
                rr = twin.get("r")
                if rr is not None and rr.status_code == 303:
                    me["resubmit_ok"] += 1
                else:
                    rec.problem(f"{name}: re-submit answered {getattr(rr, 'status_code', None)}")


# ----------------------------------------------------------------------------- counting


def _count(db_url: str, cid: str, overlap: int, clients: dict) -> dict:
    from sqlalchemy import func, select

    from chatforge.server.db import open_db
    from chatforge.server.db.models import User
    from chatforge.server.web.models import Assignment, Ranking, RankTask

    db = open_db(db_url, upgrade=False)
    try:
        with db.sessions() as s:
            rows = s.execute(select(User.username, RankTask.task_id, Ranking.submit_key, Assignment.id)
                             .join(Assignment, Assignment.id == Ranking.assignment_id)
                             .join(RankTask, RankTask.id == Assignment.task_id)
                             .join(User, User.id == Assignment.user_id)
                             .where(RankTask.campaign_id == cid)).all()
            per_task = s.execute(select(RankTask.task_id, func.count(Assignment.id))
                                 .join(Assignment, Assignment.task_id == RankTask.id)
                                 .where(RankTask.campaign_id == cid, Assignment.status != "skipped")
                                 .group_by(RankTask.task_id)).all()
            pairs = s.execute(select(User.username, RankTask.task_id).join(Assignment, Assignment.user_id == User.id)
                              .join(RankTask, RankTask.id == Assignment.task_id)
                              .where(RankTask.campaign_id == cid)).all()
            still_open = s.scalar(select(func.count()).select_from(Assignment).join(RankTask)
                                  .where(RankTask.campaign_id == cid, Assignment.status == "open"))
    finally:
        db.close()
    expected = {(n, a["task"]) for n, me in clients.items() for a in me["acked"]}
    keys = {a["key"] for me in clients.values() for a in me["acked"]}
    stored = [(u, t) for u, t, _, _ in rows]
    unique = set(stored)
    assigned_twice = len(pairs) - len(set(pairs))
    repeat_seen = sum(len(me["tasks_seen"]) - len(set(me["tasks_seen"])) for me in clients.values())
    return {"expected": len(expected), "stored_rows": len(rows), "stored_unique": len(unique),
            "lost": len(expected - unique), "duplicated": len(rows) - len(unique),
            "stored_unacknowledged": len(unique - expected),
            "foreign_keys": sum(1 for _, _, k, _ in rows if k not in keys),
            "overfilled_tasks": sum(1 for _, n in per_task if n > overlap),
            "same_task_twice": assigned_twice + repeat_seen, "open_assignments": still_open}


# ----------------------------------------------------------------------------- the run


def run(db_url: str | None = None, labelers: int = 50, tasks_per_labeler: int = 4, overlap: int = 3,
        resubmit_share: float = 0.1, draft_share: float = 0.15, time_limit_s: float = 240.0, seed: int = 0,
        quick: bool = False) -> dict:
    """Start the app, import a campaign, run `labelers` concurrent clients, count the database. `quick`:
    8 labelers x 3 tasks. Returns (and prints) a JSON-able dict."""
    from chatforge.server.db.engine import database_url

    if quick:
        labelers, tasks_per_labeler = min(labelers, 8), min(tasks_per_labeler, 3)
    if labelers < 1 or tasks_per_labeler < 1 or overlap < 1:
        raise UserError("--labelers, --tasks-per-labeler and the overlap must be at least 1")
    # enough slots that nobody runs dry: the assignments wanted, plus overlap x T spare (a labeler's own
    # earlier tasks can hold at most (T - 1) x (overlap - 1) of the free slots)
    n_tasks = math.ceil(labelers * tasks_per_labeler / overlap) + tasks_per_labeler
    with tempfile.TemporaryDirectory(prefix="cf-labelers-") as tmp:
        url = database_url(db_url or f"sqlite:///{Path(tmp) / 'labelers.db'}")
        backend = url.split(":", 1)[0].split("+", 1)[0]
        names = [f"labeler{i:03d}" for i in range(labelers)]
        _setup_accounts(url, names)
        port = _free_port()
        log = Path(tmp) / "server.log"
        proc = _start_server(url, port, log)
        base = f"http://127.0.0.1:{port}"
        try:
            cid = _import_campaign(base, n_tasks, overlap)
            rec, clients = Recorder(), {}
            start = threading.Barrier(labelers + 1, timeout=time_limit_s + 60)
            t_deadline = time.monotonic() + time_limit_s
            threads = [threading.Thread(target=_labeler, daemon=True,
                                        args=(base, n, tasks_per_labeler, seed * 100_003 + i, resubmit_share,
                                              draft_share, t_deadline, start, rec, clients))
                       for i, n in enumerate(names)]
            for th in threads:
                th.start()
            start.wait()
            t0 = time.perf_counter()
            start.wait()  # every labeler logged in: the ranking flow starts
            t1 = time.perf_counter()
            for th in threads:
                th.join(max(t_deadline - time.monotonic(), 0) + 90)
            wall = time.perf_counter() - t0
            hung = sum(th.is_alive() for th in threads)
        finally:
            _stop(proc)
        server_log = log.read_text(errors="replace")
        counts = _count(url, cid, overlap, clients)
    n_req = sum(len(v) for v in rec.samples.values()) + sum(s.get(0, 0) for s in rec.status.values())
    n_rank = n_req - sum(rec.status["login"].values())
    five = sum(n for st in rec.status.values() for code, n in st.items() if code >= 500)
    latency = {k: {"n": len(rec.samples[k]), "p50_ms": _ms(_pct(rec.samples[k], 0.5)),
                   "p95_ms": _ms(_pct(rec.samples[k], 0.95)), "max_ms": _ms(max(rec.samples[k], default=None)),
                   "status": {str(c): n for c, n in sorted(rec.status[k].items())}}
               for k in KINDS if rec.status.get(k)}
    resubmits = sum(me["resubmits"] for me in clients.values())
    result: dict[str, Any] = {
        "stage": "labelers", "db": backend, "labelers": labelers, "tasks_per_labeler": tasks_per_labeler,
        "overlap": overlap, "tasks": n_tasks, "wall_s": round(wall, 2), "login_phase_s": round(t1 - t0, 2),
        "requests": n_req, "req_s": round(n_req / wall, 1) if wall else None,
        "ranking_req_s": round(n_rank / (wall - (t1 - t0)), 1) if wall > t1 - t0 else None, **counts,
        "resubmits": resubmits, "resubmits_ok": sum(me["resubmit_ok"] for me in clients.values()),
        "http_5xx": five, "transport_errors": sum(s.get(0, 0) for s in rec.status.values()),
        "starved": sum(me["starved"] for me in clients.values()),
        "timed_out": sum(me["timed_out"] for me in clients.values()) + hung,
        "server_log_errors": sum(server_log.count(s) for s in ("Traceback", "database is locked")),
        "latency": latency, "errors": rec.errors[:20]}
    if result["server_log_errors"]:
        result["server_log_tail"] = server_log[-3000:]
    _print(result)
    return result


def _ms(x: float | None) -> float | None:
    return None if x is None else round(1000 * x, 1)


def _print(r: dict) -> None:
    from rich.table import Table

    from chatforge.core.log import console

    t = Table(title=f"bench labelers: {r['labelers']} labelers x {r['tasks_per_labeler']} tasks on {r['db']} "
                    f"(overlap {r['overlap']}, {r['tasks']} tasks)")
    for col in ("request", "n", "p50", "p95", "max", "statuses"):
        t.add_column(col, justify="right")
    for k, v in r["latency"].items():
        t.add_row(k, str(v["n"]), f"{v['p50_ms']} ms", f"{v['p95_ms']} ms", f"{v['max_ms']} ms",
                  " ".join(f"{c}:{n}" for c, n in v["status"].items()))
    console.print(t)
    s = Table(title="submissions")
    s.add_column("metric")
    s.add_column("value", justify="right")
    for k in ("expected", "stored_rows", "lost", "duplicated", "stored_unacknowledged", "overfilled_tasks",
              "same_task_twice", "open_assignments", "resubmits", "resubmits_ok", "http_5xx", "transport_errors",
              "starved", "timed_out", "server_log_errors", "requests", "req_s", "ranking_req_s", "login_phase_s",
              "wall_s"):
        s.add_row(k, str(r[k]))
    console.print(s)
    for e in r["errors"]:
        console.print(f"[red]{e}[/red]", soft_wrap=True)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--serve":
        _serve(sys.argv[2], int(sys.argv[3]))
    else:
        print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
