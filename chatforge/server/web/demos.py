"""Demonstrations: a trainer writes a conversation playing both sides (InstructGPT's SFT data), from a
prompt of an imported prompt set or from scratch, for as many turns as they like.

Work is never lost: the turns are saved server-side as the trainer types (`/draft`, by static/app.js),
a submit is idempotent (a submit key per rendered form), and a submitted demonstration can be revised
(each submit is a DemoRevision). "Draft with the model" asks a served model for the next assistant
turn; the trainer edits it, and both versions are stored (`model_drafts`). Exported as DESIGN
conversations (`chatforge export demos`, `sft --data`).
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from fastapi import HTTPException, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from chatforge.core.io import DataError, UserError
from chatforge.data.formats import Conversation, read_prompts_text
from chatforge.server.db.models import User
from chatforge.server.web import campaigns as cp
from chatforge.server.web.deps import DB, Admin, Labeler
from chatforge.server.web.models import Demonstration, DemoRevision, PromptSet, SetPrompt
from chatforge.server.web.pages import app_router, check_csrf, page

router = app_router()
MAX_TURNS = 40
MAX_TURN_CHARS = 20_000
MAX_UPLOAD = 20 * 1024 * 1024
DEMO_GUIDELINES = ("Write what an ideal assistant would say: helpful, honest and harmless. Play both sides: "
                   "write the user's turn too when you continue the conversation.")


# ----------------------------------------------------------------------------- logic


def ensure_prompt_set(db: Session, name: str, prompts: list[dict], actor: User | None) -> str:
    """The prompt set `name`, created with `prompts` (DESIGN prompt dicts) when missing. Returns its id."""
    ps = db.scalar(select(PromptSet).where(PromptSet.name == name))
    if ps is None:
        ps = PromptSet(name=name, guidelines=DEMO_GUIDELINES, created_by=actor.id if actor else None)
        db.add(ps)
        db.flush()
        for i, p in enumerate(prompts):
            db.add(SetPrompt(set_id=ps.id, prompt_id=str(p.get("id") or i), messages=p["messages"]))
        cp.audit(db, actor, "prompts.import", ps.id, name=name, prompts=len(prompts))
        db.commit()
    return ps.id


def parse_turns(form: dict[str, str]) -> list[dict]:
    """turn_role_0/turn_content_0, ... from a form (or the autosave JSON) as messages, in order."""
    out, i = [], 0
    while f"turn_role_{i}" in form and i < MAX_TURNS:
        role, content = form[f"turn_role_{i}"], form.get(f"turn_content_{i}", "")
        if role not in ("user", "assistant"):
            raise UserError(f"turn {i + 1}: role must be user or assistant")
        if len(content) > MAX_TURN_CHARS:
            raise UserError(f"turn {i + 1} is longer than {MAX_TURN_CHARS} characters")
        out.append({"role": role, "content": content})
        i += 1
    return out


def check_demonstration(messages: list[dict]) -> list[dict]:
    """A submittable conversation: user and assistant alternate from a user turn, end with the assistant,
    no turn empty. Returns the messages with surrounding blanks stripped."""
    msgs = [{"role": m["role"], "content": m["content"].strip()} for m in messages]
    if len(msgs) < 2:
        raise UserError("a demonstration needs at least a user turn and an assistant turn")
    for i, m in enumerate(msgs):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            raise UserError(f"turn {i + 1} should be the {want}'s (turns alternate, starting with the user)")
        if not m["content"]:
            raise UserError(f"turn {i + 1} ({m['role']}) is empty")
    if msgs[-1]["role"] != "assistant":
        raise UserError("end with an assistant turn (the reply being demonstrated)")
    Conversation.from_dict({"id": "check", "messages": msgs}, "demonstration", None, require_assistant=True)
    return msgs


def submit_demo(db: Session, demo: Demonstration, messages: list[dict], submit_key: str) -> tuple[DemoRevision, bool]:
    """Store a new revision (or return the one this submit key already stored)."""
    prev = db.scalar(select(DemoRevision).where(DemoRevision.submit_key == submit_key))
    if prev is not None:
        if prev.demo_id != demo.id:
            raise UserError("this form was already used for another demonstration; reload the page")
        return prev, False
    msgs = check_demonstration(messages)
    rev = (db.scalar(select(func.max(DemoRevision.revision)).where(DemoRevision.demo_id == demo.id)) or 0) + 1
    row = DemoRevision(demo_id=demo.id, revision=rev, submit_key=submit_key, messages=msgs,
                       model_drafts=list(demo.model_drafts))
    db.add(row)
    demo.draft, demo.status, demo.revision = msgs, "submitted", rev
    db.flush()
    return row, True


def demo_conversations(db: Session, author: str | None = None, prompt_set: str | None = None) -> list[Conversation]:
    """The latest revision of every submitted demonstration as a DESIGN conversation with provenance."""
    last = (select(DemoRevision.demo_id, func.max(DemoRevision.revision).label("rev"))
            .group_by(DemoRevision.demo_id).subquery())
    q = (select(DemoRevision, Demonstration, User)
         .join(last, (last.c.demo_id == DemoRevision.demo_id) & (last.c.rev == DemoRevision.revision))
         .join(Demonstration, Demonstration.id == DemoRevision.demo_id).join(User, User.id == Demonstration.author_id)
         .order_by(Demonstration.created_at, Demonstration.id))
    if author:
        q = q.where(User.username == author)
    sets = {p.id: (p.prompt_id, db.get(PromptSet, p.set_id)) for p in db.scalars(select(SetPrompt))}
    out = []
    for rev, demo, user in db.execute(q).all():
        pid, ps = sets.get(demo.prompt_id, (None, None))
        if prompt_set and (ps is None or prompt_set not in (ps.id, ps.name)):
            continue
        out.append(Conversation.from_dict({
            "id": demo.id, "messages": rev.messages, "source": "app",
            "meta": {"author": user.username, "revision": rev.revision, "created_at": rev.created_at.isoformat(),
                     "prompt_set": ps.name if ps else None, "prompt_id": pid, "model_drafts": rev.model_drafts}}))
    return out


def _own_demo(db: Session, did: str, user: User) -> Demonstration:
    d = db.get(Demonstration, did)
    if d is None or d.author_id != user.id:  # another trainer's demonstration is a 404: ids leak nothing
        raise HTTPException(404, "no such demonstration of yours")
    return d


# ----------------------------------------------------------------------------- pages


@router.get("/write")
def write_home(request: Request, db: DB, auth: Labeler) -> HTMLResponse:
    sess, user = auth
    mine = list(db.scalars(select(Demonstration).where(Demonstration.author_id == user.id)
                           .order_by(Demonstration.updated_at.desc())))
    used = {d.prompt_id for d in mine}
    sets = []
    for ps in db.scalars(select(PromptSet).order_by(PromptSet.created_at)):
        todo = [p for p in db.scalars(select(SetPrompt).where(SetPrompt.set_id == ps.id).order_by(SetPrompt.created_at))
                if p.id not in used]
        sets.append({"set": ps, "todo": todo[:20], "left": len(todo)})
    return page(request, "write.html", user, sess, mine=mine, sets=sets)


@router.post("/write/new")
async def write_new(request: Request, db: DB, auth: Labeler) -> Response:
    form = await request.form()
    sess, user = auth
    check_csrf(sess, str(form.get("csrf", "")))
    pid = str(form.get("prompt_id", "") or "")
    if pid:
        p = db.get(SetPrompt, pid)
        if p is None:
            raise HTTPException(404, "no such prompt")
        mine = db.scalar(select(Demonstration).where(Demonstration.author_id == user.id, Demonstration.prompt_id == pid))
        if mine is not None:  # one demonstration per prompt and trainer: open the one there is
            return RedirectResponse(f"/app/write/{mine.id}", status_code=303)
        draft = [*p.messages, {"role": "assistant", "content": ""}]
    else:
        draft = [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]
    d = Demonstration(author_id=user.id, prompt_id=pid or None, draft=draft)
    db.add(d)
    db.commit()
    return RedirectResponse(f"/app/write/{d.id}", status_code=303)


def _demo_page(request: Request, db: Session, auth: tuple, d: Demonstration, status: int = 200, error: str = "",
               turns: list[dict] | None = None) -> HTMLResponse:
    sess, user = auth
    revs = list(db.scalars(select(DemoRevision).where(DemoRevision.demo_id == d.id).order_by(DemoRevision.revision)))
    served = getattr(request.app.state, "served", None) or []
    guidelines = DEMO_GUIDELINES
    if d.prompt_id and (p := db.get(SetPrompt, d.prompt_id)) and (ps := db.get(PromptSet, p.set_id)):
        guidelines = ps.guidelines or guidelines
    return page(request, "demo.html", user, sess, status=status, error=error, d=d, turns=turns or d.draft,
                revisions=revs, models=[m.id for m in served], guidelines=guidelines,
                submit_key=secrets.token_urlsafe(16))


@router.get("/write/{did}")
def write_form(request: Request, db: DB, auth: Labeler, did: str) -> HTMLResponse:
    return _demo_page(request, db, auth, _own_demo(db, did, auth[1]))


@router.post("/write/{did}/draft")
async def write_autosave(request: Request, db: DB, auth: Labeler, did: str) -> Response:
    """Autosave: the form's fields as the trainer types (no validation beyond sizes)."""
    form = {k: str(v) for k, v in (await request.form()).items()}
    check_csrf(auth[0], form.get("csrf", ""))
    d = _own_demo(db, did, auth[1])
    try:
        d.draft = parse_turns(form)
    except UserError as e:
        return JSONResponse({"saved": False, "error": str(e)}, status_code=422)
    db.commit()
    return JSONResponse({"saved": True})


