"""`data prepare`: readers, cleaning, quality filters, dedup, split, shards, report, atomicity."""

import gzip
import json
import random
from pathlib import Path

import numpy as np
import pytest

from chatforge.core.io import DataError, UserError
from chatforge.data.corpus import PrepareConfig, default_corpus_paths, format_report, prepare
from chatforge.data.corpus_clean import (
    FILTER_NAMES,
    DedupConfig,
    Deduper,
    QualityFilters,
    clean_text,
    dedup_key,
    quality_failure,
)
from chatforge.data.corpus_read import iter_documents, list_inputs
from chatforge.data.shards import load_meta, open_index, open_split, split_tokens

WORDS = (
    "apple river mountain quiet garden yellow window bright forest little happy sudden morning "
    "silver basket candle orange pepper rabbit turtle dragon castle pocket rocket ladder meadow "
    "thunder whisper puzzle button cookie blanket friend kitten puppy flower summer winter autumn "
    "spring ocean island harbor bridge tower market school teacher doctor farmer baker sailor "
    "painter singer dancer runner jumper sleepy hungry clever gentle brave proud shy curious"
).split()


def make_doc(seed: int, n_words: int = 80) -> str:
    """A distinct, clean, prose-like document (passes every default quality filter)."""
    rng = random.Random(seed)
    words = [rng.choice(WORDS) for _ in range(n_words)]
    sentences = [" ".join(words[i: i + 8]).capitalize() + "." for i in range(0, n_words, 8)]
    return " ".join(sentences)


def tok_dir(tok) -> Path:
    return Path(tok.name_or_path)


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: t}) + "\n" for t in texts), encoding="utf-8")
    return path


def run(inputs, out, tok, **kw) -> dict:
    kw.setdefault("progress", False)
    return prepare([Path(p) for p in inputs], out, PrepareConfig(**kw), tokenizer=tok_dir(tok))


def read_texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


def no_leftovers(out: Path) -> bool:
    return not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


# ----------------------------------------------------------------------------- dedup


def test_exact_and_near_duplicates_removed_distinct_kept(tmp_path, tiny_tokenizer):
    distinct = [make_doc(i, 300) for i in range(12)]
    exact = "  " + distinct[0].upper().replace(" ", "   \n", 3) + "\n"  # case/whitespace differ only
    words = distinct[1].split()
    words[100:103] = ["zebra", "quantum", "violin"]  # three words changed in 300
    near = " ".join(words)
    docs = distinct[:6] + [exact] + distinct[6:] + [near]
    rep = run([write_jsonl(tmp_path / "d.jsonl", docs)], tmp_path / "out", tiny_tokenizer)
    assert rep["exact_duplicates"] == 1
    assert rep["near_duplicates"] == 1
    assert rep["documents_kept"] == 12
    kept = read_texts(tmp_path / "out/text/train.jsonl") + read_texts(tmp_path / "out/text/val.jsonl")
    assert sorted(kept) == sorted(distinct)


def test_deduper_keeps_half_overlapping_documents():
    d = Deduper(DedupConfig())
    a = make_doc(1, 200)
    half = " ".join(a.split()[:100] + make_doc(2, 100).split())  # Jaccard about 1/3
    assert d.check(a, dedup_key(a)) is None
    assert d.check(half, dedup_key(half)) is None
    assert d.check(a, dedup_key(a)) == "exact_duplicate"
    assert d.inserted == 2
    off = Deduper(DedupConfig(exact=False, near=False))
    assert off.check(a, dedup_key(a)) is None and off.check(a, dedup_key(a)) is None


# ----------------------------------------------------------------------------- quality filters


def _lines(seed: int, n: int, words: int = 6) -> list[str]:
    return [" ".join(make_doc(seed * 100 + i, words).split()) for i in range(n)]


