"""The one resumable batch order every training stage uses (LM windows, SFT rows, comparisons, pairs).

Each epoch visits all N items in an order drawn from (seed, epoch). A global step takes
`batch_size * world_size` consecutive items of that order and rank r takes its own slice, so the
position is two integers shared by all ranks, saved with every checkpoint: resume is exact.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from chatforge.core.io import UserError


class EpochLoader:
    """Iterator of collated batches; `state_dict()` is the exact position (epoch, cursor)."""

    def __init__(self, n_items: int, batch_size: int, collate_fn: Callable[[np.ndarray], Any], seed: int,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True, what: str = "items"):
        if n_items < batch_size * world_size:
            raise UserError(f"only {n_items} {what} for a global batch of {batch_size * world_size}; "
                            "add data or lower train.batch_size")
        self.n, self.batch_size, self.collate_fn, self.seed = n_items, batch_size, collate_fn, seed
        self.rank, self.world, self.shuffle, self.what = rank, world_size, shuffle, what
        self.epoch, self.cursor = 0, 0
        self._order = self._make_order()

    def _make_order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)

    def __iter__(self) -> EpochLoader:
        return self

    def __next__(self) -> Any:
        per_step = self.batch_size * self.world
        if self.cursor + per_step > self.n:  # drop the ragged tail, start a new epoch
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._make_order()
        start = self.cursor + self.rank * self.batch_size
        idx = self._order[start: start + self.batch_size]
        self.cursor += per_step
        return self.collate_fn(idx)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "n": self.n}

    def load_state_dict(self, state: dict) -> None:
        if state["n"] != self.n:
            raise UserError(f"checkpoint was made on different data ({state['n']} {self.what}, now {self.n})")
        self.epoch, self.cursor, self.seed = state["epoch"], state["cursor"], state["seed"]
        self._order = self._make_order()
