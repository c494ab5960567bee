"""`chatforge loop`: rounds of sample → rank → reward model → PPO/DPO/GRPO → eval → register.

    chatforge loop --config loop.yaml
    chatforge loop --set sft=runs/sft --set rounds=2 --set out=runs/loop

Each round r lives in OUT/round-r/:
  tasks.jsonl         K replies per fresh prompt from the current policy (resumable)
  comparisons.jsonl   rankings: a simulated panel, people in the web app (`labeler=app`: the round's
                      tasks become a campaign, the loop waits for the labelers), or a file exported
                      from elsewhere (`labels_dir/round-r.jsonl`); when not there yet the loop waits or stops
  rm/                 reward model trained on every round's comparisons so far (continuing the last RM)
  policy/             PPO (or DPO/GRPO) from the current policy, KL-anchored to the SFT model
  eval.json           the new policy vs the previous one and vs SFT (task accuracy, judged win rate)
Every step is skipped when its output is complete and resumed when it is not, so a killed loop
re-run with the same config continues where it was (inside stages too: they resume checkpoints).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from chatforge.config import load_config, to_dict
from chatforge.core.io import UserError, write_json, write_jsonl
from chatforge.core.log import console, print0
from chatforge.core.run import read_manifest
from chatforge.core.tracking import final_mean


class PeopleLabels(Protocol):
    """Where people's rankings come from (`labeler=app`; chatforge.server.rounds.AppRankings)."""

    def collect(self, round_: int, tasks: Path, out: Path) -> None:
        """Write the round's comparisons to `out`, or raise UserError when they are not ready."""


class FeedbackSource(Protocol):
    """Deployed-chat feedback as comparisons (`feedback_db`; chatforge.server.rounds.DBFeedback)."""

    def export(self, out_dir: Path) -> int:
        """Write out_dir/comparisons.jsonl and out_dir/report.json; return the number of comparisons."""


@dataclass
class AppLabelConfig:
    overlap: int = 3
    """Labelers per task (each task to this many different people)."""
    deadline_s: float = 86400.0
    """Train on what is ranked when this passes (at least one task), counted from the campaign's import."""
    poll_s: float = 5.0
    consensus: bool = False
    """One aggregated ranking per task instead of every labeler's own."""
    campaign: str | None = None
    """Campaign name prefix (default: the loop's out dir name)."""


