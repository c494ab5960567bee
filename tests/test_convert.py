"""Importers/exporters on real excerpts (tests/fixtures/chatdata), round trips, and the embedded data."""

import copy
import gzip
import json
from pathlib import Path

import pytest

from chatforge.core.io import DataError, UserError
from chatforge.data.convert import (
    FORMATS,
    comparison_to_hh_pairs,
    convert,
    detect_format,
    format_hh,
    hh_pair_to_comparison,
    load_comparisons,
    load_conversations,
    oasst_tree_to_comparisons,
    oasst_tree_to_conversations,
    parse_hh,
)
from chatforge.data.formats import (
    Message,
    comparison_pairs,
    read_comparisons,
    read_conversations,
)

FIX = Path(__file__).parent / "fixtures" / "chatdata"
HH = FIX / "hh_test_excerpt.jsonl.gz"
OASST = FIX / "oasst_en100_excerpt.jsonl"
SELF_INSTRUCT = FIX / "self_instruct_seed_excerpt.jsonl"
OPENAI = FIX / "openai_chat.jsonl"
TRL_CONV = FIX / "trl_conversational.jsonl"
TRL_PC = FIX / "trl_prompt_completion.jsonl"
TRL_PREF = FIX / "trl_preference.jsonl"


def lines(path):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(x) for x in f if x.strip()]


def roles(conv):
    return [m.role for m in conv.messages]


# ----------------------------------------------------------------------------- detection


@pytest.mark.parametrize("path,fmt", [
    (HH, "hh"), (OASST, "oasst"), (SELF_INSTRUCT, "self-instruct"), (OPENAI, "openai"),
    (TRL_CONV, "openai"), (TRL_PC, "trl-pc"), (TRL_PREF, "trl-pref"),
])
def test_detect_format(path, fmt):
    assert detect_format(lines(path)[0]) == fmt


def test_detect_format_rejects_unknown_records(tmp_path):
    assert detect_format({"id": "x", "messages": []}) == "chatforge"
    with pytest.raises(DataError, match=r"f\.jsonl:1: cannot detect the format \(foo\)"):
        detect_format({"foo": 1}, (tmp_path / "f.jsonl", 1))


# ----------------------------------------------------------------------------- Anthropic HH


def test_hh_to_comparisons(tmp_path):
    rep = convert(HH, "comparison", tmp_path / "c.jsonl")
    assert (rep.from_format, rep.read, rep.written) == ("hh", 11, 10)
    assert rep.skipped == {"identical chosen and rejected": 1}  # helpful-base line 722
    cmps = read_comparisons(tmp_path / "c.jsonl")
    raw = [r for r in lines(HH) if r["chosen"] != r["rejected"]]
    for c, r in zip(cmps, raw, strict=True):
        assert len(c.responses) == 2 and c.prompt[-1].role == "user"
        best, worst = c.ranking[0][0], c.ranking[1][0]
        assert r["chosen"].endswith(c.response(best).content) and r["rejected"].endswith(c.response(worst).content)
    first = cmps[0]
    assert first.prompt == [Message("user", "How do I float on my back in the water?")]
    assert first.response(first.ranking[0][0]).content.startswith("You should tuck your arms")
    assert first.response(first.ranking[1][0]).content == "You want me to tell you the answer to a physics question?"
    solar = next(c for c in cmps if c.prompt[0].content == "How much do solar panels cost?")
    # two Assistant turns in a row in the chosen reply: kept verbatim in the response
    assert solar.response(solar.ranking[0][0]).content.startswith("Umm. Just a second...\n\nAssistant: A solar")
    temp = next(c for c in cmps if c.prompt[0].content.startswith("Why did the temperature"))
    assert temp.response(temp.ranking[1][0]).content == ""  # empty rejected reply (line 741)


def test_hh_dialogues_to_conversations(tmp_path):
    convs, rep = load_conversations(HH)
    assert (rep.read, len(convs)) == (11, 10)
    assert rep.skipped == {"HH dialogue without a non-empty Assistant turn": 1}  # harmless line 517
    solar = next(c for c in convs if c.messages[0].content == "How much do solar panels cost?")
    assert roles(solar) == ["user", "assistant"]  # consecutive Assistant turns merged
    assert solar.messages[1].content == ("Umm. Just a second...\n\nA solar panel should cost about $50 to $80, "
                                         "depending on the size and quality.")
    sc = next(c for c in convs if "Starcraft" in c.messages[0].content)
    assert sc.messages[1].content.startswith("Human: I")  # "Human:" not after a blank line is text
    for c in convs:
        assert roles(c)[0] == "user" and roles(c)[-1] == "assistant"
        assert all(a != b for a, b in zip(roles(c), roles(c)[1:], strict=False))  # alternating
    rejected, _ = load_conversations(HH, field="rejected")
    assert rejected[0].messages[-1].content != convs[0].messages[-1].content


