"""Prompt sets by spec: a JSONL of conversations, or `tasks:N[:SEED]` / `tasks-heldout:N[:SEED]`."""

from __future__ import annotations

from pathlib import Path

from chatforge.core.io import UserError


def load_prompts(spec: str) -> list[dict]:
    """Prompt conversations from a JSONL path, `tasks:N[:SEED]` / `tasks-heldout:N[:SEED]` (N per family), or
    `embedded:NAME[:N]` (shipped conversations, e.g. `embedded:sft/oasst-best:12`, final replies dropped)."""
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

    if spec.startswith("embedded:"):
        from chatforge.data.embedded import embedded_path

        name, _, n = spec.removeprefix("embedded:").partition(":")
        if n and not n.isdigit():
            raise UserError(f"prompt spec '{spec}': expected embedded:NAME or embedded:NAME:N")
        rows = [c.to_dict() for c in read_prompts(embedded_path(name), strip_assistant=True)]
        return rows[:int(n)] if n else rows
    return [c.to_dict() for c in read_prompts(Path(spec), strip_assistant=True)]
