"""Best-of-n distillation (rejection-sampling fine-tuning; Llama 2, RAFT): sample n, the reward picks, SFT.

    chatforge bon --policy runs/sft --reward runs/rm --prompts tasks:16:101 --set bon.n=8 --out runs/bon

One round, readable top to bottom:

  1. draw bon.prompts_per_round prompts (a fresh slice each round while they last)
  2. sample bon.n replies per prompt from the current model with the RL rollout engine (core/rollout)
  3. score every reply with the reward source (and the bon.ensemble sources, combined by mean or min);
     replies cut off before their end of turn cannot be picked (bon.require_end_of_turn)
  4. keep the argmax per prompt as a demonstration (conversation format, provenance in `meta`: policy,
     reward, n, the pick's score and rank, the mean and max of its siblings)
  5. SFT the current model on the picks (stages/sft.run, LoRA when lora.enabled): round-R/sft
  6. the next round samples from that model

Best-of-n is the most KL-efficient way to spend a reward model (Gao et al. 2022: best-of-n costs
log n - (n-1)/n nats); distilling it keeps that property while making inference one sample. Out: `round-R/
picks.jsonl`, `round-R/sft/` (a normal SFT run dir), `model` (a link to the last round's model) and
`bon.json` (per-round scores: the picks' mean vs a random reply's mean, i.e. what the selection gained).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import torch

from chatforge.config import BoNConfig, SFTConfig, SFTDataConfig, to_dict
from chatforge.core.io import UserError, write_json, write_jsonl
from chatforge.core.log import console, print0
from chatforge.core.model import load_model_and_tokenizer, unwrap
from chatforge.core.rewards import EnsembleReward, make_reward_source, score_rollout
from chatforge.core.rollout import (
    generate_rollouts,
    keep_scorable,
    prepare_prompts,
    rollout_seed,
)
from chatforge.core.run import Run, parent_run_id
from chatforge.core.train import set_threads


def check_config(cfg: BoNConfig) -> None:
    problems = []
    if not cfg.policy:
        problems.append("bon needs a policy: --policy RUN_DIR|HF_DIR|NAME")
    if not cfg.reward:
        problems.append("bon needs a reward: --reward RM_RUN|tasks|rule|keyword:WORD")
    if not cfg.prompts:
        problems.append("bon needs prompts: --prompts FILE.jsonl|tasks:N[:SEED]")
    if cfg.bon.n < 2:
        problems.append(f"bon.n must be >= 2 (one sample has nothing to pick from), got {cfg.bon.n}")
    if cfg.bon.rounds < 1 or cfg.bon.prompts_per_round < 1:
        problems.append("bon.rounds and bon.prompts_per_round must be >= 1")
    if problems:
        raise UserError("; ".join(problems))


def pick_best(scores: torch.Tensor, ended: torch.Tensor, n: int, require_end: bool) -> list[int | None]:
    """Row index of the best reply of each prompt (rows prompt-major, n per prompt); None when no reply of
    that prompt may be picked (all cut off and `require_end`)."""
    s = scores.view(-1, n).clone()
    if require_end:
        s[~ended.view(-1, n)] = float("-inf")
    best = s.argmax(dim=1)
    return [None if not torch.isfinite(s[i, b]) else i * n + int(b) for i, b in enumerate(best.tolist())]


def run(cfg: BoNConfig, out: Path, resume: bool = True) -> dict:
    """Rounds of sample n → pick → SFT into `out`; returns the summary (also in bon.json)."""
    from chatforge.core.distributed import init_distributed
    from chatforge.stages import sft

    check_config(cfg)
    set_threads(cfg.train)
    out = Path(out)
    run_ = Run(out, "bon", cfg, init_distributed("cpu"), inputs={"policy": cfg.policy},
               parent=parent_run_id(str(cfg.policy)))
    run_.write_manifest("running")
    sources = [make_reward_source(spec, "cpu", cfg.rollout.forward_batch_size)
               for spec in [cfg.reward, *cfg.bon.ensemble]]  # type: ignore[list-item]
    reward = EnsembleReward(sources, cfg.bon.combine) if cfg.bon.ensemble else sources[0]
    rng = random.Random(cfg.train.seed)
    current = str(cfg.policy)
    summary: dict = {"config": to_dict(cfg), "rounds": []}
    order: list[int] | None = None
    for r in range(1, cfg.bon.rounds + 1):
        rdir = out / f"round-{r}"
        sft_dir = rdir / "sft"
        if resume and (sft_dir / "model").exists() and (rdir / "round.json").exists():
            print0(f"round {r}: done already ({sft_dir})")
            summary["rounds"].append(json.loads((rdir / "round.json").read_text()))
            current = str(sft_dir)
            continue
        console.rule(f"[bold]best-of-{cfg.bon.n} round {r}/{cfg.bon.rounds}: sample, pick, SFT")
        # 1-2. prompts and n samples each from the current model
        policy, tok, _ = load_model_and_tokenizer(current)
        policy.eval()
        context = getattr(unwrap(policy).config.get_text_config(), "max_position_embeddings", None)
        prompts, prompt_ids, _ = prepare_prompts(cfg.prompts, tok, cfg.rollout.max_new_tokens, context)  # type: ignore[arg-type]
        prompts, prompt_ids = keep_scorable(reward, prompts, prompt_ids)
        if order is None:
            order = list(range(len(prompts)))
            rng.shuffle(order)
        take = [order[(i + (r - 1) * cfg.bon.prompts_per_round) % len(order)]
                for i in range(min(cfg.bon.prompts_per_round, len(order)))]
        picks, gains = [], []
        batch = max(1, cfg.rollout.forward_batch_size // cfg.bon.n)
        with torch.no_grad():
            for b0 in range(0, len(take), batch):
                idx = take[b0: b0 + batch]
                seeds = [rollout_seed(cfg.train.seed, r, 0, i) for i in idx]
                ro = generate_rollouts(policy, tok, [prompts[i] for i in idx], [prompt_ids[i] for i in idx],
                                       max_new_tokens=cfg.rollout.max_new_tokens,
                                       temperature=cfg.rollout.temperature, top_k=cfg.rollout.top_k,
                                       top_p=cfg.rollout.top_p, seeds=seeds, num_samples=cfg.bon.n)
                # 3. scores (ensemble combined), 4. the argmax per prompt
                scores = torch.tensor(score_rollout(reward, tok, ro))
                for j, row in enumerate(pick_best(scores, ro.ended.cpu(), cfg.bon.n, cfg.bon.require_end_of_turn)):
                    group = scores[j * cfg.bon.n: (j + 1) * cfg.bon.n]
                    if row is None:
                        continue
                    p = ro.prompts[row]
                    rank = int((group > scores[row]).sum()) + 1
                    picks.append({"id": f"bon-r{r}-{p.get('id', row)}",
                                  "messages": [*p["messages"], {"role": "assistant", "content": ro.texts[row]}],
                                  "source": "bon",
                                  "meta": {**(p.get("meta") or {}), "policy": current, "reward": cfg.reward,
                                           "ensemble": cfg.bon.ensemble, "combine": cfg.bon.combine,
                                           "n": cfg.bon.n, "score": float(scores[row]), "rank": rank,
                                           "siblings_mean": float(group.mean()), "siblings_max": float(group.max()),
                                           "round": r, "prompt_id": p.get("id")}})
                    gains.append((float(scores[row]), float(group.mean())))
                print0(f"round {r}: scored {min(b0 + batch, len(take))}/{len(take)} prompts x {cfg.bon.n}")
        del policy
        if not picks:
            raise UserError(f"round {r}: no reply could be picked (every sample was cut off before its end "
                            f"of turn; raise rollout.max_new_tokens or set bon.require_end_of_turn=false)")
        rdir.mkdir(parents=True, exist_ok=True)
        write_jsonl(rdir / "picks.jsonl", picks)
        stats = {"round": r, "policy": current, "prompts": len(take), "picks": len(picks),
                 "pick_score_mean": sum(g[0] for g in gains) / len(gains),
                 "sample_score_mean": sum(g[1] for g in gains) / len(gains)}
        print0(f"round {r}: {len(picks)} picks, mean score {stats['pick_score_mean']:+.3f} "
               f"vs {stats['sample_score_mean']:+.3f} for a random sample")
        # 5. SFT on the picks from the current model
        scfg = SFTConfig(model=current, train=cfg.train, data=SFTDataConfig(paths=[str(rdir / "picks.jsonl")],
                                                                            val_fraction=0.0),
                         lora=cfg.lora, log=cfg.log)
        res = sft.run(scfg, sft_dir, resume=resume)
        stats["sft_run_id"] = res.get("run_id")
        write_json(rdir / "round.json", stats)
        summary["rounds"].append(stats)
        current = str(sft_dir)  # 6. the next round samples from this model
    link = out / "model"
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(os.path.relpath(Path(current) / "model", out), link)
    summary["model"] = str(Path(current) / "model")
    write_json(out / "bon.json", summary)
    last = summary["rounds"][-1]
    run_.write_manifest("completed", metrics={"rounds": len(summary["rounds"]), "picks": last["picks"],
                                              "pick_score_mean": last["pick_score_mean"],
                                              "sample_score_mean": last["sample_score_mean"]},
                        extra={"model": summary["model"]})
    print0(f"best-of-{cfg.bon.n} done: {summary['model']}")
    return summary
