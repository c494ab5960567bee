"""Campaign logic: import ranking tasks, assign with overlap, validate a submitted ranking, export."""

from __future__ import annotations

import json
import random
import string
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from chatforge.core.io import DataError, UserError
from chatforge.data.formats import MAX_RATING, MIN_RATING, Comparison, RankingTask
from chatforge.server.db.models import User
from chatforge.server.web.models import Assignment, AuditLog, Campaign, Ranking, RankTask

MAX_TEXT = 20_000  # characters in a comment or skip reason
LETTERS = string.ascii_uppercase


def audit(db: Session, actor: User | None, action: str, target: str = "", **detail: Any) -> None:
    db.add(AuditLog(actor_id=actor.id if actor else None, action=action, target=target, detail=detail))


def parse_task_lines(text: str, source: str = "upload") -> list[RankingTask]:
    """Every line of a `chatforge sample` file as a RankingTask; the first bad line raises naming it."""
    tasks, seen = [], set()
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(source, n, f"not valid JSON ({e.msg})") from None
        task = RankingTask.from_dict(obj, source, n)
        if task.task_id in seen:
            raise DataError(source, n, f"duplicate task_id '{task.task_id}'")
        seen.add(task.task_id)
        tasks.append(task)
    if not tasks:
        raise DataError(source, None, "no ranking tasks in the file")
    return tasks


def import_tasks(db: Session, campaign: Campaign, tasks: list[RankTask | RankingTask]) -> int:
    """Add parsed tasks to a campaign (the caller's transaction: all or nothing)."""
    have = set(db.scalars(select(RankTask.task_id).where(RankTask.campaign_id == campaign.id)))
    for t in tasks:
        if t.task_id in have:
            raise UserError(f"task_id '{t.task_id}' is already in campaign {campaign.name}")
        db.add(RankTask(campaign_id=campaign.id, task_id=t.task_id, data=t.to_dict()))
    return len(tasks)


def authored_by(task: dict, username: str) -> bool:
    """True when one of the task's replies is this person's own writing: a reply whose `policy` is
    `human:<username>` (a demonstration entered as a reply) or a task whose meta names them as `author`."""
    return (task.get("meta") or {}).get("author") == username or any(
        r.get("policy") == f"human:{username}" for r in task.get("responses", []))


def next_assignment(db: Session, user: User, campaign_id: str | None = None) -> Assignment | None:
    """The labeler's open assignment, else a new one on a task with fewer than `overlap` labelers that
    this labeler never had. The reply order shown is shuffled per labeler and stored."""
    q = select(Assignment).where(Assignment.user_id == user.id, Assignment.status == "open")
    if campaign_id:
        q = q.join(RankTask).where(RankTask.campaign_id == campaign_id)
    mine = db.scalars(q.order_by(Assignment.created_at)).first()
    if mine is not None:
        return mine
    taken = (select(Assignment.task_id, func.count().label("n")).where(Assignment.status != "skipped")
             .group_by(Assignment.task_id).subquery())
    had = select(Assignment.task_id).where(Assignment.user_id == user.id)
    tried: list[str] = []
    races = 0
    while races < 20:  # a task another labeler filled at the same moment: take the next one
        q = (select(RankTask).join(Campaign).outerjoin(taken, taken.c.task_id == RankTask.id)
             .where(func.coalesce(taken.c.n, 0) < Campaign.overlap, RankTask.id.not_in(had),
                    RankTask.id.not_in(tried))
             .order_by(func.coalesce(taken.c.n, 0), RankTask.created_at, RankTask.id))
        if campaign_id:
            q = q.where(RankTask.campaign_id == campaign_id)
        task = db.scalars(q.limit(1)).first()
        if task is None:
            return None
        tried.append(task.id)
        if authored_by(task.data, user.username):  # never rank your own demonstration
            continue
        races += 1
        # PostgreSQL: lock the task row so concurrent takers of it queue here (SQLite ignores FOR UPDATE; its
        # insert below holds the database's write lock instead). Then count again, after our insert.
        db.scalars(select(RankTask.id).where(RankTask.id == task.id).with_for_update()).first()
        ids = [r["response_id"] for r in task.data["responses"]]
        random.SystemRandom().shuffle(ids)
        a = Assignment(task_id=task.id, user_id=user.id, shown_order=ids)
        db.add(a)
        db.flush()  # the (task, user) unique constraint fires here under a race; the caller retries
        n = db.scalar(select(func.count()).select_from(Assignment)
                      .where(Assignment.task_id == task.id, Assignment.status != "skipped"))
        overlap = db.scalar(select(Campaign.overlap).where(Campaign.id == task.campaign_id))
        if n <= overlap:
            return a
        db.delete(a)
        db.flush()
    return None