@router.post("/write/{did}")
async def write_submit(request: Request, db: DB, auth: Labeler, did: str) -> Response:
    raw = await request.form()
    form = {k: str(v) for k, v in raw.items()}
    sess, user = auth
    check_csrf(sess, form.get("csrf", ""))
    d = _own_demo(db, did, user)
    action = form.get("action", "submit")
    try:
        turns = parse_turns(form)
        if action == "add":  # the next turn of the other side
            nxt = "assistant" if turns and turns[-1]["role"] == "user" else "user"
            d.draft = [*turns, {"role": nxt, "content": ""}]
            db.commit()
            return RedirectResponse(f"/app/write/{d.id}#turn-{len(d.draft) - 1}", status_code=303)
        if action == "remove" and len(turns) > 2:
            d.draft = turns[:-1]
            db.commit()
            return RedirectResponse(f"/app/write/{d.id}", status_code=303)
        if action == "model":
            return await _draft_with_model(request, db, auth, d, turns, form.get("model", ""))
        d.draft = turns
        if action == "save":
            db.commit()
            return RedirectResponse(f"/app/write/{d.id}", status_code=303)
        submit_demo(db, d, turns, form.get("submit_key") or secrets.token_urlsafe(16))
        db.commit()
    except UserError as e:
        db.rollback()
        return _demo_page(request, db, auth, d, status=422, error=str(e), turns=parse_turns_safe(form) or d.draft)
    except IntegrityError:  # the same submit raced itself: the first one stored it
        db.rollback()
    return RedirectResponse("/app/write?submitted=1", status_code=303)


