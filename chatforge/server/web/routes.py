"""The web app's pages under /app: login, ranking, admin (campaigns, import, agreement, export, users)."""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import Form, HTTPException, Request, UploadFile
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from chatforge.core.io import DataError, UserError
from chatforge.server.db.models import ROLES, User
from chatforge.server.web import campaigns as cp
from chatforge.server.web.agreement import campaign_agreement
from chatforge.server.web.deps import DB, Admin, Auth, Labeler, current, limiter
from chatforge.server.web.models import Assignment, AuditLog, Campaign, Ranking, RankTask
from chatforge.server.web.pages import FLAGS, app_router, check_csrf, page, safe_next
from chatforge.server.web.security import (
    SESSION_COOKIE,
    SESSION_TTL,
    create_session,
    end_session,
    hash_password,
    user_by_name,
    verify_password,
)

HERE = Path(__file__).parent
MAX_UPLOAD = 50 * 1024 * 1024
router = app_router()
STATIC = {p.name: p for p in (HERE / "static").iterdir() if p.suffix in (".js", ".css")}
MEDIA = {".js": "text/javascript", ".css": "text/css"}


@router.get("/static/{name}")
def static_file(name: str) -> Response:
    """The app's own JS/CSS (a fixed list, so `include_router` alone mounts everything)."""
    p = STATIC.get(name)
    if p is None:
        raise HTTPException(404, "no such file")
    return Response(p.read_bytes(), media_type=MEDIA[p.suffix], headers={"cache-control": "no-cache"})


def _secure_cookie(request: Request) -> bool:
    return request.url.scheme == "https" or request.headers.get("x-forwarded-proto") == "https"


# ----------------------------------------------------------------------------- accounts


@router.get("/login")
def login_form(request: Request, next: str = "", expired: int = 0) -> HTMLResponse:
    msg = ("Your session ended. Log in again to go on: what you typed on a task was saved as a draft."
           if expired else "")
    return page(request, "login.html", message=msg, next=safe_next(next) if next else "")


@router.post("/login")
def login(request: Request, db: DB, username: Annotated[str, Form(max_length=100)],
          password: Annotated[str, Form(max_length=1000)], next: Annotated[str, Form(max_length=2000)] = "") -> Response:
    lim = limiter(request)
    key = f"{request.client.host if request.client else '-'}:{username.lower()}"
    wait = lim.retry_after(key)
    if wait:
        return page(request, "login.html", status=429, error=f"Too many failed logins; try again in {wait} s.",
                    next=safe_next(next) if next else "", headers_retry=wait)
    user = user_by_name(db, username)
    if not verify_password(db, user, password):
        lim.fail(key)
        return page(request, "login.html", status=401, error="Wrong username or password.",
                    next=safe_next(next) if next else "")
    lim.reset(key)
    token, _ = create_session(db, user, old_token=request.cookies.get(SESSION_COOKIE))
    db.commit()
    dest = safe_next(next) if next else "/app/admin" if user.role == "admin" else "/app/"
    resp = RedirectResponse(dest, status_code=303)
    resp.set_cookie(SESSION_COOKIE, token, max_age=int(SESSION_TTL.total_seconds()), httponly=True,
                    samesite="lax", secure=_secure_cookie(request), path="/")
    return resp


@router.post("/logout")
def logout(request: Request, db: DB, auth: Auth, csrf: Annotated[str, Form()] = "") -> Response:
    check_csrf(auth[0], csrf)
    end_session(db, request.cookies.get(SESSION_COOKIE))
    db.commit()
    resp = RedirectResponse("/app/login", status_code=303)
    resp.delete_cookie(SESSION_COOKIE, path="/")
    return resp


@router.get("/")
def home(request: Request, db: DB, auth: Auth) -> HTMLResponse:
    sess, user = auth
    done = db.scalar(select(func.count()).select_from(Assignment)
                     .where(Assignment.user_id == user.id, Assignment.status == "done"))
    return page(request, "home.html", user, sess, done=done)


# ----------------------------------------------------------------------------- ranking


@router.get("/rank")
def rank_next(request: Request, db: DB, auth: Labeler) -> Response:
    sess, user = auth
    for _ in range(3):  # another labeler may take the same slot at the same moment: retry
        try:
            a = cp.next_assignment(db, user)
            db.commit()
            break
        except IntegrityError:
            db.rollback()
    else:
        a = None
    if a is None:
        return page(request, "home.html", user, sess, done=None, message="No ranking tasks left for you. Thank you!")
    return RedirectResponse(f"/app/rank/{a.id}", status_code=303)


def _own_assignment(db: DB, aid: str, user: User) -> tuple[Assignment, RankTask, Campaign]:
    a = db.get(Assignment, aid)
    if a is None or (a.user_id != user.id):  # another labeler's work is a 404, not a 403: ids leak nothing
        raise HTTPException(404, "no such task for you (it may have been reassigned)")
    t = db.get(RankTask, a.task_id)
    if t is None:
        raise HTTPException(404, "this task was deleted")
    return a, t, db.get(Campaign, t.campaign_id)


