"""Chat with a served version (issue 20, point 5): multi-turn, streamed, with thumbs, regenerate and edit.

Everything lives in the serving tables, so `chatforge export feedback` reads it as it is:
- a chat is a Conversation (`meta.kind = "chat"`, `meta.leaf` = the message shown last); turns are
  Messages in a tree: a regenerate is a sibling of the reply it replaces (same parent user turn);
- every model reply is a stored Completion (prompt = the messages before it, the model version as
  `model`/`run_id`, the chat's id), linked from its Message;
- thumbs are Feedback rows (rating ±1, reason chips + text in `reason`, `message_id` set);
- preferring one of several sibling replies, or sending the next turn after one of them (continuing with
  it), stores Feedback on each other sibling with rating -1 and `preferred_completion_id` = the chosen
  reply: a comparison in the export;
- editing a reply stores Feedback with `edited_content` (a demonstration and an edit comparison in the
  export) and adds the edit as a sibling message without a completion, which the chat continues from.

Replies stream as server-sent events when the request asks for `text/event-stream` (static/chat.js reads
them with fetch + ReadableStream); a plain form post waits for the reply and redirects (works without JS).
A chat is visible to its owner only: any other id is a 404.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from chatforge.server.db import repo
from chatforge.server.db.models import Conversation, Feedback, Message, User
from chatforge.server.web.deps import DB, Auth, session_factory
from chatforge.server.web.pages import app_router, check_csrf, page

router = app_router()
MAX_MESSAGE_CHARS = 20_000
MAX_REPLY_TOKENS = 256
TEMPERATURE, TOP_P = 0.7, 0.95
REASON_CHIPS = ("helpful", "accurate", "well written", "not helpful", "wrong facts", "ignored the instruction",
                "unsafe", "too long", "too short")
CONTINUED = "continued with another reply"
CHAT_GUIDELINES = ("Chat as you like. Rate any reply with thumbs up or down (reasons are optional), "
                   "regenerate a reply to see another one, prefer the better of two, or edit a reply into "
                   "the one you wanted: all of it teaches the next version.")


# ----------------------------------------------------------------------------- model replies


def served_models(request: Request) -> dict[str, Any]:
    return {m.id: m for m in getattr(request.app.state, "served", None) or []}


def version_of(m: Any) -> str:
    """The model version a served model stands for (its registry run id, else its name)."""
    return m.run_id or m.id


async def model_reply(m: Any, messages: list[dict]) -> AsyncIterator[tuple]:
    """("delta", text) pieces of served model `m`'s reply to `messages`, then ("done", finish, ptok, ctok)."""
    from chatforge.server.api import stream_chat

    async for ev in stream_chat(m, messages, max_tokens=MAX_REPLY_TOKENS, temperature=TEMPERATURE, top_p=TOP_P,
                                seed=secrets.randbelow(2**31)):
        yield ev


def store_reply(db: Session, m: Any, conv: Conversation, parent: Message, prompt: list[dict], text: str,
                end: tuple, user: User, started: float) -> Message:
    """Store a finished reply as a Completion (with the model version) and an assistant Message under `parent`."""
    cid = repo.store_completion(db, "chat", m.id, m.run_id, {"temperature": TEMPERATURE, "top_p": TOP_P,
                                                            "max_tokens": MAX_REPLY_TOKENS}, prompt,
                                [{"index": 0, "content": text, "finish_reason": end[0]}], end[1], end[2],
                                None, None, time.perf_counter() - started, user_id=user.id,
                                conversation_id=conv.id)
    msg = repo.add_message(db, conv.id, "assistant", text, parent_id=parent.id, completion_id=cid, choice_index=0)
    conv.meta = {**conv.meta, "leaf": msg.id}  # a new dict: JSON columns track assignment, not mutation
    return msg


# ----------------------------------------------------------------------------- the message tree


def own_chat(db: Session, cid: str, user: User) -> Conversation:
    conv = db.get(Conversation, cid)
    if conv is None or conv.user_id != user.id or (conv.meta or {}).get("kind") != "chat":
        raise HTTPException(404, "no such chat")  # another user's chat is a 404: ids leak nothing
    return conv


