"""`chatforge data prepare`: ingest a corpus, clean, filter, dedup, split, tokenize into shards.

    chatforge data prepare corpus/ extra.jsonl --out data/       # train a 4096-token BPE on the result
    chatforge data prepare --out data/ --tokenizer runs/sft/model # embedded corpus, existing tokenizer

Pipeline (streaming; memory is bounded except for the dedup state, ~1 KB per kept document):

1. read     .txt (split on <|endoftext|> if present, else blank lines), .jsonl, .parquet, .gz, dirs
2. clean    Unicode NFC (or NFKC), control characters out, line ends tidied   (corpus_clean.py)
3. filter   Gopher quality heuristics, thresholds in `QualityFilters`          (corpus_clean.py)
4. dedup    exact (sha1 of normalized text), then MinHash LSH near-dups        (corpus_clean.py)
5. split    val iff hash(seed, normalized text) < val_fraction: stable across runs and chunking
6. write    OUT/text/{train,val}.jsonl, train or load the tokenizer, then token shards  (shards.py)

Everything is built in a temp dir beside OUT and renamed into place at the end, so a failure
leaves nothing at OUT. The returned report is also written to OUT/report.json.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import itertools
import json
import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from chatforge.core.io import UserError, atomic_dir, sha256_file, sha256_path, write_json
from chatforge.core.log import console, print0
from chatforge.data.corpus_clean import (
    FILTER_NAMES,
    Analyzed,
    DedupConfig,
    Deduper,
    Normalization,
    QualityFilters,
    analyze_chunk,
)
from chatforge.data.corpus_read import iter_documents, list_inputs
from chatforge.data.shards import FORMAT, ShardWriter, token_dtype

__all__ = ["DedupConfig", "PrepareConfig", "QualityFilters", "default_corpus_paths", "format_report", "prepare"]

EMBEDDED_CORPUS = Path(__file__).parent / "embedded" / "corpus"
SPLITS = ("train", "val")
PROGRESS_MIN_BYTES = 8 << 20  # show progress bars only for inputs at least this big
PROGRESS_MIN_DOCS = 20_000
AUTO_WORKERS_MIN_BYTES = 32 << 20  # below this a process pool costs more than it saves
AUTO_WORKERS_MAX = 8


@dataclass
class PrepareConfig:
    """Settings of `chatforge data prepare` (YAML / `--set` keys are these field names)."""

    text_field: str = "text"
    """Field (JSONL) or column (parquet) holding the document text."""
    txt_separator: str | None = None
    """Document separator in .txt files; none = '<|endoftext|>' if the file has it, else blank lines."""
    normalization: Normalization = "NFC"
    """Unicode normalization: NFC (lossless), NFKC (folds compatibility forms, e.g. ligatures), none."""
    filters: QualityFilters = field(default_factory=QualityFilters)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    val_fraction: float = 0.05
    """Share of documents for validation (at least one document when there are two or more)."""
    vocab_size: int = 4096
    """Size of the BPE trained on the kept train text when no tokenizer is given."""
    shard_tokens: int = 10_000_000
    """Tokens per shard file (documents are never split across shards)."""
    seed: int = 0
    """Seed of the train/val split hash (and of the MinHash permutations)."""
    chunk_docs: int = 1000
    """Documents processed (and tokenized) per batch."""
    workers: int = 0
    """Processes for cleaning/filtering/MinHash; 0 = auto (1 below 32 MB of input, else one per core
    minus one, up to 8). The output does not depend on it."""
    tokenizer_train_chars: int = 2_000_000_000
    """Train the tokenizer on at most this many characters of train text (nanochat uses 2B)."""
    progress: bool = True
    """Show progress bars and phase messages."""

    def validate(self) -> None:
        """Collect every problem and raise one UserError."""
        p = self.filters.problems() + self.dedup.problems()
        if not 0.0 <= self.val_fraction < 1.0:
            p.append("val_fraction must be in [0, 1)")
        if self.vocab_size < 263:
            p.append("vocab_size must be >= 263 (256 bytes + special tokens)")
        if self.shard_tokens < 1:
            p.append("shard_tokens must be >= 1")
        if self.workers < 0:
            p.append("workers must be >= 0 (0 = auto)")
        if self.chunk_docs < 1:
            p.append("chunk_docs must be >= 1")
        if self.normalization not in ("NFC", "NFKC", "none"):
            p.append(f"normalization must be NFC, NFKC or none, not {self.normalization!r}")
        if self.txt_separator == "":
            p.append("txt_separator must not be empty (use none for auto)")
        if p:
            raise UserError("invalid data prepare config: " + "; ".join(p))


def default_corpus_paths() -> list[Path]:
    """The embedded corpus shipped in the package (TinyStories prefix + Tiny Shakespeare, gzipped)."""
    paths = sorted(EMBEDDED_CORPUS.glob("*.txt.gz"))
    if not paths:
        raise UserError(f"embedded corpus not found in {EMBEDDED_CORPUS} (broken install?)")
    return paths


# ----------------------------------------------------------------------------- progress


class _Progress:
    """A rich bar over input bytes or documents, or nothing for small or non-terminal runs."""

    def __init__(self, total: int, enabled: bool, unit: str = "bytes", description: str = "reading"):
        self.bar = None
        self.done = 0
        big = total >= (PROGRESS_MIN_BYTES if unit == "bytes" else PROGRESS_MIN_DOCS)
        if enabled and big and console.is_terminal:
            cols = ([DownloadColumn(), TransferSpeedColumn(), TextColumn("{task.fields[docs]:,} docs")]
                    if unit == "bytes" else [MofNCompleteColumn(), TextColumn("docs")])
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), *cols, TimeRemainingColumn(),
                                console=console, transient=True)
            self.task = self.bar.add_task(description, total=total, docs=0)
            self.bar.start()

    def file_bytes(self, pos: int) -> None:
        """Bytes consumed so far in the current input file."""
        if self.bar:
            self.bar.update(self.task, completed=self.done + pos)

    def file_done(self, size: int) -> None:
        self.done += size
        self.file_bytes(0)

    def docs(self, n: int) -> None:
        if self.bar:
            self.bar.update(self.task, docs=n)

    def advance(self, n: int) -> None:
        if self.bar:
            self.bar.advance(self.task, n)

    def stop(self) -> None:
        if self.bar:
            self.bar.stop()


# ----------------------------------------------------------------------------- ingest


@dataclass
class _Stats:
    read: int = 0
    dropped: Counter = field(default_factory=Counter)
    docs: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    chars: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    inputs: list[dict] = field(default_factory=list)
    # The train document whose split hash is smallest (the "most val-like"): moved to val if val is empty.
    min_train: tuple[int, int] | None = None  # (split hash, line index in text/train.jsonl)

    @property
    def kept(self) -> int:
        return sum(self.docs.values())


def split_hash(key: bytes, seed: int) -> int:
    """64-bit hash of a document's dedup key and the seed; the document goes to val iff it is small."""
    return int.from_bytes(hashlib.sha1(seed.to_bytes(8, "little", signed=True) + key).digest()[:8], "little")


