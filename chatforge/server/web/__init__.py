"""The feedback web app (issue 20): pages under /app in the same FastAPI server and database as the API."""

from __future__ import annotations

from typing import Any

from chatforge.server.web.routes import router


def install(app: Any, sessionmaker: Any = None) -> None:
    """Mount the pages (and their static files) on `app` (optionally with an explicit sessionmaker)."""
    if sessionmaker is not None:
        app.state.web_sessionmaker = sessionmaker
    from chatforge.server.web.accounts import router as accounts_router
    from chatforge.server.web.arena import router as arena_router
    from chatforge.server.web.chat import router as chat_router
    from chatforge.server.web.demos import router as demos_router

    app.include_router(router)
    app.include_router(accounts_router)
    app.include_router(demos_router)
    app.include_router(chat_router)
    app.include_router(arena_router)


__all__ = ["router", "install"]
