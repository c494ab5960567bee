"""Data that ships inside the package, so demos and tests never download anything.

Names are paths under this folder without the data suffix, e.g. `sft/oasst-best` is
`sft/oasst-best.jsonl.gz`. Each subfolder has a SOURCES.md (origin, commit, license, what was
filtered) and the licenses. `build.py` regenerates `sft/` and `prefs/` from the public source files;
it is a development tool and is never run by chatforge itself.
"""

from __future__ import annotations

from pathlib import Path

from chatforge.core.io import UserError

EMBEDDED_DIR = Path(__file__).resolve().parent
DATA_SUFFIXES = (".jsonl.gz", ".jsonl", ".txt.gz", ".txt", ".json.gz", ".json", ".parquet")

DESCRIPTIONS = {
    "sft/oasst-best": "OpenAssistant en-100: best (rank-0) path of each human tree, 95 conversations",
    "sft/oasst-all": "OpenAssistant en-100: every root-to-leaf path of the human trees, 547 conversations",
    "sft/hh-chosen": "HH-RLHF chosen dialogues, 1,000 helpful + 1,000 harmless (train split only)",
    "sft/self-instruct": "self-instruct's 175 human-written seed tasks as single-turn conversations",
    "prefs/hh": "HH-RLHF helpful+harmless test pairs as K=2 comparisons (meta.split: 80% train / 20% test)",
    "prefs/oasst": "OpenAssistant en-100 sibling rankings as K-wise comparisons (human replies only)",
}


def _name_of(path: Path) -> str | None:
    rel = path.relative_to(EMBEDDED_DIR).as_posix()
    for suf in DATA_SUFFIXES:
        if rel.endswith(suf):
            return rel[: -len(suf)]
    return None


def list_embedded() -> dict[str, str]:
    """name -> one-line description of every embedded data file."""
    found = {}
    for p in sorted(EMBEDDED_DIR.rglob("*")):
        if p.is_file() and not p.name.startswith(".") and (name := _name_of(p)) is not None:
            found[name] = DESCRIPTIONS.get(name, "")
    return found


def embedded_path(name: str) -> Path:
    """The file behind an embedded data name such as `sft/oasst-best` (`embedded:` prefix allowed)."""
    name = name.removeprefix("embedded:").strip("/")
    direct = EMBEDDED_DIR / name
    if direct.is_file() and EMBEDDED_DIR in direct.resolve().parents:
        return direct
    for suf in DATA_SUFFIXES:
        p = EMBEDDED_DIR / f"{name}{suf}"
        if p.is_file():
            return p
    known = ", ".join(list_embedded()) or "none"
    raise UserError(f"no embedded data named '{name}'; available: {known}")
