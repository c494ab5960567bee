"""Next-token batches from `data prepare` shards, with an exact, resumable position.

The token stream of a split is cut into non-overlapping windows of seq_len + 1 tokens (windows
never cross shards). Each epoch visits every window once in an order drawn from (seed, epoch).
A global step takes `batch_size * world_size` consecutive windows of that order; rank r takes its
own slice, so every rank reads different data and the position is one integer for all ranks.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from chatforge.core.io import UserError
from chatforge.data.sampler import EpochLoader


def load_split(data_dir: Path, split: str) -> list[np.ndarray]:
    meta_path = Path(data_dir) / "meta.json"
    if not meta_path.exists():
        raise UserError(f"{data_dir} is not a prepared data dir (no meta.json); run `chatforge data prepare`")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    dtype = np.dtype(meta["dtype"])
    info = meta["splits"].get(split)
    if info is None:
        raise UserError(f"{meta_path}: no '{split}' split")
    shards = []
    for name in info["shards"]:
        p = Path(data_dir) / split / Path(name).name
        if not p.exists():
            raise UserError(f"missing shard {p}")
        shards.append(np.memmap(p, dtype=dtype, mode="r"))
    return shards


class WindowLoader(EpochLoader):
    """Iterator of (inputs, targets) LongTensor pairs [batch_size, seq_len], resumable (data/sampler.py)."""

    def __init__(self, shards: list[np.ndarray], seq_len: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True, device: torch.device | None = None):
        self.shards, self.seq_len = shards, seq_len
        self.device = device or torch.device("cpu")
        counts = [(len(s) - 1) // seq_len for s in shards]
        self.bounds = np.cumsum([0] + counts)
        self.n_windows = int(self.bounds[-1])
        if self.n_windows < batch_size * world_size:
            raise UserError(f"data too small: {self.n_windows} windows of {seq_len + 1} tokens, need at least "
                            f"{batch_size * world_size} (lower train.seq_len or train.batch_size, or add data)")
        super().__init__(self.n_windows, batch_size, self._collate, seed, rank, world_size, shuffle, "windows")

    def _window(self, idx: int) -> np.ndarray:
        s = int(np.searchsorted(self.bounds, idx, side="right") - 1)
        off = (idx - int(self.bounds[s])) * self.seq_len
        return np.asarray(self.shards[s][off: off + self.seq_len + 1], dtype=np.int64)

    def _collate(self, idxs: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.from_numpy(np.stack([self._window(int(i)) for i in idxs]))
        if torch.device(self.device).type == "cuda":  # page-locked: the copy runs asynchronously to the GPU
            rows = rows.pin_memory().to(self.device, non_blocking=True)
        else:
            rows = rows.to(self.device)
        return rows[:, :-1], rows[:, 1:]


def eval_batches(shards: list[np.ndarray], seq_len: int, batch_size: int, n_batches: int, rank: int = 0,
                 world_size: int = 1, device: torch.device | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed set of validation batches (the first windows, in order), sharded across ranks."""
    loader = WindowLoader(shards, seq_len, min(batch_size, max(1, _windows(shards, seq_len) // world_size)), 0,
                          rank, world_size, shuffle=False, device=device)
    n = min(n_batches, loader.n_windows // (loader.batch_size * world_size))
    return [next(loader) for _ in range(max(1, n))]


def _windows(shards: list[np.ndarray], seq_len: int) -> int:
    return sum((len(s) - 1) // seq_len for s in shards)