def _consume(analyzed: list[Analyzed], cfg: PrepareConfig, deduper: Deduper | None, stats: _Stats,
             out: dict[str, TextIO]) -> None:
    """The stateful part, always in the main process and in input order: dedup, split, write."""
    cut = int(cfg.val_fraction * 2**64)
    lines: dict[str, list[str]] = {s: [] for s in SPLITS}
    for text, reason, key, sig in analyzed:
        if reason is None and deduper is not None:
            reason = deduper.check(text, key, sig)
        if reason is not None:
            stats.dropped[reason] += 1
            continue
        h = split_hash(key, cfg.seed)
        split = "val" if h < cut else "train"
        if split == "train" and (stats.min_train is None or h < stats.min_train[0]):
            stats.min_train = (h, stats.docs["train"])
        stats.docs[split] += 1
        stats.chars[split] += len(text)
        lines[split].append(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    for s in SPLITS:
        out[s].writelines(lines[s])


def _num_workers(cfg: PrepareConfig, total_bytes: int) -> int:
    if cfg.workers > 0:
        return cfg.workers
    if total_bytes < AUTO_WORKERS_MIN_BYTES:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(AUTO_WORKERS_MAX, cores - 1))


def _ingest(files: list[Path], root: Path, cfg: PrepareConfig, bar: _Progress, workers: int) -> _Stats:
    """Stream every input through clean -> filter -> dedup -> split into root/text/{train,val}.jsonl.

    With workers > 1, chunks are analyzed (clean, filter, key, signature) in a process pool with at
    most 2 chunks per worker in flight, so memory stays bounded; results are consumed in input order,
    so the output is identical for any number of workers.
    """
    stats = _Stats()
    seed = cfg.seed + 1  # MinHash permutations
    deduper = Deduper(cfg.dedup, seed=seed) if (cfg.dedup.exact or cfg.dedup.near) else None
    analyze = functools.partial(analyze_chunk, normalization=cfg.normalization, filters=cfg.filters,
                                dedup=cfg.dedup, seed=seed)
    (root / "text").mkdir(parents=True, exist_ok=True)
    outs = {s: open(root / "text" / f"{s}.jsonl", "w", encoding="utf-8") for s in SPLITS}
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) if workers > 1 else None
    pending: collections.deque[Future] = collections.deque()

    def submit(chunk: list[str]) -> None:
        if pool is None:
            _consume(analyze(chunk), cfg, deduper, stats, outs)
            return
        pending.append(pool.submit(analyze, chunk))
        while len(pending) > 2 * workers:
            _consume(pending.popleft().result(), cfg, deduper, stats, outs)

    try:
        for path in files:
            n_file = 0
            chunk: list[str] = []
            for doc in iter_documents(path, cfg.text_field, cfg.txt_separator, bar.file_bytes):
                chunk.append(doc)
                n_file += 1
                if len(chunk) >= cfg.chunk_docs:
                    submit(chunk)
                    chunk = []
                    bar.docs(stats.read + n_file)
            if chunk:
                submit(chunk)
            stats.read += n_file
            size = path.stat().st_size
            bar.file_done(size)
            stats.inputs.append({"path": str(path), "bytes": size, "sha256": sha256_file(path), "documents": n_file})
        while pending:
            _consume(pending.popleft().result(), cfg, deduper, stats, outs)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        for f in outs.values():
            f.close()
    return stats


