"""Text cleaning, Gopher-style quality filters, and exact + MinHash-LSH near-duplicate removal.

All three are pure per-document functions or small stateful objects, so `corpus.prepare` can
stream documents through them in chunks.
"""

from __future__ import annotations

import hashlib
import re
import string
import unicodedata
import zlib
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Normalization = Literal["NFC", "NFKC", "none"]

# Control characters (Unicode category Cc) except \t and \n; \r is turned into \n before this runs.
# U+FEFF (byte-order mark / zero-width no-break space) is junk inside text, so it goes too.
_CONTROL = {c: None for c in [*range(0x00, 0x20), *range(0x7F, 0xA0), 0xFEFF] if chr(c) not in "\t\n"}
_PUNCT = string.punctuation + "“”‘’«»…–—¡¿"
_ALPHA_WORD = re.compile(r"\S*?[^\W\d_]\S*")  # a whitespace-separated word with at least one letter
_BULLETS = ("•", "●", "○", "◦", "▪", "▫", "■", "□", "‣", "⁃", "∙", "·", "-", "*", "+")


def clean_text(text: str, normalization: Normalization = "NFC") -> str:
    """Unicode-normalize, drop control characters (keeping \\n and \\t), and tidy line ends.

    Line ends become \\n, trailing spaces on each line go, runs of blank lines collapse to one, and
    leading/trailing blank lines are removed. Indentation at the start of lines is kept (poetry, code).
    """
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if normalization != "none" and not unicodedata.is_normalized(normalization, text):
        text = unicodedata.normalize(normalization, text)
    text = text.translate(_CONTROL)
    lines = [ln.rstrip() for ln in text.split("\n")]
    out: list[str] = []
    for ln in lines:
        if ln or (out and out[-1]):
            out.append(ln)
    while out and not out[-1]:
        out.pop()
    return "\n".join(out)


# ----------------------------------------------------------------------------- quality filters


@dataclass
class QualityFilters:
    """Heuristic document filters from Gopher (Rae et al. 2021, "Scaling Language Models: Methods,
    Analysis & Insights from Training Gopher", Appendix A.1.1 "MassiveWeb" quality filters).

    Gopher's published thresholds are the defaults, except `min_words`: Gopher drops documents under
    50 words, which would throw away most of TinyStories' paragraphs and Shakespeare's speeches, so
    the default here is 5. Because of that, the statistical filters (mean word length, top and
    duplicate n-grams) only judge documents of at least `stats_min_words` words (50, Gopher's own
    minimum): on "Be calm, be calm." they measure rhetoric, not spam. A document is dropped by the
    first filter it fails (the report counts drops per filter name). Words are whitespace-separated
    tokens; n-gram fractions are characters of the n-gram (words joined by spaces) times its count,
    over the document's characters, as in datatrove's Gopher filters.
    """

    enabled: bool = True
    """Turn all quality filters off (cleaning and dedup still run)."""
    min_words: int = 5
    """Drop documents with fewer words (Gopher: 50). Filter name: `min_words`."""
    max_words: int = 100_000
    """Drop documents with more words (Gopher: 100,000). Filter name: `max_words`."""
    min_mean_word_length: float = 3.0
    """Mean length of words (surrounding punctuation stripped) must be at least this (Gopher: 3)."""
    max_mean_word_length: float = 10.0
    """... and at most this (Gopher: 10). Filter name for both: `mean_word_length`."""
    max_symbol_word_ratio: float = 0.1
    """Max ratio of '#' and ellipsis ('...', '…') occurrences to words (Gopher: 0.1). `symbol_ratio`."""
    max_bullet_lines: float = 0.9
    """Max fraction of lines starting with a bullet point (Gopher: 0.9). `bullet_lines`."""
    max_ellipsis_lines: float = 0.3
    """Max fraction of lines ending with an ellipsis (Gopher: 0.3). `ellipsis_lines`."""
    min_alpha_words: float = 0.8
    """Min fraction of words containing an alphabetic character (Gopher: 0.8). `alpha_words`."""
    max_duplicate_lines: float = 0.3
    """Max fraction of non-empty lines that repeat an earlier line (Gopher: 0.3). `duplicate_lines`."""
    max_top_ngram: list[float] = field(default_factory=lambda: [0.20, 0.18, 0.16])
    """Max fraction of characters covered by the most frequent repeated 2-, 3- and 4-gram (Gopher:
    0.20, 0.18, 0.16). `top_ngram`."""
    max_duplicate_ngrams: list[float] = field(default_factory=lambda: [0.15, 0.14, 0.13, 0.12, 0.11, 0.10])
    """Max fraction of characters inside repeated 5- to 10-grams (Gopher: 0.15 down to 0.10).
    `duplicate_ngrams`."""
    stats_min_words: int = 50
    """Mean-word-length and n-gram filters apply only to documents with at least this many words."""

    def problems(self) -> list[str]:
        p = []
        if self.min_words < 0 or self.max_words < self.min_words:
            p.append("filters: need 0 <= min_words <= max_words")
        if self.stats_min_words < 1:
            p.append("filters.stats_min_words must be >= 1")
        if self.min_mean_word_length > self.max_mean_word_length:
            p.append("filters: min_mean_word_length > max_mean_word_length")
        if len(self.max_top_ngram) > 3:
            p.append("filters.max_top_ngram: at most 3 values (for 2-, 3-, 4-grams)")
        if len(self.max_duplicate_ngrams) > 6:
            p.append("filters.max_duplicate_ngrams: at most 6 values (for 5- to 10-grams)")
        return p


