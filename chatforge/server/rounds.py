"""People in `chatforge loop`: the label and feedback sources the CLI hands to the loop stage.

    chatforge loop --set labeler=app --set db=runs/chatforge.db --set app.overlap=3

`AppRankings.collect` pushes a round's sampled tasks into the web app as a campaign (each task to
`overlap` labelers), waits with a progress bar until every task has its rankings or the deadline
passes, and writes what labelers submitted through the app's forms as the round's comparisons: every
labeler's own ranking (InstructGPT trained on all of them, not a consensus), `consensus=True` writes
one aggregated ranking per task instead. The campaign id and deadline live in ROUND/app.json, so a
killed loop re-run waits on the same campaign, never imports it twice.

`DBFeedback.export` turns the same database's chat thumbs, chosen regenerates and edits into
comparisons (`chatforge export feedback`). Weighting: every exported pair counts as one comparison;
a ranked task of K replies also counts as one (its C(K,2) pairs share a weight of 1, as in
InstructGPT), so one thumbs pair weighs as much as one labeler's ranking.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from chatforge.core.io import UserError, write_json
from chatforge.core.log import console, print0


class AppRankings:
    """A round's rankings from the web app's labelers (see the module docstring)."""

    def __init__(self, db_url: str, overlap: int = 3, deadline_s: float = 86400.0, poll_s: float = 5.0,
                 consensus: bool = False, name: str = "loop", min_tasks: int = 1) -> None:
        if overlap < 1:
            raise UserError(f"app.overlap must be >= 1, not {overlap}")
        self.db_url, self.overlap, self.deadline_s, self.poll_s = db_url, overlap, deadline_s, poll_s
        self.consensus, self.name, self.min_tasks = consensus, name, min_tasks
        self._database: Any = None

    def _db(self) -> Any:
        from chatforge.server.db import open_db

        if self._database is None:  # open (and migrate) once, not on every poll
            self._database = open_db(self.db_url)
        return self._database

    def push(self, round_: int, tasks: Path, state_path: Path) -> dict:
        """Import `tasks` as this round's campaign once; the state file makes a re-run find it again."""
        from chatforge.data.formats import read_tasks
        from chatforge.server.web import campaigns as cp
        from chatforge.server.web.models import Campaign

        if state_path.exists():
            return json.loads(state_path.read_text(encoding="utf-8"))
        db = self._db()
        with db.sessions() as s:
            c = Campaign(name=f"{self.name} round {round_}", overlap=self.overlap, allow_ties=True,
                         guidelines="Rank the replies from best to worst: helpful, honest and harmless first.")
            s.add(c)
            s.flush()
            n = cp.import_tasks(s, c, read_tasks(tasks))
            cp.audit(s, None, "campaign.import", c.id, name=c.name, tasks=n, overlap=self.overlap, source="loop")
            s.commit()
            state = {"campaign_id": c.id, "tasks": n, "overlap": self.overlap,
                     "created_at": datetime.now(timezone.utc).isoformat(), "deadline": time.time() + self.deadline_s}
        write_json(state_path, state)
        print0(f"round {round_}: {n} ranking tasks in campaign '{self.name} round {round_}' ({c.id}), "
               f"{self.overlap} labelers each")
        return state

    def progress(self, campaign_id: str) -> tuple[int, int]:
        """(tasks with `overlap` submitted rankings, tasks) of a campaign."""
        from chatforge.server.web.models import Assignment, RankTask

        with self._db().sessions() as s:
            per_task = (select(Assignment.task_id, func.count().label("n")).join(RankTask)
                        .where(RankTask.campaign_id == campaign_id, Assignment.status == "done")
                        .group_by(Assignment.task_id).subquery())
            full = s.scalar(select(func.count()).select_from(per_task).where(per_task.c.n >= self.overlap))
            total = s.scalar(select(func.count()).select_from(RankTask).where(RankTask.campaign_id == campaign_id))
        return int(full or 0), int(total or 0)

    def collect(self, round_: int, tasks: Path, out: Path) -> None:
        """Push, wait, pull: writes the round's comparisons to `out` (atomically)."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from chatforge.data.aggregate import aggregate
        from chatforge.data.formats import write_jsonl_records
        from chatforge.server.web import campaigns as cp

        state = self.push(round_, tasks, out.parent / "app.json")
        cid = state["campaign_id"]
        with Progress(TextColumn("[bold]ranked in the app"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console) as bar:
            t = bar.add_task("rank", total=state["tasks"])
            while True:
                full, total = self.progress(cid)
                bar.update(t, completed=full, total=total)
                if full >= total or time.time() >= state["deadline"]:
                    break
                time.sleep(self.poll_s)
        with self._db().sessions() as s:
            raw = cp.raw_comparisons(s, cid)
        ranked = len({c.task_id for c in raw})
        if ranked < self.min_tasks:
            raise UserError(f"round {round_}: the deadline passed with {ranked} of {total} tasks ranked in campaign "
                            f"{cid}; rank in the app and re-run the loop (it resumes at this campaign)")
        if full < total:
            print0(f"round {round_}: deadline reached; training on {ranked} of {total} tasks ranked so far")
        write_jsonl_records(out, aggregate(raw) if self.consensus else raw)
        print0(f"round {round_}: {len(raw)} rankings by {len({c.labeler for c in raw})} labelers from the app")


class DBFeedback:
    """Chat feedback from the serve database as comparisons (`chatforge export feedback`)."""

    def __init__(self, db_url: str, max_policy_age: int | None = None) -> None:
        self.db_url, self.max_policy_age = db_url, max_policy_age

    def export(self, out_dir: Path) -> int:
        from chatforge.server.db import open_db
        from chatforge.server.export import export_feedback

        rep = export_feedback(open_db(self.db_url), out_dir, self.max_policy_age)
        print0(f"feedback from {self.db_url}: {rep['comparisons']} comparisons")
        return int(rep["comparisons"])


def loop_sources(cfg: Any) -> dict[str, Any]:
    """The `people` and `feedback` sources a LoopConfig asks for (what `chatforge loop` passes to the stage)."""
    sources: dict[str, Any] = {}
    if cfg.labeler == "app":
        if not cfg.db:
            raise UserError("labeler=app needs the app's database: --set db=URL (the one `chatforge serve --db` uses)")
        a = cfg.app
        sources["people"] = AppRankings(cfg.db, overlap=a.overlap, deadline_s=a.deadline_s, poll_s=a.poll_s,
                                        consensus=a.consensus, name=a.campaign or f"{Path(cfg.out).name}")
    fb = cfg.feedback_db or (cfg.db if cfg.labeler == "app" else None)
    if fb:
        sources["feedback"] = DBFeedback(fb, cfg.feedback_max_policy_age)
    return sources
