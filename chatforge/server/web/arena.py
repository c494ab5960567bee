"""The arena (issue 20, point 5): two anonymous served versions answer one prompt side by side, the user
votes A / B / tie / both bad, and only then are the names shown. The leaderboard ranks versions by
Bradley–Terry strengths fitted on every vote, with bootstrap 95 % intervals (chatforge.evals.stats).

Storage reuses the serving tables: a battle is a Conversation (`meta.kind = "arena"`, the two sides'
models, versions and completion ids, and the vote) whose user turn has the two replies as sibling
Messages, each a stored Completion of its model. A vote is stored as feedback events on both replies, so
`chatforge export feedback` reads them: A (or B) wins -> +1 on the winner and -1 with
`preferred_completion_id` = the winner on the loser (a comparison); tie -> +1 on both; both bad -> -1 on
both (no pair: neither is preferred). On the leaderboard a tie and "both bad" each count half a win to
each side (Chatbot Arena's rule).
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from typing import Annotated, Any

from fastapi import Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from chatforge.server.db import repo
from chatforge.server.db.models import Conversation, User, utcnow
from chatforge.server.web.chat import MAX_MESSAGE_CHARS, model_reply, served_models, store_reply, version_of
from chatforge.server.web.deps import DB, Auth
from chatforge.server.web.pages import app_router, check_csrf, page

router = app_router()
ARENA_TITLE = "arena battle"
VOTES = {"a": "A is better", "b": "B is better", "tie": "Tie", "bad": "Both are bad"}
SCORE_OF_A = {"a": 1.0, "b": 0.0, "tie": 0.5, "bad": 0.5}
N_BOOT = 300
ELO_SCALE = 400 / math.log(10)
ARENA_GUIDELINES = ("Ask anything. Two anonymous models answer; vote for the better reply (or tie, or both "
                    "bad). Judge helpfulness, honesty and harmlessness, not length. The names are shown "
                    "after your vote. Keys: Alt+A / Alt+B / Alt+T / Alt+X vote (access keys).")


async def _answer(m: Any, prompt: list[dict]) -> tuple[str, tuple]:
    text, end = "", ("length", 0, 0)
    async for ev in model_reply(m, prompt):
        if ev[0] == "delta":
            text += ev[1]
        else:
            end = ev[1:]
    return text, end


def own_battle(db: Session, bid: str, user: User) -> Conversation:
    conv = db.get(Conversation, bid)
    if conv is None or conv.user_id != user.id or (conv.meta or {}).get("kind") != "arena":
        raise HTTPException(404, "no such battle")
    return conv


def battles(db: Session) -> list[dict]:
    """The meta of every voted battle."""
    rows = db.scalars(select(Conversation).where(Conversation.title == ARENA_TITLE))
    return [c.meta for c in rows if (c.meta or {}).get("kind") == "arena" and c.meta.get("vote") in VOTES]


def leaderboard(votes: list[tuple[str, str, str]], n_boot: int = N_BOOT, seed: int = 0) -> list[dict]:
    """Rows (best first) of {version, strength (natural log-odds, mean 0), rating (Elo-like), lo, hi (95 %
    bootstrap interval of the rating), battles, wins} from (version_a, version_b, vote) triples."""
    from chatforge.evals.stats import bradley_terry_bootstrap

    comps = [(a, b, SCORE_OF_A[v]) for a, b, v in votes if a != b]
    if not comps:
        return []
    bt = bradley_terry_bootstrap(comps, n_boot=n_boot, seed=seed)
    count: dict[str, int] = {}
    wins: dict[str, float] = {}
    for a, b, s in comps:
        for name, w in ((a, s), (b, 1 - s)):
            count[name] = count.get(name, 0) + 1
            wins[name] = wins.get(name, 0.0) + w
    rows = [{"version": v, "strength": r["strength"], "rating": 1000 + ELO_SCALE * r["strength"],
             "lo": 1000 + ELO_SCALE * r["lo"], "hi": 1000 + ELO_SCALE * r["hi"], "rank": r["rank"],
             "battles": count[v], "wins": wins[v]} for v, r in bt.items()]
    return sorted(rows, key=lambda r: r["rank"])


@router.get("/arena")
def arena_home(request: Request, db: DB, auth: Auth) -> HTMLResponse:
    sess, user = auth
    mine = [c for c in db.scalars(select(Conversation).where(Conversation.user_id == user.id,
                                                             Conversation.title == ARENA_TITLE)
                                  .order_by(Conversation.created_at.desc()).limit(20))
            if (c.meta or {}).get("kind") == "arena"]
    return page(request, "arena.html", user, sess, mine=mine, ready=len(served_models(request)) >= 2,
                guidelines=ARENA_GUIDELINES)


@router.post("/arena")
async def arena_start(request: Request, db: DB, auth: Auth, csrf: Annotated[str, Form()] = "",
                      prompt: Annotated[str, Form()] = "") -> Response:
    from chatforge.server.errors import OpenAIError

    sess, user = auth
    check_csrf(sess, csrf)
    served = list(served_models(request).values())
    text = prompt.strip()
    if len(served) < 2 or not text or len(text) > MAX_MESSAGE_CHARS:
        err = ("the arena needs two served versions (chatforge serve --model A --model B)" if len(served) < 2
               else f"write a prompt of 1 to {MAX_MESSAGE_CHARS} characters")
        return page(request, "arena.html", user, sess, status=422, error=err, mine=[], ready=len(served) >= 2,
                    guidelines=ARENA_GUIDELINES)
    ma, mb = random.sample(served, 2)  # random pair, random sides
    conv = repo.create_conversation(db, user_id=user.id, title=ARENA_TITLE)
    msg = repo.add_message(db, conv.id, "user", text)
    conv.meta = {"kind": "arena-pending"}  # not a battle until both replies are stored
    db.commit()  # no write transaction stays open while the models answer (SQLite would lock)
    messages = [{"role": "user", "content": text}]
    started = time.perf_counter()
    try:
        (ta, ea), (tb, eb) = await asyncio.gather(_answer(ma, messages), _answer(mb, messages))
    except OpenAIError as e:
        db.delete(conv)
        db.commit()
        raise HTTPException(e.status if e.status < 500 else 503, e.message) from None
    ra = store_reply(db, ma, conv, msg, messages, ta, ea, user, started)
    rb = store_reply(db, mb, conv, msg, messages, tb, eb, user, started)
    conv.meta = {"kind": "arena", "model_a": ma.id, "model_b": mb.id, "version_a": version_of(ma),
                 "version_b": version_of(mb), "message_a": ra.id, "message_b": rb.id,
                 "completion_a": ra.completion_id, "completion_b": rb.completion_id, "vote": None}
    db.commit()
    return RedirectResponse(f"/app/arena/{conv.id}", status_code=303)


def _battle_page(request: Request, db: Session, auth: tuple, conv: Conversation, status: int = 200,
                 error: str = "") -> HTMLResponse:
    from chatforge.server.db.models import Message

    sess, user = auth
    meta = conv.meta
    a, b = db.get(Message, meta["message_a"]), db.get(Message, meta["message_b"])
    prompt = db.get(Message, a.parent_id)
    return page(request, "arena_battle.html", user, sess, status=status, error=error, conv=conv, meta=meta,
                prompt=prompt.content, reply_a=a.content, reply_b=b.content, votes=VOTES,
                voted=meta.get("vote") in VOTES, guidelines=ARENA_GUIDELINES)


@router.get("/arena/{bid}")
def arena_battle(request: Request, db: DB, auth: Auth, bid: str) -> HTMLResponse:
    return _battle_page(request, db, auth, own_battle(db, bid, auth[1]))


@router.post("/arena/{bid}/vote")
def arena_vote(request: Request, db: DB, auth: Auth, bid: str, csrf: Annotated[str, Form()] = "",
               vote: Annotated[str, Form()] = "") -> Response:
    sess, user = auth
    check_csrf(sess, csrf)
    conv = own_battle(db, bid, user)
    meta = conv.meta
    if vote not in VOTES:
        return _battle_page(request, db, auth, conv, status=422, error="vote A, B, tie or both bad")
    if meta.get("vote") in VOTES:  # a double submit (or a second vote) changes nothing
        if meta["vote"] == vote:
            return RedirectResponse(f"/app/arena/{bid}", status_code=303)
        return _battle_page(request, db, auth, conv, status=409, error="you already voted on this battle")
    ca, cb = meta["completion_a"], meta["completion_b"]
    ma, mb = meta["message_a"], meta["message_b"]
    reason = f"arena: {VOTES[vote].lower()}"
    if vote in ("a", "b"):
        (win, wmsg), (lose, lmsg) = ((ca, ma), (cb, mb)) if vote == "a" else ((cb, mb), (ca, ma))
        repo.add_feedback(db, win, 1, reason=reason, user_id=user.id, message_id=wmsg)
        repo.add_feedback(db, lose, -1, reason=reason, preferred_completion_id=win, preferred_choice_index=0,
                          user_id=user.id, message_id=lmsg)
    else:
        rating = 1 if vote == "tie" else -1
        repo.add_feedback(db, ca, rating, reason=reason, user_id=user.id, message_id=ma)
        repo.add_feedback(db, cb, rating, reason=reason, user_id=user.id, message_id=mb)
    conv.meta = {**meta, "vote": vote, "voted_at": utcnow().isoformat()}
    db.commit()
    return RedirectResponse(f"/app/arena/{bid}", status_code=303)


@router.get("/leaderboard")
def leaderboard_page(request: Request, db: DB, auth: Auth) -> HTMLResponse:
    sess, user = auth
    votes = [(b["version_a"], b["version_b"], b["vote"]) for b in battles(db)]
    return page(request, "leaderboard.html", user, sess, rows=leaderboard(votes), n_votes=len(votes),
                n_boot=N_BOOT)


__all__ = ["router", "leaderboard", "battles"]
