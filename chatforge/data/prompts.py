"""Prompt sets by spec: a JSONL of conversations, or `tasks:N[:SEED]` / `tasks-heldout:N[:SEED]`."""

from __future__ import annotations

from pathlib import Path

from chatforge.core.io import UserError


def load_prompts(spec: str) -> list[dict]:
    """Prompt conversations from a JSONL path, or `tasks:N[:SEED]` / `tasks-heldout:N[:SEED]` (N per family)."""
    if spec.startswith(("tasks:", "tasks-heldout:")):
        from chatforge.data import tasks

        kind, *rest = spec.split(":")
        try:
            n_per, seed = int(rest[0]), int(rest[1]) if len(rest) > 1 else 0
        except (ValueError, IndexError):
            raise UserError(f"prompt spec '{spec}': expected {kind}:N or {kind}:N:SEED") from None
        fn = tasks.heldout_prompts if kind == "tasks-heldout" else tasks.train_prompts
        return fn(n_per, seed=seed)
    from chatforge.data.formats import read_prompts

    return [c.to_dict() for c in read_prompts(Path(spec), strip_assistant=True)]
