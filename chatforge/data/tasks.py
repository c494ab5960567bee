"""Verifiable task suite: short prompts with exact checkers, so gains are measured without humans.

Eight families, each small enough that a ~1-7M-parameter model learns it in a few hundred SFT steps:

| family      | prompt                                                    | reference          |
|-------------|-----------------------------------------------------------|--------------------|
| arithmetic  | What is 23 + 58?                                          | 81                 |
| reverse     | Reverse the words: cat dog sun                            | sun dog cat        |
| sort        | Sort these numbers: 7 2 9 4                               | 2 4 7 9            |
| count       | How many words are in: red blue green?                    | 3                  |
| caps        | Say in all caps: hello world                              | HELLO WORLD        |
| n_words     | Write exactly 3 words about cats.                         | Cats are great.    |
| json_keys   | Give a JSON object with keys name and age.                | {"name": "Ann", "age": 7} |
| passage_qa  | Tom has a red ball. Mia has a blue kite. What does Mia have? | a blue kite     |

Every checker works from the prompt *text* alone (a regex per family parses it and recomputes the
answer), so prompts read back from any JSONL file can be scored; `meta.family` only speeds that up.

Scores are in [0, 1]. Partial credit, kept deliberately simple:
- reverse, sort: 0.5 for the right items in the wrong order.
- caps: 0.5 for the right words not in all caps.
- n_words: 0.5 for one word off.
- json_keys: a JSON object with other keys gets 0.5 x (key overlap / key union).
- passage_qa: 0.5 for the right object with a wrong or missing colour.
- arithmetic, count: none (the last number in the reply is the answer: "The answer is 81." is right).

Train and held-out prompts never overlap: a prompt is held out iff sha256(normalized text) mod 10 == 0,
and `generate` draws (deterministically from the seed) until it has n distinct prompts of the split.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from chatforge.core.io import UserError

SPLITS = ("train", "heldout")
HELDOUT_MOD = 10  # one prompt in ten is held out
MAX_MISSES = 50_000  # consecutive draws without a new prompt before generate() gives up

WORDS = (
    "cat dog sun red blue green tree fish bird milk cake door book star moon rain snow hat cup box "
    "pen car bus ship frog duck lamp ring bell sock shoe rock sand leaf king cow pig hen owl bee ant "
    "egg jam pie tea map key fox bat rat bag toy bed boat kite drum coin wolf bear lion"
).split()
TOPICS = (
    "cats dogs trees rivers books birds flowers clouds stars apples cars trains boats horses fish "
    "mountains oceans songs games friends cookies lakes bikes kites shoes hats rabbits frogs bees "
    "owls ducks lions tigers bears wolves foxes cows pigs goats sheep chickens ants spiders snakes "
    "turtles whales sharks dolphins penguins eagles parrots robots planets moons islands forests "
    "gardens farms cities villages bridges castles houses schools teachers doctors farmers pilots "
    "painters dancers singers babies puppies kittens candles lamps clocks phones pencils drums "
    "pianos guitars rainbows storms"
).split()
NAMES = (
    "Tom Mia Sam Ann Ben Eva Max Zoe Leo Ivy Jack Lily Noah Emma Liam Ella Owen Ruby Dan Kim "
    "Tim Amy Joe Sue Ray Kay Bob Liz Ned Pam"
).split()
COLORS = "red blue green yellow black white pink brown orange purple gray".split()
OBJECTS = (
    "ball kite hat cup book box car doll drum bike lamp fish bag pen coat sock shoe bell cake boat "
    "rope key map ring toy fan jar mug vase clock"
).split()
JSON_VALUES: dict[str, Any] = {
    "name": "Ann", "age": 7, "city": "Paris", "color": "red", "pet": "dog", "food": "rice", "year": 2020,
    "size": "big", "day": "Monday", "job": "cook", "score": 9, "country": "Peru", "sport": "golf",
    "fruit": "apple", "price": 5, "team": "blue", "count": 3, "month": "May", "drink": "tea", "toy": "ball",
}
NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve".split())}
N_WORDS_TEMPLATES = ("Write exactly {n} words about {t}.", "Reply with exactly {n} words about {t}.",
                     "Use exactly {n} words to describe {t}.", "Say exactly {n} words about {t}.")
N_WORDS_REFERENCES = {1: "{T}.", 2: "{T} rule.", 3: "{T} are great.", 4: "I really like {t}.",
                      5: "{T} make me very happy.", 6: "I think {t} are really nice."}


# ----------------------------------------------------------------------------- shared helpers

def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def normalize_prompt(text: str) -> str:
    return " ".join(text.lower().split())


def split_of(text: str) -> str:
    """'heldout' for one prompt in HELDOUT_MOD (by hash of the normalized text), else 'train'."""
    return "heldout" if int(_sha(normalize_prompt(text))[:12], 16) % HELDOUT_MOD == 0 else "train"


def _ints(text: str) -> list[int]:
    # "-" counts as a sign only when not glued to a preceding digit ("23-5" is 23 and 5).
    return [int(x) for x in re.findall(r"(?<!\d)-?\d+", text)]


def _numbers_with_words(text: str) -> list[int]:
    out = []
    for tok in re.findall(r"-?\d+|[A-Za-z]+", text):
        if re.fullmatch(r"-?\d+", tok):
            out.append(int(tok))
        elif tok.lower() in NUMBER_WORDS:
            out.append(NUMBER_WORDS[tok.lower()])
    return out


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z0-9]+(?:['’-][A-Za-z0-9]+)*", text)


def _tail(reply: str) -> str:
    """The part after the last colon: 'Sorted: 2 4 7 9' -> ' 2 4 7 9'."""
    return reply.rsplit(":", 1)[-1]


def sane(reply: str, max_chars: int = 400) -> bool:
    """Well-formed text: non-empty, not too long, no control/replacement chars, no stutter, no specials."""
    s = reply.strip()
    if not s or len(s) > max_chars or "\ufffd" in s or "<|" in s:
        return False
    if any(ord(c) < 32 and c not in "\n\t" for c in s):
        return False
    words = s.lower().split()
    return not any(words[i] == words[i + 1] == words[i + 2] == words[i + 3] for i in range(len(words) - 3))


def _short(reply: str, max_words: int) -> bool:
    return sane(reply) and "\n" not in reply.strip() and len(reply.split()) <= max_words


# ----------------------------------------------------------------------------- families

def _arith_sample(rng: random.Random) -> str:
    op, a, b = rng.choice("+-"), rng.randint(0, 99), rng.randint(0, 99)
    if op == "-" and b > a:  # keep answers non-negative: tiny models learn faster
        a, b = b, a
    return f"What is {a} {op} {b}?"


def _arith_solve(m: re.Match[str]) -> str | None:
    a, b = int(m[1]), int(m[3])
    return str(a + b if m[2] == "+" else a - b)


def _last_number_score(m: re.Match[str], reply: str, solve: Callable, with_words: bool = False) -> float:
    nums = _numbers_with_words(reply) if with_words else _ints(reply)
    return float(bool(nums) and str(nums[-1]) == solve(m))


def _has_number_shape(m: re.Match[str], reply: str) -> bool:
    return _short(reply, 6) and bool(_numbers_with_words(reply))


def _reverse_sample(rng: random.Random) -> str:
    return "Reverse the words: " + " ".join(rng.sample(WORDS, rng.randint(3, 5)))


def _list_score(got: list, want: list) -> float:
    if got == want:
        return 1.0
    return 0.5 if sorted(got) == sorted(want) else 0.0


def _reverse_score(m: re.Match[str], reply: str) -> float:
    return _list_score([w.lower() for w in _words(_tail(reply))], m[1].split()[::-1])


def _reverse_shape(m: re.Match[str], reply: str) -> bool:
    return _short(reply, 12) and len(_words(_tail(reply))) == len(m[1].split())


def _sort_sample(rng: random.Random) -> str:
    return "Sort these numbers: " + " ".join(str(x) for x in rng.sample(range(100), rng.randint(3, 5)))


def _sort_solve(m: re.Match[str]) -> str | None:
    return " ".join(str(x) for x in sorted(int(x) for x in m[1].split()))


def _sort_score(m: re.Match[str], reply: str) -> float:
    return _list_score(_ints(_tail(reply)), sorted(int(x) for x in m[1].split()))


def _sort_shape(m: re.Match[str], reply: str) -> bool:
    tail = _tail(reply).strip().rstrip(".")
    return _short(reply, 12) and bool(re.fullmatch(r"-?\d+(?:[ ,]+-?\d+)*", tail)) and \
        len(_ints(tail)) == len(m[1].split())


def _count_sample(rng: random.Random) -> str:
    return "How many words are in: " + " ".join(rng.sample(WORDS, rng.randint(2, 7))) + "?"


def _count_solve(m: re.Match[str]) -> str | None:
    return str(len(m[1].split()))


def _caps_sample(rng: random.Random) -> str:
    return "Say in all caps: " + " ".join(rng.sample(WORDS, rng.randint(2, 4)))


def _caps_score(m: re.Match[str], reply: str) -> float:
    got, want = _words(reply), m[1].upper().split()
    if got == want:
        return 1.0
    return 0.5 if [w.upper() for w in got] == want else 0.0


def _caps_shape(m: re.Match[str], reply: str) -> bool:
    return _short(reply, 12) and bool(_words(reply)) and reply.upper() == reply


def _n_words_sample(rng: random.Random) -> str:
    return rng.choice(N_WORDS_TEMPLATES).format(n=rng.randint(2, 6), t=rng.choice(TOPICS))


def _n_words_solve(m: re.Match[str]) -> str | None:
    n, t = int(m[1]), m[2]
    if not 1 <= n <= 20:
        return None
    template = N_WORDS_REFERENCES.get(n) or " ".join(["{T}", "are"] + ["really"] * (n - 3) + ["nice."])
    return template.format(t=t, T=t.capitalize())


def _n_words_score(m: re.Match[str], reply: str) -> float:
    diff = abs(len(_words(reply)) - int(m[1]))
    return 1.0 if diff == 0 else 0.5 if diff == 1 else 0.0


def _n_words_shape(m: re.Match[str], reply: str) -> bool:
    return _short(reply, 2 * int(m[1]) + 4) and bool(re.search(r"[A-Za-z]", reply))


def _json_sample(rng: random.Random) -> str:
    keys = rng.sample(sorted(JSON_VALUES), rng.randint(2, 3))
    listed = " and ".join(keys) if len(keys) == 2 else f"{keys[0]}, {keys[1]} and {keys[2]}"
    return f"Give a JSON object with keys {listed}."


def _json_keys(m: re.Match[str]) -> list[str]:
    return [k for k in re.split(r", | and ", m[1])]


def _json_solve(m: re.Match[str]) -> str | None:
    keys = _json_keys(m)
    if len(set(keys)) != len(keys):
        return None
    return json.dumps({k: JSON_VALUES.get(k, "x") for k in keys})


def _json_object(reply: str) -> dict | None:
    s = reply.strip()
    start, end = s.find("{"), s.rfind("}")
    if start < 0 or end < start:
        return None
    try:
        obj = json.loads(s[start:end + 1])
    except json.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def _json_score(m: re.Match[str], reply: str) -> float:
    obj = _json_object(reply)
    if obj is None:
        return 0.0
    got, want = set(obj), set(_json_keys(m))
    return 1.0 if got == want else 0.5 * len(got & want) / len(got | want)


def _json_shape(m: re.Match[str], reply: str) -> bool:
    s = reply.strip()
    return sane(reply) and s.startswith("{") and s.endswith("}") and _json_object(s) is not None


def _with_article(color: str, obj: str) -> str:
    return f"{'an' if color[0] in 'aeiou' else 'a'} {color} {obj}"


def _qa_sample(rng: random.Random) -> str:
    people = rng.sample(NAMES, rng.randint(2, 3))
    objects = rng.sample(OBJECTS, len(people))
    passage = " ".join(f"{p} has {_with_article(rng.choice(COLORS), o)}." for p, o in zip(people, objects))
    return f"{passage} What does {rng.choice(people)} have?"


_HAS = re.compile(r"([A-Z][a-z]+) has (an? [a-z]+ [a-z]+)\.")


def _qa_items(m: re.Match[str]) -> tuple[str | None, list[str]]:
    owned = _HAS.findall(m[1])
    answer = next((item for who, item in owned if who == m[2]), None)
    return answer, [item for who, item in owned if item != answer]


def _qa_solve(m: re.Match[str]) -> str | None:
    return _qa_items(m)[0]


def normalize_answer(text: str) -> str:
    """SQuAD-style: lowercase, drop punctuation and articles, collapse spaces."""
    words = re.sub(r"[^a-z0-9 ]", " ", text.lower()).split()
    return " ".join(w for w in words if w not in ("a", "an", "the"))


def _contains(text: str, phrase: str) -> bool:
    return f" {phrase} " in f" {text} "


def _qa_score(m: re.Match[str], reply: str) -> float:
    answer, others = _qa_items(m)
    got, want = normalize_answer(reply), normalize_answer(answer or "")
    if any(_contains(got, normalize_answer(o)) for o in others):
        return 0.0  # naming a distractor (or hedging between items) is wrong
    if _contains(got, want):
        return 1.0
    other_nouns = {o.split()[-1] for o in others}
    noun = want.split()[-1]
    return 0.5 if _contains(got, noun) and not any(_contains(got, n) for n in other_nouns) else 0.0


def _qa_shape(m: re.Match[str], reply: str) -> bool:
    return _short(reply, 8) and bool(re.fullmatch(r"[A-Za-z ,.'!]+", reply.strip()))


# ----------------------------------------------------------------------------- the Family record

@dataclass
class TaskItem:
    """One generated prompt: `prompt` is a chatforge conversation dict ending with the user turn."""

    id: str
    family: str
    prompt: dict
    reference: str


@dataclass(frozen=True)
class Family:
    """A task family: how to draw a prompt, parse it back, solve it, and score a reply."""

    name: str
    pattern: re.Pattern[str]
    sample: Callable[[random.Random], str]
    solve: Callable[[re.Match[str]], str | None]
    score: Callable[[re.Match[str], str], float]
    shape: Callable[[re.Match[str], str], bool]

    def parse(self, text: str) -> re.Match[str] | None:
        """The prompt's regex match if `text` is a well-formed prompt of this family."""
        m = self.pattern.fullmatch(text.strip())
        return m if m is not None and self.solve(m) is not None else None

    def reference(self, text: str) -> str:
        m = self.parse(text)
        if m is None:
            raise UserError(f"not a {self.name} prompt: {text!r}")
        return self.solve(m)  # type: ignore[return-value]

    def check(self, text: str, reply: str) -> float:
        """Correctness of `reply` in [0, 1]."""
        m = self.parse(text)
        if m is None:
            raise UserError(f"not a {self.name} prompt: {text!r}")
        return float(self.score(m, reply))

    def format_ok(self, text: str, reply: str) -> bool:
        m = self.parse(text)
        return m is not None and bool(self.shape(m, reply))

    def item(self, text: str) -> TaskItem:
        ref = self.reference(text)
        item_id = f"{self.name}-{_sha(normalize_prompt(text))[:12]}"
        prompt = {
            "id": item_id,
            "messages": [{"role": "user", "content": text}],
            "source": f"tasks/{self.name}",
            "meta": {"family": self.name, "split": split_of(text), "reference": ref},
        }
        return TaskItem(id=item_id, family=self.name, prompt=prompt, reference=ref)

    def generate(self, split: str, n: int, seed: int = 0) -> list[TaskItem]:
        """n distinct prompts of `split`, deterministic given `seed`."""
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
        rng = random.Random(f"chatforge-tasks|{self.name}|{seed}")
        items: list[TaskItem] = []
        seen: set[str] = set()
        misses = 0  # draws since the last new prompt; many in a row means the split is exhausted
        while len(items) < n and misses < MAX_MISSES:
            text = self.sample(rng)
            if text in seen or split_of(text) != split:
                misses += 1
                continue
            misses = 0
            seen.add(text)
            items.append(self.item(text))
        if len(items) < n:
            raise UserError(f"task family {self.name} has only about {len(items)} distinct {split} prompts; "
                            f"asked for {n}")
        return items


FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("arithmetic", re.compile(r"What is (\d{1,2}) ([+-]) (\d{1,2})\?"), _arith_sample, _arith_solve,
           lambda m, r: _last_number_score(m, r, _arith_solve), _has_number_shape),
    Family("reverse", re.compile(r"Reverse the words: ([a-z]+(?: [a-z]+)*)"), _reverse_sample,
           lambda m: " ".join(m[1].split()[::-1]), _reverse_score, _reverse_shape),
    Family("sort", re.compile(r"Sort these numbers: (\d+(?: \d+)*)"), _sort_sample, _sort_solve,
           _sort_score, _sort_shape),
    Family("count", re.compile(r"How many words are in: ([a-z]+(?: [a-z]+)*)\?"), _count_sample, _count_solve,
           lambda m, r: _last_number_score(m, r, _count_solve, with_words=True), _has_number_shape),
    Family("caps", re.compile(r"Say in all caps: ([a-z]+(?: [a-z]+)*)"), _caps_sample,
           lambda m: m[1].upper(), _caps_score, _caps_shape),
    Family("n_words",
           re.compile(r"(?:Write|Reply with|Use|Say) exactly (\d+) words (?:about|to describe) ([a-z]+)\."),
           _n_words_sample, _n_words_solve, _n_words_score, _n_words_shape),
    Family("json_keys", re.compile(r"Give a JSON object with keys ([a-z]+(?:, [a-z]+)* and [a-z]+)\."),
           _json_sample, _json_solve, _json_score, _json_shape),
    Family("passage_qa",
           re.compile(r"((?:[A-Z][a-z]+ has an? [a-z]+ [a-z]+\. ){1,4})What does ([A-Z][a-z]+) have\?"),
           _qa_sample, _qa_solve, _qa_score, _qa_shape),
]}


