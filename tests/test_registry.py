"""Model registry: lineage back to the corpus, idempotent and concurrent registration, Run hook."""

import json
import multiprocessing as mp

import pytest
from rich.console import Console

from chatforge.core.io import UserError
from chatforge.core.registry import (
    REGISTRY_ENV,
    lineage,
    lineage_tree,
    list_runs,
    register,
    registry_path,
    registry_table,
)

DATA_SHA = "ab" * 32


def _run(d, run_id, stage, parent=None, inputs=None, metrics=None, **extra):
    d.mkdir(parents=True, exist_ok=True)
    (d / "model").mkdir(exist_ok=True)
    (d / "manifest.json").write_text(json.dumps({
        "run_id": run_id, "stage": stage, "status": "completed", "parent": parent, "inputs": inputs or {},
        "config": {}, "metrics": metrics or {}, "created_at": f"2026-01-0{len(run_id) % 9 + 1}T00:00:00+00:00",
        **extra}))
    return d


@pytest.fixture
def chain(tmp_path, monkeypatch):
    """runs/{pre,sft,rm,ppo}: pretrain from data, SFT on it, RM from SFT, PPO on SFT with that RM."""
    monkeypatch.delenv(REGISTRY_ENV, raising=False)
    runs = tmp_path / "runs"
    pre = _run(runs / "pre", "pretrain-1", "pretrain", inputs={"data": {"path": "d/meta.json", "sha256": DATA_SHA}},
               metrics={"best_val_loss": 3.25, "steps": 100}, data_dir=str(tmp_path / "d"))
    sft = _run(runs / "sft", "sft-1", "sft", parent="pretrain-1",
               inputs={"data": {"specs": ["tasks:3"], "sha256": "cd" * 32}, "model": {"path": str(pre / "model")}})
    rm = _run(runs / "rm", "rm-1", "rm", parent="sft-1",
              inputs={"data": {"specs": ["cmp.jsonl"], "sha256": "ef" * 32}, "model": {"path": str(sft / "model")}},
              metrics={"val_accuracy": 0.7})
    ppo = _run(runs / "ppo", "ppo-1", "ppo", parent="sft-1",
               inputs={"policy": {"path": str(sft / "model")}, "reward": {"spec": str(rm)},
                       "prompts": {"spec": "tasks:4", "sha256": "12" * 32}},
               metrics={"iterations": 20, "guards_fired": {"kl": 2}})
    for d in (pre, sft, rm, ppo):
        register(d)
    return runs


def test_default_path_is_beside_the_runs(chain, tmp_path, monkeypatch):
    assert registry_path(chain / "ppo") == chain / "registry.json"
    assert registry_path(chain / "a" / "b" / "c") == chain / "registry.json"  # nearest ancestor named runs
    assert registry_path(tmp_path / "elsewhere" / "x") == tmp_path / "elsewhere" / "registry.json"
    monkeypatch.setenv(REGISTRY_ENV, str(tmp_path / "mine.json"))
    assert registry_path(chain / "ppo") == tmp_path / "mine.json"


def test_lineage_back_to_the_corpus(chain):
    reg = chain / "registry.json"
    ids = [e["run_id"] for e in lineage("ppo-1", reg)]
    assert ids == ["ppo-1", "sft-1", "pretrain-1", f"data:{DATA_SHA[:16]}"]
    assert lineage("ppo-1", reg)[-1]["stage"] == "data"
    assert [e["run_id"] for e in lineage("rm-1", reg)] == ["rm-1", "sft-1", "pretrain-1", f"data:{DATA_SHA[:16]}"]
    ppo = lineage("ppo-1", reg)[0]
    assert ppo["data"] == {"prompts": "12" * 32} and ppo["uses"]["reward"] == str(chain / "rm")
    assert ppo["metrics"]["iterations"] == 20 and "guards_fired" not in ppo["metrics"]  # scalars only
    assert lineage("sft", reg)[0]["run_id"] == "sft-1"  # unique prefix
    assert lineage(str(chain / "rm"), reg)[0]["run_id"] == "rm-1"  # or a path
    with pytest.raises(UserError, match="no run 'nope'"):
        lineage("nope", reg)

    console = Console(record=True, width=250)
    console.print(lineage_tree("ppo-1", reg))
    text = console.export_text()
    for needle in ("data:abababab", "pretrain-1", "sft-1", "ppo-1", "reward:", "rm-1", "best_val_loss=3.25"):
        assert needle in text, needle
    assert text.index("pretrain-1") < text.index("sft-1") < text.index("ppo-1")  # corpus at the root


