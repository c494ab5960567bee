"""Record validation (every bad case names file:line and the field), readers/writers, pairs, aggregation."""

import gzip
import json
import math
import random

import pytest

from chatforge.core.io import DataError, UserError
from chatforge.data.aggregate import aggregate, bradley_terry_strengths, pairwise_agreement
from chatforge.data.formats import (
    Comparison,
    Conversation,
    RankingTask,
    assign_split,
    comparison_pairs,
    read_comparisons,
    read_conversations,
    read_prompts,
    read_tasks,
    stable_id,
    write_jsonl_records,
)

U = {"role": "user", "content": "What is 2 + 2?"}
A = {"role": "assistant", "content": "4"}


def conv(**kw):
    return {"id": "c1", "messages": [U, A], "source": "test", "meta": {}, **kw}


def task(**kw):
    d = {
        "task_id": "t1",
        "prompt": {"messages": [U]},
        "responses": [{"response_id": "a", "content": "4", "policy": "run-1", "params": {"temperature": 1.0}},
                      {"response_id": "b", "content": "5", "policy": "run-1", "params": {}},
                      {"response_id": "c", "content": "", "policy": "run-1", "params": {}}],
    }
    d.update(kw)
    return d


def cmp(ranking=None, **kw):
    return task(ranking=ranking if ranking is not None else [["a"], ["b", "c"]], **kw)


def write_lines(path, objs):
    path.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return path


def expect_error(tmp_path, reader, bad, needle, good=None):
    """Line 1 is valid, line 2 is `bad`: the error must name file:2 and contain `needle`."""
    path = write_lines(tmp_path / "data.jsonl", [good, bad])
    with pytest.raises(DataError) as e:
        reader(path)
    assert f"{path}:2:" in str(e.value)
    assert needle in str(e.value)
    return str(e.value)


# ----------------------------------------------------------------------------- conversations


def test_conversation_round_trip_and_derived_id(tmp_path):
    c = Conversation.from_dict(conv())
    assert Conversation.from_dict(c.to_dict()) == c
    no_id = Conversation.from_dict({"messages": [U, A]})
    assert no_id.id == Conversation.from_dict({"messages": [U, A]}).id and len(no_id.id) == 16
    assert no_id.source == "" and no_id.meta == {}
    parts = Conversation.from_dict({"messages": [U, {"role": "assistant", "content": [
        {"type": "text", "text": "fo"}, {"type": "text", "text": "ur"}]}]})
    assert parts.messages[1].content == "four"


@pytest.mark.parametrize("bad,needle", [
    (conv(messages=[U, {"role": "bot", "content": "hi"}]), "messages[1].role' is 'bot'"),
    (conv(messages=[U, {"role": "assistant", "content": "  "}]), "messages[1].content' is empty"),
    (conv(messages=[U, {"role": "assistant"}]), "missing field 'messages[1].content'"),
    ({"id": "x"}, "missing field 'messages'"),
    (conv(messages=[]), "'messages' is empty"),
    (conv(messages="hello"), "'messages' must be list"),
    (conv(messages=[U]), "no assistant turn"),
    (conv(messages=[U, A, {"role": "system", "content": "late"}]), "system message may only be the first"),
    (conv(messages=[U, {"role": "assistant", "content": 3}]), "messages[1].content' must be a string"),
    (conv(meta=[1]), "'meta' must be dict"),
    ([1, 2], "expected a JSON object"),
])
def test_bad_conversations_name_file_line_and_field(tmp_path, bad, needle):
    expect_error(tmp_path, read_conversations, bad, needle, good=conv())


def test_require_assistant_is_a_flag(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [conv(messages=[U])])
    assert read_conversations(path, require_assistant=False)[0].messages[0].role == "user"


def test_malformed_json_names_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps(conv()) + "\n{oops\n")
    with pytest.raises(DataError, match=r"x\.jsonl:2: malformed JSON"):
        read_conversations(path)


# ----------------------------------------------------------------------------- prompts


def test_read_prompts_accepts_every_prompt_shape(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [
        "Tell me a joke.",
        {"prompt": "What is 2 + 2?"},
        {"prompt": [{"role": "system", "content": "Be brief."}, U]},
        {"id": "p4", "messages": [U, A, {"role": "user", "content": "And 3 + 3?"}]},
    ])
    prompts = read_prompts(path)
    assert [p.messages[-1].role for p in prompts] == ["user"] * 4
    assert prompts[0].messages[0].content == "Tell me a joke."
    assert prompts[2].messages[0].role == "system" and prompts[3].id == "p4"
    assert prompts[0].id == read_prompts(path)[0].id  # derived ids are stable


def test_prompt_must_end_with_user(tmp_path):
    expect_error(tmp_path, read_prompts, conv(), "last message must be from the user", good="hi")
    path = write_lines(tmp_path / "sft.jsonl", [conv()])
    assert [m.role for m in read_prompts(path, strip_assistant=True)[0].messages] == ["user"]