# ----------------------------------------------------------------------------- public API

def suite(families: Iterable[str] | None = None) -> dict[str, Family]:
    """The task families by name (all, or the named ones in the given order)."""
    if families is None:
        return dict(FAMILIES)
    names = list(families)
    unknown = [f for f in names if f not in FAMILIES]
    if unknown:
        raise UserError(f"unknown task family {unknown[0]!r}; valid: {', '.join(FAMILIES)}")
    return {f: FAMILIES[f] for f in names}


def generate(family: str, split: str, n: int, seed: int = 0) -> list[TaskItem]:
    return suite([family])[family].generate(split, n, seed)


def _prompts(split: str, n_per_family: int, seed: int, families: Iterable[str] | None) -> list[dict]:
    return [it.prompt for fam in suite(families).values() for it in fam.generate(split, n_per_family, seed)]


def train_prompts(n_per_family: int, seed: int = 0, families: Iterable[str] | None = None) -> list[dict]:
    """Prompt dicts (conversations ending with the user turn) from the train split, family by family."""
    return _prompts("train", n_per_family, seed, families)


def heldout_prompts(n_per_family: int, seed: int = 0, families: Iterable[str] | None = None) -> list[dict]:
    """Prompt dicts from the held-out split (never overlapping any train prompt)."""
    return _prompts("heldout", n_per_family, seed, families)