def parse_turns_safe(form: dict[str, str]) -> list[dict]:
    try:
        return parse_turns(form)
    except UserError:
        return []


async def _draft_with_model(request: Request, db: Session, auth: tuple, d: Demonstration, turns: list[dict],
                            model: str) -> Response:
    """Fill the last (empty) assistant turn with a served model's reply; both versions are kept."""
    from chatforge.server.api import complete_chat
    from chatforge.server.errors import OpenAIError

    served = {m.id: m for m in getattr(request.app.state, "served", None) or []}
    if not served:
        raise UserError("no model is served here, so there is nothing to draft with")
    m = served.get(model) or next(iter(served.values()))
    if not turns or turns[-1]["role"] != "assistant":
        raise UserError("add an assistant turn first: the model drafts the last assistant turn")
    history = [{"role": t["role"], "content": t["content"]} for t in turns[:-1]]
    if not history or any(not t["content"].strip() for t in history):
        raise UserError("write the turns before the assistant's first")
    try:
        text, *_ = await complete_chat(m, history, max_tokens=256, temperature=0.7)
    except OpenAIError as e:
        raise UserError(f"the model could not draft: {e.message}") from None
    turns[-1] = {"role": "assistant", "content": text.strip()}
    d.draft = turns
    d.model_drafts = [*d.model_drafts, {"turn": len(turns) - 1, "content": text.strip(), "model": m.id}]
    db.commit()
    return RedirectResponse(f"/app/write/{d.id}#turn-{len(turns) - 1}", status_code=303)