def own_message(db: Session, conv: Conversation, mid: str) -> Message:
    msg = db.get(Message, mid)
    if msg is None or msg.conversation_id != conv.id:
        raise HTTPException(404, "no such message in this chat")
    return msg


def messages_of(db: Session, conv_id: str) -> list[Message]:
    return list(db.scalars(select(Message).where(Message.conversation_id == conv_id)
                           .order_by(Message.created_at, Message.id)))


def thread(msgs: list[Message], through: str | None) -> list[Message]:
    """The path shown: root to `through`, then down through each turn's latest child."""
    by_id = {m.id: m for m in msgs}
    children: dict[str | None, list[Message]] = {}
    for m in msgs:
        children.setdefault(m.parent_id, []).append(m)
    if through not in by_id:
        through = msgs[-1].id if msgs else None
    path: list[Message] = []
    node = by_id.get(through) if through else None
    while node is not None:
        path.append(node)
        node = by_id.get(node.parent_id) if node.parent_id else None
    path.reverse()
    while path and children.get(path[-1].id):
        path.append(children[path[-1].id][-1])
    return path


def history(path: list[Message]) -> list[dict]:
    return [{"role": m.role, "content": m.content} for m in path]


def prefer(db: Session, chosen: Message, user: User, reason: str | None) -> int:
    """Store "`chosen` beats each sibling reply" (rating -1 on the sibling, preferred = chosen) once per pair
    and user. Returns how many comparisons were added."""
    if chosen.completion_id is None:
        return 0
    added = 0
    for sib in db.scalars(select(Message).where(Message.parent_id == chosen.parent_id, Message.id != chosen.id,
                                                Message.role == "assistant", Message.completion_id.is_not(None))):
        if sib.completion_id == chosen.completion_id:
            continue
        seen = db.scalar(select(Feedback.id).where(Feedback.completion_id == sib.completion_id,
                                                   Feedback.preferred_completion_id == chosen.completion_id,
                                                   Feedback.user_id == user.id))
        if seen is None:
            repo.add_feedback(db, sib.completion_id, -1, choice_index=sib.choice_index or 0, reason=reason,
                              preferred_completion_id=chosen.completion_id,
                              preferred_choice_index=chosen.choice_index or 0, user_id=user.id, message_id=sib.id)
            added += 1
    return added


# ----------------------------------------------------------------------------- pages


@router.get("/chat")
def chat_list(request: Request, db: DB, auth: Auth) -> HTMLResponse:
    sess, user = auth
    chats = [c for c in db.scalars(select(Conversation).where(Conversation.user_id == user.id)
                                   .order_by(Conversation.updated_at.desc())) if (c.meta or {}).get("kind") == "chat"]
    return page(request, "chat_list.html", user, sess, chats=chats, models=list(served_models(request)),
                guidelines=CHAT_GUIDELINES)


@router.post("/chat")
def chat_new(request: Request, db: DB, auth: Auth, csrf: Annotated[str, Form()] = "",
             model: Annotated[str, Form(max_length=200)] = "") -> Response:
    check_csrf(auth[0], csrf)
    served = served_models(request)
    if not served:
        raise HTTPException(503, "no model is served here (chatforge serve --model M)")
    m = served.get(model) or next(iter(served.values()))
    conv = repo.create_conversation(db, user_id=auth[1].id, title="", model=m.id)
    conv.meta = {"kind": "chat", "leaf": None, "version": version_of(m)}
    db.commit()
    return RedirectResponse(f"/app/chat/{conv.id}", status_code=303)