def demonstrations(n_per_family: int, seed: int = 0, split: str = "train",
                   families: Iterable[str] | None = None) -> list[dict]:
    """SFT conversations: each suite prompt followed by its reference as the assistant reply."""
    out = []
    for fam in suite(families).values():
        for it in fam.generate(split, n_per_family, seed):
            conv = json.loads(json.dumps(it.prompt))  # deep copy: callers may mutate
            conv["messages"].append({"role": "assistant", "content": it.reference})
            out.append(conv)
    return out


def prompt_text(prompt: TaskItem | dict | str) -> str | None:
    """The text a checker parses: the last user message of a prompt dict (or the string itself)."""
    if isinstance(prompt, TaskItem):
        prompt = prompt.prompt
    if isinstance(prompt, str):
        return prompt
    messages = prompt.get("messages") or []
    users = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    return users[-1] if users and isinstance(users[-1], str) else None


def find_family(prompt: TaskItem | dict | str) -> Family | None:
    """The suite family of a prompt (trying `meta.family` first, then every family's parser), or None."""
    text = prompt_text(prompt)
    if text is None:
        return None
    meta = prompt.get("meta") if isinstance(prompt, dict) else None
    hinted = meta.get("family") if isinstance(meta, dict) else None
    candidates = ([FAMILIES[hinted]] if hinted in FAMILIES else []) + list(FAMILIES.values())
    return next((f for f in candidates if f.parse(text) is not None), None)


