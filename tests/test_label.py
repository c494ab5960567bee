import json
import math
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from chatforge.core.io import DataError, UserError, read_jsonl
from chatforge.data import tasks
from chatforge.stages import label as L


def _task(task_id, prompt_text, replies, meta=None):
    prompt = {"messages": [{"role": "user", "content": prompt_text}]}
    if meta:
        prompt["meta"] = meta
    return {"task_id": task_id, "prompt": prompt,
            "responses": [{"response_id": f"{task_id}-r{i}", "content": c, "policy": "run-x", "params": {}}
                          for i, c in enumerate(replies)]}


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _arith_tasks(n, seed=0):
    """n two-reply tasks: one correct and one wrong reply, in random order."""
    rng = random.Random(seed)
    out = []
    for it in tasks.generate("arithmetic", "train", n, seed):
        wrong = str(int(it.reference) + rng.choice([-1, 1, 10]))
        pair = [it.reference, wrong] if rng.random() < 0.5 else [wrong, it.reference]
        out.append(_task(it.id, it.prompt["messages"][0]["content"], pair))
    return out


def _top_content(task, ranking):
    by_id = {r["response_id"]: r["content"] for r in task["responses"]}
    return [by_id[rid] for rid in ranking[0]]


# ----------------------------------------------------------------------------- rule / reference

def test_rule_ranks_correct_above_wrong():
    lab = L.parse_labeler_spec("rule")[0]
    t = _task("t1", "What is 23 + 58?", ["80", "The answer is 81.", "81", ""])
    ranking = lab.rank(t)
    assert _top_content(t, ranking) == ["81"]  # correct and shortest
    assert [len(tier) for tier in ranking] == [1, 1, 1, 1]
    assert ranking[1] == ["t1-r1"]  # correct but longer beats wrong
    assert ranking[-1] == ["t1-r3"]  # empty is last
    verdict = lab.judge(t)
    assert verdict.ratings["t1-r2"] == 7 and verdict.ratings["t1-r0"] == 1


def test_ties_at_temperature_zero():
    lab = L.parse_labeler_spec("rule")[0]
    t = _task("t2", "What is 2 + 2?", ["4!", "4.", "5", "5"])
    ranking = lab.rank(t)
    assert sorted(ranking[0]) == ["t2-r0", "t2-r1"]  # equal utility: tied
    assert sorted(ranking[1]) == ["t2-r2", "t2-r3"]  # identical text: tied
    assert len(ranking) == 2


def test_identical_replies_stay_tied_under_noise():
    lab = L.parse_labeler_spec("rule:temperature=5,flip_prob=0.3")[0]
    t = _task("t3", "What is 2 + 2?", ["4", "4", "5"])
    for i in range(20):
        t["task_id"] = f"t3-{i}"
        assert ["t3-r0", "t3-r1"] in [sorted(tier) for tier in lab.rank(t)]


def test_rule_heuristic_for_open_prompts():
    lab = L.parse_labeler_spec("rule")[0]
    t = _task("t4", "Tell me about the sea.", [
        "The sea is large and salty, and it covers most of the planet.",
        "sea sea sea sea sea sea sea sea sea sea sea sea",
        "Tell me about the sea.",
        "",
    ])
    ranking = lab.rank(t)
    assert ranking[0] == ["t4-r0"] and ranking[-1] == ["t4-r3"] and len(ranking) == 4
    assert L.generic_quality(t["prompt"], "Tell me about the sea.") == 0.0  # an echo is worthless
    assert L.generic_quality(t["prompt"], "sea " * 12) < 0.2  # stutter


def test_reference_labeler_uses_meta_reference_and_token_f1():
    lab = L.parse_labeler_spec("reference")[0]
    t = _task("t5", "Who wrote Hamlet?", ["Shakespeare wrote it", "William Shakespeare", "Marlowe"],
              meta={"reference": "William Shakespeare"})
    assert lab.rank(t) == [["t5-r1"], ["t5-r0"], ["t5-r2"]]
    assert L.token_f1("the blue kite", "a blue kite") == 1.0
    assert math.isclose(L.token_f1("blue ball", "blue kite"), 0.5)
    # suite prompts without meta get the suite's answer as reference
    qa = _task("t6", "Tom has a red ball. Mia has a blue kite. What does Mia have?", ["a red ball", "blue kite"])
    assert lab.rank(qa)[0] == ["t6-r1"]


# ----------------------------------------------------------------------------- noise and agreement

