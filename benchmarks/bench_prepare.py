"""Throughput and peak memory of `chatforge data prepare` on synthetic corpora of growing size.

    python benchmarks/bench_prepare.py                      # one 300 MB run
    python benchmarks/bench_prepare.py --sizes 25,50,100    # memory vs input size
    python benchmarks/bench_prepare.py --sizes 50 --json out.json --workdir /big/tmp

Each size runs in a fresh subprocess, so its peak RSS (getrusage ru_maxrss) belongs to that run
alone. The synthetic JSONL has Zipf-distributed pseudo-words, 50-1500-word documents, 3% planted
exact duplicates and 2% planted near-duplicates (a few words changed), so every pipeline stage
(filters, exact + MinHash dedup, tokenizer training, tokenization) does real work.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _vocab(rng: np.random.Generator, n: int = 20_000) -> np.ndarray:
    syll = ["ka", "lo", "mi", "ren", "to", "sa", "vel", "dor", "in", "ap", "el", "un", "ber", "qui", "sta",
            "mon", "tri", "ga", "phe", "or", "wil", "lun", "ny", "ze", "cor", "ith", "ba", "rus", "fen", "ost"]
    words = set()
    while len(words) < n:
        words.add("".join(rng.choice(syll, size=rng.integers(1, 4))))
    out = np.array(sorted(words), dtype=object)
    rng.shuffle(out)
    return np.concatenate([out, np.array(["."], dtype=object)])


def generate(path: Path, size_mb: float, seed: int = 0) -> dict:
    """Stream a synthetic JSONL corpus of about `size_mb` MB to `path`; return what was planted."""
    rng = np.random.default_rng(seed)
    vocab = _vocab(rng)
    ranks = np.arange(1, len(vocab))
    p = 1.0 / ranks**1.05
    cdf = np.cumsum(p / p.sum())
    target, written, docs, exact, near = int(size_mb * 1e6), 0, 0, 0, 0
    recent: list[str] = []
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            r = rng.random()
            if r < 0.03 and recent:
                text = recent[int(rng.integers(len(recent)))]
                exact += 1
            elif r < 0.05 and recent:
                words = recent[int(rng.integers(len(recent)))].split(" ")
                i = int(rng.integers(0, max(1, len(words) - 3)))
                words[i: i + 2] = ["zanzibar", "quokka"]
                text = " ".join(words)
                near += 1
            else:
                n = int(np.clip(rng.lognormal(5.6, 0.6), 50, 1500))
                ids = np.searchsorted(cdf, rng.random(n))
                ids[rng.random(n) < 0.08] = len(vocab) - 1  # sentence ends
                text = " ".join(vocab[ids].tolist()).replace(" .", ".")
                recent = (recent + [text])[-64:]
            line = json.dumps({"text": text, "id": docs}) + "\n"
            f.write(line)
            written += len(line)
            docs += 1
    return {"documents": docs, "planted_exact": exact, "planted_near": near, "bytes": path.stat().st_size}


def child(size_mb: float, workdir: Path, vocab_size: int, tokenizer: str | None, keep: bool, workers: int) -> dict:
    """Generate, then prepare, in this process; report throughput and peak RSS."""
    from chatforge.data.corpus import PrepareConfig, prepare

    src = workdir / f"synthetic-{size_mb:g}mb.jsonl"
    t0 = time.time()
    planted = generate(src, size_mb)
    gen_s = time.time() - t0
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = workdir / f"prepared-{size_mb:g}mb"
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.time()
    rep = prepare([src], out, PrepareConfig(vocab_size=vocab_size, progress=False, workers=workers),
                  tokenizer=Path(tokenizer) if tokenizer else None)
    elapsed = time.time() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)  # all threads (tokenizers uses several)
    peak = ru1.ru_maxrss / 1024
    if not keep:
        src.unlink()
        import shutil

        shutil.rmtree(out)
    return {
        "input_mb": round(planted["bytes"] / 1e6, 1), "workers": workers, "documents": rep["documents_read"],
        "kept": rep["documents_kept"], "exact_dups": rep["exact_duplicates"], "near_dups": rep["near_duplicates"],
        "planted_exact": planted["planted_exact"], "planted_near": planted["planted_near"],
        "tokens": sum(s["tokens"] for s in rep["splits"].values()),
        "generate_s": round(gen_s, 1), "prepare_s": round(elapsed, 1),
        **rep["timings"],
        "docs_per_s": round(rep["documents_read"] / elapsed), "mb_per_s": round(planted["bytes"] / 1e6 / elapsed, 2),
        "cpu_s": round(cpu, 1), "mb_per_cpu_s": round(planted["bytes"] / 1e6 / cpu, 2),
        "rss_after_generate_mb": round(rss_before), "peak_rss_mb": round(peak),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=float, default=300.0, help="input size for a single run")
    ap.add_argument("--sizes", type=str, default=None, help="comma-separated sizes in MB (overrides --size-mb)")
    ap.add_argument("--workdir", type=str, default=None, help="where to write inputs/outputs (default: temp)")
    ap.add_argument("--vocab-size", type=int, default=4096, help="BPE size trained when no --tokenizer")
    ap.add_argument("--tokenizer", type=str, default=None, help="use this tokenizer dir instead of training one")
    ap.add_argument("--workers", type=int, default=0, help="PrepareConfig.workers (0 = auto)")
    ap.add_argument("--keep", action="store_true", help="keep the generated input and prepared output")
    ap.add_argument("--json", type=str, default=None, help="also write the results here")
    ap.add_argument("--child", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child is not None:
        res = child(args.child, Path(args.workdir), args.vocab_size, args.tokenizer, args.keep, args.workers)
        print("RESULT " + json.dumps(res))
        return

    sizes = [float(s) for s in args.sizes.split(",")] if args.sizes else [args.size_mb]
    results = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for size in sizes:
            cmd = [sys.executable, __file__, "--child", str(size), "--workdir", tmp, "--vocab-size",
                   str(args.vocab_size), "--workers", str(args.workers)] + (["--tokenizer", args.tokenizer] if args.tokenizer else []) + \
                  (["--keep"] if args.keep else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                sys.exit(f"size {size} MB failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
            res = json.loads(lines[-1][len("RESULT "):])
            results.append(res)
            print(json.dumps(res), flush=True)

    from rich.console import Console
    from rich.table import Table

    t = Table(title="chatforge data prepare — synthetic JSONL")
    cols = ["input_mb", "workers", "documents", "kept", "exact_dups", "near_dups", "tokens", "prepare_s",
            "read_filter_dedup_s", "tokenizer_s", "tokenize_s", "docs_per_s", "mb_per_s", "cpu_s", "mb_per_cpu_s",
            "peak_rss_mb"]
    for c in cols:
        t.add_column(c, justify="right")
    for r in results:
        t.add_row(*[f"{r[c]:,}" if isinstance(r[c], int) else str(r[c]) for c in cols])
    Console(width=200).print(t)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
