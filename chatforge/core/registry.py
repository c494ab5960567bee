"""The model registry: which data and which model made each run (DESIGN.md "Artifacts").

    chatforge registry list [--registry runs/registry.json] [--stage ppo]
    chatforge registry show RUN_ID            # the lineage back to the corpus, as a tree

One JSON file, `registry.json`, maps run ids to a small summary of each run's manifest: stage, status,
parent run id, data hashes (from the manifest's inputs), the models it used (reward, reference),
key metrics, path and created_at. Where it lives, first match wins:

1. an explicit `registry=` argument (the CLI's `--registry`);
2. the `CHATFORGE_REGISTRY` environment variable;
3. beside the run dirs: `<nearest ancestor named runs>/registry.json`, else `<run dir's parent>/registry.json`
   (with no run dir at hand, `./runs/registry.json`).

Writers take an exclusive file lock (`registry.json.lock`) around read-modify-write and replace the file
atomically, so concurrent `register` calls from parallel runs never lose an entry or leave half a file.
A pretrain run from scratch has no parent run; its parent is its data: `data:<sha256 of meta.json>`.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from chatforge.core.io import UserError, write_json
from chatforge.core.run import read_manifest

REGISTRY_ENV = "CHATFORGE_REGISTRY"
REGISTRY_FILE = "registry.json"
DATA_PREFIX = "data:"
# Manifest metrics worth a column in `registry list` (first ones found, in this order).
KEY_METRICS = ("best_val_loss", "final_loss", "val_accuracy", "accuracy", "steps", "iterations", "tokens")
MAX_METRICS = 12  # scalar manifest metrics kept per entry


# ----------------------------------------------------------------------------- where and how


def registry_path(run_dir: str | Path | None = None, registry: str | Path | None = None) -> Path:
    """The registry file for `run_dir` (see the module docstring for the order of precedence)."""
    if registry:
        return Path(registry)
    if env := os.environ.get(REGISTRY_ENV):
        return Path(env)
    if run_dir is None:
        return Path("runs") / REGISTRY_FILE
    d = Path(run_dir).resolve()
    for a in d.parents:
        if a.name == "runs":
            return a / REGISTRY_FILE
    return d.parent / REGISTRY_FILE


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Exclusive advisory lock on `<registry>.lock` (a no-op where fcntl does not exist)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: atomic replace still keeps the file whole
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _load(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: corrupt registry ({e}); fix or delete it and re-register the runs") from None
    runs = obj.get("runs") if isinstance(obj, dict) else None
    if not isinstance(runs, dict):
        raise UserError(f"{path}: not a chatforge registry (expected {{\"runs\": {{run_id: entry}}}})")
    return runs


# ----------------------------------------------------------------------------- entries


def _scalar_metrics(metrics: dict) -> dict[str, Any]:
    out = {}
    for k, v in (metrics or {}).items():
        if isinstance(v, (int, float, str, bool)) or v is None:
            out[k] = v
        if len(out) >= MAX_METRICS:
            break
    return out


def entry_from_manifest(run_dir: Path, manifest: dict) -> dict:
    """The registry entry of one run dir: ids, stage, data hashes, models used, key metrics, path."""
    data, uses = {}, {}
    for name, inp in (manifest.get("inputs") or {}).items():
        if not isinstance(inp, dict):
            continue
        if inp.get("sha256"):
            data[name] = inp["sha256"]
        elif name not in ("model", "policy") and (inp.get("path") or inp.get("spec")):
            uses[name] = str(inp.get("path") or inp.get("spec"))  # reward / reference models
    parent = manifest.get("parent")
    if parent is None and manifest.get("stage") == "pretrain" and data.get("data"):
        parent = f"{DATA_PREFIX}{data['data'][:16]}"
    cfg = manifest.get("config") or {}
    base = (cfg.get("model") or {}).get("from") if isinstance(cfg.get("model"), dict) else cfg.get("model")
    return {
        "run_id": manifest["run_id"],
        "stage": manifest.get("stage"),
        "status": manifest.get("status"),
        "parent": parent,
        "base_model": base if isinstance(base, str) else None,
        "data": data,
        "data_dir": manifest.get("data_dir"),
        "uses": uses,
        "metrics": _scalar_metrics(manifest.get("metrics") or {}),
        "path": str(Path(run_dir).resolve()),
        "created_at": manifest.get("created_at"),
        "chatforge_version": manifest.get("chatforge_version"),
    }


def register(run_dir: str | Path, registry: str | Path | None = None) -> dict:
    """Add or refresh `run_dir` in the registry (idempotent; locked; atomic). Returns the entry."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    if not manifest or "run_id" not in manifest:
        raise UserError(f"{run_dir}: no manifest.json with a run_id; is it a chatforge run dir?")
    entry = entry_from_manifest(run_dir, manifest)
    path = registry_path(run_dir, registry)
    with _locked(path):
        runs = _load(path)
        old = runs.get(entry["run_id"])
        entry["registered_at"] = (old or {}).get("registered_at") or datetime.now(timezone.utc).isoformat()
        if old != entry:
            runs[entry["run_id"]] = entry
            write_json(path, {"version": 1, "runs": runs})
    return entry