def _chat_page(request: Request, db: Session, auth: tuple, conv: Conversation, show: str | None = None,
               status: int = 200, error: str = "") -> HTMLResponse:
    sess, user = auth
    msgs = messages_of(db, conv.id)
    path = thread(msgs, show or (conv.meta or {}).get("leaf"))
    siblings: dict[str, list[str]] = {}
    for m in msgs:
        siblings.setdefault(m.parent_id or "", []).append(m.id)
    mine = {f.message_id: f for f in db.scalars(select(Feedback).where(Feedback.user_id == user.id,
                                                                       Feedback.message_id.is_not(None))
                                                .order_by(Feedback.created_at))}
    turns = []
    for m in path:
        sibs = siblings.get(m.parent_id or "", [m.id]) if m.role == "assistant" else [m.id]
        i = sibs.index(m.id)
        turns.append({"m": m, "n": len(sibs), "i": i + 1, "prev": sibs[i - 1] if i else None,
                      "next": sibs[i + 1] if i + 1 < len(sibs) else None, "rated": mine.get(m.id)})
    return page(request, "chat.html", user, sess, status=status, error=error, conv=conv, turns=turns,
                parent=path[-1].id if path else "", served=conv.model in served_models(request),
                chips=REASON_CHIPS, guidelines=CHAT_GUIDELINES)


@router.get("/chat/{cid}")
def chat_page(request: Request, db: DB, auth: Auth, cid: str, show: str | None = None) -> HTMLResponse:
    return _chat_page(request, db, auth, own_chat(db, cid, auth[1]), show=show)


def _wants_stream(request: Request) -> bool:
    return "text/event-stream" in request.headers.get("accept", "")


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _reply(request: Request, db: Session, conv: Conversation, parent: Message, user: User) -> Response:
    """Generate the assistant's reply to the thread ending at `parent` (a user turn): streamed or redirect."""
    from chatforge.server.errors import OpenAIError

    m = served_models(request).get(conv.model or "")
    if m is None:
        raise HTTPException(409, f"the model of this chat ({conv.model}) is not served any more; start a new chat")
    prompt = history(thread(messages_of(db, conv.id), parent.id)[:_depth(db, parent)])
    conv_id, parent_id, user_id = conv.id, parent.id, user.id
    started = time.perf_counter()

    def finish(text: str, end: tuple) -> str:
        # A fresh session: the request's own may be closed by the time a stream ends.
        with session_factory(request.app)() as s:
            c, p, u = s.get(Conversation, conv_id), s.get(Message, parent_id), s.get(User, user_id)
            msg = store_reply(s, m, c, p, prompt, text, end, u, started)
            s.commit()
            return msg.id

    if not _wants_stream(request):
        text, end = "", ("length", 0, 0)
        try:
            async for ev in model_reply(m, prompt):
                if ev[0] == "delta":
                    text += ev[1]
                else:
                    end = ev[1:]
        except OpenAIError as e:
            raise HTTPException(e.status if e.status < 500 else 503, e.message) from None
        finish(text, end)
        return RedirectResponse(f"/app/chat/{conv_id}", status_code=303)

    async def events() -> AsyncIterator[str]:
        text = ""
        try:
            async for ev in model_reply(m, prompt):
                if ev[0] == "delta":
                    text += ev[1]
                    yield _sse({"delta": ev[1]})
                else:
                    mid = finish(text, ev[1:])
                    yield _sse({"done": True, "message_id": mid, "url": f"/app/chat/{conv_id}"})
        except OpenAIError as e:
            yield _sse({"error": e.message})

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _depth(db: Session, msg: Message) -> int:
    """How many messages lead to `msg`, itself included."""
    n, node = 0, msg
    while node is not None:
        n += 1
        node = db.get(Message, node.parent_id) if node.parent_id else None
    return n


@router.post("/chat/{cid}/send")
async def chat_send(request: Request, db: DB, auth: Auth, cid: str) -> Response:
    form = await request.form()
    sess, user = auth
    check_csrf(sess, str(form.get("csrf", "")))
    conv = own_chat(db, cid, user)
    content, parent_id = str(form.get("content", "")).strip(), str(form.get("parent", ""))
    if not content or len(content) > MAX_MESSAGE_CHARS:
        return _chat_page(request, db, auth, conv, status=422,
                          error=f"write a message of 1 to {MAX_MESSAGE_CHARS} characters")
    parent = own_message(db, conv, parent_id) if parent_id else None
    if parent is None and messages_of(db, conv.id):
        return _chat_page(request, db, auth, conv, status=422, error="say which reply you continue from")
    if parent is not None and parent.role != "assistant":
        return _chat_page(request, db, auth, conv, status=422, error="continue from an assistant reply")
    if parent is not None:
        prefer(db, parent, user, CONTINUED)  # continuing with one of several replies prefers it
    msg = repo.add_message(db, conv.id, "user", content, parent_id=parent.id if parent else None)
    if not conv.title:
        conv.title = content[:80]
    conv.meta = {**conv.meta, "leaf": msg.id}
    db.commit()
    return await _reply(request, db, conv, msg, user)