@dataclass
class LoopConfig:
    sft: str | None = None
    """The SFT run: the first round's policy and every round's KL reference."""
    out: str = "runs/loop"
    rounds: int = 2
    prompts: str = "tasks:8"
    """Fresh prompts per round: a JSONL path, or tasks:N (the round number is used as the draw seed)."""
    k: int = 4
    sample_max_new_tokens: int = 32
    sample_temperature: float = 1.0
    labeler: str = "panel:rule*5:temperature=0.5"
    """A simulated panel spec, or `app`: people rank each round's tasks in the web app (needs `db`)."""
    db: str | None = None
    """With labeler=app: the web app's database URL (the one `chatforge serve --db` uses); its chat
    feedback joins every round too, as with feedback_db."""
    app: AppLabelConfig = field(default_factory=AppLabelConfig)
    per_task: int = 0
    """Panel labelers per task (0 = every labeler ranks every task)."""
    labels_dir: str | None = None
    """Use people's rankings instead of a simulated panel: expects labels_dir/round-N.jsonl."""
    extra_comparisons: list[str] = field(default_factory=list)
    """Comparison files trained on in every round beside the rankings (e.g. an `export feedback` output)."""
    feedback_db: str | None = None
    """The `serve` database: each round exports its users' feedback (round-N/feedback/) and trains on those
    comparisons too (only the latest round's export, which already holds every earlier event)."""
    feedback_max_policy_age: int | None = None
    """With feedback_db: drop replies from model versions older than N rounds (export --max-policy-age)."""
    wait_for_labels: Literal["stop", "wait"] = "stop"
    wait_seconds: int = 3600
    algo: Literal["ppo", "dpo", "grpo", "bon"] = "ppo"
    """ppo | dpo | grpo | bon (best-of-n distillation: sample n, the round's RM picks, SFT on the picks)."""
    rm_model: str | None = None
    """The first round's reward model starts from this model instead of the SFT model (later rounds continue the
    last RM), e.g. a pretrained trunk larger than a small policy's (the sizes need not match: InstructGPT paired a
    6B RM with its 175B policy). The RM reads prompt and reply as text, so its tokenizer may differ."""
    rm_set: list[str] = field(default_factory=list)
    """--set overrides for each round's reward model (e.g. train.max_steps=200)."""
    algo_set: list[str] = field(default_factory=list)
    """--set overrides for each round's PPO/DPO/GRPO run."""
    algo_prompts: str = "tasks:16"
    """Prompts for PPO/GRPO rollouts (tasks:N uses 100 + round as the draw seed)."""
    eval_prompts: str = "tasks-heldout:10:1"
    eval_exclude: str | None = None
    """Prompts dropped from the eval set: the RL runs' gold validation prompts (gold.prompts), so the checkpoint
    kept for its validation gold is not judged on the prompts that chose it."""
    judge: str = "panel:rule*5:temperature=0.5"
    eval_max_new_tokens: int = 32
    gold: str | None = "rule"
    """The noise-free gold judge (the panel's utility without its sampling noise): the primary measure beside the
    panel `judge`; none = panel only."""
    eval_samples: int = 2
    """Sampled replies per eval prompt (paired seeds 0..S-1) beside the greedy one; 0 = greedy only."""
    eval_temperature: float = 1.0
    """Temperature of those samples (the rollouts' by default: the decoding RL trained)."""
    report: bool = True
    """Write each round's full `chatforge eval` report (round-N/report/), linked to the previous one."""
    report_bias: bool = True
    report_general: int = 48
    """Held-out human-written conversations outside the task suite in each round's report (general chat, the
    alignment tax; `chatforge eval`'s general_n); 0 = off."""
    baseline: str | None = None
    """Another model (e.g. the untouched pretrained chat model the SFT started from): each round also judges
    its policy, and the SFT model, against it (eval.json: vs_baseline, sft_vs_baseline)."""


def _done(run_dir: Path) -> bool:
    m = read_manifest(run_dir) if run_dir.exists() else None
    return bool(m and m.get("status") == "completed")


def _seeded(spec: str, seed: int) -> str:
    """tasks:N -> tasks:N:SEED so every round draws fresh prompts; other specs unchanged."""
    parts = spec.split(":")
    if parts[0] in ("tasks", "tasks-heldout") and len(parts) == 2:
        return f"{spec}:{seed}"
    return spec


def _labels(cfg: LoopConfig, r: int, tasks: Path, out: Path, people: PeopleLabels | None) -> None:
    if out.exists():
        return
    if cfg.labeler == "app":
        if people is None:
            raise UserError("labeler=app needs the web app: run it as `chatforge loop` (or pass "
                            "people=chatforge.server.rounds.AppRankings(...) to loop.run)")
        people.collect(r, tasks, out)
        return
    if cfg.labels_dir:
        src = Path(cfg.labels_dir) / f"round-{r}.jsonl"
        deadline = time.time() + (cfg.wait_seconds if cfg.wait_for_labels == "wait" else 0)
        while not src.exists():
            if time.time() >= deadline:
                raise UserError(f"round {r}: labels not ready ({src} missing). Rank {tasks} in the feedback app, "
                                f"export to {src}, then re-run the loop (it resumes here)")
            print0(f"waiting for {src} ...")
            time.sleep(10)
        from chatforge.data.formats import read_comparisons, write_jsonl_records

        write_jsonl_records(out, read_comparisons(src))
        return
    from chatforge.stages.label import format_stats, label

    console.print(format_stats(label(tasks, out, cfg.labeler, per_task=cfg.per_task, seed=r)))


def _feedback(rdir: Path, feedback: FeedbackSource | None) -> list[Path]:
    """This round's export of the serve database's feedback (kept once written, so a re-run resumes)."""
    if feedback is None:
        return []
    out = rdir / "feedback"
    if not (out / "report.json").exists():
        feedback.export(out)
    path = out / "comparisons.jsonl"
    return [path] if path.stat().st_size else []