BAD_DOCS = {
    "min_words": "Far too short.",
    "max_words": make_doc(3, 120),  # checked with max_words=100 below
    "mean_word_length": " ".join(random.Random(0).choice(["a", "I", "ox", "be", "go"]) for _ in range(60)),
    "symbol_ratio": " ".join(f"#{w}" if i % 4 == 0 else w for i, w in enumerate(make_doc(4, 60).split())),
    "bullet_lines": "\n".join(f"- {line}" for line in _lines(5, 10)),
    "ellipsis_lines": "\n".join(line + (" ..." if i < 4 else "") for i, line in enumerate(_lines(6, 10, 10))),
    "alpha_words": " ".join(str(1000 + i) if i % 3 == 0 else w for i, w in enumerate(make_doc(7, 60).split())),
    "duplicate_lines": "\n".join(_lines(8, 6) + _lines(8, 4)),
    "top_ngram": " ".join(w + (" big dog" if i % 3 == 0 else "") for i, w in enumerate(make_doc(9, 60).split())),
    "duplicate_ngrams": " ".join(p for p in _lines(10, 12, 6) for _ in range(2)),
}


@pytest.mark.parametrize("name", FILTER_NAMES)
def test_each_quality_filter_drops_its_bad_document(name):
    f = QualityFilters(max_words=100) if name == "max_words" else QualityFilters()
    assert quality_failure(BAD_DOCS[name], f) == name
    assert quality_failure(make_doc(11, 90), f) is None
    assert quality_failure(BAD_DOCS[name], QualityFilters(enabled=False)) is None


def test_short_dialogue_is_kept():
    # Statistical filters need >= stats_min_words words; short, repetitive speech is normal text.
    assert quality_failure("MENENIUS:\nBe calm, be calm, good sirs.", QualityFilters()) is None
    assert quality_failure("All:\nSpeak, speak.", QualityFilters()) == "min_words"


def test_filter_counts_in_report(tmp_path, tiny_tokenizer):
    docs = [BAD_DOCS[n] for n in FILTER_NAMES if n != "max_words"] + [make_doc(i, 90) for i in range(5)]
    rep = run([write_jsonl(tmp_path / "d.jsonl", docs)], tmp_path / "out", tiny_tokenizer)
    for n in FILTER_NAMES:
        assert rep["dropped"][n] == (0 if n == "max_words" else 1), n
    assert rep["documents_kept"] == 5


# ----------------------------------------------------------------------------- cleaning


def test_clean_text():
    assert clean_text("cafe\u0301") == "caf\u00e9"  # NFC composes
    assert clean_text("\ufb01ne") == "\ufb01ne"  # NFC keeps the ligature ...
    assert clean_text("\ufb01ne", "NFKC") == "fine"  # ... NFKC folds it
    assert clean_text("a\x00b\x07c\u0085d\ufeff\te") == "abcd\te"
    assert clean_text("\n\n  one  \r\ntwo\r\n\r\n\r\n\r\nthree   \n\n") == "  one\ntwo\n\nthree"


# ----------------------------------------------------------------------------- inputs


def test_every_input_kind_is_read(tmp_path, tiny_tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    docs = [make_doc(i) for i in range(14)]
    (d / "a.txt").write_text(f"{docs[0]}\n\n\n{docs[1]}\n   \n{docs[2]}\n", encoding="utf-8")
    (d / "b.txt").write_text(f"{docs[3]}\n\n{docs[4]}<|endoftext|>\n{docs[5]}\n<|endoftext|>\n", encoding="utf-8")
    write_jsonl(d / "c.jsonl", docs[6:8])
    with gzip.open(d / "sub" / "d.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": docs[8]}) + "\n\n" + json.dumps({"text": docs[9], "id": 2}) + "\n")
    with gzip.open(d / "sub" / "e.txt.gz", "wt", encoding="utf-8") as f:
        f.write(docs[10])
    pq.write_table(pa.table({"text": docs[11:14], "n": [1, 2, 3]}), d / "sub" / "f.parquet", row_group_size=2)
    (d / "README.md").write_text("not corpus")
    (d / ".hidden.txt").write_text("hidden")

    files = list_inputs([d])
    assert [p.name for p in files] == ["a.txt", "b.txt", "c.jsonl", "d.jsonl.gz", "e.txt.gz", "f.parquet"]
    assert [len(list(iter_documents(p))) for p in files] == [3, 2, 2, 2, 1, 3]  # b.txt: <|endoftext|> wins
    rep = run([d], tmp_path / "out", tiny_tokenizer)
    assert rep["documents_read"] == 13 and rep["documents_kept"] == 13
    assert [i["documents"] for i in rep["inputs"]] == [3, 2, 2, 2, 1, 3]
    assert all(len(i["sha256"]) == 64 for i in rep["inputs"])


