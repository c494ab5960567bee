"""`POST /v1/feedback` (a chatforge extension to the OpenAI API): thumbs on a stored completion.

    {"completion_id": "chatcmpl-…", "choice_index": 0, "rating": 1 | -1, "reason": "…",
     "preferred_completion_id": "chatcmpl-…", "preferred_choice_index": 0, "edited_content": "…"}

`preferred_completion_id` names a regenerate of the same messages that the rater liked better (the rated
reply is then the rejected one); `edited_content` is the reply as the rater would have written it. A key
can rate only completions made with it. Returns `{"id": "fb_…", "object": "feedback", ...}`; `chatforge
export feedback` turns these into comparisons and demonstrations.
"""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from chatforge.server.auth import KeyInfo, api_key
from chatforge.server.errors import OpenAIError

router = APIRouter()
MAX_TEXT = 100_000  # characters of reason / edited_content


class FeedbackRequest(BaseModel):
    completion_id: str = Field(min_length=1, max_length=64)
    choice_index: int = Field(0, ge=0)
    rating: Literal[1, -1]
    reason: str | None = Field(None, max_length=MAX_TEXT)
    preferred_completion_id: str | None = Field(None, min_length=1, max_length=64)
    preferred_choice_index: int | None = Field(None, ge=0)
    edited_content: str | None = Field(None, max_length=MAX_TEXT)
    user: str | None = Field(None, max_length=200)


@router.post("/v1/feedback")
async def post_feedback(body: FeedbackRequest, request: Request, key: KeyInfo | None = Depends(api_key)) -> dict:
    from chatforge.server.db.repo import Invalid, NotFound

    db = request.app.state.db
    if db is None:
        raise OpenAIError(503, "feedback needs storage: start the server with --db", code="storage_disabled")
    key_id = key.id if key is not None else None
    try:
        fb = await asyncio.to_thread(lambda: db.add_feedback(
            completion_id=body.completion_id, choice_index=body.choice_index, rating=body.rating,
            reason=body.reason, preferred_completion_id=body.preferred_completion_id,
            preferred_choice_index=body.preferred_choice_index, edited_content=body.edited_content,
            api_key_id=key_id, user_id=key.user_id if key else None, user=body.user, owner_key_id=key_id))
    except NotFound as e:
        raise OpenAIError(404, str(e), param=e.param, code="completion_not_found") from None
    except Invalid as e:
        raise OpenAIError(400, str(e), param=e.param, code="invalid_value") from None
    return {"id": fb.id, "object": "feedback", "completion_id": fb.completion_id, "choice_index": fb.choice_index,
            "rating": fb.rating, "policy": fb.policy, "created_at": int(fb.created_at.timestamp())}
