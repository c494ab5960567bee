"""`chatforge bench STAGE`: throughput, MFU against a measured matmul peak, peak memory.

Each stage module exposes `run(quick: bool) -> dict`; comparisons with a peer (TRL, transformers
`generate`) run side by side in the same process so that the ratio is meaningful on a noisy machine.
"""

from __future__ import annotations

import importlib

from chatforge.core.io import UserError

STAGES = {"pretrain": "chatforge.bench.pretrain", "generate": "chatforge.bench.generate", "rm": "chatforge.bench.rm",
          "dpo": "chatforge.bench.dpo", "sft": "chatforge.bench.sft", "ppo": "chatforge.bench.ppo",
          "model": "chatforge.bench.model", "serve": "chatforge.bench.serve",
          "labelers": "chatforge.bench.labelers"}


def run_bench(stage: str, quick: bool = False, **options: object) -> dict:
    """Run one stage's benchmark; `options` (None values ignored) go to its `run` when it takes them."""
    import inspect

    if stage not in STAGES:
        raise UserError(f"unknown bench stage '{stage}'; choose from {', '.join(STAGES)}")
    fn = importlib.import_module(STAGES[stage]).run
    given = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(given) - set(inspect.signature(fn).parameters))
    if unknown:
        raise UserError(f"bench {stage} does not take {', '.join('--' + k.replace('_', '-') for k in unknown)}")
    return fn(quick=quick, **given)
