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
