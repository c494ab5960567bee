"""Shared test helpers: a tiny prepared data dir built without the corpus pipeline; a live uvicorn server."""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np

STORY = (
    "Once upon a time there was a little girl named Lily. She liked to play outside in the sun. "
    "One day she saw a big red ball in the park. She ran to get it and laughed with her friend Tom. "
)


def make_data_dir(root: Path, tok, n_docs: int = 120) -> Path:
    """Shards in `data prepare`'s format (meta.json + train/val .bin), from repeated short stories."""
    root.mkdir(parents=True, exist_ok=True)
    ids: list[int] = []
    for i in range(n_docs):
        ids += [tok.bos_token_id] + tok.encode(f"{STORY} Story {i}.", add_special_tokens=False)
    arr = np.array(ids, dtype=np.uint16)
    cut = len(arr) * 9 // 10
    for split, part in (("train", arr[:cut]), ("val", arr[cut:])):
        (root / split).mkdir(exist_ok=True)
        part.tofile(root / split / "shard-00000.bin")
    tok.save_pretrained(root / "tokenizer")
    meta = {"dtype": "uint16", "vocab_size": len(tok), "bos_id": tok.bos_token_id, "tokenizer": "tokenizer",
            "splits": {"train": {"shards": ["shard-00000.bin"], "tokens": int(cut)},
                       "val": {"shards": ["shard-00000.bin"], "tokens": int(len(arr) - cut)}}}
    (root / "meta.json").write_text(json.dumps(meta))
    return root


TINY = ["model.depth=1", "model.aspect=64", "model.head_dim=32", "train.seq_len=32", "train.batch_size=4",
        "train.warmup_steps=2", "train.log_every=5", "log.tensorboard=false"]


def run_killed_then_resumed(cmd: list[str], out: Path, ckpt_step: int, env: dict, timeout: float = 600):
    """Start `cmd`, SIGKILL it once checkpoints/step-<ckpt_step> exists, then run it again to the end."""
    import signal
    import subprocess
    import time

    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not (out / "checkpoints" / f"step-{ckpt_step}" / "meta.json").exists():
        assert p.poll() is None and time.time() < deadline, "run ended before its checkpoint"
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL
    assert not (out / "model").exists(), "killed too late to test resume"
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_resumed(r, out, ckpt_step)
    return r


def assert_resumed(r, out: Path, min_step: int) -> int:
    """The run whose output is `r` resumed from one of OUT's checkpoints at step >= MIN_STEP (train_loop's
    "resumed from <dir>/step-N (step N)" line), not retrained from scratch; returns N."""
    import re

    flat = re.sub(r"\s+", "", r.stdout + r.stderr)  # rich folds long lines at the console width
    ckpts = re.sub(r"\s+", "", str(out / "checkpoints"))
    found = re.findall(r"resumedfrom" + re.escape(ckpts) + r"/step-(\d+)\(step(\d+)\)", flat)
    assert found, f"no 'resumed from {out / 'checkpoints'}/step-N' line: the second run did not resume\n{r.stdout[-2000:]}"
    assert len(found) == 1 and found[0][0] == found[0][1], found
    step = int(found[0][0])
    assert step >= min_step, f"resumed from step {step}, before the checkpoint at {min_step} the first run wrote"
    return step


def save_tiny_model(path: Path, tok, factory, **kw) -> Path:
    model = factory(tok, **kw)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, nproc: int = 2, probe: bool = False) -> list[str]:
    """`torchrun --nproc-per-node N -m chatforge.cli ARGS` on a free rendezvous port (tests never share one).

    `probe=True` runs the same CLI through this file's `__main__`, which makes every rank write
    OUT/probe/rank<r>.json (see `rank_probe`): read it with `assert_ranks_disjoint_and_in_sync`."""
    entry = [str(Path(__file__).resolve())] if probe else ["-m", "chatforge.cli"]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
            str(free_port()), *entry, *args]