def test_custom_text_field_and_separator(tmp_path):
    p = write_jsonl(tmp_path / "c.jsonl", ["one doc", "two doc"], field="content")
    assert list(iter_documents(p, text_field="content")) == ["one doc", "two doc"]
    t = tmp_path / "s.txt"
    t.write_text("a b\n===\nc d\n\ne f", encoding="utf-8")
    assert list(iter_documents(t, txt_separator="\n===\n")) == ["a b", "c d\n\ne f"]


def test_inputs_listed_once_and_output_inside_input_dir_is_skipped(tmp_path, tiny_tokenizer):
    d = tmp_path / "corpus"
    d.mkdir()
    write_jsonl(d / "a.jsonl", [make_doc(i) for i in range(4)])
    assert list_inputs([d, d / "a.jsonl"]) == [d / "a.jsonl"]
    out = d / "prepared"
    first = run([d], out, tiny_tokenizer)
    again = run([d], out, tiny_tokenizer)  # must not read prepared/text/*.jsonl as input
    assert first["documents_read"] == again["documents_read"] == 4
    assert [i["path"] for i in again["inputs"]] == [str(d / "a.jsonl")]


def test_embedded_corpus_is_packaged():
    paths = default_corpus_paths()
    assert [p.name for p in paths] == ["tinyshakespeare.txt.gz", "tinystories_val_prefix.txt.gz"]
    first = next(iter_documents(paths[0]))
    assert first.startswith("First Citizen:\nBefore we proceed any further")
    assert (paths[0].parent / "SOURCES.md").is_file()


def _bad(tmp_path: Path, kind: str) -> tuple[Path, str]:
    p = tmp_path / {"missing": "nope.jsonl", "empty": "e.txt", "nul": "n.txt", "utf8": "u.jsonl",
                    "json": "m.jsonl", "field": "f.jsonl", "parquet": "p.parquet", "gz": "z.txt.gz"}[kind]
    good = json.dumps({"text": make_doc(1)})
    if kind == "empty":
        p.write_bytes(b"")
    elif kind == "nul":
        p.write_bytes(make_doc(1).encode() + b"\nline two\nbad \x00\x01 line\n")
    elif kind == "utf8":
        p.write_bytes((good + "\n").encode() + b'{"text": "caf\xe9"}\n')
    elif kind == "json":
        p.write_text(f"{good}\n{good}\n{{\"text\": oops}}\n", encoding="utf-8")
    elif kind == "field":
        p.write_text(f"{good}\n{json.dumps({'body': 'x'})}\n", encoding="utf-8")
    elif kind == "gz":
        p.write_bytes(b"plain text, not gzip\n")
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"body": ["x"]}), p)
    expected = {"missing": "file not found", "empty": "empty file", "nul": f"{p}:3: binary",
                "utf8": f"{p}:2: not UTF-8", "json": f"{p}:3: malformed JSON",
                "field": f"{p}:2: missing text field 'text'", "parquet": "missing text column 'text'",
                "gz": "corrupt or truncated gzip"}[kind]
    return p, expected


@pytest.mark.parametrize("kind", ["missing", "empty", "nul", "utf8", "json", "field", "parquet", "gz"])
def test_bad_input_raises_data_error_and_leaves_nothing(tmp_path, tiny_tokenizer, kind):
    p, expected = _bad(tmp_path, kind)
    good = write_jsonl(tmp_path / "good.jsonl", [make_doc(i) for i in range(3)])
    out = tmp_path / "out"
    with pytest.raises(DataError) as e:
        run([good, p], out, tiny_tokenizer)
    assert expected in str(e.value)
    assert str(p) in str(e.value)
    assert no_leftovers(out)


