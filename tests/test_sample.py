"""`chatforge sample`: K replies per prompt as ranking tasks, reproducible, resumable without duplicates."""

import json

from helpers import save_tiny_model

from chatforge.stages.sample import SampleConfig, make_task
from chatforge.stages.sample import run as sample_run


def _prompts(path, n):
    rows = [{"id": f"p{i}", "messages": [{"role": "user", "content": f"What is {i} + {i}?"}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_sample_resume_appends_never_duplicates(tiny_tokenizer, tiny_model_factory, tmp_path):
    model = save_tiny_model(tmp_path / "m", tiny_tokenizer, tiny_model_factory)
    cfg = SampleConfig(k=3, max_new_tokens=8, seed=7, batch_size=2)
    full = tmp_path / "full.jsonl"
    sample_run(str(model), str(_prompts(tmp_path / "p5.jsonl", 5)), full, cfg)
    rows = [json.loads(x) for x in full.read_text().splitlines()]
    assert [r["task_id"] for r in rows] == [f"p{i}" for i in range(5)]
    for r in rows:
        assert 1 <= len(r["responses"]) <= 3
        assert r["responses"][0]["params"]["temperature"] == 1.0 and r["responses"][0]["policy"]

    # a partial file (3 prompts done, plus a torn line from a kill) resumes to the same content
    part = tmp_path / "part.jsonl"
    sample_run(str(model), str(_prompts(tmp_path / "p3.jsonl", 3)), part, cfg)
    with open(part, "a") as f:
        f.write('{"task_id": "p3", "prom')
    stats = sample_run(str(model), str(tmp_path / "p5.jsonl"), part, cfg)
    assert stats["resumed_skipped"] == 3 and stats["written"] == 2
    assert part.read_text() == full.read_text()


def test_identical_replies_are_collapsed():
    task = make_task({"id": "x", "messages": [{"role": "user", "content": "hi"}]}, ["a", " a ", "b"], "run1", {})
    assert [r["content"] for r in task["responses"]] == ["a", "b"]


def test_sample_with_compile_writes_the_same_replies(tiny_tokenizer, tiny_model_factory, tmp_path):
    model = save_tiny_model(tmp_path / "m", tiny_tokenizer, tiny_model_factory)
    prompts = str(_prompts(tmp_path / "p.jsonl", 3))
    outs = []
    for compile in (False, True):
        out = tmp_path / f"c{compile}.jsonl"
        sample_run(str(model), prompts, out, SampleConfig(k=2, max_new_tokens=6, seed=3, batch_size=2, compile=compile))
        outs.append([[r["content"] for r in json.loads(x)["responses"]] for x in out.read_text().splitlines()])
    assert outs[0] == outs[1] and len(outs[0]) == 3