def _digest(modules: dict) -> str:
    """sha256 over every module's state dict (names and bytes; a sharded DTensor is gathered first)."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for name in sorted(modules):
        for key, t in sorted(modules[name].state_dict().items()):
            if hasattr(t, "full_tensor"):
                t = t.full_tensor()
            if isinstance(t, torch.Tensor):
                h.update(f"{name}.{key}:{t.dtype}:{tuple(t.shape)}".encode())
                h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def rank_probe(argv: list[str]) -> None:
    """Run `chatforge ARGV` on this rank, recording in OUT/probe/rank<RANK>.json what the training loop read
    and held: for every batch of the loop's data loaders (EpochLoader's items, PromptStream's prompts) the
    loader's name, epoch and item indices, and a digest of the trained modules before and after the loop."""
    import importlib
    import os

    from chatforge.core.rollout import PromptStream
    from chatforge.data.sampler import EpochLoader

    stage = importlib.import_module(f"chatforge.stages.{argv[0]}")
    out = Path(argv[argv.index("--out") + 1])
    rank = int(os.environ["RANK"])
    record: dict = {"rank": rank, "world_size": int(os.environ["WORLD_SIZE"]), "batches": []}
    streams: dict[int, str] = {}
    real_next = PromptStream.__next__

    def next_recorded(self):
        idx = real_next(self)
        if id(self) in streams:
            record["batches"].append([streams[id(self)], self.epoch, [int(i) for i in idx]])
        return idx

    PromptStream.__next__ = next_recorded
    real_loop = stage.train_loop

    def loop(run, cfg, *, modules, stateful, **kw):
        for name, obj in stateful.items():
            if isinstance(obj, EpochLoader):
                def collate(idx, name=name, obj=obj, real=obj.collate_fn):
                    record["batches"].append([name, obj.epoch, [int(i) for i in idx]])
                    return real(idx)

                obj.collate_fn = collate
            elif isinstance(obj, PromptStream):
                streams[id(obj)] = name
        record["params_before"] = _digest(modules)
        state = real_loop(run, cfg, modules=modules, stateful=stateful, **kw)
        record["params_after"], record["steps"] = _digest(modules), state.step
        (out / "probe").mkdir(parents=True, exist_ok=True)
        (out / "probe" / f"rank{rank}.json").write_text(json.dumps(record))
        return state

    stage.train_loop = loop
    sys.argv = ["chatforge", *argv]
    from chatforge.cli import main

    main()


def run_probed(args: list[str], out: Path, steps: int, env: dict | None = None) -> dict[int, dict]:
    """Run `chatforge ARGS` as 2 probed torchrun ranks (see `torchrun(..., probe=True)`); it must complete, every
    rank read its own slice and the ranks end in sync (`assert_ranks_disjoint_and_in_sync`). Returns the records."""
    import os
    import subprocess

    env = env or {**os.environ, "CI": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(torchrun(*args, probe=True), env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "manifest.json").read_text())["status"] == "completed"
    return assert_ranks_disjoint_and_in_sync(out, steps=steps)


def assert_ranks_disjoint_and_in_sync(out: Path, steps: int, nproc: int = 2) -> dict[int, dict]:
    """What `torchrun(..., probe=True)` recorded: every rank ran STEPS steps; within an epoch no item of a
    loader was read twice, by any rank (each rank had its own slice of every global batch); the ranks'
    parameters were identical after the steps, and the steps changed them. Returns the records by rank."""
    recs = {r: json.loads((out / "probe" / f"rank{r}.json").read_text()) for r in range(nproc)}
    assert all(rec["steps"] == steps and rec["world_size"] == nproc for rec in recs.values()), recs
    loaders = {b[0] for rec in recs.values() for b in rec["batches"]}
    assert loaders, "no training batch was recorded"
    for name in loaders:
        per_rank = {r: [b for b in rec["batches"] if b[0] == name] for r, rec in recs.items()}
        counts = {r: len(bs) for r, bs in per_rank.items()}
        assert len(set(counts.values())) == 1 and counts[0] >= steps, (name, counts)
        seen: dict[tuple[int, int], int] = {}
        for r, bs in per_rank.items():
            for _, epoch, idx in bs:
                assert idx, (name, r, "an empty batch")
                for i in idx:
                    assert (epoch, i) not in seen, f"{name}: item {i} of epoch {epoch} read by rank {seen[(epoch, i)]} and rank {r}"
                    seen[(epoch, i)] = r
    after = {rec["params_after"] for rec in recs.values()}
    assert len(after) == 1, "the ranks' parameters differ after the steps (gradients not averaged?)"
    assert recs[0]["params_before"] != recs[0]["params_after"], "the steps did not change the parameters"
    assert len({rec["params_before"] for rec in recs.values()}) == 1, "the ranks started from different parameters"
    return recs


@contextlib.contextmanager
def live(app):
    """Run `app` under uvicorn in a thread; yield its base URL; shut it down (lifespan stops the scheduler)."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


if __name__ == "__main__":  # torchrun(..., probe=True) runs this file on every rank
    rank_probe(sys.argv[1:])
