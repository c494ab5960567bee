"""What every page module of the web app shares: the route class that adds security headers and turns
a missing login into a redirect, the templates, `page()` and the CSRF check. Page modules build their
router with `app_router()` and are included by `web.install`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from fastapi.templating import Jinja2Templates

from chatforge.server.db.models import User
from chatforge.server.web.deps import LoginRequired, PasswordChangeRequired
from chatforge.server.web.models import WebSession
from chatforge.server.web.security import HEADERS, SESSION_COOKIE, csrf_ok

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=str(HERE / "templates"))  # autoescape on for .html
FLAGS = ("fails_instruction", "hallucination", "harmful", "sexual_or_violent", "denigrates_protected_class",
         "personal_data")


class SecureRoute(APIRoute):
    """Adds the security headers (CSP without inline script, nosniff, frame-ancestors, referrer) to every page."""

    def get_route_handler(self):  # noqa: ANN201 - starlette's handler type
        inner = super().get_route_handler()

        async def handler(request: Request) -> Response:
            try:
                resp = await inner(request)
            except LoginRequired:
                resp = RedirectResponse(login_url(request), status_code=303)
            except PasswordChangeRequired:
                resp = RedirectResponse("/app/password", status_code=303)
            for k, v in HEADERS:
                resp.headers.setdefault(k.decode(), v.decode())
            return resp
        return handler


def login_url(request: Request) -> str:
    """Where a request without a live session goes: the login page, told to come back to the page the person
    was on (for a form post, the page that posted it) and, if they had a session, that it ended."""
    from urllib.parse import quote, urlsplit

    back = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    if request.method != "GET":
        ref = urlsplit(request.headers.get("referer", ""))
        same = ref.netloc in ("", request.url.netloc)
        back = ref.path + (f"?{ref.query}" if ref.query else "") if same and ref.path else "/app/"
    ended = "&expired=1" if request.cookies.get(SESSION_COOKIE) else ""
    return f"/app/login?next={quote(safe_next(back), safe='/')}{ended}"


def safe_next(dest: str | None) -> str:
    """`dest` if it is a page of this app (no open redirect to another site), else the home page."""
    dest = dest or ""
    ok = dest.startswith("/app/") and not dest.startswith(("/app/login", "/app/logout")) and "\\" not in dest \
        and "//" not in dest and all(c.isprintable() for c in dest)
    return dest if ok else "/app/"


def app_router() -> APIRouter:
    """A router for pages under /app (security headers, login redirect, not in the OpenAPI schema)."""
    return APIRouter(prefix="/app", route_class=SecureRoute, include_in_schema=False)


def page(request: Request, name: str, user: User | None = None, sess: WebSession | None = None,
         status: int = 200, **ctx: Any) -> HTMLResponse:
    """Render template `name` with the user, their CSRF token and the ranking flags in the context."""
    return templates.TemplateResponse(request, name, {"user": user, "csrf": sess.csrf if sess else "",
                                                      "flags": FLAGS, **ctx}, status_code=status)


def check_csrf(sess: WebSession, token: str) -> None:
    if not csrf_ok(sess, token):
        raise HTTPException(403, "missing or wrong CSRF token: reload the page and try again")