def _train_rm(cfg: LoopConfig, r: int, cmp_paths: list[Path], prev_rm: Path | None, out: Path) -> None:
    if _done(out):
        return
    from chatforge.config import RMConfig
    from chatforge.stages import rm

    rcfg = load_config(RMConfig, None, cfg.rm_set)
    rcfg.model = str(prev_rm / "model") if prev_rm else (cfg.rm_model or cfg.sft)
    rcfg.data.paths = [str(p) for p in cmp_paths]
    rm.run(rcfg, out)


def _train_policy(cfg: LoopConfig, r: int, policy: str, rm_dir: Path, cmp_paths: list[Path], out: Path) -> None:
    if _done(out):
        return
    import importlib

    from chatforge import config as config_mod

    cls = {"ppo": "PPOConfig", "dpo": "DPOConfig", "grpo": "GRPOConfig", "bon": "BoNConfig"}[cfg.algo]
    acfg = load_config(getattr(config_mod, cls), None, cfg.algo_set)
    acfg.policy = policy
    if cfg.algo == "dpo":
        acfg.data.paths = [str(p) for p in cmp_paths]
    else:
        acfg.reward = str(rm_dir)
        acfg.prompts = _seeded(cfg.algo_prompts, 100 + r)
        if hasattr(acfg, "reference"):
            acfg.reference = cfg.sft
    importlib.import_module(f"chatforge.stages.{cfg.algo}").run(acfg, out)


def judged_outcomes(prompts: list[dict], replies_m: list[str], replies_b: list[str], judge: str,
                    seed: int = 0, reasons_m: list[str] | None = None, reasons_b: list[str] | None = None
                    ) -> list[float]:
    """Per prompt: 1 if the judge panel prefers M's reply, 0 if B's, 0.5 for a tie (majority vote); finish
    reasons let the judge see which replies were cut off at max_new_tokens."""
    from chatforge.stages.label import parse_labeler_spec
    from chatforge.stages.report import judge_outcomes

    return judge_outcomes(prompts, replies_m, replies_b, parse_labeler_spec(judge, seed=seed), reasons_m, reasons_b)