def list_runs(registry: str | Path | None = None, stage: str | None = None) -> list[dict]:
    """Every registered run (oldest first), optionally of one stage."""
    rows = sorted(_load(registry_path(None, registry)).values(), key=lambda e: (e.get("created_at") or "", e["run_id"]))
    return [r for r in rows if stage is None or r.get("stage") == stage]


def find_run(ref: str, registry: str | Path | None = None) -> dict:
    """An entry by run id, unique run-id prefix, or run dir path."""
    runs = _load(registry_path(None, registry))
    if ref in runs:
        return runs[ref]
    p = Path(ref)
    if p.exists():
        target = str(p.resolve())
        for e in runs.values():
            if target in (e["path"], str(Path(e["path"]) / "model")):
                return e
    hits = [e for k, e in runs.items() if k.startswith(ref)]
    if len(hits) == 1:
        return hits[0]
    where = registry_path(None, registry)
    if hits:
        raise UserError(f"run id prefix '{ref}' is ambiguous in {where}: {', '.join(h['run_id'] for h in hits[:5])}")
    raise UserError(f"no run '{ref}' in {where} (see `chatforge registry list`)")


def _data_node(parent_id: str, child: dict) -> dict:
    return {"run_id": parent_id, "stage": "data", "status": None, "parent": None,
            "data": {"data": child.get("data", {}).get("data")}, "path": child.get("data_dir"), "uses": {},
            "metrics": {}, "created_at": None}


def lineage(run_id: str, registry: str | Path | None = None) -> list[dict]:
    """The run and its ancestors, newest first, back to the corpus (a `data:` node) or the first
    unregistered / external parent (a node with stage "unregistered")."""
    runs = _load(registry_path(None, registry))
    chain = [find_run(run_id, registry)]
    seen = {chain[0]["run_id"]}
    while (parent := chain[-1].get("parent")) and parent not in seen:
        seen.add(parent)
        if parent in runs:
            chain.append(runs[parent])
        elif parent.startswith(DATA_PREFIX):
            chain.append(_data_node(parent, chain[-1]))
        else:
            chain.append({"run_id": parent, "stage": "unregistered", "parent": None, "data": {}, "uses": {},
                          "metrics": {}, "path": None, "created_at": None})
    return chain


# ----------------------------------------------------------------------------- rendering


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _key_metrics(e: dict, k: int = 2) -> str:
    m = e.get("metrics") or {}
    shown = [f"{name}={_fmt(m[name])}" for name in KEY_METRICS if m.get(name) is not None][:k]
    return " ".join(shown)


def registry_table(rows: list[dict]) -> Any:
    """A rich Table of registry entries (run id, stage, status, parent, data, metrics, created, path)."""
    from rich.table import Table

    t = Table(title=f"{len(rows)} registered run(s)")
    for col in ("run id", "stage", "status", "parent", "data", "key metrics", "created", "path"):
        t.add_column(col, overflow="fold")
    for e in rows:
        data = " ".join(f"{k}:{v[:8]}" for k, v in (e.get("data") or {}).items() if v)
        t.add_row(e["run_id"], str(e.get("stage")), str(e.get("status") or ""), str(e.get("parent") or "-"),
                  data or "-", _key_metrics(e) or "-", (e.get("created_at") or "")[:19], str(e.get("path") or ""))
    return t


def _label(e: dict) -> str:
    if e.get("stage") == "data":
        return f"[bold]corpus[/bold] {e['run_id']}" + (f"  [dim]{e['path']}[/dim]" if e.get("path") else "")
    data = ", ".join(f"{k} {v[:12]}" for k, v in (e.get("data") or {}).items() if v)
    bits = [f"[bold]{e.get('stage')}[/bold] {e['run_id']}"]
    if data:
        bits.append(f"[dim]data: {data}[/dim]")
    if e.get("base_model") and e.get("stage") == "pretrain":
        bits.append(f"[dim]from {e['base_model']}[/dim]")
    if m := _key_metrics(e, 3):
        bits.append(m)
    if e.get("path"):
        bits.append(f"[dim]{e['path']}[/dim]")
    return "  ".join(bits)


def _used_run(spec: str, runs: dict[str, dict]) -> dict | None:
    p = Path(spec)
    target = str(p.resolve()) if p.exists() else None
    for e in runs.values():
        if target and target in (e["path"], str(Path(e["path"]) / "model")):
            return e
    return None


def lineage_tree(run_id: str, registry: str | Path | None = None) -> Any:
    """A rich Tree from the corpus (root) down to `run_id`, with models each run used as side branches."""
    from rich.tree import Tree

    runs = _load(registry_path(None, registry))
    chain = list(reversed(lineage(run_id, registry)))
    root = Tree(_label(chain[0]))
    node = root
    for i, e in enumerate(chain):
        if i:
            node = node.add(_label(e))
        for role, spec in (e.get("uses") or {}).items():
            used = _used_run(spec, runs)
            node.add(f"[italic]{role}:[/italic] " + (_label(used) if used else spec))
    return root