def test_list_and_table(chain):
    reg = chain / "registry.json"
    rows = list_runs(reg)
    assert {r["run_id"] for r in rows} == {"pretrain-1", "sft-1", "rm-1", "ppo-1"}
    assert [r["run_id"] for r in list_runs(reg, stage="rm")] == ["rm-1"]
    console = Console(record=True, width=250)
    console.print(registry_table(rows))
    text = console.export_text()
    assert "4 registered run(s)" in text and "pretrain-1" in text and "val_accuracy=0.7" in text


def test_register_is_idempotent(chain):
    reg = chain / "registry.json"
    before = reg.read_bytes()
    entry = register(chain / "sft")
    assert reg.read_bytes() == before  # nothing changed, nothing rewritten
    assert entry["registered_at"] == json.loads(before)["runs"]["sft-1"]["registered_at"]
    m = json.loads((chain / "sft" / "manifest.json").read_text())
    m["metrics"] = {"best_val_loss": 1.5}
    (chain / "sft" / "manifest.json").write_text(json.dumps(m))
    register(chain / "sft")
    runs = json.loads(reg.read_text())["runs"]
    assert len(runs) == 4 and runs["sft-1"]["metrics"] == {"best_val_loss": 1.5}


def _register_many(args):
    dirs, reg = args
    for d in dirs:
        register(d, reg)
    return len(dirs)


def test_concurrent_register_loses_nothing(tmp_path):
    dirs = [str(_run(tmp_path / "runs" / f"r{i}", f"sft-{i:02d}", "sft")) for i in range(24)]
    reg = str(tmp_path / "runs" / "registry.json")
    ctx = mp.get_context("fork")
    with ctx.Pool(4) as pool:
        assert sum(pool.map(_register_many, [(dirs[i::4], reg) for i in range(4)])) == 24
    assert len(json.loads((tmp_path / "runs" / "registry.json").read_text())["runs"]) == 24
    assert not list((tmp_path / "runs").glob(".registry.json.*.tmp"))  # atomic writes left no temp files


def test_bad_inputs(tmp_path):
    with pytest.raises(UserError, match="no manifest.json"):
        register(tmp_path)
    reg = tmp_path / "registry.json"
    reg.write_text("{not json")
    with pytest.raises(UserError, match="corrupt registry"):
        list_runs(reg)


def test_run_registers_on_completion(tmp_path, monkeypatch):
    from chatforge.core.distributed import DistInfo
    from chatforge.core.run import Run

    monkeypatch.delenv(REGISTRY_ENV, raising=False)
    run = Run(tmp_path / "runs" / "x", "sft", None, DistInfo(), parent="pretrain-9")
    run.write_manifest("running")
    assert not (tmp_path / "runs" / "registry.json").exists()
    run.write_manifest("completed", {"final_loss": 2.0})
    (entry,) = list_runs(tmp_path / "runs" / "registry.json")
    assert entry["run_id"] == run.run_id and entry["parent"] == "pretrain-9" and entry["metrics"]["final_loss"] == 2.0
    (tmp_path / "runs" / "registry.json").write_text("garbage")  # a broken registry never fails the run
    run.write_manifest("completed")
    assert json.loads((tmp_path / "runs" / "x" / "manifest.json").read_text())["status"] == "completed"