def test_hh_string_round_trip():
    for r in lines(HH):
        for text in (r["chosen"], r["rejected"]):
            try:
                msgs = parse_hh(text)
            except DataError:
                continue
            assert parse_hh(format_hh(msgs)) == msgs
    clean = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Bye\n\nAssistant: Goodbye."
    assert format_hh(parse_hh(clean)) == clean
    sys_msgs = [Message("system", "Be kind."), Message("user", "Hi"), Message("assistant", "Hello")]
    assert format_hh(sys_msgs) == "Be kind.\n\nHuman: Hi\n\nAssistant: Hello"
    assert parse_hh(format_hh(sys_msgs)) == sys_msgs
    assert parse_hh("Human: a\n\nAssistant: b") == [Message("user", "a"), Message("assistant", "b")]
    assert parse_hh("\n\nHuman: I said Humans: are\nAssistant: ok")[0].content == "I said Humans: are\nAssistant: ok"
    with pytest.raises(DataError, match="no 'Human:'/'Assistant:' turns"):
        parse_hh("just text")


def test_hh_pairs_round_trip_through_comparisons(tmp_path):
    convert(HH, "comparison", tmp_path / "c.jsonl")
    rep = convert(tmp_path / "c.jsonl", "hh", tmp_path / "back.jsonl")
    assert rep.written == 10
    original = [r for r in lines(HH) if r["chosen"] != r["rejected"]]
    assert lines(tmp_path / "back.jsonl") == original  # byte-identical dialogues
    # hh -> hh directly keeps pairs, too
    assert convert(HH, "hh", tmp_path / "again.jsonl").written == 10


def test_hh_pair_needs_shared_human_turn():
    with pytest.raises(DataError, match="share no dialogue"):
        hh_pair_to_comparison("\n\nHuman: a\n\nAssistant: b", "\n\nHuman: c\n\nAssistant: d", ("f.jsonl", 3))


# ----------------------------------------------------------------------------- OpenAI / TRL


def test_openai_import_and_round_trip(tmp_path):
    convs, rep = load_conversations(OPENAI)
    assert rep.from_format == "openai" and len(convs) == 3
    assert roles(convs[0]) == ["system", "user", "assistant"] and convs[0].source == "openai"
    assert convs[1].messages[0] == Message("system", "Answer briefly.")  # developer -> system
    assert convs[1].messages[-1].content == "Then a cold front probably moved in."  # text parts joined
    convert(OPENAI, "chatforge", tmp_path / "c.jsonl")
    convert(tmp_path / "c.jsonl", "openai", tmp_path / "o.jsonl")
    assert lines(tmp_path / "o.jsonl")[0] == lines(OPENAI)[0]
    back, _ = load_conversations(tmp_path / "o.jsonl")
    assert back == read_conversations(tmp_path / "c.jsonl")  # ids derive from content: stable


def test_trl_conversational_and_prompt_completion(tmp_path):
    convs, rep = load_conversations(TRL_CONV, "trl")
    assert rep.from_format == "trl" and [len(c.messages) for c in convs] == [2, 5]
    pcs, rep = load_conversations(TRL_PC)
    assert rep.from_format == "trl-pc" and len(pcs) == 3
    assert pcs[0].messages == [Message("user", "The sky is"), Message("assistant", " blue.")]
    assert roles(pcs[2]) == ["system", "user", "assistant"]
    convert(TRL_PC, "trl-pc", tmp_path / "pc.jsonl")
    out = lines(tmp_path / "pc.jsonl")
    assert out[1:] == lines(TRL_PC)[1:]  # conversational records come back unchanged
    assert out[0] == {"prompt": [{"role": "user", "content": "The sky is"}],
                      "completion": [{"role": "assistant", "content": " blue."}]}
    rep = convert(TRL_CONV, "trl-pc", tmp_path / "pc2.jsonl")
    assert rep.written == 2 and lines(tmp_path / "pc2.jsonl")[1]["completion"] == [
        {"role": "assistant", "content": "Yes."}]