# ----------------------------------------------------------------------------- tasks and comparisons


def test_task_and_comparison_round_trip(tmp_path):
    t = RankingTask.from_dict(task())
    assert RankingTask.from_dict(t.to_dict()) == t
    assert t.responses[2].content == ""  # an empty reply is a legal (bad) reply to rank last
    c = Comparison.from_dict(cmp(ratings={"a": 7, "b": 2}, flags={"b": ["wrong"]}, labeler="ann",
                                 created_at="2025-01-01T00:00:00Z"))
    assert Comparison.from_dict(c.to_dict()) == c
    assert c.rank_of() == {"a": 0, "b": 1, "c": 1} and c.best_ids() == ["a"]
    assert c.task().to_dict() == t.to_dict()
    # the comparison file is also a valid task file (ranking ignored) and a prompt-string is accepted
    path = write_lines(tmp_path / "c.jsonl", [c.to_dict(), cmp(prompt="What is 2 + 2?")])
    assert [x.task_id for x in read_tasks(path)] == ["t1", "t1"]
    assert read_comparisons(path)[1].prompt == c.prompt


@pytest.mark.parametrize("bad,needle", [
    (task(responses=[]), "'responses' is empty"),
    (task(responses=task()["responses"][:1]), "K=1"),
    (task(responses=[task()["responses"][0]] * 2), "responses[1].response_id': duplicate id 'a'"),
    (task(prompt={"messages": [U, A]}), "last message must be from the user"),
    ({k: v for k, v in task().items() if k != "task_id"}, "missing field 'task_id'"),
    (task(responses=[{"content": "x"}, {"response_id": "b", "content": "y"}]), "missing field 'responses[0].response_id'"),
])
def test_bad_tasks(tmp_path, bad, needle):
    expect_error(tmp_path, read_tasks, bad, needle, good=task())


@pytest.mark.parametrize("bad,needle", [
    (cmp([["a"], ["b"], ["z"]]), "unknown response id 'z'"),
    (cmp([["a"], ["b", "a"], ["c"]]), "names response id 'a' twice"),
    (cmp([["a"], ["b"]]), "must rank every response; missing c"),
    (cmp([["a"], [], ["b", "c"]]), "'ranking[1]' is an empty group"),
    ({k: v for k, v in cmp().items() if k != "ranking"}, "missing field 'ranking'"),
    (cmp(ratings={"a": 8}), "'ratings.a' is 8"),
    (cmp(ratings={"a": 0}), "'ratings.a' is 0"),
    (cmp(ratings={"a": 3.5}), "'ratings.a' is 3.5"),
    (cmp(ratings={"a": True}), "'ratings.a' is True"),
    (cmp(ratings={"q": 3}), "'ratings' names unknown response id 'q'"),
    (cmp(flags={"a": "rude"}), "'flags.a' must be a list of strings"),
    (cmp(responses=task()["responses"][:1], ranking=[["a"]]), "K=1"),
])
def test_bad_comparisons(tmp_path, bad, needle):
    expect_error(tmp_path, read_comparisons, bad, needle, good=cmp())


def test_comparison_pairs_skip_ties():
    c = Comparison.from_dict(cmp([["a"], ["b", "c"]]))
    assert comparison_pairs(c) == [("a", "b"), ("a", "c")]
    k4 = Comparison.from_dict(task(responses=[{"response_id": r, "content": r} for r in "wxyz"],
                                   ranking=[["x"], ["z"], ["w"], ["y"]]))
    pairs = comparison_pairs(k4)
    assert len(pairs) == 6 and ("x", "y") in pairs and ("y", "x") not in pairs
    assert comparison_pairs(Comparison.from_dict(cmp([["a", "b", "c"]]))) == []
    assert Comparison.from_dict(cmp(["a", "b", "c"])).ranking == [["a"], ["b"], ["c"]]  # bare ids


def test_stable_id_and_split():
    assert stable_id("a", "b") == stable_id("a", "b") != stable_id("ab")
    assert len(stable_id(1)) == 16
    splits = [assign_split(f"prompt {i}") for i in range(2000)]
    assert 0.17 < splits.count("test") / len(splits) < 0.23
    assert assign_split("x") == assign_split("x")


def test_write_jsonl_records_gz_is_atomic_and_deterministic(tmp_path):
    recs = [Conversation.from_dict(conv(id=str(i))) for i in range(3)]
    out = tmp_path / "o.jsonl.gz"
    assert write_jsonl_records(out, recs) == 3
    first = out.read_bytes()
    write_jsonl_records(out, recs)
    assert out.read_bytes() == first  # gzip mtime 0
    assert [json.loads(line)["id"] for line in gzip.open(out, "rt")] == ["0", "1", "2"]
    assert read_conversations(out) == recs

    def boom():
        yield recs[0].to_dict()
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_jsonl_records(out, boom())
    assert out.read_bytes() == first and list(tmp_path.iterdir()) == [out]  # no half-written file