def _rank_page(request: Request, db: DB, auth: tuple, aid: str, status: int = 200, error: str = "",
               form: dict | None = None) -> HTMLResponse:
    sess, user = auth
    a, t, c = _own_assignment(db, aid, user)
    by_id = {r["response_id"]: r for r in t.data["responses"]}
    replies = [{"letter": cp.LETTERS[i], "content": by_id[rid]["content"]} for i, rid in enumerate(a.shown_order)]
    last = db.scalars(select(Ranking).where(Ranking.assignment_id == a.id).order_by(Ranking.revision.desc())).first()
    return page(request, "rank.html", user, sess, status=status, a=a, task=t.data, campaign=c, replies=replies,
                error=error, form=form or a.draft or {}, last=last, submit_key=secrets.token_urlsafe(16),
                started=time.time())


@router.get("/rank/{aid}")
def rank_form(request: Request, db: DB, auth: Labeler, aid: str) -> HTMLResponse:
    return _rank_page(request, db, auth, aid)


@router.post("/rank/{aid}/draft")
async def rank_autosave(request: Request, db: DB, auth: Labeler, aid: str) -> Response:
    """Autosave of the ranking form as the labeler works (restored when the task is opened again)."""
    from fastapi.responses import JSONResponse

    form = await request.form()
    check_csrf(auth[0], str(form.get("csrf", "")))
    a, _, _ = _own_assignment(db, aid, auth[1])
    keep = {k: str(v)[:cp.MAX_TEXT] for k, v in form.items() if k not in ("csrf", "submit_key", "started", "action")}
    a.draft = keep
    db.commit()
    return JSONResponse({"saved": True})


@router.post("/rank/{aid}")
async def rank_submit(request: Request, db: DB, auth: Labeler, aid: str) -> Response:
    form = await request.form()
    sess, user = auth
    check_csrf(sess, str(form.get("csrf", "")))
    a, t, c = _own_assignment(db, aid, user)
    f = {k: str(v) for k, v in form.items()}
    try:
        if form.get("action") == "skip":
            reason = f.get("skip_reason", "").strip()
            if not reason:
                raise UserError("say why you skip (e.g. 'I can't judge this topic')")
            if len(reason) > cp.MAX_TEXT:
                raise UserError(f"the reason is longer than {cp.MAX_TEXT} characters")
            a.status, a.skip_reason = "skipped", reason
            db.commit()
            return RedirectResponse("/app/rank", status_code=303)
        letters = cp.LETTERS[:len(a.shown_order)]
        not_rankable = form.get("not_rankable") == "1"
        ranking = ([list(a.shown_order)] if not_rankable else
                   cp.parse_ranking(f.get("ranking", ""), a.shown_order, c.allow_ties))
        ratings, flags = {}, {}
        for i, rid in enumerate(a.shown_order):
            r = cp.parse_rating(f.get(f"rating_{letters[i]}", ""), letters[i])
            if r is not None:
                ratings[rid] = r
            fl = [x for x in form.getlist(f"flag_{letters[i]}") if x in FLAGS]
            if fl:
                flags[rid] = fl
        started = float(f.get("started") or 0) or None
        seconds = round(time.time() - started, 1) if started else None
        key = f.get("submit_key") or secrets.token_urlsafe(16)
        cp.submit_ranking(db, a, key, ranking, not_rankable, ratings, flags, f.get("comment", ""), seconds)
        db.commit()
    except UserError as e:
        db.rollback()
        return _rank_page(request, db, auth, aid, status=422, error=str(e), form=f)
    except IntegrityError:  # the same submit raced itself: the first one stored it
        db.rollback()
    return RedirectResponse("/app/rank", status_code=303)


# ----------------------------------------------------------------------------- admin


@router.get("/admin")
def admin(request: Request, db: DB, auth: Admin) -> HTMLResponse:
    return admin_page(request, db, auth)


def admin_page(request: Request, db: DB, auth: tuple, status: int = 200, **ctx: Any) -> HTMLResponse:
    """The admin page (campaigns, users, open invites, audit log) with extra context (error, invite_link)."""
    from datetime import datetime, timezone

    from chatforge.server.web.models import WebInvite

    sess, user = auth
    rows = []
    for c in db.scalars(select(Campaign).order_by(Campaign.created_at)):
        n = db.scalar(select(func.count()).select_from(RankTask).where(RankTask.campaign_id == c.id))
        done = db.scalar(select(func.count()).select_from(Assignment).join(RankTask)
                         .where(RankTask.campaign_id == c.id, Assignment.status == "done"))
        rows.append({"c": c, "tasks": n, "done": done, "needed": n * c.overlap})
    users = list(db.scalars(select(User).order_by(User.username)))
    log = list(db.scalars(select(AuditLog).order_by(AuditLog.id.desc()).limit(20)))
    invites = list(db.scalars(select(WebInvite).where(WebInvite.used_at.is_(None),
                                                      WebInvite.expires_at > datetime.now(timezone.utc))
                              .order_by(WebInvite.created_at)))
    from chatforge.server.web.demos import prompt_sets_summary

    return page(request, "admin.html", user, sess, status=status, campaigns=rows, users=users, roles=ROLES,
                log=log, invites=invites, prompt_sets=prompt_sets_summary(db), **ctx)


