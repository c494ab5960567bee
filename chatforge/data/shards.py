"""Binary token shards written by `chatforge data prepare`, and their reader.

Layout of a prepared dir (nanochat-style: BOS delimits documents, no EOS is appended):

    OUT/meta.json                      dtype, vocab_size, bos_id, eos_id, tokenizer, per-split shard lists
    OUT/train/shard-00000.bin          raw little-endian token ids (uint16 if vocab <= 65535, else uint32)
    OUT/train/shard-00000.idx          uint64 start offset of each document inside that shard
    OUT/val/shard-00000.bin, .idx      same for the validation split

Each document is stored as `[bos_id] + ids`. A shard is closed before the document that would push it
past `shard_tokens`, so documents never straddle shards (a single document longer than `shard_tokens`
gets a shard of its own). An empty split has no shard files at all.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from chatforge.core.io import UserError

FORMAT = "chatforge-shards-v1"
UINT16_MAX_VOCAB = 65535
IDX_DTYPE = np.dtype("<u8")


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest little-endian dtype that holds every id of a vocabulary of `vocab_size` tokens."""
    return np.dtype("<u2") if vocab_size <= UINT16_MAX_VOCAB else np.dtype("<u4")


def shard_name(split: str, index: int) -> str:
    """Path of shard `index` of `split`, relative to the prepared dir."""
    return f"{split}/shard-{index:05d}.bin"


class ShardWriter:
    """Append documents to `root/split/shard-NNNNN.bin` (+ `.idx`), rolling over at `shard_tokens`."""

    def __init__(self, root: Path, split: str, dtype: np.dtype, shard_tokens: int):
        if shard_tokens < 1:
            raise UserError("shard_tokens must be >= 1")
        self.root, self.split, self.dtype, self.shard_tokens = Path(root), split, np.dtype(dtype), shard_tokens
        self.shards: list[str] = []
        self.tokens = 0
        self.documents = 0
        self._bin: BinaryIO | None = None
        self._idx: BinaryIO | None = None
        self._shard_len = 0

    def _open_next(self) -> None:
        self._close_current()
        name = shard_name(self.split, len(self.shards))
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        self._bin = open(path, "wb")
        self._idx = open(path.with_suffix(".idx"), "wb")
        self._shard_len = 0
        self.shards.append(name)

    def _close_current(self) -> None:
        for f in (self._bin, self._idx):
            if f is not None:
                f.close()
        self._bin = self._idx = None

    def add(self, ids: Sequence[int] | np.ndarray) -> None:
        """Write one document (already starting with BOS)."""
        n = len(ids)
        if n == 0:
            return
        if self._bin is None or (self._shard_len > 0 and self._shard_len + n > self.shard_tokens):
            self._open_next()
        assert self._bin is not None and self._idx is not None
        self._idx.write(np.array([self._shard_len], dtype=IDX_DTYPE).tobytes())
        self._bin.write(np.asarray(ids, dtype=self.dtype).tobytes())
        self._shard_len += n
        self.tokens += n
        self.documents += 1

    def close(self) -> dict[str, Any]:
        """Close the open shard; return this split's entry for meta.json."""
        self._close_current()
        return {"shards": list(self.shards), "tokens": self.tokens, "documents": self.documents}

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._close_current()


# ----------------------------------------------------------------------------- reading


def load_meta(data_dir: str | Path) -> dict:
    """Read `data_dir/meta.json` of a prepared dir (UserError if it is not one)."""
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise UserError(f"{data_dir} is not a prepared data dir (no meta.json); run `chatforge data prepare`")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    for key in ("dtype", "bos_id", "splits"):
        if key not in meta:
            raise UserError(f"{path}: missing key '{key}'")
    return meta


def _split_info(data_dir: Path, meta: dict, split: str) -> dict:
    info = meta["splits"].get(split)
    if info is None:
        raise UserError(f"{data_dir / 'meta.json'}: no '{split}' split (have: {', '.join(meta['splits'])})")
    return info


def open_split(data_dir: str | Path, split: str) -> list[np.memmap]:
    """One read-only memmap of token ids per shard of `split` (empty list for an empty split)."""
    data_dir = Path(data_dir)
    meta = load_meta(data_dir)
    dtype = np.dtype(meta["dtype"])
    out = []
    for name in _split_info(data_dir, meta, split)["shards"]:
        path = data_dir / name
        if not path.is_file():
            raise UserError(f"missing shard {path}")
        out.append(np.memmap(path, dtype=dtype, mode="r"))
    return out


def open_index(data_dir: str | Path, split: str) -> list[np.memmap]:
    """One memmap of uint64 document start offsets per shard of `split`."""
    data_dir = Path(data_dir)
    meta = load_meta(data_dir)
    out = []
    for name in _split_info(data_dir, meta, split)["shards"]:
        path = (data_dir / name).with_suffix(".idx")
        if not path.is_file():
            raise UserError(f"missing shard index {path}")
        out.append(np.memmap(path, dtype=IDX_DTYPE, mode="r"))
    return out


class SplitTokens:
    """All shards of one split seen as one token array: `len()`, int and slice access by global offset.

    Slices that cross a shard boundary are copied together; everything else is a memmap view.
    """

    def __init__(self, shards: list[np.memmap], index: list[np.memmap], bos_id: int):
        self.shards, self.index, self.bos_id = shards, index, bos_id
        self.starts = np.cumsum([0] + [len(s) for s in shards]).astype(np.int64)
        self.dtype = shards[0].dtype if shards else np.dtype("<u2")

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _locate(self, pos: int) -> tuple[int, int]:
        s = int(np.searchsorted(self.starts, pos, side="right") - 1)
        return s, pos - int(self.starts[s])

    def __getitem__(self, key: int | slice) -> Any:
        n = len(self)
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step != 1:
                raise ValueError("SplitTokens supports only contiguous slices")
            if stop <= start:
                return np.empty(0, dtype=self.dtype)
            s0, o0 = self._locate(start)
            s1, o1 = self._locate(stop - 1)
            if s0 == s1:
                return self.shards[s0][o0: o1 + 1]
            parts = [self.shards[s0][o0:]] + [self.shards[i][:] for i in range(s0 + 1, s1)]
            return np.concatenate(parts + [self.shards[s1][: o1 + 1]])
        if key < 0:
            key += n
        if not 0 <= key < n:
            raise IndexError(f"token index {key} out of range for {n} tokens")
        s, o = self._locate(key)
        return self.shards[s][o]

    def num_documents(self) -> int:
        return sum(len(i) for i in self.index)

    def documents(self) -> Iterator[np.ndarray]:
        """Yield each document's token ids (starting with BOS), in order."""
        for shard, idx in zip(self.shards, self.index):
            bounds = list(map(int, idx)) + [len(shard)]
            for a, b in zip(bounds[:-1], bounds[1:]):
                yield shard[a:b]


def split_tokens(data_dir: str | Path, split: str) -> SplitTokens:
    """Random access to a whole split by global token offset, plus per-document iteration."""
    meta = load_meta(data_dir)
    return SplitTokens(open_split(data_dir, split), open_index(data_dir, split), int(meta["bos_id"]))