def test_trl_preference_import(tmp_path):
    cmps, rep = load_comparisons(TRL_PREF)
    assert rep.from_format == "trl-pref" and len(cmps) == 5
    best = [c.response(c.ranking[0][0]).content for c in cmps]
    worst = [c.response(c.ranking[1][0]).content for c in cmps]
    prompts = [c.prompt[-1].content for c in cmps]
    assert best[0] == " blue." and worst[0] == " green." and prompts[0] == "The sky is"  # explicit string
    assert best[1] == "Nope. Sorry."  # explicit conversational
    assert prompts[2] == "Why did the temperature drop 30 degrees today" and worst[2] == "I don't know."  # implicit
    assert (prompts[3], best[3], worst[3]) == ("The sky is", " blue.", " green.")  # implicit string (TRL rule)
    assert prompts[4] == "How much do solar panels cost?" and worst[4] == "I can't say."  # mixed
    assert cmps[0].task_id == cmps[3].task_id  # same content, same id


def test_comparisons_to_trl_pairs_count_and_round_trip(tmp_path):
    rep = convert(OASST, "comparison", tmp_path / "c.jsonl")
    cmps = read_comparisons(tmp_path / "c.jsonl")
    implied = sum(len(comparison_pairs(c)) for c in cmps)
    assert implied == 3 + 6 + 3  # K = 3, 4, 3 with no ties
    assert convert(tmp_path / "c.jsonl", "trl-pref", tmp_path / "pairs.jsonl").written == implied
    assert convert(OASST, "trl-pref", tmp_path / "pairs2.jsonl").written == implied
    hh_pairs = [p for c in cmps for p in comparison_to_hh_pairs(c)]
    assert len(hh_pairs) == implied and hh_pairs[0]["chosen"].startswith("\n\nHuman: ")
    # TRL pairs -> comparisons -> TRL pairs is the identity on conversational pairs
    convert(TRL_PREF, "comparison", tmp_path / "tc.jsonl")
    convert(tmp_path / "tc.jsonl", "trl-pref", tmp_path / "tp.jsonl")
    assert lines(tmp_path / "tp.jsonl")[1] == lines(TRL_PREF)[1]
    assert rep.written == 3


# ----------------------------------------------------------------------------- OpenAssistant