# ----------------------------------------------------------------------------- aggregation

IDS = "abcde"  # true order: a best ... e worst


def labeled(task_id, ranking, labeler, ids=IDS):
    return Comparison.from_dict({
        "task_id": task_id, "prompt": {"messages": [U]},
        "responses": [{"response_id": r, "content": f"reply {r}"} for r in ids],
        "ranking": ranking, "labeler": labeler, "created_at": f"2025-01-0{len(labeler)}",
    })


def noisy_labels(task_id="t"):
    # Three labelers, each wrong somewhere, never on the same pair.
    return [labeled(task_id, [["b"], ["a"], ["c"], ["d"], ["e"]], "ann"),
            labeled(task_id, [["a"], ["b"], ["d"], ["c"], ["e"]], "bob"),
            labeled(task_id, [["a"], ["b"], ["c"], ["e", "d"]], "cy")]


@pytest.mark.parametrize("method", ["bradley_terry", "ranked_pairs", "borda"])
def test_aggregate_recovers_consensus_from_noisy_labelers(method):
    out = aggregate(noisy_labels(), method)
    assert len(out) == 1
    c = out[0]
    assert c.ranking == [["a"], ["b"], ["c"], ["d"], ["e"]]
    assert c.labeler == f"aggregate:{method}" and c.meta["labelers"] == ["ann", "bob", "cy"]
    assert c.created_at == "2025-01-03"
    assert Comparison.from_dict(c.to_dict()) == c  # valid record


@pytest.mark.parametrize("method", ["bradley_terry", "ranked_pairs", "borda"])
def test_aggregate_simulated_labelers_beat_single_labeler(method):
    """30 tasks, 3 labelers who each swap adjacent items with p=0.25: the consensus errs far less."""
    truth = {(a, b) for i, a in enumerate(IDS) for b in IDS[i + 1:]}

    def wrong_pairs(c):  # of the 10 true pairs, how many the ranking reverses or ties
        return len(truth - set(comparison_pairs(c)))

    rng = random.Random(0)
    comps = []
    for t in range(30):
        for who in ("ann", "bob", "cy"):
            order = list(IDS)
            for i in range(len(order) - 1):
                if rng.random() < 0.25:
                    order[i], order[i + 1] = order[i + 1], order[i]
            comps.append(labeled(f"t{t}", [[x] for x in order], who))
    consensus = aggregate(comps, method)
    assert len(consensus) == 30
    single = sum(map(wrong_pairs, comps)) / len(comps)
    agreed = sum(map(wrong_pairs, consensus)) / len(consensus)
    assert single > 0.8 and agreed < 0.55 * single


def test_aggregate_ties_single_labeler_and_errors():
    split = [labeled("t", [["a"], ["b"], ["c", "d", "e"]], "ann", ),
             labeled("t", [["b"], ["a"], ["c", "d", "e"]], "bob")]
    for method in ("bradley_terry", "ranked_pairs", "borda"):
        assert aggregate(split, method)[0].ranking == [["a", "b"], ["c", "d", "e"]]
    one = labeled("u", [["c"], ["a", "b"], ["d"], ["e"]], "ann")
    assert aggregate([one])[0].ranking == one.ranking
    with pytest.raises(UserError, match="unknown aggregation method"):
        aggregate(split, "majority")
    other = labeled("t", [["a"], ["b"]], "cy", ids="ab")
    with pytest.raises(UserError, match="different response sets"):
        aggregate([*split, other])


def test_bradley_terry_strengths_are_finite_and_ordered():
    # a beats b 3-0, b beats c 2-1: a perfect record still gives a finite strength (prior).
    wins = [[0, 3, 0], [0, 0, 2], [0, 1, 0]]
    s = bradley_terry_strengths(wins)
    assert all(math.isfinite(x) for x in s) and s[0] > s[1] > s[2]


def test_pairwise_agreement_hand_example():
    t1 = [labeled("t1", [["a"], ["b"], ["c"], ["d"], ["e"]], "ann"),
          labeled("t1", [["a"], ["c"], ["b"], ["d"], ["e"]], "bob")]  # disagree on (b, c) only: 9/10
    t2 = [labeled("t2", [["a", "b"], ["c"], ["d"], ["e"]], "ann"),
          labeled("t2", [["b"], ["a"], ["e"], ["d"], ["c"]], "bob")]
    # t2: (a,b) tied for ann -> excluded; of the other 9 pairs they agree on (a,c) (a,d) (a,e) (b,c)
    # (b,d) (b,e) and disagree on (c,d) (c,e) (d,e): 6/9.
    solo = [labeled("t3", [["e"], ["d"], ["c"], ["b"], ["a"]], "cy")]  # one labeler: ignored
    assert pairwise_agreement(t1) == pytest.approx(9 / 10)
    assert pairwise_agreement(t1 + t2 + solo) == pytest.approx((9 + 6) / (10 + 9))
    assert math.isnan(pairwise_agreement(solo))