def check_conversation(prompt: TaskItem | dict | str, reply: str) -> float | None:
    """Correctness of `reply` in [0, 1], or None if the prompt is not from the suite."""
    fam = find_family(prompt)
    return None if fam is None else fam.check(prompt_text(prompt) or "", reply)


def check(item_or_prompt: TaskItem | dict | str, reply: str) -> float:
    """Like check_conversation, but a prompt outside the suite is an error."""
    score = check_conversation(item_or_prompt, reply)
    if score is None:
        raise UserError(f"not a task-suite prompt: {prompt_text(item_or_prompt)!r}")
    return score


def format_ok(prompt: TaskItem | dict | str, reply: str) -> bool:
    """Well-formed reply: the family's expected shape for suite prompts, else just `sane` text."""
    fam = find_family(prompt)
    return sane(reply) if fam is None else fam.format_ok(prompt_text(prompt) or "", reply)


def reference_of(prompt: TaskItem | dict | str) -> str | None:
    """`meta.reference` if the prompt carries one, else the suite's answer if it is a suite prompt."""
    meta = prompt.get("meta") if isinstance(prompt, dict) else None
    if isinstance(meta, dict) and isinstance(meta.get("reference"), str):
        return meta["reference"]
    fam = find_family(prompt)
    return None if fam is None else fam.reference(prompt_text(prompt) or "")


def accuracy(prompts: Sequence[TaskItem | dict | str],
             replies: Sequence[str]) -> dict[str, tuple[float, int]]:
    """Mean score and count per family (plus 'all'); prompts outside the suite are skipped."""
    if len(prompts) != len(replies):
        raise ValueError(f"{len(prompts)} prompts but {len(replies)} replies")
    scores: dict[str, list[float]] = {}
    for p, r in zip(prompts, replies):
        fam = find_family(p)
        if fam is not None:
            scores.setdefault(fam.name, []).append(fam.check(prompt_text(p) or "", r))
    out = {name: (sum(v) / len(v), len(v)) for name, v in scores.items()}
    every = [s for v in scores.values() for s in v]
    if every:
        out["all"] = (sum(every) / len(every), len(every))
    return out
