"""Using a trained reward model: load it, score replies, evaluate it on held-out comparisons.

    chatforge rm eval --model runs/rm --data heldout.jsonl --out runs/rm/eval
    chatforge rm eval --model runs/rm --data cmp.jsonl --split val     # the run's own held-out tasks
    chatforge rm score --model runs/rm --data convs.jsonl --out scores.jsonl

`load_reward_model` and `score_texts` are what PPO, GRPO and `chatforge eval` call. Scores are
normalised with the run's `reward_norm.json` (SFT-policy replies average 0). A conversation too long
for the model is cut the way training cuts it (old prompt turns first, data/rm_data.py); a reply too
long even then is scored on its last tokens and counted as clipped.

`rm eval` reports pairwise accuracy (ties excluded) overall, by source and by K; calibration of
P(a > b) = sigmoid(r_a - r_b) against observed outcomes (each pair in both orientations, so the
reliability diagram is symmetric), with a reliability plot; and the Pearson correlation of reward
with reply length, warning when it exceeds LENGTH_BIAS_WARN (long replies winning by length alone is
the best-known reward-hacking route).
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from chatforge.core.io import UserError, atomic_write, write_json, write_jsonl
from chatforge.core.log import print0, warn
from chatforge.core.model import resolve_model_path
from chatforge.core.reward_model import (  # noqa: F401  (re-exported: load and score from here as before)
    DEFAULT_BATCH,
    RewardNorm,
    load_reward_model,
    score_length,
    score_texts,
    score_token_ids,
)
from chatforge.core.run import read_manifest
from chatforge.data.rm_data import (
    build_examples,
    load_comparisons,
    score_sequences,
    split_comparisons,
)

LENGTH_BIAS_WARN = 0.5  # |Pearson r| between reward and reply length above which eval warns
CALIBRATION_BINS = 10


# ----------------------------------------------------------------------------- eval metrics


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def pearson(xs: list[float], ys: list[float]) -> float | None:
    n = len(xs)
    if n < 3:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else None


def calibration(gaps: list[float], bins: int = CALIBRATION_BINS) -> dict:
    """Reliability of sigmoid(r_better - r_worse), each pair counted in both orientations; ECE."""
    pts = [(_sigmoid(g), 1.0) for g in gaps] + [(_sigmoid(-g), 0.0) for g in gaps]
    rows = []
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        inside = [(p, y) for p, y in pts if lo <= p < hi or (b == bins - 1 and p == 1.0)]
        if inside:
            rows.append({"lo": lo, "hi": hi, "n": len(inside), "predicted": sum(p for p, _ in inside) / len(inside),
                         "observed": sum(y for _, y in inside) / len(inside)})
    ece = sum(r["n"] * abs(r["predicted"] - r["observed"]) for r in rows) / max(1, len(pts))
    return {"bins": rows, "ece": ece}


def reliability_plot(cal: dict, path: Path, title: str) -> None:
    """Predicted vs observed P(a > b) per bin, point size by count; the diagonal is perfect calibration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "--", color="gray", lw=1, label="perfect")
    rows = cal["bins"]
    if rows:
        n_max = max(r["n"] for r in rows)
        ax.plot([r["predicted"] for r in rows], [r["observed"] for r in rows], "-", color="C0", lw=1)
        ax.scatter([r["predicted"] for r in rows], [r["observed"] for r in rows],
                   s=[20 + 180 * r["n"] / n_max for r in rows], color="C0", label="reward model", zorder=3)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="predicted P(a > b) = sigmoid(r_a - r_b)", ylabel="observed frequency",
           title=f"{title}\nECE {cal['ece']:.3f}")
    ax.legend(loc="upper left")
    fig.tight_layout()
    with atomic_write(path, mode="wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def _accuracy_table(rows: list[tuple[str, float]]) -> dict:
    """group -> {accuracy, pairs} from (group, r_better - r_worse) rows."""
    groups: dict[str, list[float]] = defaultdict(list)
    for g, d in rows:
        groups[g].append(d)
    return {g: {"accuracy": sum(d > 0 for d in ds) / len(ds), "pairs": len(ds)} for g, ds in sorted(groups.items())}


def labeler_agreement(cmps: list) -> dict | None:
    """Inter-labeler agreement on these comparisons (tasks ranked by >= 2 labelers), InstructGPT style: the
    ceiling to read an RM's accuracy against, since labels that disagree with each other cap it. Also per
    source, to set next to the RM's `by_source` accuracy."""
    from chatforge.stages.label import panel_agreement

    by_task: dict[str, list] = defaultdict(list)
    source: dict[str, str] = {}
    for c in cmps:
        by_task[c.task_id].append(c.ranking)
        source[c.task_id] = c.source or "unknown"
    shared = {t: r for t, r in by_task.items() if len(r) >= 2}
    value, pairs = panel_agreement(list(shared.values()))
    if value is None:
        return None
    per_source: dict[str, list] = defaultdict(list)
    for t, ranks in shared.items():
        per_source[source[t]].append(ranks)
    by_source = {}
    for src, tasks in sorted(per_source.items()):
        v, n = panel_agreement(tasks)
        if v is not None:
            by_source[src] = {"agreement": v, "pairs": n}
    return {"agreement": value, "pairs": pairs, "by_source": by_source}


def _heldout(spec: str, cmps: list, split: str) -> list:
    if split == "all":
        return cmps
    run_dir = resolve_model_path(spec).parent
    manifest = read_manifest(run_dir)
    if not manifest or manifest.get("stage") != "rm":
        raise UserError(f"--split {split} needs the RM's run dir (its manifest holds data.val_fraction); "
                        f"{run_dir} has no rm manifest")
    frac = manifest["config"]["data"]["val_fraction"]
    train, val = split_comparisons(cmps, frac)
    return val if split == "val" else train


def evaluate(model_spec: str, data: list[str] | str, out: Path | None = None, split: str = "all",
             batch_size: int = DEFAULT_BATCH, device: str = "auto") -> dict:
    """Accuracy (overall, by source, by K), calibration and length bias on comparisons; writes eval.json + PNG."""
    if split not in ("all", "val", "train"):
        raise UserError(f"--split must be all, val or train, got '{split}'")
    model, tok, norm = load_reward_model(model_spec, device)
    cmps = _heldout(model_spec, load_comparisons([data] if isinstance(data, str) else list(data)), split)
    examples, st = build_examples(tok, cmps, score_length(model, None))
    if not examples:
        raise UserError("no comparison with an ordered pair to evaluate (all empty, tied or too long)")
    flat = [s for ex in examples for s in ex.seqs]
    raw = score_sequences(model, flat, model.config.pad_token_id, batch_size, next(model.parameters()).device)
    rewards = [norm.apply(r) for r in raw]
    by_src, by_k, gaps, lengths, scores = [], [], [], [], []
    loss, longer_rm, longer_label, n_len_pairs, i = 0.0, 0, 0, 0, 0
    for ex in examples:
        r = rewards[i: i + ex.k]
        i += ex.k
        lengths += ex.reply_chars
        scores += r
        for b, w, _ in ex.pairs:
            d = r[b] - r[w]
            gaps.append(d)
            by_src.append((ex.source or "unknown", d))
            by_k.append((str(ex.k), d))
            loss += ex.weight * -math.log(max(1e-12, _sigmoid(d)))
            if ex.reply_chars[b] != ex.reply_chars[w]:
                n_len_pairs += 1
                longer_label += ex.reply_chars[b] > ex.reply_chars[w]
                longer_rm += (ex.reply_chars[b] > ex.reply_chars[w]) == (d > 0)
    cal = calibration(gaps)
    corr = pearson([float(x) for x in lengths], scores)
    agreement = labeler_agreement(cmps)
    res = {
        "model": str(resolve_model_path(model_spec)), "data": data, "split": split,
        "comparisons": len(examples), "pairs": len(gaps),
        "accuracy": sum(d > 0 for d in gaps) / len(gaps), "loss": loss / len(examples),
        "by_source": _accuracy_table(by_src), "by_k": _accuracy_table(by_k),
        "calibration": cal, "ece": cal["ece"],
        "length": {"pearson_reward_vs_chars": corr, "warn_threshold": LENGTH_BIAS_WARN,
                   "pairs_with_length_gap": n_len_pairs,
                   "labels_prefer_longer": longer_label / n_len_pairs if n_len_pairs else None,
                   "rm_prefers_longer": longer_rm / n_len_pairs if n_len_pairs else None},
        "reward": {"mean": sum(scores) / len(scores), "min": min(scores), "max": max(scores)},
        "skipped": {"comparisons": st.skipped_comparisons, "replies": st.skipped_replies,
                    "truncated_prompts": st.truncated_prompts},
        "norm": {"mean": norm.mean, "std": norm.std, "n": norm.n, "policy": norm.policy},
        "labeler_agreement": agreement,
    }
    if corr is not None and abs(corr) > LENGTH_BIAS_WARN:
        warn(f"length bias: reward correlates with reply length (Pearson r = {corr:+.2f}, |r| > {LENGTH_BIAS_WARN})")
        res["length"]["warning"] = True
    print0(f"rm eval: accuracy {res['accuracy']:.3f} on {len(gaps)} pairs from {len(examples)} comparisons, "
           f"ECE {cal['ece']:.3f}, reward~length r = {'n/a' if corr is None else f'{corr:+.2f}'}"
           + (f"; labelers agree with each other on {agreement['agreement']:.3f} of {agreement['pairs']} pairs of "
              "these tasks" if agreement else ""))
    if agreement and len(res["by_source"]) > 1:
        for src, row in res["by_source"].items():
            ceiling = agreement["by_source"].get(src)
            print0(f"  {src}: accuracy {row['accuracy']:.3f} on {row['pairs']} pairs"
                   + (f"; labelers agree on {ceiling['agreement']:.3f}" if ceiling else ""))
    if out is not None:
        out = Path(out)
        reliability_plot(cal, out / "reliability.png", f"RM calibration ({len(gaps)} pairs)")
        write_json(out / "eval.json", res)
        print0(f"wrote {out / 'eval.json'} and {out / 'reliability.png'}")
    return res


def score(model_spec: str, data: str | Path, out: Path, batch_size: int = DEFAULT_BATCH,
          divide_std: bool | None = None, device: str = "auto") -> dict:
    """Score each conversation's last assistant turn; write {id, score, raw_score} JSONL to `out`."""
    from chatforge.data.formats import read_conversations

    model, tok, norm = load_reward_model(model_spec, device)
    if divide_std is not None:
        norm.divide_std = divide_std
    convs = read_conversations(data, require_assistant=True)
    prompts, replies = [], []
    for c in convs:
        msgs = c.dicts()
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        prompts.append(msgs[:last])
        replies.append(msgs[last]["content"])
    stats: dict = {}
    raw = score_texts(model, tok, prompts, replies, None, batch_size, stats=stats)
    rows = [{"id": c.id, "score": norm.apply(r), "raw_score": r} for c, r in zip(convs, raw)]
    write_jsonl(out, rows)
    if stats.get("truncated") or stats.get("clipped"):
        warn(f"{stats['truncated']} prompts lost old turns and {stats['clipped']} replies were clipped to the "
             f"model's context ({score_length(model, None)} tokens)")
    mean = sum(r["score"] for r in rows) / max(1, len(rows))
    print0(f"scored {len(rows)} conversations (mean normalised score {mean:+.4f}) -> {out}")
    return {"n": len(rows), "mean": mean, "truncated": stats.get("truncated", 0), "clipped": stats.get("clipped", 0),
            "out": str(out)}


# ----------------------------------------------------------------------------- best-of-n: how far to trust the RM


def parse_best_of(text: str) -> list[int]:
    """'1,2,4,8,16' -> [1, 2, 4, 8, 16] (sorted, distinct, each >= 1)."""
    try:
        ns = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise UserError(f"--best-of must be comma-separated integers such as 1,2,4,8,16, not '{text}'") from None
    if not ns or ns[0] < 1:
        raise UserError(f"--best-of needs integers >= 1, not '{text}'")
    return ns


def bon_kl(n: int) -> float:
    """KL(best-of-n || policy) in nats, the analytic bound Gao et al. use: log n - (n - 1) / n."""
    return math.log(n) - (n - 1) / n


def best_of_n(reward: str, policy: str, prompts: str, ns: list[int], gold: str, temperature: float = 1.0,
              max_new_tokens: int = 32, seed: int = 0, out: Path | None = None, device: str = "auto") -> dict:
    """The gold utility of the reward model's pick among n samples of `policy`, at each n, next to the
    gold's own pick (the oracle) and a random pick (the mean over the n samples), on `prompts`.

    Samples are drawn once (max n per prompt, seed per sample) and every n uses the first n of them, so the
    columns are paired. Intervals: bootstrap over prompts of the RM pick's gain over a random pick.
    """
    import numpy as np

    from chatforge.core.model import load_model_and_tokenizer
    from chatforge.core.rewards import TaskReward, make_reward_source
    from chatforge.data.prompts import load_prompts
    from chatforge.data.tasks import find_family
    from chatforge.evals.stats import bootstrap_ci
    from chatforge.stages.evaluate import sample_replies

    if not ns or min(ns) < 1:
        raise UserError("best-of needs n >= 1")
    items = load_prompts(prompts)
    if not items:
        raise UserError(f"no prompts in '{prompts}'")
    gold_src = make_reward_source(gold)  # a bad spec fails here, before any generation
    if isinstance(gold_src, TaskReward) and any(find_family(p) is None for p in items):
        raise UserError(f"--gold {gold}: the task-suite checker cannot score the prompts '{prompts}' "
                        "(use task-suite prompts such as tasks-heldout:4:1, or --gold rule)")
    model, tok, src = load_model_and_tokenizer(policy)
    model.eval()
    n_max = max(ns)
    drawn = sample_replies(model, tok, items, max_new_tokens, temperature, seed, n_max)
    del model
    samples = [texts for texts, _ in drawn]
    ended = [[why != "length" for why in reasons] for _, reasons in drawn]  # both judges see cut-off replies
    proxy_src = make_reward_source(reward, device if device != "auto" else "cpu")
    proxy = np.array([proxy_src.score(items, s, e) for s, e in zip(samples, ended)])  # (n_max, prompts)
    utility = np.array([gold_src.score(items, s, e) for s, e in zip(samples, ended)])
    rows = []
    for n in ns:
        pick = np.argmax(proxy[:n], axis=0)
        cols = np.arange(len(items))
        rm_pick, oracle, random = utility[pick, cols], utility[:n].max(axis=0), utility[:n].mean(axis=0)
        lo, hi = bootstrap_ci(rm_pick - random, seed=seed)
        rows.append({"n": n, "kl_nats": bon_kl(n), "rm_pick": float(rm_pick.mean()), "oracle": float(oracle.mean()),
                     "random": float(random.mean()), "proxy_of_pick": float(proxy[pick, cols].mean()),
                     "gain_over_random": float((rm_pick - random).mean()), "gain_ci": [lo, hi],
                     "recovered": (float((rm_pick - random).mean() / (oracle - random).mean())
                                   if (oracle - random).mean() > 0 else None)})
    res = {"reward": reward, "policy": str(src), "gold": gold, "prompts": prompts, "n_prompts": len(items),
           "temperature": temperature, "max_new_tokens": max_new_tokens, "seed": seed, "rows": rows}
    for r in rows:
        print0(f"best-of-{r['n']:<3d} (KL {r['kl_nats']:.2f} nats): gold of the RM's pick {r['rm_pick']:.3f}, "
               f"oracle {r['oracle']:.3f}, random {r['random']:.3f}; RM pick - random {r['gain_over_random']:+.3f} "
               f"({r['gain_ci'][0]:+.3f} to {r['gain_ci'][1]:+.3f})"
               + (f", {100 * r['recovered']:.0f} % of the oracle's gain" if r["recovered"] is not None else ""))
    if out is not None:
        out = Path(out)
        write_json(out / "best_of_n.json", res)
        best_of_n_plot(res, out / "best_of_n.png")
        print0(f"wrote {out / 'best_of_n.json'} and {out / 'best_of_n.png'}")
    return res


def best_of_n_plot(res: dict, path: Path) -> None:
    """Gold utility of the RM's pick, the oracle and a random pick against the best-of-n KL (Gao et al.)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    kl = [math.sqrt(r["kl_nats"]) for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for key, label, style in (("oracle", "gold's own pick (oracle)", "--"), ("rm_pick", "RM's pick", "-o"),
                              ("random", "random sample", ":")):
        ax.plot(kl, [r[key] for r in rows], style, label=label)
    for x, r in zip(kl, rows):
        ax.annotate(f"n={r['n']}", (x, r["rm_pick"]), textcoords="offset points", xytext=(3, -10), fontsize=7)
    ax.set_xlabel("sqrt(KL of best-of-n), nats^0.5")
    ax.set_ylabel(f"gold utility ({res['gold']})")
    ax.set_title(f"best-of-n on {res['n_prompts']} prompts")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