def _ensure_val(root: Path, stats: _Stats, cfg: PrepareConfig) -> None:
    """With val_fraction > 0 and >= 2 documents, move the most val-like train document to an empty val."""
    if cfg.val_fraction <= 0 or stats.docs["val"] > 0 or stats.docs["train"] < 2 or stats.min_train is None:
        return
    index = stats.min_train[1]
    train_path, val_path = root / "text" / "train.jsonl", root / "text" / "val.jsonl"
    tmp = train_path.with_suffix(".tmp")
    with open(train_path, encoding="utf-8") as src, open(tmp, "w", encoding="utf-8") as dst, \
            open(val_path, "w", encoding="utf-8") as val:
        for i, line in enumerate(src):
            (val if i == index else dst).write(line)
            if i == index:
                n = len(json.loads(line)["text"])
                stats.chars["train"] -= n
                stats.chars["val"] += n
    tmp.replace(train_path)
    stats.docs["train"] -= 1
    stats.docs["val"] += 1


# ----------------------------------------------------------------------------- tokenize


def _iter_texts(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]


def _capped(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    total = 0
    for t in texts:
        if total >= max_chars:
            return
        total += len(t)
        yield t


def _batches(items: Iterable[str], n: int) -> Iterator[list[str]]:
    it = iter(items)
    while batch := list(itertools.islice(it, n)):
        yield batch


def _load_given_tokenizer(tokenizer: Path) -> Any:
    from chatforge.core.tokenizer import TokenizerError, load_tokenizer

    try:
        return load_tokenizer(tokenizer)
    except TokenizerError as e:
        raise UserError(str(e)) from None


def _train_tokenizer(root: Path, cfg: PrepareConfig) -> Any:
    """Train a byte-level BPE of cfg.vocab_size on root/text/train.jsonl into root/tokenizer."""
    from chatforge.core.tokenizer import TokenizerError, train_tokenizer

    if cfg.progress:
        print0(f"training a {cfg.vocab_size}-token byte-level BPE on the kept train text")
    texts = _capped(_iter_texts(root / "text" / "train.jsonl"), cfg.tokenizer_train_chars)
    try:
        return train_tokenizer(texts, cfg.vocab_size, root / "tokenizer")
    except TokenizerError as e:
        raise UserError(str(e)) from None


def _bos_id(tok: Any) -> int:
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if bos is None:
        raise UserError("tokenizer has neither a BOS nor an EOS token to delimit documents")
    return int(bos)


def _encoder(tok: Any) -> Any:
    """A function texts -> list of id lists that encodes special-token strings as plain text.

    Fast tokenizers go straight to the Rust backend (`encode_batch_fast` skips offsets, ~20% faster
    than `tok(texts)`); anything else goes through `tok(..., split_special_tokens=True)`.
    """
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        def encode(texts: list[str]) -> list[list[int]]:
            old = backend.encode_special_tokens
            backend.encode_special_tokens = True
            try:
                return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
            finally:
                backend.encode_special_tokens = old
        return encode
    return lambda texts: tok(texts, add_special_tokens=False, split_special_tokens=True,
                             return_attention_mask=False)["input_ids"]


def _tokenize_split(root: Path, split: str, tok: Any, cfg: PrepareConfig, bar: _Progress) -> dict:
    """Tokenize root/text/{split}.jsonl in batches into shards; each document is [bos] + ids.

    Special-token strings inside the text ('<|end|>' ...) are encoded as plain text, so corpus
    content can never forge chat-control tokens.
    """
    bos, encode = _bos_id(tok), _encoder(tok)
    writer = ShardWriter(root, split, token_dtype(len(tok)), cfg.shard_tokens)
    with writer:
        for batch in _batches(_iter_texts(root / "text" / f"{split}.jsonl"), cfg.chunk_docs):
            for ids in encode(batch):
                writer.add([bos, *ids])
            bar.advance(len(batch))
        return writer.close()


# ----------------------------------------------------------------------------- entry point


def _check_out(out: Path) -> None:
    if out.is_file():
        raise UserError(f"--out {out} is a file, expected a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "meta.json").exists():
        raise UserError(f"--out {out} is a non-empty directory that is not a prepared data dir; "
                        "refusing to replace it")


def prepare(inputs: list[Path] | None, out: Path, cfg: PrepareConfig | None = None,
            tokenizer: Path | None = None) -> dict:
    """Run the whole pipeline into `out` and return the report (also saved as out/report.json).

    `inputs` None or empty means the embedded corpus (`default_corpus_paths()`). `tokenizer` is an HF
    tokenizer dir (or a model dir that has one); without it a BPE of `cfg.vocab_size` is trained.
    """
    t0 = time.time()
    cfg = cfg or PrepareConfig()
    cfg.validate()
    out = Path(out)
    files = list_inputs([Path(p) for p in inputs] if inputs else default_corpus_paths(), exclude=out)
    _check_out(out)
    given_tok = _load_given_tokenizer(Path(tokenizer)) if tokenizer is not None else None  # fail fast
    total_bytes = sum(p.stat().st_size for p in files)
    with atomic_dir(out) as root:
        bar = _Progress(total_bytes, cfg.progress)
        try:
            stats = _ingest(files, root, cfg, bar, _num_workers(cfg, total_bytes))
        finally:
            bar.stop()
        if stats.kept == 0:
            reasons = ", ".join(f"{k}: {v}" for k, v in stats.dropped.most_common()) or "no documents"
            raise UserError(f"all {stats.read} documents were dropped ({reasons}); nothing to write. "
                            "Loosen the filters (e.g. --set filters.min_words=1) or check the input")
        _ensure_val(root, stats, cfg)
        timings = {"read_filter_dedup_s": time.time() - t0}
        t1 = time.time()
        if given_tok is not None:
            tok = given_tok
            tok.save_pretrained(root / "tokenizer")  # the prepared dir is self-contained
        else:
            tok = _train_tokenizer(root, cfg)
        timings["tokenizer_s"] = time.time() - t1
        t1 = time.time()
        bar = _Progress(stats.kept, cfg.progress, unit="docs", description="tokenizing")
        try:
            splits = {s: _tokenize_split(root, s, tok, cfg, bar) for s in SPLITS}
        finally:
            bar.stop()
        timings["tokenize_s"] = time.time() - t1
        meta = {
            "format": FORMAT,
            "dtype": token_dtype(len(tok)).name,
            "vocab_size": len(tok),
            "bos_id": _bos_id(tok),
            "eos_id": tok.eos_token_id,
            "tokenizer": "tokenizer",
            "tokenizer_source": str(Path(tokenizer).resolve()) if tokenizer is not None else None,
            "tokenizer_sha256": sha256_path(root / "tokenizer"),
            "document_delimiter": "bos",
            "splits": splits,
        }
        write_json(root / "meta.json", meta)
        report = _report(stats, splits, cfg, out, total_bytes, t0, timings, meta)
        write_json(root / "report.json", report)
    return report


def _report(stats: _Stats, splits: dict, cfg: PrepareConfig, out: Path, total_bytes: int, t0: float,
            timings: dict[str, float], meta: dict) -> dict:
    elapsed = time.time() - t0
    dropped = {name: stats.dropped.get(name, 0) for name in FILTER_NAMES}
    dropped["exact_duplicate"] = stats.dropped.get("exact_duplicate", 0)
    dropped["near_duplicate"] = stats.dropped.get("near_duplicate", 0)
    return {
        "out": str(out),
        "documents_read": stats.read,
        "documents_kept": stats.kept,
        "documents_dropped": sum(dropped.values()),
        "dropped": dropped,
        "exact_duplicates": dropped["exact_duplicate"],
        "near_duplicates": dropped["near_duplicate"],
        "splits": {s: {"documents": stats.docs[s], "chars": stats.chars[s], "tokens": splits[s]["tokens"],
                       "shards": len(splits[s]["shards"])} for s in SPLITS},
        "inputs": stats.inputs,
        "input_bytes": total_bytes,
        "tokenizer": {"vocab_size": meta["vocab_size"], "source": meta["tokenizer_source"],
                      "sha256": meta["tokenizer_sha256"]},
        "elapsed_s": round(elapsed, 3),
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "docs_per_s": round(stats.read / elapsed, 1) if elapsed > 0 else None,
        "mb_per_s": round(total_bytes / 1e6 / elapsed, 3) if elapsed > 0 else None,
        "config": dataclasses.asdict(cfg),
    }


def format_report(report: dict) -> Table:
    """A rich table summarizing a prepare report (what the CLI prints)."""
    t = Table(title=f"data prepare → {report['out']}", show_header=True, header_style="bold")
    t.add_column("item")
    t.add_column("value", justify="right")
    read = report["documents_read"] or 1
    t.add_row("input files", f"{len(report['inputs'])} ({report['input_bytes'] / 1e6:,.1f} MB)")
    t.add_row("documents read", f"{report['documents_read']:,}")
    t.add_row("documents kept", f"{report['documents_kept']:,} ({100 * report['documents_kept'] / read:.1f}%)")
    for name, n in report["dropped"].items():
        if n:
            t.add_row(f"  dropped: {name}", f"{n:,}")
    for s, info in report["splits"].items():
        t.add_row(f"{s}", f"{info['documents']:,} docs · {info['tokens']:,} tokens · {info['chars']:,} chars · "
                          f"{info['shards']} shard(s)")
    tok = report["tokenizer"]
    t.add_row("tokenizer", f"{tok['source'] or 'trained'} (vocab {tok['vocab_size']:,})")
    t.add_row("time", f"{report['elapsed_s']:.1f} s ({report['docs_per_s'] or 0:,.0f} docs/s, "
                      f"{report['mb_per_s'] or 0:.2f} MB/s)")
    return t
