import json

import pytest

from chatforge.core.io import UserError
from chatforge.core.tokenizer import render_conversation
from chatforge.data import tasks

# A reply that is wrong for each family (checked against a freshly generated prompt).
WRONG = {
    "arithmetic": "1000", "reverse": "banana apple", "sort": "100 200", "count": "zero",
    "caps": "something else", "n_words": "", "json_keys": '{"zzz": 1}', "passage_qa": "a purple unicorn",
}


def test_every_family_is_covered():
    assert set(tasks.suite()) == set(WRONG)


def test_generation_is_deterministic_under_seed():
    for fam in tasks.suite().values():
        a = [it.prompt for it in fam.generate("train", 20, seed=1)]
        b = [it.prompt for it in fam.generate("train", 20, seed=1)]
        c = [it.prompt for it in fam.generate("train", 20, seed=2)]
        assert a == b
        assert a != c
        assert len({p["id"] for p in a}) == 20  # distinct prompts


def test_train_and_heldout_are_disjoint_over_large_n():
    for name, fam in tasks.suite().items():
        train = fam.generate("train", 1500, seed=0)
        heldout = fam.generate("heldout", 150, seed=0)
        train_text = {tasks.normalize_prompt(it.prompt["messages"][0]["content"]) for it in train}
        held_text = {tasks.normalize_prompt(it.prompt["messages"][0]["content"]) for it in heldout}
        assert len(train_text) == 1500 and len(held_text) == 150, name
        assert not train_text & held_text, name
        assert all(it.prompt["meta"]["split"] == "heldout" for it in heldout)
        # a different seed draws other held-out prompts, but still never a train one
        other = {tasks.normalize_prompt(it.prompt["messages"][0]["content"]) for it in fam.generate("train", 300, 7)}
        assert not other & held_text


def test_prompt_shape():
    item = tasks.generate("arithmetic", "train", 1, seed=0)[0]
    p = item.prompt
    assert p["id"] == item.id and p["source"] == "tasks/arithmetic"
    assert p["messages"][0]["role"] == "user" and len(p["messages"]) == 1
    assert p["meta"] == {"family": "arithmetic", "split": "train", "reference": item.reference}
    json.dumps(p)  # plain JSON-serializable data


def test_reference_scores_one_and_wrong_scores_zero_for_every_family():
    for name, fam in tasks.suite().items():
        for it in fam.generate("heldout", 30, seed=3):
            assert tasks.check(it, it.reference) == 1.0, (name, it.prompt, it.reference)
            assert tasks.format_ok(it.prompt, it.reference), (name, it.reference)
            assert tasks.check(it, WRONG[name]) == 0.0, (name, it.prompt)


def test_checker_parses_the_prompt_text_without_meta():
    bare = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "What is 23 + 58?"}]}
    assert tasks.check_conversation(bare, "81") == 1.0
    assert tasks.check_conversation("What is 23 + 58?", "80") == 0.0
    assert tasks.reference_of(bare) == "81"
    assert tasks.check_conversation({"messages": [{"role": "user", "content": "Tell me a joke."}]}, "no") is None
    with pytest.raises(UserError, match="not a task-suite prompt"):
        tasks.check("Tell me a joke.", "no")


@pytest.mark.parametrize("reply,score", [
    ("81", 1.0), ("81.", 1.0), ("The answer is 81", 1.0), ("23 + 58 = 81", 1.0), (" 81\n", 1.0),
    ("80", 0.0), ("81 or maybe 82", 0.0), ("eighty-one", 0.0), ("", 0.0),
])
def test_arithmetic_hand_cases(reply, score):
    assert tasks.check("What is 23 + 58?", reply) == score


def test_subtraction_and_negative_parsing():
    assert tasks.check("What is 58 - 23?", "35") == 1.0
    assert tasks.check("What is 58 - 23?", "-35") == 0.0


