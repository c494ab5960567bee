"""What people submitted in the app, as training data: rankings (every labeler's own, or one consensus per
task) with filters, in chatforge's comparison format or TRL's / OpenAssistant's. The admin pages and
`chatforge export rankings` both call `rankings()`.

Consensus (`consensus=True`): per task, `data.aggregate` with `method` over every labeler's latest ranking
(Bradley–Terry strengths fitted on all pairwise outcomes, ties half a win; `ranked_pairs` and `borda` too).
Rankings marked "all bad / not rankable" are never exported (they order nothing); skips are not rankings.
Provenance in `meta`: campaign, assignment, revision, shown order, comment, seconds, source "app".
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from chatforge.core.io import UserError
from chatforge.data.formats import Comparison
from chatforge.server.db.models import User
from chatforge.server.web import campaigns as cp
from chatforge.server.web.models import Campaign

RANKING_FORMATS = ("chatforge", "trl", "oasst")


def parse_when(value: str | None, name: str) -> datetime | None:
    """An ISO date or datetime (UTC when no zone is given) for --since / --until."""
    if not value:
        return None
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise UserError(f"{name}: '{value}' is not an ISO date such as 2026-12-01 or 2026-12-01T14:00") from None
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


def find_campaign(db: Session, ref: str) -> Campaign:
    """A campaign by id or exact name; a clear error naming what exists when there is none."""
    c = db.get(Campaign, ref) or db.scalar(select(Campaign).where(Campaign.name == ref))
    if c is None:
        names = ", ".join(f"'{n}'" for n in db.scalars(select(Campaign.name).order_by(Campaign.created_at))) or "none"
        raise UserError(f"no campaign '{ref}' (campaigns: {names})")
    return c


def rankings(db: Session, campaign: str | None = None, since: datetime | None = None, until: datetime | None = None,
             labeler: str | None = None, model_version: str | None = None, consensus: bool = False,
             method: str = "bradley_terry") -> list[Comparison]:
    """The filtered rankings as comparisons (see the module docstring)."""
    from chatforge.data.aggregate import aggregate

    cid = find_campaign(db, campaign).id if campaign else None
    if labeler and db.scalar(select(User).where(User.username == labeler)) is None:
        raise UserError(f"no user '{labeler}'")
    if since and until and since > until:
        raise UserError("--since is after --until")
    names = {c.id: c.name for c in db.scalars(select(Campaign))}
    out = []
    for r, a, t, u in cp.latest_rankings(db, cid, labeler):
        if r.not_rankable or (since and r.created_at < since) or (until and r.created_at > until):
            continue
        if model_version and not any(x.get("policy") == model_version for x in t.data["responses"]):
            continue
        out.append(cp.to_comparison(r, a, t, u, names.get(t.campaign_id, "")))
    return aggregate(out, method) if consensus and out else out


def ranking_rows(comparisons: list[Comparison], fmt: str = "chatforge") -> list[dict[str, Any]]:
    """Comparisons as JSON rows of `fmt`: chatforge comparisons, TRL preference pairs, or oasst trees."""
    from chatforge.data.convert import CMP_WRITERS, Skip

    key = {"chatforge": "comparison", "trl": "trl-pref", "oasst": "oasst"}.get(fmt)
    if key is None:
        raise UserError(f"--format must be one of {', '.join(RANKING_FORMATS)}, not '{fmt}'")
    rows = []
    for c in comparisons:
        try:
            rows += CMP_WRITERS[key](c)
        except Skip:
            continue
    return rows


def write_rankings(db: Session, out: Path, fmt: str = "chatforge", **filters: Any) -> int:
    """Write the filtered rankings to `out` (JSONL, atomic). Returns the number of rows."""
    from chatforge.data.formats import write_jsonl_records

    return write_jsonl_records(out, ranking_rows(rankings(db, **filters), fmt))
