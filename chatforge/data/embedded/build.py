"""Regenerate the embedded SFT and preference data from the public source files.

    python -m chatforge.data.embedded.build SRC_DIR

SRC_DIR holds the files named in sft/SOURCES.md and prefs/SOURCES.md, laid out as
`hh-rlhf/{helpful-base,harmless-base}/test.jsonl.gz`, `hh-rlhf/LICENSE`,
`oasst-en100/{en_100_tree.jsonl,LICENSE}` and `self-instruct/{seed_tasks.jsonl,LICENSE}`.
This is a development tool: chatforge never runs it and never reads SRC_DIR at run time. Output is
deterministic (content-hash ids, gzip mtime 0), so a rebuild from the same sources gives the same bytes.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from chatforge.core.io import read_jsonl
from chatforge.data.convert import (
    Skip,
    hh_pair_to_comparison,
    hh_to_conversation,
    oasst_tree_to_comparisons,
    oasst_tree_to_conversations,
    self_instruct_to_conversations,
)
from chatforge.data.embedded import EMBEDDED_DIR
from chatforge.data.formats import assign_split, write_jsonl_records

HH_PARTS = {"hh-helpful": "helpful-base", "hh-harmless": "harmless-base"}
HH_SFT_PER_PART = 1000
TEST_FRACTION = 0.2


def build_hh(src: Path, out: Path) -> dict[str, int]:
    """prefs/hh (every pair) and sft/hh-chosen (chosen dialogues of the first train-split pairs)."""
    comparisons, sft = [], []
    for source, part in HH_PARTS.items():
        path = src / "hh-rlhf" / part / "test.jsonl.gz"
        n_sft = 0
        for line, obj in read_jsonl(path):
            try:
                cmp = hh_pair_to_comparison(obj["chosen"], obj["rejected"], (path, line), source, "hh-rlhf")
            except Skip:
                continue  # the 2 pairs whose chosen and rejected are identical
            # Split by the opening user turn: HH has many dialogues that share an opening question
            # and differ later; they must land on the same side.
            split = assign_split(cmp.prompt[0].content, TEST_FRACTION)
            cmp.meta = {"split": split, "line": line}
            comparisons.append(cmp)
            if split == "train" and n_sft < HH_SFT_PER_PART:
                try:
                    sft.append(hh_to_conversation(obj["chosen"], (path, line), source, {"split": split, "line": line}))
                    n_sft += 1
                except Skip:
                    pass  # a chosen dialogue whose only Assistant turn is empty
    return {"prefs/hh": write_jsonl_records(out / "prefs" / "hh.jsonl.gz", comparisons),
            "sft/hh-chosen": write_jsonl_records(out / "sft" / "hh-chosen.jsonl.gz", sft)}


def build_oasst(src: Path, out: Path) -> dict[str, int]:
    """sft/oasst-best, sft/oasst-all and prefs/oasst from the human (non-synthetic) messages."""
    path = src / "oasst-en100" / "en_100_tree.jsonl"
    best, every, cmps = [], [], []
    for line, tree in read_jsonl(path):
        where = (path, line)
        b = oasst_tree_to_conversations(tree, "best", where=where)
        a = oasst_tree_to_conversations(tree, "all", where=where)
        c = oasst_tree_to_comparisons(tree, where=where)
        # Split whole trees, so a test prompt's siblings and follow-ups are never trained on.
        split = assign_split(str(tree.get("message_tree_id")), TEST_FRACTION)
        for rec in [*b, *a, *c]:
            rec.meta["split"] = split
        best, every, cmps = best + b, every + a, cmps + c
    return {"sft/oasst-best": write_jsonl_records(out / "sft" / "oasst-best.jsonl.gz", best),
            "sft/oasst-all": write_jsonl_records(out / "sft" / "oasst-all.jsonl.gz", every),
            "prefs/oasst": write_jsonl_records(out / "prefs" / "oasst.jsonl.gz", cmps)}


def build_self_instruct(src: Path, out: Path) -> dict[str, int]:
    path = src / "self-instruct" / "seed_tasks.jsonl"
    convs = [c for line, task in read_jsonl(path) for c in self_instruct_to_conversations(task, (path, line))]
    return {"sft/self-instruct": write_jsonl_records(out / "sft" / "self-instruct.jsonl.gz", convs)}


def copy_licenses(src: Path, out: Path) -> None:
    for sub in ("sft", "prefs"):
        shutil.copyfile(src / "hh-rlhf" / "LICENSE", out / sub / "LICENSE-hh-rlhf-MIT")
        shutil.copyfile(src / "oasst-en100" / "LICENSE", out / sub / "LICENSE-Apache-2.0")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path, help="folder holding hh-rlhf/, oasst-en100/, self-instruct/")
    ap.add_argument("--out", type=Path, default=EMBEDDED_DIR, help="embedded data folder (default: this one)")
    args = ap.parse_args(argv)
    counts = {**build_hh(args.src, args.out), **build_oasst(args.src, args.out),
              **build_self_instruct(args.src, args.out)}
    copy_licenses(args.src, args.out)
    for name in counts:  # atomic writes create 0600 temp files; package data must be world-readable
        (args.out / f"{name}.jsonl.gz").chmod(0o644)
    for name, n in sorted(counts.items()):
        size = (args.out / f"{name}.jsonl.gz").stat().st_size
        print(f"{name:20s} {n:6d} records {size / 1024:8.1f} KiB")


if __name__ == "__main__":
    main()