def test_oasst_all_best_and_synthetic_filter(tmp_path):
    trees = lines(OASST)
    assert trees[0]["prompt"]["synthetic"] is True
    all_convs, rep = load_conversations(OASST, mode="all")
    best, _ = load_conversations(OASST, mode="best")
    with_synth, _ = load_conversations(OASST, mode="all", include_synthetic="true")
    assert (rep.read, len(all_convs), len(best), len(with_synth)) == (3, 9, 2, 11)
    assert all(c.meta["message_tree_id"] != trees[0]["message_tree_id"] for c in all_convs)
    for c in all_convs:
        assert roles(c)[-1] == "assistant"
        assert roles(c) == ["user", "assistant"] * (len(c.messages) // 2)
    assert len({c.id for c in all_convs}) == len(all_convs)
    root = trees[1]["prompt"]
    rank0 = next(r for r in root["replies"] if r["rank"] == 0)
    assert best[0].messages == [Message("user", root["text"].strip()), Message("assistant", rank0["text"].strip())]
    assert max(len(c.messages) for c in all_convs) == 4


def test_oasst_best_skips_synthetic_and_deleted_replies():
    tree = copy.deepcopy(lines(OASST)[1])
    replies = sorted(tree["prompt"]["replies"], key=lambda r: r["rank"])
    replies[0]["synthetic"] = True
    replies[1]["deleted"] = True
    best = oasst_tree_to_conversations(tree, "best")
    assert best[0].messages[1].content == replies[2]["text"].strip()
    assert len(oasst_tree_to_conversations(tree, "all")) == len(replies) - 2
    with pytest.raises(UserError, match="mode must be"):
        oasst_tree_to_conversations(tree, "worst")


def test_oasst_comparisons_ranks_ties_and_unranked():
    tree = copy.deepcopy(lines(OASST)[2])
    cmps = oasst_tree_to_comparisons(tree)
    assert [len(c.responses) for c in cmps] == [4, 3]
    root = cmps[0]
    by_rank = sorted(tree["prompt"]["replies"], key=lambda r: r["rank"])
    assert root.ranking == [[r["message_id"]] for r in by_rank]
    assert all(r.policy == "human" for r in root.responses)
    assert len(cmps[1].prompt) == 3 and cmps[1].prompt[-1].role == "user"
    by_rank[1]["rank"] = by_rank[2]["rank"]  # a tie
    by_rank[3]["rank"] = None  # unranked: left out
    tied = oasst_tree_to_comparisons(tree)[0]
    assert tied.ranking == [[by_rank[0]["message_id"]], [by_rank[1]["message_id"], by_rank[2]["message_id"]]]
    assert len(comparison_pairs(tied)) == 2
    assert oasst_tree_to_comparisons(lines(OASST)[0]) == []  # synthetic tree
    assert len(oasst_tree_to_comparisons(lines(OASST)[0], include_synthetic=True)[0].responses) == 2


# ----------------------------------------------------------------------------- self-instruct


def test_self_instruct(tmp_path):
    convs, rep = load_conversations(SELF_INSTRUCT)
    assert rep.from_format == "self-instruct" and len(convs) == 6
    assert convs[0].id == "seed_task_0" and roles(convs[0]) == ["user", "assistant"]
    assert convs[0].messages[0].content.startswith("Is there anything I can eat for a breakfast")
    assert convs[1].messages[0].content == "What is the relation between the given pairs?\n\nNight : Day :: Right : Left"
    assert convs[1].messages[1].content == "The relation between the given pairs is that they are opposites."
    assert convs[1].meta["name"] == "antonym_relation"


# ----------------------------------------------------------------------------- convert() behaviour


def test_comparisons_to_demonstrations(tmp_path):
    convert(TRL_PREF, "comparison", tmp_path / "c.jsonl")
    rep = convert(tmp_path / "c.jsonl", "chatforge", tmp_path / "demo.jsonl")
    demos = read_conversations(tmp_path / "demo.jsonl")
    assert rep.written == 5 and demos[1].messages[-1] == Message("assistant", "Nope. Sorry.")


def test_unsupported_directions_and_options(tmp_path):
    with pytest.raises(UserError, match="cannot convert openai to trl-pref"):
        convert(OPENAI, "trl-pref", tmp_path / "x.jsonl")
    with pytest.raises(UserError, match="unknown target format 'alpaca'"):
        convert(OPENAI, "alpaca", tmp_path / "x.jsonl")
    with pytest.raises(UserError, match="unknown convert option"):
        convert(OPENAI, "chatforge", tmp_path / "x.jsonl", colour="red")
    with pytest.raises(UserError, match="holds conversations, not comparisons"):
        load_comparisons(OPENAI)
    assert not (tmp_path / "x.jsonl").exists()
    assert set(FORMATS) == {"chatforge", "comparison", "openai", "trl", "trl-pc", "trl-pref", "hh", "oasst",
                            "self-instruct"}


def test_bad_line_names_file_and_line_and_writes_nothing(tmp_path):
    src = tmp_path / "in.jsonl"
    good = lines(OPENAI)[0]
    src.write_text(json.dumps(good) + "\n" + json.dumps({"messages": [{"role": "tool", "content": "x"}]}) + "\n")
    out = tmp_path / "out.jsonl"
    with pytest.raises(DataError, match=r"in\.jsonl:2: field 'messages\[0\]\.role' is 'tool'"):
        convert(src, "chatforge", out)
    assert not out.exists()
    rep = convert(src, "chatforge", out, on_error="skip")
    assert (rep.read, rep.written, rep.skipped["invalid record"]) == (2, 1, 1)
    assert "skipped 1 (invalid record)" in rep.summary()


def test_gz_output_and_explicit_format(tmp_path):
    rep = convert(HH, "trl-pref", tmp_path / "p.jsonl.gz", from_format="hh", source="hh-helpful")
    assert rep.written == 10 and len(lines(tmp_path / "p.jsonl.gz")) == 10
    cmps, _ = load_comparisons(HH, source="hh-helpful")
    assert {c.source for c in cmps} == {"hh-helpful"}


# ----------------------------------------------------------------------------- embedded data


def test_embedded_data_is_listed_valid_and_split():
    from chatforge.data.embedded import embedded_path, list_embedded

    names = list_embedded()
    expected = {"sft/oasst-best": 95, "sft/oasst-all": 547, "sft/hh-chosen": 2000, "sft/self-instruct": 175}
    for name, n in expected.items():
        assert names[name]
        convs = read_conversations(embedded_path(name))
        assert len(convs) == n and all(c.messages[-1].role == "assistant" for c in convs)
    hh = read_comparisons(embedded_path("embedded:prefs/hh"))
    assert len(hh) == 4664 and {c.source for c in hh} == {"hh-helpful", "hh-harmless"}
    test_frac = sum(c.meta["split"] == "test" for c in hh) / len(hh)
    assert 0.17 < test_frac < 0.23
    oasst = read_comparisons(embedded_path("prefs/oasst"))
    assert len(oasst) == 207 and sum(len(comparison_pairs(c)) for c in oasst) == 732
    sft_prompts = {c.messages[0].content for c in read_conversations(embedded_path("sft/hh-chosen"))}
    held_out = {c.prompt[0].content for c in hh if c.meta["split"] == "test"}
    assert not sft_prompts & held_out  # SFT never sees the preference test prompts
    with pytest.raises(UserError, match="no embedded data named 'sft/nope'"):
        embedded_path("sft/nope")