def test_temperature_is_bradley_terry():
    rng = random.Random(0)
    n, d, temp = 4000, 1.0, 0.5
    first = sum(L.noisy_ranking([d, 0.0], temp, 0.0, rng)[0] == [0] for _ in range(n))
    assert abs(first / n - 1 / (1 + math.exp(-d / temp))) < 0.03


def test_pairwise_agreement_excludes_ties():
    assert L.pairwise_agreement([["a"], ["b"], ["c"]], [["a"], ["c"], ["b"]]) == (2, 3)
    assert L.pairwise_agreement([["a", "b"], ["c"]], [["b"], ["a"], ["c"]]) == (2, 2)
    assert L.panel_agreement([[[["a"], ["b"]]]]) == (None, 0)  # a single label: nothing to compare


@pytest.mark.parametrize("spec,expected", [
    ("panel:rule*2:flip_prob=0.2", 0.2**2 + 0.8**2),
    # correct vs wrong-by-one differs by exactly W_CORRECT in rule utility: s = sigmoid(4 / T)
    ("panel:rule*2:temperature=4", (1 / (1 + math.exp(-1))) ** 2 + (1 - 1 / (1 + math.exp(-1))) ** 2),
])
def test_panel_agreement_matches_configured_noise(tmp_path, spec, expected):
    rows = _arith_tasks(2000)
    stats = L.label(_write(tmp_path / "tasks.jsonl", rows), tmp_path / "cmp.jsonl", spec, per_task=2, seed=0)
    assert stats["tasks"] == 2000 and stats["comparisons"] == 4000
    assert stats["agreement_pairs"] == 2000
    assert abs(stats["agreement"] - expected) < 0.04
    assert abs(stats["expected_agreement"] - expected) < 0.02
    # noise only ever demotes the correct reply: the top pick is right far more often than chance
    assert stats["suite_score_mean"] == 0.5 and stats["suite_score_top"] > 0.6


def test_expected_agreement_matches_measured_with_k4_ties_and_duplicates(tmp_path):
    rng = random.Random(1)
    rows = []
    for it in tasks.generate("arithmetic", "train", 600, seed=0):
        ref = int(it.reference)
        choices = [str(ref), str(ref + 1), f"The answer is {ref}.", "", str(ref)]
        rows.append(_task(it.id, it.prompt["messages"][0]["content"], [rng.choice(choices) for _ in range(4)]))
    path = _write(tmp_path / "tasks.jsonl", rows)
    stats = L.label(path, tmp_path / "cmp.jsonl", "panel:rule*3:temperature=1,flip_prob=0.1", per_task=0)
    assert stats["agreement_pairs"] > 5000
    assert abs(stats["agreement"] - stats["expected_agreement"]) < 0.03


def test_expected_agreement_closed_forms():
    utils = [[1.0, 0.0]] * 50
    assert L.expected_agreement(utils, 0.0, 0.0) == 1.0
    assert abs(L.expected_agreement(utils, 0.0, 0.3) - (0.09 + 0.49)) < 0.02
    assert L.expected_agreement([[1.0, 1.0]], 0.0, 0.0) is None  # all tied


def test_label_writes_comparisons(tmp_path):
    rows = _arith_tasks(12)
    rows[0]["responses"][0]["params"] = {"temperature": 1.0}
    out = tmp_path / "cmp.jsonl"
    stats = L.label(_write(tmp_path / "tasks.jsonl", rows), out, "panel:rule*3:flip_prob=0.2", per_task=1, seed=5)
    recs = [r for _, r in read_jsonl(out)]
    assert len(recs) == 12 and stats["labels_per_task"] == 1 and stats["agreement"] is None
    assert sum(stats["labelers"].values()) == 12 and set(stats["labelers"]) <= {
        "rule#0:flip_prob=0.2", "rule#1:flip_prob=0.2", "rule#2:flip_prob=0.2"}
    r = recs[0]
    assert r["task_id"] == rows[0]["task_id"] and r["responses"] == rows[0]["responses"]
    assert sorted(x for tier in r["ranking"] for x in tier) == sorted(x["response_id"] for x in r["responses"])
    assert r["labeler"].startswith("rule#") and r["created_at"].endswith("+00:00")
    assert all(1 <= v <= 7 for v in r["ratings"].values())
    # deterministic: same inputs, same rankings and labelers
    L.label(tmp_path / "tasks.jsonl", tmp_path / "again.jsonl", "panel:rule*3:flip_prob=0.2", per_task=1, seed=5)
    again = [r for _, r in read_jsonl(tmp_path / "again.jsonl")]
    assert [(a["ranking"], a["labeler"]) for a in again] == [(b["ranking"], b["labeler"]) for b in recs]
    assert "inter-labeler" not in L.format_stats(stats) and "cmp.jsonl" in L.format_stats(stats)