def test_all_dropped_is_an_error_and_refuses_foreign_dir(tmp_path, tiny_tokenizer):
    p = write_jsonl(tmp_path / "d.jsonl", ["too short", "also short"])
    with pytest.raises(UserError, match="all 2 documents were dropped"):
        run([p], tmp_path / "out", tiny_tokenizer)
    assert no_leftovers(tmp_path / "out")
    with pytest.raises(UserError, match="tokenizer directory not found"):
        prepare([p], tmp_path / "out", PrepareConfig(progress=False), tokenizer=tmp_path / "no-tok")
    assert no_leftovers(tmp_path / "out")
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(UserError, match="refusing"):
        run([write_jsonl(tmp_path / "g.jsonl", [make_doc(1)])], foreign, tiny_tokenizer)
    assert (foreign / "precious.txt").read_text() == "keep me"


# ----------------------------------------------------------------------------- split and shards


def test_split_is_deterministic_across_runs_and_chunking(tmp_path, tiny_tokenizer):
    docs = [make_doc(i, 40) for i in range(60)]
    a, b = write_jsonl(tmp_path / "a.jsonl", docs[:25]), write_jsonl(tmp_path / "b.jsonl", docs[25:])
    r1 = run([a, b], tmp_path / "o1", tiny_tokenizer, val_fraction=0.2, chunk_docs=1000)
    r2 = run([a, b], tmp_path / "o2", tiny_tokenizer, val_fraction=0.2, chunk_docs=7)
    v1, v2 = read_texts(tmp_path / "o1/text/val.jsonl"), read_texts(tmp_path / "o2/text/val.jsonl")
    assert v1 == v2 and 0 < len(v1) < 60
    assert r1["splits"] == r2["splits"]
    assert (tmp_path / "o1/val/shard-00000.bin").read_bytes() == (tmp_path / "o2/val/shard-00000.bin").read_bytes()
    # Membership depends on the document only, not on what else is in the corpus.
    run([b], tmp_path / "o3", tiny_tokenizer, val_fraction=0.2)
    assert read_texts(tmp_path / "o3/text/val.jsonl") == [t for t in v1 if t in docs[25:]]


def test_worker_processes_give_identical_output(tmp_path, tiny_tokenizer):
    docs = [make_doc(i, 60) for i in range(50)] + [make_doc(3, 60), "short one"]
    src = write_jsonl(tmp_path / "d.jsonl", docs)
    r1 = run([src], tmp_path / "w1", tiny_tokenizer, workers=1, chunk_docs=8, val_fraction=0.2)
    r2 = run([src], tmp_path / "w2", tiny_tokenizer, workers=2, chunk_docs=8, val_fraction=0.2)
    assert r1["dropped"] == r2["dropped"] and r1["splits"] == r2["splits"]
    assert r2["dropped"]["exact_duplicate"] == 1 and r2["dropped"]["min_words"] == 1
    for name in ("text/train.jsonl", "text/val.jsonl", "train/shard-00000.bin"):
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes()


def test_two_documents_give_one_val_document(tmp_path, tiny_tokenizer):
    rep = run([write_jsonl(tmp_path / "d.jsonl", [make_doc(1), make_doc(2)])], tmp_path / "out", tiny_tokenizer)
    assert rep["splits"]["val"]["documents"] == 1 and rep["splits"]["train"]["documents"] == 1
    assert len(read_texts(tmp_path / "out/text/train.jsonl")) == 1