def parse_ranking(text: str, shown: list[str], allow_ties: bool) -> list[list[str]]:
    """'B, A=C, D' (letters as shown, best first, '=' ties) -> groups of response ids; every reply once."""
    letters = {LETTERS[i]: rid for i, rid in enumerate(shown)}
    groups, seen = [], set()
    for part in text.replace(">", ",").split(","):
        part = part.strip()
        if not part:
            continue
        group = []
        for tok in part.split("="):
            tok = tok.strip().upper()
            if tok not in letters:
                raise UserError(f"the ranking names an unknown reply '{tok[:10]}'")
            if tok in seen:
                raise UserError(f"the ranking names reply {tok} twice")
            seen.add(tok)
            group.append(letters[tok])
        groups.append(group)
    missing = [k for k in letters if k not in seen]
    if missing:
        raise UserError(f"the ranking leaves out reply {', '.join(missing)}: rank every reply")
    if not allow_ties and any(len(g) > 1 for g in groups):
        raise UserError("this campaign does not allow ties")
    return groups


def parse_rating(value: str, letter: str) -> int | None:
    if not value:
        return None
    if not value.isdigit() or not MIN_RATING <= int(value) <= MAX_RATING:
        raise UserError(f"rating of reply {letter} must be {MIN_RATING}-{MAX_RATING}")
    return int(value)


def submit_ranking(db: Session, a: Assignment, submit_key: str, ranking: list[list[str]], not_rankable: bool,
                   ratings: dict[str, int], flags: dict[str, list[str]], comment: str,
                   seconds: float | None) -> tuple[Ranking, bool]:
    """Store a ranking (a new revision if one exists). Returns (row, created); the same `submit_key`
    again returns the first row unchanged, so a double submit stores nothing twice."""
    prev = db.scalar(select(Ranking).where(Ranking.submit_key == submit_key))
    if prev is not None:
        if prev.assignment_id != a.id:
            raise UserError("this form was already used for another task; reload the page")
        return prev, False
    if len(comment) > MAX_TEXT:
        raise UserError(f"the comment is longer than {MAX_TEXT} characters")
    rev = (db.scalar(select(func.max(Ranking.revision)).where(Ranking.assignment_id == a.id)) or 0) + 1
    row = Ranking(assignment_id=a.id, revision=rev, submit_key=submit_key, ranking=ranking,
                  not_rankable=not_rankable, ratings=ratings, flags=flags, comment=comment,
                  shown_order=list(a.shown_order), seconds=seconds)
    db.add(row)
    a.status, a.done_at, a.draft = "done", datetime.now(timezone.utc), {}
    db.flush()
    return row, True


def latest_rankings(db: Session, campaign_id: str | None = None,
                    labeler: str | None = None) -> list[tuple[Ranking, Assignment, RankTask, User]]:
    """The latest revision of every submitted ranking (optionally of one campaign / labeler)."""
    last = (select(Ranking.assignment_id, func.max(Ranking.revision).label("rev"))
            .group_by(Ranking.assignment_id).subquery())
    q = (select(Ranking, Assignment, RankTask, User)
         .join(last, (last.c.assignment_id == Ranking.assignment_id) & (last.c.rev == Ranking.revision))
         .join(Assignment, Assignment.id == Ranking.assignment_id).join(RankTask, RankTask.id == Assignment.task_id)
         .join(User, User.id == Assignment.user_id).order_by(RankTask.task_id, User.username))
    if campaign_id:
        q = q.where(RankTask.campaign_id == campaign_id)
    if labeler:
        q = q.where(User.username == labeler)
    return [tuple(r) for r in db.execute(q).all()]


def to_comparison(r: Ranking, a: Assignment, t: RankTask, u: User, campaign: str) -> Comparison:
    """A stored ranking as a DESIGN comparison, with provenance in `meta`."""
    c = Comparison.from_dict({**t.data, "ranking": r.ranking, "ratings": r.ratings, "flags": r.flags,
                              "labeler": u.username, "created_at": r.created_at.isoformat()})
    c.meta = {**c.meta, "campaign": campaign, "assignment_id": a.id, "revision": r.revision,
              "shown_order": r.shown_order, "comment": r.comment, "seconds": r.seconds, "source": "app"}
    return c


def raw_comparisons(db: Session, campaign_id: str | None = None, labeler: str | None = None) -> list[Comparison]:
    """Per-labeler comparisons, leaving out rankings marked not rankable."""
    names = {c.id: c.name for c in db.scalars(select(Campaign))}
    return [to_comparison(r, a, t, u, names.get(t.campaign_id, "")) for r, a, t, u in
            latest_rankings(db, campaign_id, labeler) if not r.not_rankable]