# ----------------------------------------------------------------------------- admin: prompt sets


@router.post("/admin/prompts")
async def admin_import_prompts(request: Request, db: DB, auth: Admin) -> Response:
    from chatforge.server.web.routes import admin_page

    form = await request.form()
    check_csrf(auth[0], str(form.get("csrf", "")))
    name = str(form.get("name", "")).strip()[:200]
    upload = form.get("prompts")
    try:
        if not name:
            raise UserError("a prompt set needs a name")
        if db.scalar(select(PromptSet).where(PromptSet.name == name)) is not None:
            raise UserError(f"a prompt set named '{name}' exists")
        if not isinstance(upload, UploadFile) and not hasattr(upload, "read"):
            raise UserError("choose a prompts file (JSONL: conversations, {prompt: ...} or strings)")
        raw = await upload.read(MAX_UPLOAD + 1)
        if len(raw) > MAX_UPLOAD:
            raise UserError("the file is larger than 20 MB")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{upload.filename}: not valid UTF-8 (byte {e.start})") from None
        prompts = read_prompts_text(text, upload.filename or "upload")
        ps = PromptSet(name=name, guidelines=str(form.get("guidelines", ""))[:cp.MAX_TEXT] or DEMO_GUIDELINES,
                       created_by=auth[1].id)
        db.add(ps)
        db.flush()
        seen = set()
        for i, c in enumerate(prompts):
            pid = c.id or str(i)
            if pid in seen:
                raise UserError(f"duplicate prompt id '{pid}'")
            seen.add(pid)
            db.add(SetPrompt(set_id=ps.id, prompt_id=pid, messages=c.dicts()))
        cp.audit(db, auth[1], "prompts.import", ps.id, name=name, prompts=len(prompts))
        db.commit()
    except DataError as e:
        db.rollback()
        return admin_page(request, db, auth, error=f"nothing imported: {e}", status=422)
    except UserError as e:
        db.rollback()
        return admin_page(request, db, auth, error=f"nothing imported: {e}", status=422)
    return RedirectResponse("/app/admin", status_code=303)


@router.get("/admin/demos/export")
def admin_export_demos(db: DB, auth: Admin, author: str | None = None, prompt_set: str | None = None) -> Response:
    body = "".join(json.dumps(c.to_dict(), ensure_ascii=False) + "\n"
                   for c in demo_conversations(db, author or None, prompt_set or None))
    return Response(body, media_type="application/x-ndjson",
                    headers={"content-disposition": 'attachment; filename="demonstrations.jsonl"'})


def prompt_sets_summary(db: Session) -> list[dict[str, Any]]:
    """Per prompt set: prompts, and demonstrations submitted on them (the admin page)."""
    rows = []
    for ps in db.scalars(select(PromptSet).order_by(PromptSet.created_at)):
        n = db.scalar(select(func.count()).select_from(SetPrompt).where(SetPrompt.set_id == ps.id))
        done = db.scalar(select(func.count()).select_from(Demonstration).join(SetPrompt)
                         .where(SetPrompt.set_id == ps.id, Demonstration.status == "submitted"))
        rows.append({"set": ps, "prompts": n, "demos": done})
    return rows
