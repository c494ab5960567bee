"""Streaming document readers for `data prepare`: .txt, .jsonl, .parquet, their .gz, and directories.

Every reader yields one document (a str) at a time and reports progress in raw bytes of the input
file, so memory stays bounded however large the input is. Bad input raises `DataError` naming the
file and, where there is one, the line.
"""

from __future__ import annotations

import gzip
import json
import re
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from chatforge.core.io import DataError, UserError
from chatforge.core.log import warn

ENDOFTEXT = "<|endoftext|>"
"""Document separator of the original TinyStories/GPT-2 .txt files; used when present in a .txt file."""

BLANK_LINES = "\n\n"
"""`txt_separator` value meaning: split on one or more blank lines."""

READ_CHUNK = 1 << 20
MAX_LINE_CARRY = 1 << 22  # decode a newline-free run in pieces once it grows past this (bounded memory)
_BLANK_RE = re.compile(r"\n(?:[ \t\r\f\v]*\n)+")

KINDS = {".txt": "txt", ".text": "txt", ".jsonl": "jsonl", ".parquet": "parquet"}

Progress = Callable[[int], None]
"""Called with the number of raw input bytes consumed so far in the current file."""


def input_kind(path: Path) -> str:
    """'txt', 'jsonl' or 'parquet' from the file name (`.gz` is looked through); unknown -> 'txt'."""
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return KINDS.get(Path(name).suffix, "txt")


def _supported(path: Path) -> bool:
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return Path(name).suffix in KINDS


def list_inputs(inputs: list[Path], exclude: Path | None = None) -> list[Path]:
    """Expand directories (recursively, sorted; hidden entries and unknown suffixes skipped).

    Files named explicitly are always read (an unknown suffix is read as text). A file reached twice
    is listed once, and nothing under `exclude` (the output dir, which may sit inside an input dir)
    is listed at all.
    """
    files: list[Path] = []
    seen: set[Path] = set()
    skip = exclude.resolve() if exclude is not None else None

    def add(q: Path) -> None:
        r = q.resolve()
        if r not in seen and not (skip is not None and r.is_relative_to(skip)):
            seen.add(r)
            files.append(q)

    for p in map(Path, inputs):
        if not p.exists():
            raise DataError(p, None, "file not found")
        if p.is_file():
            add(p)
            continue
        found, skipped = [], 0
        for q in sorted(p.rglob("*")):
            rel = q.relative_to(p).parts
            if not q.is_file() or any(part.startswith(".") for part in rel):
                continue
            if _supported(q):
                found.append(q)
            else:
                skipped += 1
        if skipped:
            warn(f"{p}: skipped {skipped} file(s) that are not .txt/.jsonl/.parquet(.gz)")
        if not found:
            raise DataError(p, None, "directory has no .txt, .jsonl or .parquet files")
        for q in found:
            add(q)
    if not files:
        raise UserError("no input files left to read (all inputs are inside --out?)")
    return files