FILTER_NAMES = ["min_words", "max_words", "mean_word_length", "symbol_ratio", "bullet_lines",
                "ellipsis_lines", "alpha_words", "duplicate_lines", "top_ngram", "duplicate_ngrams"]


_M1, _M2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9)


def ngram_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """A 64-bit hash of each n-gram of a uint64 id sequence (xor-multiply chain, numpy-vectorized)."""
    m = len(ids) - n + 1
    if m <= 0:
        return np.zeros(0, dtype=np.uint64)
    h = np.full(m, 0xCBF29CE484222325, dtype=np.uint64)
    for j in range(n):
        h = (h ^ (ids[j: j + m] * _M2)) * _M1
    return h


def _top_ngram_fraction(h: np.ndarray, lens: np.ndarray, n: int, total_chars: int) -> float:
    """Characters in all occurrences of the most frequent n-gram (if it repeats) / document characters.

    `h` holds the hashes of the document's n-grams (`ngram_hashes`), `lens` its word lengths.
    """
    if len(h) < 2:
        return 0.0
    _, first, counts = np.unique(h, return_index=True, return_counts=True)
    k = int(counts.argmax())
    if counts[k] < 2:
        return 0.0
    start = int(first[k])
    return int(counts[k]) * (int(lens[start: start + n].sum()) + n - 1) / total_chars


def _duplicate_ngram_fraction(h: np.ndarray, lens: np.ndarray, n: int, total_chars: int) -> float:
    """Characters of words inside a repeated (not first) occurrence of some n-gram / document characters."""
    if len(h) < 2:
        return 0.0
    _, first = np.unique(h, return_index=True)
    if len(first) == len(h):
        return 0.0
    dup = np.ones(len(h), dtype=bool)
    dup[first] = False
    starts = np.flatnonzero(dup)
    delta = np.zeros(len(lens) + 1, dtype=np.int32)
    delta[starts] += 1
    delta[starts + n] -= 1
    covered = np.cumsum(delta[:-1]) > 0
    return (int(lens[covered].sum()) + int(covered.sum())) / total_chars