def compare_models(model_m: str, model_b: str, prompts: list[dict], judge: str, max_new_tokens: int = 32,
                   cache: dict | None = None, gold: str | None = None, samples: int = 0,
                   temperature: float = 1.0, rm: str | None = None) -> dict:
    """Held-out task accuracy of both, and M's win rate over B (ties count half), with 95 % intervals.

    `win_rate`: greedy replies judged by `judge` (the noisy panel, Wilson and bootstrap intervals). With `gold`
    (a noise-free judge such as `rule`): `gold.greedy`, and with `samples` S > 0 also `gold.sampled` and
    `panel_sampled`: S replies per prompt at `temperature`, sample s drawn with seed s by both models (paired),
    each prompt's mean outcome over its S pairs, bootstrap over prompts. With `rm` (a reward model, e.g. the one
    M was trained against): `rm_score`, its normalised score of both models' replies to the same held-out
    prompts and the paired change M − B with a bootstrap 95 % interval, greedy and (with `samples`) sampled."""
    import numpy as np

    from chatforge.core.model import load_model_and_tokenizer
    from chatforge.evals.stats import bootstrap_ci, length_controlled_win_rate, win_rate
    from chatforge.stages.evaluate import generate_replies, sample_replies, task_accuracy

    cache = {} if cache is None else cache
    draws = ["greedy", *(f"T{temperature}-s{s}" for s in range(samples))]  # sample s: seed s, paired
    for spec in (model_m, model_b):
        if all((spec, d) in cache for d in draws):
            continue
        model, tok, _ = load_model_and_tokenizer(spec)
        model.eval()
        if (spec, "greedy") not in cache:  # (texts, finish reasons)
            cache[(spec, "greedy")] = generate_replies(model, tok, prompts, max_new_tokens=max_new_tokens)
        if any((spec, key) not in cache for key in draws[1:]):  # one prefill per prompt for all samples
            for key, drawn in zip(draws[1:], sample_replies(model, tok, prompts, max_new_tokens,
                                                                    temperature, 0, samples), strict=True):
                cache[(spec, key)] = drawn

    def outcomes_of(key: str, judge_spec: str) -> list[float]:
        (m, why_m), (b, why_b) = cache[(model_m, key)], cache[(model_b, key)]
        return judged_outcomes(prompts, m, b, judge_spec, reasons_m=why_m, reasons_b=why_b)

    greedy_m, greedy_b = cache[(model_m, "greedy")][0], cache[(model_b, "greedy")][0]
    outcomes = outcomes_of("greedy", judge)
    res: dict = {"model": model_m, "baseline": model_b, "judge": judge, "decoding": "greedy",
                 "win_rate": win_rate(outcomes),
                 "length_controlled": length_controlled_win_rate(outcomes, [len(x.split()) for x in greedy_m],
                                                                 [len(x.split()) for x in greedy_b]),
                 "accuracy_model": task_accuracy(prompts, greedy_m),
                 "accuracy_baseline": task_accuracy(prompts, greedy_b)}

    def sampled(judge_spec: str) -> dict:
        per = [outcomes_of(k, judge_spec) for k in draws[1:]]
        y = np.mean(np.array(per), axis=0)
        lo, hi = bootstrap_ci(y, np.mean)
        return {"win_rate": float(y.mean()), "ci_bootstrap": [float(lo), float(hi)], "n_prompts": len(y),
                "samples": samples, "temperature": temperature, "paired_seeds": list(range(samples))}

    if samples:
        res["panel_sampled"] = sampled(judge)
        acc = [task_accuracy(prompts, cache[(m, k)][0])["all"]["accuracy"] for m in (model_m, model_b)
               for k in draws[1:]]
        res["sampled_accuracy"] = {"model": float(np.mean(acc[:samples])), "baseline": float(np.mean(acc[samples:]))}
    if gold:
        res["gold"] = {"judge": gold, "greedy": win_rate(outcomes_of("greedy", gold)),
                       **({"sampled": sampled(gold)} if samples else {})}
    if rm:
        res["rm_score"] = rm_score_change(rm, prompts, {k: (cache[(model_m, k)], cache[(model_b, k)]) for k in draws})
    return res


def rm_score_change(rm: str, prompts: list[dict], replies: dict[str, tuple[tuple, tuple]]) -> dict:
    """The reward model's normalised score of two models' replies to the same prompts, and the paired change.

    `replies[key]` = ((texts M, finish reasons M), (texts B, finish reasons B)) for each decoding: "greedy", and
    sampled draws (any other key), whose per-prompt differences are averaged over the draws before the bootstrap.
    Cut-off replies are scored as the RM was trained (without end-of-turn tokens)."""
    import numpy as np

    from chatforge.core.reward_model import load_reward_model, score_texts
    from chatforge.evals.stats import bootstrap_ci

    model, tok, norm = load_reward_model(rm)
    msgs = [p["messages"] for p in prompts]
    # one call for every draw of both models: score_texts scores each distinct sequence once, and greedy and
    # sampled replies of a sharpened policy often coincide
    lists = [(key, side, texts, why) for key, pair in replies.items() for side, (texts, why) in enumerate(pair)]
    flat = score_texts(model, tok, msgs * len(lists), [t for _, _, texts, _ in lists for t in texts], norm,
                       finished=[w != "length" for _, _, _, why in lists for w in why])
    scores: dict[str, list] = {key: [None, None] for key in replies}
    for i, (key, side, _, _) in enumerate(lists):
        scores[key][side] = np.array(flat[i * len(msgs): (i + 1) * len(msgs)])

    def change(keys: list[str]) -> dict:
        m = np.mean([scores[k][0] for k in keys], axis=0)
        b = np.mean([scores[k][1] for k in keys], axis=0)
        lo, hi = bootstrap_ci(m - b, np.mean)
        return {"model": float(m.mean()), "baseline": float(b.mean()), "change": float((m - b).mean()),
                "ci_bootstrap": [float(lo), float(hi)], "n_prompts": len(m), "draws": len(keys)}

    out = {"rm": rm, "greedy": change(["greedy"])}
    if len(replies) > 1:
        out["sampled"] = change([k for k in replies if k != "greedy"])
    return out