def test_bad_task_line_names_file_and_line_and_writes_nothing(tmp_path):
    rows = _arith_tasks(3)
    rows[1]["responses"] = []
    out = tmp_path / "cmp.jsonl"
    with pytest.raises(DataError, match=r"tasks.jsonl:2: responses must be a non-empty list"):
        L.label(_write(tmp_path / "tasks.jsonl", rows), out, "rule")
    assert not out.exists() and list(tmp_path.iterdir()) == [tmp_path / "tasks.jsonl"]
    with pytest.raises(DataError, match="no ranking tasks"):
        L.label(_write(tmp_path / "empty.jsonl", []), out, "rule")


def test_single_reply_tasks_are_skipped_and_counted(tmp_path):
    """K samples that were all identical collapse to one reply: nothing to rank, counted not fatal."""
    rows = _arith_tasks(3)
    rows[1]["responses"] = rows[1]["responses"][:1]
    stats = L.label(_write(tmp_path / "tasks.jsonl", rows), tmp_path / "cmp.jsonl", "rule")
    assert stats["skipped_single_reply"] == 1 and stats["tasks"] == 2
    assert len((tmp_path / "cmp.jsonl").read_text().splitlines()) == 2


# ----------------------------------------------------------------------------- spec strings

def test_spec_parsing():
    [lab] = L.parse_labeler_spec("rule:temperature=0.5,seed=3")
    assert (lab.name, lab.temperature, lab.seed) == ("rule:temperature=0.5,seed=3", 0.5, 3)
    panel = L.parse_labeler_spec("panel:reference*4:flip_prob=0.1", seed=10)
    assert [p.name for p in panel] == [f"reference#{i}:flip_prob=0.1" for i in range(4)]
    assert [p.seed for p in panel] == [10, 11, 12, 13] and all(p.kind == "reference" for p in panel)
    [judge] = L.parse_labeler_spec("judge:base_url=http://127.0.0.1:1/v1,model=m,api_key=sk-secret,retries=2")
    assert judge.api_key == "sk-secret" and judge.retries == 2 and "secret" not in judge.name
    assert judge.url == "http://127.0.0.1:1/v1/chat/completions"


@pytest.mark.parametrize("spec,message", [
    ("bogus", "valid kinds: rule, reference, judge"),
    ("", "valid kinds: rule, reference, judge"),
    ("rule:temp=1", "valid options: temperature, flip_prob, seed"),
    ("rule:base_url=http://x", "valid options: temperature, flip_prob, seed"),
    ("rule:temperature=hot", "temperature must be a number"),
    ("rule:seed=1.5", "seed must be an integer"),
    ("rule:flip_prob=2", "0 <= flip_prob <= 1"),
    ("panel:rule", "panel:KIND\\*N"),
    ("panel:wizard*3", "valid kinds"),
    ("judge:model=m", "judge needs base_url"),
])
def test_spec_errors_are_clear(spec, message):
    with pytest.raises(UserError, match=message):
        L.parse_labeler_spec(spec)


# ----------------------------------------------------------------------------- judge over HTTP

class FakeJudge(BaseHTTPRequestHandler):
    """An OpenAI-compatible /v1/chat/completions that ranks replies containing GOOD first.

    `script` (a list on the server) overrides answers one request at a time: a string is sent as the
    message content, an int as an HTTP status, "SLOW" sleeps, "NOT-OPENAI" sends a non-completion body."""

    def log_message(self, *args):
        pass

    def do_POST(self):
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        srv.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        action = srv.script.pop(0) if srv.script else None
        if action == "SLOW":
            time.sleep(1.5)
        if isinstance(action, int):
            self.send_response(action)
            self.end_headers()
            return
        if action is None or action == "SLOW":
            user = body["messages"][-1]["content"]
            shown = user.split("[Reply ")[1:]
            order = sorted(range(len(shown)), key=lambda i: "GOOD" not in shown[i])
            action = "Here you go:\n```json\n" + json.dumps([i + 1 for i in order]) + "\n```"
        payload = {"object": "list"} if action == "NOT-OPENAI" else \
            {"choices": [{"index": 0, "message": {"role": "assistant", "content": action}}]}
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def fake_judge():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), FakeJudge)
    srv.daemon_threads = True
    srv.handle_error = lambda request, address: None  # a timed-out client hangs up on the SLOW handler
    srv.requests, srv.script = [], []
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _judge(srv, extra=""):
    [lab] = L.parse_labeler_spec(f"judge:base_url=http://127.0.0.1:{srv.server_port}/v1,model=fake,retries=2{extra}")
    lab.backoff = 0.0
    return lab


