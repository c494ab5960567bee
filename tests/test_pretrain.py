"""Pretraining: a run dir that loads with plain transformers, exact resume after SIGKILL, torchrun DDP."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import (
    TINY,
    assert_resumed,
    make_data_dir,
    run_killed_then_resumed,
    run_probed,
)

CLI = [sys.executable, "-m", "chatforge.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "1"}


def _args(out, data, steps, extra=()):
    sets = [*TINY, f"data.dir={data}", f"train.max_steps={steps}", "train.checkpoint_every=5",
            "train.eval_every=10", "train.threads=1", *extra]
    return [*CLI, "pretrain", "--out", str(out), *sum([["--set", s] for s in sets], [])]


@pytest.fixture(scope="module")
def data_dir(tiny_tokenizer, tmp_path_factory):
    return make_data_dir(tmp_path_factory.mktemp("data"), tiny_tokenizer)


def test_pretrain_writes_loadable_run_dir(data_dir, tmp_path):
    out = tmp_path / "run"
    r = subprocess.run(_args(out, data_dir, 10), env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    man = json.loads((out / "manifest.json").read_text())
    assert man["stage"] == "pretrain" and man["status"] == "completed"
    assert man["config"]["train"]["max_steps"] == 10 and man["inputs"]["data"]["sha256"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("val/loss" in r for r in rows) and rows[-1]["step"] == 10
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tok = AutoTokenizer.from_pretrained(out / "model")
    ids = tok("Once upon", return_tensors="pt").input_ids
    assert model(ids).logits.shape[-1] == len(tok)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-10", "step-5"]


def test_exact_resume_after_sigkill(data_dir, tmp_path):
    steps = 60
    ref = tmp_path / "ref"
    r = subprocess.run(_args(ref, data_dir, steps), env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr

    out = tmp_path / "killed"
    r = run_killed_then_resumed(_args(out, data_dir, steps), out, 10, ENV)
    assert assert_resumed(r, out, 10) < steps  # resumed from the killed run's checkpoint, not retrained
    a = (ref / "model" / "model.safetensors").read_bytes()
    b = (out / "model" / "model.safetensors").read_bytes()
    assert a == b, "resumed run's final weights differ from the uninterrupted run"


def test_checkpoint_from_another_config_is_refused(data_dir, tmp_path):
    out = tmp_path / "run"
    assert subprocess.run(_args(out, data_dir, 5), env=ENV, capture_output=True).returncode == 0
    r = subprocess.run(_args(out, data_dir, 10, ["model.aspect=32"]), env=ENV, capture_output=True, text=True)
    assert r.returncode == 1
    assert "another config" in r.stderr and "Traceback" not in r.stderr


def test_torchrun_two_processes(data_dir, tmp_path):
    out = tmp_path / "ddp"
    # every rank read its own windows (none twice, by any rank) and the ranks hold the same weights
    recs = run_probed(_args(out, data_dir, 10)[3:], out, steps=10, env=ENV)
    assert all(len(idx) == 4 for rec in recs.values() for _, _, idx in rec["batches"])
    # the position all ranks share: a global step consumed 2 x batch_size windows
    state = torch.load(out / "checkpoints" / "step-10" / "state.pt", weights_only=False)
    assert state["data"]["cursor"] == 10 * 2 * 4
    assert sorted(p.name for p in (out / "checkpoints" / "step-10").glob("rng-rank*.pt")) == \
        ["rng-rank0.pt", "rng-rank1.pt"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [5, 10], "only rank 0 writes metrics"


def test_bad_data_dir_is_one_line_error(tmp_path):
    r = subprocess.run([*CLI, "pretrain", "--out", str(tmp_path / "x"), "--set", f"data.dir={tmp_path}"],
                       env=ENV, capture_output=True, text=True)
    assert r.returncode == 1 and "not a prepared data dir" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists()
