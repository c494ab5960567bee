"""`chatforge bench STAGE`: throughput, MFU against a measured matmul peak, peak memory.

Each stage module exposes `run(quick: bool) -> dict`; comparisons with a peer (TRL, transformers
`generate`) run side by side in the same process so that the ratio is meaningful on a noisy machine.
"""

from __future__ import annotations

import importlib

from chatforge.core.io import UserError

STAGES = {"pretrain": "chatforge.bench.pretrain", "generate": "chatforge.bench.generate", "rm": "chatforge.bench.rm",
          "dpo": "chatforge.bench.dpo", "sft": "chatforge.bench.sft", "ppo": "chatforge.bench.ppo"}


def run_bench(stage: str, quick: bool = False) -> dict:
    if stage not in STAGES:
        raise UserError(f"unknown bench stage '{stage}'; choose from {', '.join(STAGES)}")
    return importlib.import_module(STAGES[stage]).run(quick=quick)