def iter_documents(path: Path, text_field: str = "text", txt_separator: str | None = None,
                   progress: Progress | None = None) -> Iterator[str]:
    """Yield the raw documents of one input file (uncleaned; blank documents are skipped)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, "file not found" if not path.exists() else "not a regular file")
    if path.stat().st_size == 0:
        raise DataError(path, None, "empty file")
    kind = input_kind(path)
    if kind == "jsonl":
        docs = _iter_jsonl(path, text_field, progress)
    elif kind == "parquet":
        docs = _iter_parquet(path, text_field, progress)
    else:
        docs = _iter_txt(path, txt_separator, progress)
    n = 0
    for doc in docs:
        n += 1
        yield doc
    if n == 0:
        raise DataError(path, None, "no documents (file has only blank text)")


# ----------------------------------------------------------------------------- raw byte access


class _Raw:
    """A file opened for binary reading, gunzipped if `.gz`; `pos()` is the raw (compressed) offset."""

    def __init__(self, path: Path):
        self.path = path
        self.raw: BinaryIO = open(path, "rb")
        self.stream: BinaryIO = gzip.GzipFile(fileobj=self.raw) if path.name.lower().endswith(".gz") else self.raw

    def pos(self) -> int:
        return self.raw.tell()

    def close(self) -> None:
        self.stream.close()
        self.raw.close()

    def __enter__(self) -> _Raw:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_error(path: Path, line: int | None, e: BaseException) -> DataError:
    if isinstance(e, (gzip.BadGzipFile, EOFError, zlib.error)):
        return DataError(path, line, f"corrupt or truncated gzip data ({e})")
    return DataError(path, line, f"cannot read ({e})")


def _decode(path: Path, data: bytes, first_line: int) -> str:
    """Decode whole lines of UTF-8; NUL bytes or invalid UTF-8 raise DataError at the exact line."""
    nul = data.find(b"\x00")
    if nul >= 0:
        line = first_line + data.count(b"\n", 0, nul)
        raise DataError(path, line, "binary data (NUL byte); expected UTF-8 text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + data.count(b"\n", 0, e.start)
        raise DataError(path, line, f"not UTF-8 text (byte 0x{data[e.start]:02x}); binary file?") from None


def _text_pieces(path: Path, progress: Progress | None) -> Iterator[str]:
    """Yield the decoded text of `path` in pieces that end on line boundaries (a leading BOM dropped)."""
    line, carry, first = 1, b"", True
    try:
        with _Raw(path) as f:
            while True:
                block = f.stream.read(READ_CHUNK)
                data = carry + block
                if not data:
                    break
                cut = data.rfind(b"\n") + 1 if block else len(data)
                if cut == 0 and len(data) > MAX_LINE_CARRY:
                    # A huge newline-free run: cut before a UTF-8 lead byte so memory stays bounded.
                    cut = len(data) - 1
                    while cut > 0 and data[cut] & 0xC0 == 0x80:
                        cut -= 1
                    cut = cut or len(data)
                if cut == 0:
                    carry = data
                    continue
                text = _decode(path, data[:cut], line)
                if first and text.startswith("\ufeff"):
                    text = text[1:]
                first = False
                line += data.count(b"\n", 0, cut)
                carry = data[cut:]
                yield text
                if progress:
                    progress(f.pos())
                if not block:
                    break
    except DataError:
        raise
    except (OSError, EOFError, zlib.error) as e:
        raise _read_error(path, line, e) from None


def _file_contains(path: Path, marker: str) -> bool:
    needle, tail = marker.encode(), b""
    try:
        with _Raw(path) as f:
            while block := f.stream.read(READ_CHUNK):
                if needle in tail + block:
                    return True
                tail = block[-(len(needle) - 1):]
    except (OSError, EOFError, zlib.error) as e:
        raise _read_error(path, None, e) from None
    return False


# ----------------------------------------------------------------------------- formats


def _iter_txt(path: Path, separator: str | None, progress: Progress | None) -> Iterator[str]:
    """Split a text file into documents on `separator` (None: <|endoftext|> if present, else blank lines)."""
    if separator is None:
        separator = ENDOFTEXT if _file_contains(path, ENDOFTEXT) else BLANK_LINES

    def split(s: str) -> list[str]:
        return _BLANK_RE.split(s) if separator == BLANK_LINES else s.split(separator)

    buf = ""
    for piece in _text_pieces(path, progress):
        buf += piece
        parts = split(buf)
        buf = parts.pop()
        for p in parts:
            if p.strip():
                yield p
    if buf.strip():
        yield buf


def _iter_jsonl(path: Path, field: str, progress: Progress | None) -> Iterator[str]:
    n = 0
    try:
        with _Raw(path) as f:
            for n, raw_line in enumerate(f.stream, 1):
                if not raw_line.strip():
                    continue
                line = _decode(path, raw_line, n)
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(path, n, f"malformed JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(obj, dict):
                    raise DataError(path, n, f"expected a JSON object, got {type(obj).__name__}")
                if field not in obj:
                    keys = ", ".join(list(obj)[:8]) or "none"
                    raise DataError(path, n, f"missing text field '{field}' (keys: {keys}); set text_field")
                text = obj[field]
                if not isinstance(text, str):
                    raise DataError(path, n, f"field '{field}' is {type(text).__name__}, expected a string")
                if progress and n % 1024 == 0:
                    progress(f.pos())
                if text.strip():
                    yield text
    except DataError:
        raise
    except (OSError, EOFError, zlib.error) as e:
        raise _read_error(path, n + 1, e) from None


def _iter_parquet(path: Path, field: str, progress: Progress | None) -> Iterator[str]:
    """Stream one string column in record batches (row-group sized reads, never the whole table)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(path, None, f"not a readable parquet file ({e})") from None
    names = pf.schema_arrow.names
    if field not in names:
        raise DataError(path, None, f"missing text column '{field}' (columns: {', '.join(names)}); set text_field")
    col_type = pf.schema_arrow.field(field).type
    if not (pa.types.is_string(col_type) or pa.types.is_large_string(col_type)):
        raise DataError(path, None, f"column '{field}' has type {col_type}, expected string")
    total_rows, size = max(pf.metadata.num_rows, 1), path.stat().st_size
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=1024, columns=[field]):
            for text in batch.column(0).to_pylist():
                row += 1
                if text is None:
                    raise DataError(path, None, f"row {row}: column '{field}' is null")
                if text.strip():
                    yield text
            if progress:
                progress(size * row // total_rows)
    except pa.ArrowException as e:
        raise DataError(path, None, f"row {row + 1}: cannot read parquet data ({e})") from None
