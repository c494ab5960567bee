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
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def save_tiny_model(path: Path, tok, factory, **kw) -> Path:
    model = factory(tok, **kw)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, nproc: int = 2) -> list[str]:
    """`torchrun --nproc-per-node N -m chatforge.cli ARGS` on a free rendezvous port (tests never share one)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
            str(free_port()), "-m", "chatforge.cli", *args]


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