def rm_change_text(rms: dict) -> str:
    """One line for an `rm_score` result: the sampled change (greedy without samples) and its 95 % interval."""
    d = rms.get("sampled", rms["greedy"])
    return f"{d['change']:+.3f} (95% CI {d['ci_bootstrap'][0]:+.3f} to {d['ci_bootstrap'][1]:+.3f})"


def round_policy(pol_dir: Path) -> Path:
    """The model a round hands on: the checkpoint with the best validation gold when the run kept one
    (`gold.spec`), else the run's final model."""
    best = pol_dir / "best_gold"
    return best if (best / "config.json").exists() else pol_dir


def run(cfg: LoopConfig, people: PeopleLabels | None = None, feedback: FeedbackSource | None = None) -> dict:
    """All rounds. `people` collects rankings when labeler=app; `feedback` exports chat feedback each round
    (the CLI builds both from the config with chatforge.server.rounds.loop_sources)."""
    if not cfg.sft:
        raise UserError("loop needs the SFT run: --set sft=RUN_DIR (or `sft:` in the config file)")
    from chatforge.core.model import resolve_model_path
    from chatforge.stages import sample
    from chatforge.stages.sample import load_prompts

    resolve_model_path(cfg.sft)  # fail early on a missing model
    if cfg.rm_model:
        resolve_model_path(cfg.rm_model)
    if cfg.feedback_db and feedback is None:
        raise UserError("feedback_db needs the server's export: run it as `chatforge loop` (or pass "
                        "feedback=chatforge.server.rounds.DBFeedback(URL) to loop.run)")
    if cfg.labels_dir and not Path(cfg.labels_dir).is_dir():
        raise UserError(f"labels_dir {cfg.labels_dir} does not exist")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "loop_config.json", to_dict(cfg))
    eval_prompts = load_prompts(cfg.eval_prompts)
    if cfg.eval_exclude:
        from chatforge.data.tasks import normalize_prompt, prompt_text

        seen = {normalize_prompt(prompt_text(p)) for p in load_prompts(cfg.eval_exclude)}
        eval_prompts = [p for p in eval_prompts if normalize_prompt(prompt_text(p)) not in seen]
    # the rounds' reports judge the same prompts as their eval, and reuse its greedy replies (`cache`)
    eval_prompts_path = out / "eval_prompts.jsonl"
    write_jsonl(eval_prompts_path, eval_prompts)
    policy, prev_rm = cfg.sft, None
    cmp_paths: list[Path] = []
    rounds, cache = [], {}
    for r in range(1, cfg.rounds + 1):
        rdir = out / f"round-{r}"
        console.rule(f"[bold]round {r}/{cfg.rounds}")
        tasks = rdir / "tasks.jsonl"
        if not (rdir / "labels.done").exists():
            sample.run(policy, _seeded(cfg.prompts, r), tasks,
                       sample.SampleConfig(k=cfg.k, temperature=cfg.sample_temperature,
                                           max_new_tokens=cfg.sample_max_new_tokens, seed=r))
        cmp_path = rdir / "comparisons.jsonl"
        _labels(cfg, r, tasks, cmp_path, people)
        (rdir / "labels.done").touch(exist_ok=True) if not (rdir / "labels.done").exists() else None
        cmp_paths.append(cmp_path)
        train_paths = [*cmp_paths, *map(Path, cfg.extra_comparisons), *_feedback(rdir, feedback)]
        rm_dir = rdir / "rm"
        if cfg.algo != "dpo" or not _done(rm_dir):
            _train_rm(cfg, r, train_paths, prev_rm, rm_dir)
        pol_dir = rdir / "policy"
        _train_policy(cfg, r, policy, rm_dir, train_paths, pol_dir)
        eval_path = rdir / "eval.json"
        new_policy = str(round_policy(pol_dir))
        if eval_path.exists():
            res = json.loads(eval_path.read_text(encoding="utf-8"))
        else:
            def vs(m: str, b: str, rm: str | None = None) -> dict:
                return compare_models(m, b, eval_prompts, cfg.judge, cfg.eval_max_new_tokens, cache, gold=cfg.gold,
                                      samples=cfg.eval_samples, temperature=cfg.eval_temperature, rm=rm)

            res = {"round": r, "policy": new_policy, "vs_previous": vs(new_policy, policy),
                   "vs_sft": vs(new_policy, cfg.sft, str(rm_dir)),
                   **({"vs_baseline": vs(new_policy, cfg.baseline),
                       "sft_vs_baseline": vs(cfg.sft, cfg.baseline)} if cfg.baseline else {}),
                   "policy_metrics": {**(read_manifest(pol_dir) or {}).get("metrics", {}),
                                      "final_kl": final_mean(pol_dir, "objective/kl")},
                   "previous_round": str(out / f"round-{r - 1}" / "eval.json") if r > 1 else None}
            write_json(eval_path, res)
        report_dir = rdir / "report"
        if cfg.report and not (report_dir / "report.json").exists():
            from chatforge.stages.report import EvalConfig
            from chatforge.stages.report import run as run_report

            prev = out / f"round-{r - 1}" / "report"
            # the untouched base too (when given): general chat is measured against it (the alignment tax)
            baselines = [policy] if policy == cfg.sft else [policy, cfg.sft]

            def eval_replies(spec: str, model: Any, tok: Any, prompts: list[dict]) -> tuple | None:
                return cache.get((spec, "greedy")) if prompts == eval_prompts else None

            run_report(EvalConfig(model=new_policy, baselines=baselines + ([cfg.baseline] if cfg.baseline else []),
                                  reward=str(rm_dir), judge=cfg.judge, prompts=str(eval_prompts_path),
                                  # the round's comparisons trained its RM: its held-out split only
                                  comparisons=[str(cmp_path)], comparisons_split="val", bias=cfg.report_bias,
                                  general=EvalConfig().general if cfg.report_general else [],
                                  general_n=cfg.report_general,
                                  previous=str(prev) if prev.exists() else None,
                                  max_new_tokens=cfg.eval_max_new_tokens), report_dir, reply_fn=eval_replies)
        _register(rdir)
        rounds.append(res)
        policy, prev_rm = new_policy, rm_dir
        wr = res["vs_sft"]["win_rate"]
        print0(f"round {r}: panel win rate vs SFT (greedy) {wr['win_rate']:.2f} (95% CI {wr['ci_wilson'][0]:.2f}-"
               f"{wr['ci_wilson'][1]:.2f}), accuracy {res['vs_sft']['accuracy_model']['all']['accuracy']:.3f} "
               f"(SFT {res['vs_sft']['accuracy_baseline']['all']['accuracy']:.3f})")
        sampled = res["vs_sft"].get("gold", {}).get("sampled")
        if sampled:
            print0(f"round {r}: gold ({cfg.gold}) win rate vs SFT, sampled T {sampled['temperature']} x"
                   f"{sampled['samples']}: {sampled['win_rate']:.3f} (95% CI {sampled['ci_bootstrap'][0]:.3f}-"
                   f"{sampled['ci_bootstrap'][1]:.3f})")
        rms = res["vs_sft"].get("rm_score")
        if rms:
            print0(f"round {r}: its reward model's held-out score vs SFT ({'sampled' if 'sampled' in rms else 'greedy'}"
                   f", SFT stds) {rm_change_text(rms)}")
    summary = {"out": str(out), "rounds": rounds}
    write_json(out / "loop_summary.json", summary)
    return summary


def _register(rdir: Path) -> None:
    """Record the round's run dirs in the registry when that module is available."""
    try:
        from chatforge.core.registry import register
    except ImportError:
        return
    for sub in ("rm", "policy"):
        if (rdir / sub / "manifest.json").exists():
            register(rdir / sub)


def load_loop_config(path: Path | None, overrides: list[str] | None) -> Any:
    return load_config(LoopConfig, path, overrides)
