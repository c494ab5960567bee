"""Account pages: set a new password (forced after a one-time password), invitations (an admin makes a
one-use link for a role; whoever opens it picks a username and password and is logged in)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from chatforge.server.db.models import ROLES, User
from chatforge.server.web import campaigns as cp
from chatforge.server.web.deps import DB, Admin, Auth
from chatforge.server.web.pages import app_router, check_csrf, page
from chatforge.server.web.security import (
    SESSION_COOKIE,
    create_invite,
    create_session,
    hash_password,
    open_invite,
    password_problem,
    user_by_name,
    verify_password,
)

router = app_router()


def _login_response(request: Request, token: str, dest: str) -> Response:
    from chatforge.server.web.security import SESSION_TTL

    resp = RedirectResponse(dest, status_code=303)
    secure = request.url.scheme == "https" or request.headers.get("x-forwarded-proto") == "https"
    resp.set_cookie(SESSION_COOKIE, token, max_age=int(SESSION_TTL.total_seconds()), httponly=True,
                    samesite="lax", secure=secure, path="/")
    return resp


@router.get("/password")
def password_form(request: Request, auth: Auth) -> HTMLResponse:
    return page(request, "password.html", auth[1], auth[0], forced=auth[1].must_change_password)


@router.post("/password")
def password_change(request: Request, db: DB, auth: Auth, csrf: Annotated[str, Form()] = "",
                    current: Annotated[str, Form(max_length=1000)] = "",
                    new: Annotated[str, Form(max_length=1000)] = "",
                    again: Annotated[str, Form(max_length=1000)] = "") -> Response:
    sess, user = auth
    check_csrf(sess, csrf)
    err = ("the current password is wrong" if not verify_password(db, user, current)
           else "choose a password different from the one-time password" if current == new
           else password_problem(new, again))
    if err:
        return page(request, "password.html", user, sess, status=422, error=err, forced=user.must_change_password)
    user.password_hash, user.must_change_password = hash_password(new), False
    # every other session of this user ends with the old password; this one is rotated
    token, _ = create_session(db, user, old_token=request.cookies.get(SESSION_COOKIE))
    from sqlalchemy import delete

    from chatforge.server.web.models import WebSession
    from chatforge.server.web.security import _digest

    db.execute(delete(WebSession).where(WebSession.user_id == user.id, WebSession.id != _digest(token)))
    db.commit()
    return _login_response(request, token, "/app/admin" if user.role == "admin" else "/app/")


@router.post("/admin/invites")
def admin_invite(request: Request, db: DB, auth: Admin, csrf: Annotated[str, Form()] = "",
                 role: Annotated[str, Form()] = "labeler") -> Response:
    from chatforge.server.web.routes import admin_page

    check_csrf(auth[0], csrf)
    if role not in ROLES:
        return admin_page(request, db, auth, error=f"role must be one of {', '.join(ROLES)}", status=422)
    token = create_invite(db, auth[1], role)
    cp.audit(db, auth[1], "invite.create", role, role=role)
    db.commit()
    link = f"{str(request.base_url).rstrip('/')}/app/invite/{token}"
    return admin_page(request, db, auth, invite_link=link)


@router.get("/invite/{token}")
def invite_form(request: Request, db: DB, token: str) -> HTMLResponse:
    inv = open_invite(db, token)
    if inv is None:
        return page(request, "invite.html", status=404, error="This invitation is used, expired or unknown; "
                    "ask an admin for a new one.", invite=None)
    return page(request, "invite.html", invite=inv, token=token)


@router.post("/invite/{token}")
def invite_accept(request: Request, db: DB, token: str, username: Annotated[str, Form(max_length=100)] = "",
                  password: Annotated[str, Form(max_length=1000)] = "",
                  again: Annotated[str, Form(max_length=1000)] = "") -> Response:
    from datetime import datetime, timezone

    inv = open_invite(db, token)  # the token itself is the CSRF defence here: only its holder can post
    if inv is None:
        return page(request, "invite.html", status=404, error="This invitation is used, expired or unknown.",
                    invite=None)
    username = username.strip()
    err = ("choose a username" if not username else f"the username '{username}' is taken"
           if user_by_name(db, username) else password_problem(password, again))
    if err:
        return page(request, "invite.html", status=422, error=err, invite=inv, token=token)
    user = User(username=username, role=inv.role, password_hash=hash_password(password))
    db.add(user)
    db.flush()
    inv.used_at, inv.used_by = datetime.now(timezone.utc), user.id
    cp.audit(db, user, "invite.accept", username, role=inv.role)
    session_token, _ = create_session(db, user, old_token=request.cookies.get(SESSION_COOKIE))
    db.commit()
    return _login_response(request, session_token, "/app/")