@router.post("/chat/{cid}/messages/{mid}/regenerate")
async def chat_regenerate(request: Request, db: DB, auth: Auth, cid: str, mid: str) -> Response:
    form = await request.form()
    sess, user = auth
    check_csrf(sess, str(form.get("csrf", "")))
    conv = own_chat(db, cid, user)
    msg = own_message(db, conv, mid)
    parent = db.get(Message, msg.parent_id) if msg.parent_id else None
    if msg.role != "assistant" or parent is None:
        raise HTTPException(422, "only an assistant reply can be regenerated")
    return await _reply(request, db, conv, parent, user)


@router.post("/chat/{cid}/messages/{mid}/thumbs")
async def chat_thumbs(request: Request, db: DB, auth: Auth, cid: str, mid: str) -> Response:
    form = await request.form()
    sess, user = auth
    check_csrf(sess, str(form.get("csrf", "")))
    conv = own_chat(db, cid, user)
    msg = own_message(db, conv, mid)
    rating = {"up": 1, "down": -1}.get(str(form.get("rating", "")))
    chips = [c for c in form.getlist("chips") if c in REASON_CHIPS]
    text = str(form.get("reason", "")).strip()
    if rating is None or msg.completion_id is None or len(text) > MAX_MESSAGE_CHARS:
        return _chat_page(request, db, auth, conv, show=mid, status=422,
                          error="rate a model reply with up or down (your own edits are not rated)")
    reason = "; ".join([*chips, text] if text else chips) or None
    repo.add_feedback(db, msg.completion_id, rating, choice_index=msg.choice_index or 0, reason=reason,
                      user_id=user.id, message_id=msg.id)
    db.commit()
    return RedirectResponse(f"/app/chat/{cid}?show={mid}", status_code=303)


@router.post("/chat/{cid}/messages/{mid}/prefer")
async def chat_prefer(request: Request, db: DB, auth: Auth, cid: str, mid: str) -> Response:
    form = await request.form()
    sess, user = auth
    check_csrf(sess, str(form.get("csrf", "")))
    conv = own_chat(db, cid, user)
    msg = own_message(db, conv, mid)
    if msg.role != "assistant" or msg.completion_id is None:
        raise HTTPException(422, "prefer one of the model's replies")
    prefer(db, msg, user, "preferred")
    conv.meta = {**conv.meta, "leaf": msg.id}
    db.commit()
    return RedirectResponse(f"/app/chat/{cid}?show={mid}", status_code=303)


@router.post("/chat/{cid}/messages/{mid}/edit")
async def chat_edit(request: Request, db: DB, auth: Auth, cid: str, mid: str) -> Response:
    form = await request.form()
    sess, user = auth
    check_csrf(sess, str(form.get("csrf", "")))
    conv = own_chat(db, cid, user)
    msg = own_message(db, conv, mid)
    content = str(form.get("content", "")).strip()
    if msg.role != "assistant" or msg.completion_id is None:
        raise HTTPException(422, "only a model reply can be edited")
    if not content or len(content) > MAX_MESSAGE_CHARS:
        return _chat_page(request, db, auth, conv, show=mid, status=422,
                          error=f"the edited reply must have 1 to {MAX_MESSAGE_CHARS} characters")
    if content != msg.content.strip():
        # The original falls short of what the user wanted: -1 with the edit (export: demonstration + pair).
        repo.add_feedback(db, msg.completion_id, -1, choice_index=msg.choice_index or 0, reason="edited",
                          edited_content=content, user_id=user.id, message_id=msg.id)
        edited = repo.add_message(db, conv.id, "assistant", content, parent_id=msg.parent_id)
        conv.meta = {**conv.meta, "leaf": edited.id}
        db.commit()
    return RedirectResponse(f"/app/chat/{cid}", status_code=303)


__all__ = ["router", "model_reply", "served_models", "version_of"]
