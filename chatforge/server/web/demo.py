"""`chatforge serve --demo`: a newcomer ranks within a minute.

Creates (once; a re-start reuses them) a local admin `admin` with a printed one-time password (the first
login asks for a new one), a campaign of ranking tasks whose replies the served model samples on shipped
human-written prompts (OpenAssistant, `embedded:sft/oasst-best`), and a demonstration prompt set, so the
person opening the printed URL can write, rank and chat at once.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from chatforge.core.log import print0
from chatforge.server.db.models import User
from chatforge.server.web import campaigns as cp
from chatforge.server.web.models import Campaign, RankTask
from chatforge.server.web.security import hash_password, one_time_password

DEMO_PROMPTS = "embedded:sft/oasst-best"
DEMO_CAMPAIGN = "Demo: rank replies"
DEMO_PROMPT_SET = "Demo: write demonstrations"
DEMO_GUIDELINES = ("Put the most helpful, honest and harmless reply first. A reply that fails the instruction "
                   "ranks below one that follows it, whatever its style.")


def demo_tasks(served: Any, n_prompts: int = 8, k: int = 4, max_new_tokens: int = 64, seed: int = 0) -> list[dict]:
    """K sampled replies of the served model to each of the first `n_prompts` shipped prompts, as ranking tasks."""
    import torch

    from chatforge.core.generation import SamplingParams, generate
    from chatforge.core.tokenizer import render_for_completion, stop_token_ids
    from chatforge.data.formats import make_task
    from chatforge.data.prompts import load_prompts

    prompts = [p for p in load_prompts(DEMO_PROMPTS)
               if len(render_for_completion(served.tok, p["messages"])) + max_new_tokens <= served.context][:n_prompts]
    ids = [render_for_completion(served.tok, p["messages"]) for p in prompts]
    params = [SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=max_new_tokens, seed=seed + i)
              for i in range(len(prompts))]
    with torch.inference_mode():
        gens = generate(served.model, ids, params, stop_token_ids=stop_token_ids(served.tok),
                        pad_id=served.tok.pad_token_id, tokenizer=served.tok, num_samples=k)
    sample = {"temperature": 1.0, "top_p": 0.95, "max_new_tokens": max_new_tokens}
    return [make_task(p, [g.text for g in gs], served.id, {**sample, "seed": seed + i}, [g.finish_reason for g in gs])
            for i, (p, gs) in enumerate(zip(prompts, gens, strict=True))]


def setup_demo(sessions: Any, served: Any, n_prompts: int = 8, k: int = 4) -> dict:
    """Create the demo admin, campaign and prompt set when missing. Returns what to print: the admin's
    one-time password (None when the admin already chose one), the campaign id and its task count."""
    from chatforge.data.formats import RankingTask

    out: dict[str, Any] = {"username": "admin", "password": None}
    with sessions() as db:
        admin = db.scalar(select(User).where(User.username == "admin"))
        if admin is None or admin.must_change_password:  # never chosen: a fresh one-time password
            otp = one_time_password()
            if admin is None:
                admin = User(username="admin", role="admin", display_name="Demo admin")
                db.add(admin)
            admin.password_hash, admin.must_change_password, admin.is_active = hash_password(otp), True, True
            out["password"] = otp
            cp.audit(db, None, "demo.admin", "admin")
        db.commit()
        camp = db.scalar(select(Campaign).where(Campaign.name == DEMO_CAMPAIGN))
        if camp is None:
            print0(f"demo: sampling {k} replies from {served.id} for {n_prompts} shipped prompts ...")
            tasks = [RankingTask.from_dict(t, "demo", i + 1) for i, t in enumerate(demo_tasks(served, n_prompts, k))]
            camp = Campaign(name=DEMO_CAMPAIGN, overlap=1, allow_ties=True, guidelines=DEMO_GUIDELINES,
                            created_by=admin.id)
            db.add(camp)
            db.flush()
            cp.import_tasks(db, camp, tasks)
            cp.audit(db, None, "campaign.import", camp.id, name=DEMO_CAMPAIGN, tasks=len(tasks), overlap=1, source="demo")
            db.commit()
        out["campaign_id"] = camp.id
        out["tasks"] = db.scalar(select(func.count()).select_from(RankTask).where(RankTask.campaign_id == camp.id))
        out["prompt_set"] = _demo_prompt_set(db, admin)
    return out


def _demo_prompt_set(db: Any, admin: User) -> str | None:
    """The demonstration prompt set (when the demonstrations pages are part of this build)."""
    try:
        from chatforge.server.web import demos
    except ImportError:
        return None
    ensure = getattr(demos, "ensure_prompt_set", None)
    if ensure is None:
        return None
    from chatforge.data.prompts import load_prompts

    return ensure(db, DEMO_PROMPT_SET, load_prompts(f"{DEMO_PROMPTS}:20")[8:], admin)