@pytest.mark.parametrize("prompt,reply,score", [
    ("Sort these numbers: 7 2 9 4", "2 4 7 9", 1.0),
    ("Sort these numbers: 7 2 9 4", "Sorted: 2, 4, 7, 9.", 1.0),
    ("Sort these numbers: 7 2 9 4", "7 2 9 4", 0.5),
    ("Sort these numbers: 7 2 9 4", "2 4 7", 0.0),
    ("Reverse the words: cat dog sun", "sun dog cat", 1.0),
    ("Reverse the words: cat dog sun", "Sun dog cat.", 1.0),
    ("Reverse the words: cat dog sun", "cat dog sun", 0.5),
    ("Reverse the words: cat dog sun", "sun dog", 0.0),
    ("How many words are in: red blue green?", "3", 1.0),
    ("How many words are in: red blue green?", "There are three words.", 1.0),
    ("How many words are in: red blue green?", "4", 0.0),
    ("Say in all caps: hello world", "HELLO WORLD", 1.0),
    ("Say in all caps: hello world", "HELLO WORLD!", 1.0),
    ("Say in all caps: hello world", "hello world", 0.5),
    ("Say in all caps: hello world", "HELLO THERE", 0.0),
    ("Write exactly 3 words about cats.", "Cats are fluffy.", 1.0),
    ("Write exactly 3 words about cats.", "Cats purr.", 0.5),
    ("Write exactly 3 words about cats.", "Cats are very soft animals.", 0.0),
    ("Give a JSON object with keys name and age.", '{"name": "Bo", "age": 3}', 1.0),
    ("Give a JSON object with keys name and age.", '```json\n{"age": 1, "name": "x"}\n```', 1.0),
    ("Give a JSON object with keys name and age.", '{"name": "Bo"}', 0.25),
    ("Give a JSON object with keys name and age.", '{"name": "Bo", age: 3}', 0.0),
    ("Give a JSON object with keys name and age.", "[1, 2]", 0.0),
    ("Tom has a red ball. Mia has a blue kite. What does Mia have?", "a blue kite", 1.0),
    ("Tom has a red ball. Mia has a blue kite. What does Mia have?", "Mia has the Blue Kite.", 1.0),
    ("Tom has a red ball. Mia has a blue kite. What does Mia have?", "a red kite", 0.5),
    ("Tom has a red ball. Mia has a blue kite. What does Mia have?", "a red ball", 0.0),
    ("Tom has a red ball. Mia has a blue kite. What does Mia have?", "a blue kite or a red ball", 0.0),
])
def test_family_hand_cases(prompt, reply, score):
    assert tasks.check(prompt, reply) == score


def test_format_ok():
    assert tasks.format_ok("What is 2 + 2?", "4")
    assert not tasks.format_ok("What is 2 + 2?", "four is what you get when you add two and two")
    assert not tasks.format_ok("What is 2 + 2?", "")
    assert not tasks.format_ok("Say in all caps: hi there", "hi there")
    assert tasks.format_ok("Give a JSON object with keys name and age.", '{"name": "x", "age": 1}')
    assert not tasks.format_ok("Give a JSON object with keys name and age.", 'Sure: {"name": "x", "age": 1}')
    assert not tasks.format_ok("Sort these numbers: 3 1 2", "1 2")
    # non-suite prompts: only sanity (non-empty, no garbage, no stutter)
    assert tasks.format_ok("Tell me a joke.", "Why did the chicken cross the road?")
    assert not tasks.format_ok("Tell me a joke.", "ha ha ha ha ha")
    assert not tasks.format_ok("Tell me a joke.", "bad \x00 bytes")


def test_demonstrations_render(tiny_tokenizer):
    demos = tasks.demonstrations(3, seed=0)
    assert len(demos) == 3 * len(tasks.suite())
    for conv in demos:
        assert [m["role"] for m in conv["messages"]] == ["user", "assistant"]
        assert tasks.check(conv, conv["messages"][-1]["content"]) == 1.0
        ids, mask = render_conversation(tiny_tokenizer, conv["messages"])
        assert len(ids) == len(mask) and 0 < sum(mask) < len(mask)


def test_prompt_helpers_and_accuracy():
    train = tasks.train_prompts(5, seed=0, families=["sort", "caps"])
    held = tasks.heldout_prompts(5, seed=0, families=["sort", "caps"])
    assert len(train) == len(held) == 10
    assert not {p["id"] for p in train} & {p["id"] for p in held}
    replies = [p["meta"]["reference"] if i % 2 == 0 else "nope" for i, p in enumerate(held)]
    acc = tasks.accuracy(held + [{"messages": [{"role": "user", "content": "hi"}]}], replies + ["hello"])
    assert acc["sort"][1] == 5 and acc["caps"][1] == 5
    assert acc["all"] == (0.5, 10)


def test_errors_are_clear():
    with pytest.raises(UserError, match="valid: arithmetic, reverse"):
        tasks.suite(["arithmetic", "poetry"])
    with pytest.raises(UserError, match="unknown split"):
        tasks.generate("sort", "test", 1)
    with pytest.raises(UserError, match="distinct heldout prompts"):
        tasks.generate("n_words", "heldout", 5000)