def test_shard_round_trip_and_report_adds_up(tmp_path, tiny_tokenizer):
    docs = [make_doc(i, 30 + i) for i in range(40)]
    docs[3] = docs[3] + " <|end|> <|bos|> are plain text here"
    docs.append("x")  # dropped by min_words
    out = tmp_path / "out"
    rep = run([write_jsonl(tmp_path / "d.jsonl", docs)], out, tiny_tokenizer, val_fraction=0.3, shard_tokens=300)
    meta = load_meta(out)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == len(tiny_tokenizer)
    assert meta["bos_id"] == tiny_tokenizer.bos_token_id and meta["tokenizer"] == "tokenizer"
    assert rep["documents_read"] == rep["documents_kept"] + sum(rep["dropped"].values()) == 41
    assert rep["documents_kept"] == sum(s["documents"] for s in rep["splits"].values()) == 40
    specials = set(tiny_tokenizer.all_special_ids)
    for split in ("train", "val"):
        texts = read_texts(out / "text" / f"{split}.jsonl")
        shards, index = open_split(out, split), open_index(out, split)
        assert rep["splits"][split]["tokens"] == sum(len(s) for s in shards) == meta["splits"][split]["tokens"]
        assert len(texts) == sum(len(i) for i in index) == meta["splits"][split]["documents"]
        decoded = []
        for doc in split_tokens(out, split).documents():
            assert doc[0] == meta["bos_id"] and not specials & set(doc[1:].tolist())
            decoded.append(tiny_tokenizer.decode(doc[1:].tolist()))
        assert decoded == texts
        for shard, idx in zip(shards, index):  # documents never straddle shards
            assert idx[0] == 0 and all(shard[int(o)] == meta["bos_id"] for o in idx)
            assert len(shard) <= 300 or len(idx) == 1
    assert rep["splits"]["train"]["shards"] > 1


def test_split_tokens_global_access(tmp_path, tiny_tokenizer):
    out = tmp_path / "out"
    run([write_jsonl(tmp_path / "d.jsonl", [make_doc(i) for i in range(20)])], out, tiny_tokenizer,
        shard_tokens=200, val_fraction=0.0)
    st = split_tokens(out, "train")
    flat = np.concatenate([np.asarray(s) for s in open_split(out, "train")])
    assert len(st) == len(flat) and len(st.shards) > 2 and st.num_documents() == 20
    b = int(st.starts[1])
    assert np.array_equal(st[b - 5: b + 400], flat[b - 5: b + 400])  # crosses two shard boundaries
    assert st[b] == flat[b] and st[-1] == flat[-1] and len(st[5:5]) == 0
    assert open_split(out, "val") == []
    with pytest.raises(IndexError):
        st[len(st)]


def test_rerun_replaces_output_and_report_table(tmp_path, tiny_tokenizer):
    out = tmp_path / "out"
    p = write_jsonl(tmp_path / "d.jsonl", [make_doc(i) for i in range(6)])
    run([p], out, tiny_tokenizer)
    (out / "stale").write_text("old")
    rep = run([p], out, tiny_tokenizer)
    assert not (out / "stale").exists()
    assert json.loads((out / "report.json").read_text())["documents_kept"] == rep["documents_kept"] == 6
    from rich.console import Console

    console = Console(width=120, record=True)
    console.print(format_report(rep))
    assert "documents kept" in console.export_text()


def test_default_run_embedded_corpus_trained_tokenizer(tmp_path):
    """No inputs, no tokenizer: the embedded corpus, mostly kept by the default filters, own BPE."""
    out = tmp_path / "data"
    rep = prepare(None, out, PrepareConfig(vocab_size=300, progress=False))
    assert rep["documents_read"] == 11524  # 7222 Shakespeare blocks + 4302 TinyStories paragraphs
    assert rep["documents_kept"] / rep["documents_read"] > 0.9
    kept_chars = sum(s["chars"] for s in rep["splits"].values())
    assert kept_chars > 0.97 * 1_900_000  # ~1.9M chars of cleaned input text
    meta = load_meta(out)
    assert meta["vocab_size"] == 300 and meta["tokenizer_source"] is None
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert 0.03 < rep["splits"]["val"]["documents"] / rep["documents_kept"] < 0.07
