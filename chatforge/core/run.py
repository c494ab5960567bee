"""A run dir: manifest.json, model/, checkpoints/, metrics.jsonl, tb/ (see DESIGN.md "Artifacts")."""

from __future__ import annotations

import hashlib
import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import chatforge
from chatforge.config import to_dict
from chatforge.core.distributed import DistInfo
from chatforge.core.io import UserError, sha256_path, write_json
from chatforge.core.tracking import JsonlSink, MultiSink, NullSink, TensorBoardSink, WandbSink


def new_run_id(stage: str) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    salt = hashlib.sha1(f"{time.time_ns()}".encode()).hexdigest()[:6]
    return f"{stage}-{stamp}-{salt}"


def read_manifest(run_dir: Path) -> dict | None:
    p = Path(run_dir) / "manifest.json"
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{p}: corrupt manifest ({e})") from None


def parent_run_id(model_dir: Path) -> str | None:
    """The run id of the run that produced a model dir (its parent's manifest), if any."""
    for d in (Path(model_dir), Path(model_dir).parent):
        m = read_manifest(d)
        if m:
            return m.get("run_id")
    return None


def _register_quietly(run_dir: Path) -> None:
    """Record a finished run in the registry; a registry problem must never fail the run itself."""
    try:
        from chatforge.core.registry import register

        register(run_dir)
    except Exception as e:  # noqa: BLE001 - the model is saved; a bad registry file only costs a warning
        from chatforge.core.log import warn

        warn(f"could not register {run_dir} in the model registry: {e}")


class Run:
    """Owns one run dir. Only rank 0 writes; other ranks get null sinks."""

    def __init__(self, out: Path, stage: str, cfg: Any, info: DistInfo, inputs: dict[str, str | Path] | None = None,
                 parent: str | None = None):
        self.dir = Path(out)
        self.stage, self.cfg, self.info = stage, cfg, info
        self.model_dir = self.dir / "model"
        self.ckpt_dir = self.dir / "checkpoints"
        old = read_manifest(self.dir) if self.dir.exists() else None
        if old and old.get("stage") != stage:
            raise UserError(f"{self.dir} holds a '{old.get('stage')}' run, not '{stage}'; choose another --out")
        self.run_id = old["run_id"] if old else new_run_id(stage)
        self.created_at = old["created_at"] if old else datetime.now(timezone.utc).isoformat()
        self.parent = parent
        self.inputs = {k: {"path": str(v), "sha256": sha256_path(v) if Path(v).exists() else None}
                       for k, v in (inputs or {}).items() if v is not None}
        self.sink: Any = NullSink()

    def open_sinks(self, resume_step: int) -> None:
        if not self.info.is_main:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        sinks: list[Any] = [JsonlSink(self.dir / "metrics.jsonl", resume_step)]
        log = getattr(self.cfg, "log", None)
        if log is None or log.tensorboard:
            sinks.append(TensorBoardSink(self.dir / "tb"))
        if log is not None and log.wandb:
            sinks.append(WandbSink(log.wandb_project, self.run_id, to_dict(self.cfg)))
        self.sink = MultiSink(sinks)

    def write_manifest(self, status: str, metrics: dict | None = None, extra: dict | None = None) -> None:
        if not self.info.is_main:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(self.dir / "manifest.json", {
            "run_id": self.run_id,
            "stage": self.stage,
            "status": status,
            "chatforge_version": chatforge.__version__,
            "created_at": self.created_at,
            "updated_at": datetime.now(timezone.utc).isoformat(),
            "parent": self.parent,
            "inputs": self.inputs,
            "config": to_dict(self.cfg),
            "metrics": metrics or {},
            **(extra or {}),
        })
        if status == "completed":
            _register_quietly(self.dir)

    def close(self) -> None:
        self.sink.close()