def _repetition_failure(words: list[str], total_chars: int, f: QualityFilters) -> str | None:
    """Gopher's top-n-gram (n = 2..4) and duplicate-n-gram (n = 5..10) checks on lowercased words."""
    # Python's str hash is enough here: only equality of words matters, never the values themselves.
    ids = np.fromiter(map(hash, words), np.int64, len(words)).view(np.uint64)
    lens = np.fromiter(map(len, words), np.int64, len(words))
    h = np.full(len(ids), 0xCBF29CE484222325, dtype=np.uint64)
    limits = dict(zip((2, 3, 4), f.max_top_ngram))
    dup_limits = dict(zip(range(5, 11), f.max_duplicate_ngrams))
    for n in range(1, 11):
        m = len(ids) - n + 1
        if m < 2:
            break
        h = (h[:m] ^ (ids[n - 1: n - 1 + m] * _M2)) * _M1  # extend each (n-1)-gram hash by one word
        if n in limits and _top_ngram_fraction(h, lens, n, total_chars) > limits[n]:
            return "top_ngram"
        if n in dup_limits:
            frac = _duplicate_ngram_fraction(h, lens, n, total_chars)
            if frac > dup_limits[n]:
                return "duplicate_ngrams"
            # Words covered by repeated (n+1)-grams are a subset of those covered by repeated n-grams.
            if frac <= min(list(dup_limits.values())[n - 4:], default=1.0):
                break
    return None


def quality_failure(text: str, f: QualityFilters) -> str | None:
    """Name of the first quality filter `text` fails, or None if it passes all of them."""
    if not f.enabled:
        return None
    words = text.split()
    n = len(words)
    if n < f.min_words:
        return "min_words"
    if n > f.max_words:
        return "max_words"
    long_enough = n >= f.stats_min_words
    if long_enough:
        content = [w for w in (t.strip(_PUNCT) for t in text.lower().split()) if w]
        mean_len = sum(map(len, content)) / len(content) if content else 0.0
        if not f.min_mean_word_length <= mean_len <= f.max_mean_word_length:
            return "mean_word_length"
    symbols = text.count("#") + text.count("...") + text.count("…")
    if n and symbols / n > f.max_symbol_word_ratio:
        return "symbol_ratio"
    lines = [ln.strip() for ln in text.split("\n")]
    lines = [ln for ln in lines if ln]
    if lines:
        if sum(ln.startswith(_BULLETS) for ln in lines) / len(lines) > f.max_bullet_lines:
            return "bullet_lines"
        if sum(ln.endswith(("...", "…")) for ln in lines) / len(lines) > f.max_ellipsis_lines:
            return "ellipsis_lines"
    if n and len(_ALPHA_WORD.findall(text)) / n < f.min_alpha_words:
        return "alpha_words"
    if lines and (len(lines) - len(set(lines))) / len(lines) > f.max_duplicate_lines:
        return "duplicate_lines"
    if not long_enough:
        return None
    return _repetition_failure(content, len(text), f)


# ----------------------------------------------------------------------------- dedup


@dataclass
class DedupConfig:
    """Exact and near-duplicate removal. The first occurrence (in input order) is kept."""

    exact: bool = True
    """Drop documents whose normalized text (lowercased, whitespace collapsed) was seen before (sha1)."""
    near: bool = True
    """Drop near-duplicates found with MinHash LSH over word shingles (datasketch)."""
    threshold: float = 0.8
    """Estimated Jaccard similarity of shingle sets above which two documents are near-duplicates."""
    num_perm: int = 128
    """MinHash permutations (signature length)."""
    shingle: int = 5
    """Words per shingle (documents shorter than this are one shingle)."""

    def problems(self) -> list[str]:
        p = []
        if not 0.0 < self.threshold <= 1.0:
            p.append("dedup.threshold must be in (0, 1]")
        if self.num_perm < 16:
            p.append("dedup.num_perm must be >= 16")
        if self.shingle < 1:
            p.append("dedup.shingle must be >= 1")
        return p


def dedup_key(text: str) -> bytes:
    """sha1 of the text lowercased with whitespace collapsed: equal keys = exact duplicates."""
    return hashlib.sha1(" ".join(text.lower().split()).encode("utf-8")).digest()


