"""Typed dependencies: a DB session per request, the logged-in user, the CSRF check, role guards."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from sqlalchemy.orm import Session, sessionmaker

from chatforge.server.db.models import User
from chatforge.server.web.models import WebSession
from chatforge.server.web.security import SESSION_COOKIE, LoginLimiter, load_session


def session_factory(app: Any) -> sessionmaker:
    """The app's sessionmaker: set by `install`, else taken from the storage package's Database."""
    sm = getattr(app.state, "web_sessionmaker", None)
    if sm is None:
        db = getattr(app.state, "db", None)
        sm = next((getattr(db, n) for n in ("sessionmaker", "Session", "session_factory")
                   if callable(getattr(db, n, None))), None)
        if sm is None and getattr(db, "engine", None) is not None:
            sm = sessionmaker(db.engine, expire_on_commit=False)
        if sm is None:
            raise HTTPException(503, "the web app needs a database (chatforge serve --db URL)")
        app.state.web_sessionmaker = sm
    return sm


def get_db(request: Request) -> Iterator[Session]:
    with session_factory(request.app)() as db:
        yield db


def limiter(request: Request) -> LoginLimiter:
    lim = getattr(request.app.state, "web_login_limiter", None)
    if lim is None:
        lim = request.app.state.web_login_limiter = LoginLimiter()
    return lim


class LoginRequired(Exception):
    """Raised by the auth dependencies; the handler redirects to the login page."""


class PasswordChangeRequired(Exception):
    """Raised for a user logged in with a one-time password; the handler redirects to /app/password."""


PASSWORD_PAGES = ("/app/password", "/app/logout")


def current(request: Request, db: Annotated[Session, Depends(get_db)]) -> tuple[WebSession, User]:
    found = load_session(db, request.cookies.get(SESSION_COOKIE))
    if found is None:
        raise LoginRequired()
    if found[1].must_change_password and request.url.path not in PASSWORD_PAGES:
        raise PasswordChangeRequired()
    return found


def require_role(*roles: str) -> Callable[..., tuple[WebSession, User]]:
    def dep(found: Annotated[tuple[WebSession, User], Depends(current)]) -> tuple[WebSession, User]:
        if found[1].role not in roles:
            raise HTTPException(403, "your account cannot open this page")
        return found
    return dep


DB = Annotated[Session, Depends(get_db)]
Auth = Annotated[tuple[WebSession, User], Depends(current)]
Labeler = Annotated[tuple[WebSession, User], Depends(require_role("admin", "labeler"))]
Admin = Annotated[tuple[WebSession, User], Depends(require_role("admin"))]
