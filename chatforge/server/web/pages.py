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
from chatforge.server.web.security import HEADERS, csrf_ok

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
                resp = RedirectResponse("/app/login", status_code=303)
            except PasswordChangeRequired:
                resp = RedirectResponse("/app/password", status_code=303)
            for k, v in HEADERS:
                resp.headers.setdefault(k.decode(), v.decode())
            return resp
        return handler


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