class MinHasher:
    """Stateless MinHash signatures of word shingles (datasketch `MinHash`, affine32 scheme).

    Words are lowercased and stripped of punctuation; each word is crc32-hashed once and each k-word
    shingle hash is a rolling combination of its word hashes folded to 32 bits (datasketch pre-mixes
    inputs with a murmur finalizer). Same (num_perm, shingle, seed) -> same signatures in any process.
    """

    def __init__(self, num_perm: int = 128, shingle: int = 5, seed: int = 1):
        from datasketch import MinHash

        self.num_perm, self.shingle = num_perm, shingle
        self._minhash_cls = MinHash
        self._perms = MinHash(num_perm=num_perm, seed=seed).permutations

    def __call__(self, text: str) -> np.ndarray:
        """Signature (uint32[num_perm]) of `text`."""
        words = [w for w in (t.strip(_PUNCT) for t in text.lower().split()) if w] or [""]
        wh = np.fromiter(map(zlib.crc32, map(str.encode, words)), np.uint64, len(words))
        sh = ngram_hashes(wh, min(self.shingle, len(words)))
        sh = (sh ^ (sh >> np.uint64(32))) & np.uint64(0xFFFFFFFF)
        m = self._minhash_cls(num_perm=self.num_perm, hashfunc=int, permutations=self._perms, scheme="affine32")
        m.update_batch(sh)
        return m.hashvalues


class Deduper:
    """Exact-duplicate set plus a compact MinHash LSH index; `check` returns a drop reason or None.

    Banding (b bands of r rows) comes from datasketch's `MinHashLSH` for the threshold. The index
    itself is one dict per band mapping a 64-bit band hash to a document number: a document that
    collides in any band is a near-duplicate and is never inserted, so buckets hold one entry and
    cost ~0.1 KB per band instead of datasketch's per-bucket sets (~0.9 KB vs ~3.6 KB per kept
    document, measured). Candidates are not re-verified against the exact Jaccard (signatures are not
    kept, to bound memory), so pairs somewhat below the threshold are occasionally dropped:
    P(drop) = 1 - (1 - J^r)^b, about 8% at J = 0.7 for the defaults (b=9, r=13), 0.1% at J = 0.5.
    """

    def __init__(self, cfg: DedupConfig, seed: int = 1):
        from datasketch import MinHashLSH

        self.cfg = cfg
        self.minhasher = MinHasher(cfg.num_perm, cfg.shingle, seed)
        self.exact_seen: set[bytes] = set()
        lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm)
        self.bands, self.rows = lsh.b, lsh.r
        self.tables: list[dict[int, int]] = [{} for _ in range(self.bands)]
        self.inserted = 0

    def check(self, text: str, key: bytes, signature: np.ndarray | None = None) -> str | None:
        """'exact_duplicate', 'near_duplicate', or None (then the document is recorded as seen).

        `signature` may be precomputed (by `analyze_chunk` in a worker process); else it is computed.
        """
        if self.cfg.exact:
            if key in self.exact_seen:
                return "exact_duplicate"
            self.exact_seen.add(key)
        if self.cfg.near:
            sig = signature if signature is not None else self.minhasher(text)
            r = self.rows
            keys = [hash(sig[i * r: (i + 1) * r].tobytes()) for i in range(self.bands)]
            if any(k in t for k, t in zip(keys, self.tables)):
                return "near_duplicate"
            for k, t in zip(keys, self.tables):
                t[k] = self.inserted
            self.inserted += 1
        return None


Analyzed = tuple[str, str | None, bytes, "np.ndarray | None"]
"""(clean text or "" if dropped, quality failure or None, dedup key, MinHash signature or None)."""


def analyze_chunk(docs: list[str], normalization: Normalization, filters: QualityFilters, dedup: DedupConfig,
                  seed: int) -> list[Analyzed]:
    """The per-document, stateless part of the pipeline: clean, quality-check, key and signature.

    Top-level and picklable so `data prepare` can run it in worker processes; dropped documents
    come back without their text.
    """
    minhasher = MinHasher(dedup.num_perm, dedup.shingle, seed) if dedup.near else None
    out: list[Analyzed] = []
    for raw in docs:
        text = clean_text(raw, normalization)
        reason = quality_failure(text, filters)
        if reason is not None:
            out.append(("", reason, b"", None))
            continue
        out.append((text, None, dedup_key(text), minhasher(text) if minhasher is not None else None))
    return out
