"""Metric sinks (a tiny protocol, torchtune's MetricLoggerInterface): JSONL, TensorBoard, W&B, null.

Rank 0 gets the real sinks; other ranks get `NullSink` (nanochat's DummyWandb).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Protocol


class MetricSink(Protocol):
    def log(self, step: int, metrics: dict[str, float]) -> None: ...
    def close(self) -> None: ...


class NullSink:
    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlSink:
    """metrics.jsonl: one line per log step. On resume, lines past the resumed step are dropped."""

    def __init__(self, path: Path, resume_step: int = 0):
        self.path = path
        if path.exists():
            keep = []
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        keep.append(line)
                except json.JSONDecodeError:
                    continue  # a torn last line from a killed run
            path.write_text("".join(k + "\n" for k in keep), encoding="utf-8")
        self.f = open(path, "a", encoding="utf-8")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, "time": round(time.time(), 3)}
        row.update({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()})
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


class TensorBoardSink:
    def __init__(self, logdir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.w = SummaryWriter(str(logdir))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            if isinstance(v, (int, float)):
                self.w.add_scalar(k, v, step)
        self.w.flush()

    def close(self) -> None:
        self.w.close()


class WandbSink:
    def __init__(self, project: str, name: str, config: dict):
        import wandb  # optional dependency

        self.run = wandb.init(project=project, name=name, config=config)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class MultiSink:
    def __init__(self, sinks: list[Any]):
        self.sinks = sinks

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for s in self.sinks:
            s.log(step, metrics)

    def close(self) -> None:
        for s in self.sinks:
            s.close()


def final_mean(run_dir: Path, key: str = "objective/kl", last: int = 5) -> float | None:
    """Mean of `key` over the last `last` rows of a run's metrics.jsonl that have it (None when none do)."""
    vals = [r[key] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if r.get(key) is not None]
    return sum(vals[-last:]) / len(vals[-last:]) if vals else None


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