@router.post("/admin/users")
def admin_create_user(request: Request, db: DB, auth: Admin, csrf: Annotated[str, Form()] = "",
                      username: Annotated[str, Form(max_length=100)] = "",
                      password: Annotated[str, Form(max_length=1000)] = "",
                      role: Annotated[str, Form()] = "labeler") -> Response:
    check_csrf(auth[0], csrf)
    username = username.strip()
    err = ("username is empty" if not username else f"role must be one of {', '.join(ROLES)}" if role not in ROLES
           else "password must have at least 8 characters" if len(password) < 8
           else f"user '{username}' exists" if user_by_name(db, username) else "")
    if err:
        return admin_page(request, db, auth, error=err, status=422)
    u = User(username=username, role=role, password_hash=hash_password(password))
    db.add(u)
    cp.audit(db, auth[1], "user.create", username, role=role)
    db.commit()
    return RedirectResponse("/app/admin", status_code=303)


@router.post("/admin/campaigns")
async def admin_create_campaign(request: Request, db: DB, auth: Admin) -> Response:
    form = await request.form()
    check_csrf(auth[0], str(form.get("csrf", "")))
    name = str(form.get("name", "")).strip()[:200]
    upload = form.get("tasks")
    try:
        overlap = int(str(form.get("overlap", "1")))
        if not name or not 1 <= overlap <= 50:
            raise UserError("a campaign needs a name and an overlap of 1-50")
        if not isinstance(upload, UploadFile) and not hasattr(upload, "read"):
            raise UserError("choose a tasks file (`chatforge sample` output)")
        raw = await upload.read(MAX_UPLOAD + 1)
        if len(raw) > MAX_UPLOAD:
            raise UserError("the file is larger than 50 MB")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{upload.filename}: not valid UTF-8 (byte {e.start})") from None
        tasks = cp.parse_task_lines(text, upload.filename or "upload")
        c = Campaign(name=name, overlap=overlap, allow_ties=form.get("allow_ties", "1") == "1",
                     guidelines=str(form.get("guidelines", ""))[:cp.MAX_TEXT], created_by=auth[1].id)
        db.add(c)
        db.flush()
        cp.import_tasks(db, c, tasks)
        cp.audit(db, auth[1], "campaign.import", c.id, name=name, tasks=len(tasks), overlap=overlap)
        db.commit()
    except DataError as e:  # names the file and line: "tasks.jsonl line 3: ..."
        db.rollback()
        where = f"{e.path} line {e.line}" if e.line else e.path
        msg = str(e).split(": ", 1)[1] if ": " in str(e) else str(e)
        return admin_page(request, db, auth, error=f"nothing imported: {where}: {msg}", status=422)
    except (UserError, ValueError) as e:
        db.rollback()
        return admin_page(request, db, auth, error=f"nothing imported: {e}", status=422)
    return RedirectResponse(f"/app/admin/campaigns/{c.id}", status_code=303)


@router.get("/admin/campaigns/{cid}")
def admin_campaign(request: Request, db: DB, auth: Admin, cid: str) -> HTMLResponse:
    c = db.get(Campaign, cid)
    if c is None:
        raise HTTPException(404, "no such campaign")
    stats = campaign_agreement(cp.raw_comparisons(db, cid))
    n = db.scalar(select(func.count()).select_from(RankTask).where(RankTask.campaign_id == cid))
    return page(request, "campaign.html", auth[1], auth[0], c=c, tasks=n, stats=stats)


@router.get("/admin/campaigns/{cid}/export")
def admin_export(db: DB, auth: Admin, cid: str, kind: str = "raw", labeler: str | None = None,
                 since: str | None = None, until: str | None = None, model_version: str | None = None,
                 format: str = "chatforge") -> Response:
    """A campaign's rankings as a JSONL download (web.exports: the same filters and formats as the CLI)."""
    from chatforge.server.web import exports

    if db.get(Campaign, cid) is None or kind not in ("raw", "consensus"):
        raise HTTPException(404, "no such campaign or export")
    try:
        rows = exports.ranking_rows(exports.rankings(
            db, cid, exports.parse_when(since, "since"), exports.parse_when(until, "until"), labeler or None,
            model_version or None, consensus=kind == "consensus"), format)
    except UserError as e:
        raise HTTPException(422, str(e)) from None
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return Response(body, media_type="application/x-ndjson",
                    headers={"content-disposition": f'attachment; filename="{kind}-{cid}.jsonl"'})


__all__ = ["router", "current"]
