"""`chatforge bench serve --quick`: a real server subprocess, streaming clients at two concurrency levels."""

from __future__ import annotations


def test_bench_serve_quick():
    from chatforge.bench import run_bench

    r = run_bench("serve", quick=True)
    one, four = r["levels"]
    assert (one["clients"], four["clients"]) == (1, 4)
    assert one["requests"] == four["requests"] == r["requests_per_level"]
    # same requests and seeds at every level, and replies do not depend on the batch: same tokens
    assert one["output_tokens"] == four["output_tokens"] > 0
    assert one["mean_batch"] == 1.0 and four["mean_batch"] > 1.5
    for level in r["levels"]:
        assert 0 < level["ttft_p50_s"] <= level["ttft_p95_s"] and level["output_tok_s"] > 0


def test_serve_loads_and_prepares_its_models_off_the_main_thread(monkeypatch):
    """The main thread (uvicorn's loop) must never start an OpenMP pool: libgomp would then throttle the
    scheduler thread's pool (see server.app.off_main_thread). So serve() builds the app and the demo's
    campaign in a helper thread that has exited before uvicorn runs."""
    import threading

    import uvicorn

    from chatforge.server import app as app_module
    from chatforge.server.web import demo

    seen: dict[str, object] = {}

    class FakeApp:
        class state:
            served: list = [type("M", (), {"id": "m", "aliases": [], "path": "p", "base": None})()]
            db = type("DB", (), {"sessions": None})()

    def fake_create_app(*a, **k):
        seen["create_app"] = threading.current_thread()
        return FakeApp

    def fake_setup_demo(*a, **k):
        seen["setup_demo"] = threading.current_thread()
        return {"password": None, "tasks": 0}

    monkeypatch.setattr(app_module, "create_app", fake_create_app)
    monkeypatch.setattr(demo, "setup_demo", fake_setup_demo)
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: seen.setdefault("uvicorn", threading.current_thread()))
    app_module.serve(None, "sqlite://", "127.0.0.1", 0, True, 4, demo=True)
    assert seen["uvicorn"] is threading.main_thread()
    for step in ("create_app", "setup_demo"):
        assert seen[step] is not threading.main_thread() and not seen[step].is_alive()


def test_off_main_thread_returns_and_reraises():
    import threading

    import pytest

    from chatforge.core.io import UserError
    from chatforge.server.app import off_main_thread

    assert off_main_thread(lambda: threading.current_thread().name) == "chatforge-load"

    def boom() -> None:
        raise UserError("no such model")

    with pytest.raises(UserError, match="no such model"):
        off_main_thread(boom)
