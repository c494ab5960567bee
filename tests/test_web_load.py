"""The ranking flow under concurrent labelers (`chatforge bench labelers`, small): the real app under uvicorn on
a SQLite file and on the real PostgreSQL server, 8 labelers x 3 tasks at once; nothing lost, nothing stored
twice, double submits (sequential and racing) answered without a 5xx, never one task twice to a labeler."""

from __future__ import annotations

from chatforge.bench.labelers import run


def test_concurrent_labelers_lose_and_duplicate_nothing(web_db_url):
    r = run(web_db_url, labelers=8, tasks_per_labeler=3, overlap=2, resubmit_share=0.35, draft_share=0.25,
            time_limit_s=50, seed=1)
    assert r["db"] == ("sqlite" if web_db_url.startswith("sqlite") else "postgresql")
    assert r["expected"] == 8 * 3 and r["stored_rows"] == 8 * 3, r
    assert r["lost"] == 0 and r["duplicated"] == 0 and r["stored_unacknowledged"] == 0, r
    assert r["foreign_keys"] == 0 and r["open_assignments"] == 0 and r["overfilled_tasks"] == 0, r
    assert r["same_task_twice"] == 0, r  # every labeler got distinct tasks
    assert r["resubmits"] > 0 and r["resubmits_ok"] == r["resubmits"], r
    assert r["latency"]["resubmit"]["status"] == {"303": r["resubmits"]}, r
    assert r["latency"]["draft"]["n"] > 0 and set(r["latency"]["draft"]["status"]) == {"200"}, r
    assert r["http_5xx"] == 0 and r["transport_errors"] == 0 and r["server_log_errors"] == 0, r
    assert r["starved"] == 0 and r["timed_out"] == 0 and r["errors"] == [], r
    assert r["latency"]["submit"]["p95_ms"] is not None and r["req_s"] > 0