def test_judge_ranks_via_endpoint_and_maps_shuffled_order(tmp_path, fake_judge):
    rows = [_task(f"j{i}", "Say hi.", ["meh", "GOOD hi", "bad", "worse"]) for i in range(6)]
    spec = f"judge:base_url=http://127.0.0.1:{fake_judge.server_port}/v1,model=fake,api_key=sk-secret"
    stats = L.label(_write(tmp_path / "tasks.jsonl", rows), tmp_path / "cmp.jsonl", spec)
    recs = [r for _, r in read_jsonl(tmp_path / "cmp.jsonl")]
    assert stats["comparisons"] == 6 and all(r["ranking"][0] == [f"{r['task_id']}-r1"] for r in recs)
    assert all("secret" not in r["labeler"] for r in recs) and "ratings" not in recs[0]
    req = fake_judge.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["body"]["model"] == "fake"
    assert req["auth"] == "Bearer sk-secret"
    # replies are shown in a seeded random order (position bias), not always in file order
    firsts = {r["body"]["messages"][-1]["content"].split("[Reply 1]\n")[1].split("\n")[0] for r in fake_judge.requests}
    assert len(firsts) > 1


def test_judge_retries_a_malformed_answer(fake_judge):
    fake_judge.script = ["I like them both.", 503]
    lab = _judge(fake_judge, ",retries=3")
    t = _task("m1", "Say hi.", ["GOOD", "bad"])
    assert lab.rank(t) == [["m1-r0"], ["m1-r1"]]
    assert len(fake_judge.requests) == 3


def test_judge_gives_a_clear_error_after_bounded_retries(fake_judge):
    fake_judge.script = ["[1, 1]", "NOT-OPENAI"]
    with pytest.raises(UserError, match="after 2 tries"):
        _judge(fake_judge).rank(_task("m2", "Say hi.", ["a", "b"]))
    assert len(fake_judge.requests) == 2
    fake_judge.script = ["no ranking here"] * 2
    with pytest.raises(UserError, match="no valid ranking of 2 replies in its answer 'no ranking here'"):
        _judge(fake_judge).rank(_task("m3", "Say hi.", ["a", "b"]))
    fake_judge.script = [401]
    with pytest.raises(UserError, match="HTTP 401"):
        _judge(fake_judge).rank(_task("m4", "Say hi.", ["a", "b"]))


def test_judge_never_hangs(fake_judge):
    fake_judge.script = ["SLOW", "SLOW"]
    # a reply slower than the timeout is abandoned and retried a bounded number of times (no wall-time assert)
    with pytest.raises(UserError, match="cannot reach"):
        _judge(fake_judge, ",timeout=0.3").rank(_task("s1", "Say hi.", ["a", "b"]))
    assert len(fake_judge.requests) == 2
    # nothing listening: refused at once, clear message
    port = fake_judge.server_port
    fake_judge.shutdown()
    fake_judge.server_close()
    [lab] = L.parse_labeler_spec(f"judge:base_url=http://127.0.0.1:{port}/v1,model=m,retries=1")
    with pytest.raises(UserError, match=f"127.0.0.1:{port}/v1/chat/completions failed .* cannot reach"):
        lab.rank(_task("s2", "Say hi.", ["a", "b"]))


@pytest.mark.parametrize("text,k,tiers", [
    ("[2, 1, 3]", 3, [[1], [0], [2]]),
    ("```json\n[[1, 3], 2]\n```", 3, [[0, 2], [1]]),
    ("Ranking: 2 > 1 > 3", 3, [[1], [0], [2]]),
    ("first [1, 2] hmm, final answer [2, 1]", 2, [[1], [0]]),
    ("[1, 1]", 2, None),
    ("[1, 2]", 3, None),
    ("[true, 2]", 2, None),
    ("", 2, None),
])
def test_parse_judge_ranking(text, k, tiers):
    assert L.parse_judge_ranking(text, k) == tiers
