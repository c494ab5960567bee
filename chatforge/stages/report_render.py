"""Rendering for `chatforge eval`: PNG plots, and the same sections as Markdown and self-contained HTML.

The report dict (report.json) is turned into a flat list of blocks — ("h1"|"h2"|"p", text),
("table", header, rows), ("img", file, caption), ("ul", items), ("link", text, href) — and each
renderer walks that list, so Markdown and HTML never disagree. HTML inlines every PNG as base64.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

Block = tuple

CURVE_PANELS = (
    ("loss", ("train/loss", "loss", "val/loss")),
    ("reward / accuracy", ("objective/scores", "objective/rlhf_reward", "rewards/margins", "rewards/accuracies",
                           "val/accuracy")),
    ("KL to reference (nats)", ("objective/kl",)),
    ("entropy (nats/token)", ("objective/entropy",)),
)


# ----------------------------------------------------------------------------- plots


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and "step" in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_curves(run: dict, path: Path) -> list[str]:
    """One figure per run: a panel per metric group present in its metrics.jsonl. Returns the keys drawn."""
    panels = [(title, [k for k in keys if _series(run["rows"], k)[0]]) for title, keys in CURVE_PANELS]
    panels = [(t, ks) for t, ks in panels if ks]
    # Gao et al.'s figure: gold and proxy on validation prompts against sqrt(KL) (RL runs with gold.spec)
    overopt = [(max(r["objective/kl"], 0.0) ** 0.5, r["objective/gold"], r.get("objective/proxy"))
               for r in run["rows"] if isinstance(r.get("objective/gold"), (int, float))
               and isinstance(r.get("objective/kl"), (int, float))]
    if not panels and not overopt:
        return []
    plt = _plt()
    n_axes = len(panels) + bool(overopt)
    fig, axes = plt.subplots(1, n_axes, figsize=(4.2 * n_axes, 3.2), squeeze=False)
    if overopt:
        ax = axes[0][-1]
        xs = [o[0] for o in overopt]
        ax.plot(xs, [o[1] for o in overopt], marker="o", ms=3, label="objective/gold")
        ax.plot(xs, [o[2] for o in overopt], marker="s", ms=3, label="objective/proxy")
        ax.set(title="over-optimisation", xlabel="sqrt(KL to reference)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax, (title, keys) in zip(axes[0], panels):
        for k in keys:
            x, y = _series(run["rows"], k)
            ax.plot(x, y, marker="o" if len(x) < 15 else None, ms=3, label=k)
        ax.set(title=title, xlabel="step")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{run['stage']} {run['run_id']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=90)
    plt.close(fig)
    return [k for _, ks in panels for k in ks] + (["objective/gold", "objective/proxy"] if overopt else [])


def plot_accuracy(models: dict[str, dict], path: Path) -> None:
    """Grouped bars: task accuracy per family and model, with Wilson 95 % error bars."""
    plt = _plt()
    fams = sorted({f for r in models.values() for f in r["tasks"] if f != "all"}) + ["all"]
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(fams) + 2), 3.4))
    for j, (label, r) in enumerate(models.items()):
        xs, ys, err = [], [], [[], []]
        for i, f in enumerate(fams):
            t = r["tasks"].get(f)
            if not t or t["accuracy"] is None:
                continue
            xs.append(i + (j - (len(models) - 1) / 2) * width)
            ys.append(t["accuracy"])
            err[0].append(max(0.0, t["accuracy"] - t["lo"]))
            err[1].append(max(0.0, t["hi"] - t["accuracy"]))
        ax.bar(xs, ys, width, yerr=err, capsize=2, label=label)
    ax.set_xticks(range(len(fams)), fams, rotation=30, ha="right", fontsize=8)
    ax.set(ylim=(0, 1.05), ylabel="accuracy", title="held-out task accuracy (95% Wilson)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=90)
    plt.close(fig)


def plot_win_rates(rows: list[dict], path: Path) -> None:
    """Forest plot: win rate with Wilson interval, and the length-controlled estimate, per (baseline, judge)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.0, 0.55 * len(rows) + 1.4))
    for i, r in enumerate(rows):
        lo, hi = r["ci_wilson"]
        ax.plot([lo, hi], [i, i], color="C0", lw=2)
        ax.plot([r["win_rate"]], [i], "o", color="C0", label="win rate (Wilson 95%)" if i == 0 else None)
        lc = r["length_controlled"]["lc_win_rate"]
        if lc is not None:
            ax.plot([lc], [i], "x", color="C1", label="length-controlled" if i == 0 else None)
    ax.axvline(0.5, color="gray", ls="--", lw=1)
    ax.set_yticks(range(len(rows)), [f"vs {r['baseline']}\n({r['judge']})" for r in rows], fontsize=7)
    ax.set(xlim=(0, 1), xlabel=f"win rate of {rows[0]['model']}" if rows else "win rate")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=90)
    plt.close(fig)


def write_plots(report: dict, history: list[dict], out: Path) -> dict:
    """Write every PNG into `out`; returns {"accuracy", "win_rates", "curves": [{run_id, stage, file, keys}]}."""
    plots: dict[str, Any] = {"curves": []}
    plot_accuracy(report["models"], out / "accuracy.png")
    plots["accuracy"] = "accuracy.png"
    if report["win_rates"]:
        plot_win_rates(report["win_rates"], out / "win_rates.png")
        plots["win_rates"] = "win_rates.png"
    for i, run in enumerate(history):
        name = f"curves-{i}-{run['stage'] or 'run'}.png"
        keys = plot_curves(run, out / name)
        if keys:
            plots["curves"].append({"run_id": run["run_id"], "stage": run["stage"], "file": name, "keys": keys})
    return plots


# ----------------------------------------------------------------------------- blocks


def _num(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _ci(v: Any, lo: Any, hi: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    return f"{_num(v, digits)} [{_num(lo, digits)}, {_num(hi, digits)}]"


def _interval(lo: Any, hi: Any, digits: int = 3) -> str:
    return f"[{_num(lo, digits)}, {_num(hi, digits)}]"


def _summary(report: dict) -> list[Block]:
    rows = []
    for label, r in report["models"].items():
        t = r["tasks"]["all"]
        rows.append([label, _ci(t["accuracy"], t["lo"], t["hi"]), _ci(*(r["rm"][k] for k in ("mean", "lo", "hi")))
                     if r.get("rm") else "–", _num((r.get("lm") or {}).get("loss")),
                     _num((r.get("sft_val") or {}).get("loss")), _num(r["text"]["distinct_2"]),
                     _num(r["text"].get("end_of_turn_rate")), _num(r["text"]["mean_words"], 1)])
    return [("h2", "Summary"),
            ("table", ["model", "task accuracy", "RM score", "LM val loss", "SFT val loss", "distinct-2",
                       "end-of-turn", "words/reply"], rows)]


def _losses(report: dict) -> list[Block]:
    rows = []
    for label, r in report["models"].items():
        lm, sv = r.get("lm") or {}, r.get("sft_val") or {}
        note = "; ".join(x for x in (lm.get("skipped"), sv.get("skipped")) if x)
        rows.append([label, _num(lm.get("loss")), _num(lm.get("ppl"), 2), _num(lm.get("tokens")),
                     _num(sv.get("loss")), _num(sv.get("ppl"), 2), _num(sv.get("target_tokens")), note or ""])
    if all(not (r.get("lm") or r.get("sft_val")) for r in report["models"].values()):
        return [("h2", "Held-out loss"), ("p", "Not computed: no prepared data dir in the lineage (give "
                                               "--data-dir) and no --sft-data.")]
    return [("h2", "Held-out loss"),
            ("p", "Mean next-token loss on the pretraining val split, and on assistant tokens of held-out SFT "
                  "conversations. Per token of each model's own tokenizer: compare across tokenizers with care."),
            ("table", ["model", "LM val loss", "LM ppl", "tokens", "SFT val loss", "SFT ppl", "target tokens", "note"],
             rows)]


def _tasks(report: dict) -> list[Block]:
    labels = list(report["models"])
    fams = sorted({f for r in report["models"].values() for f in r["tasks"] if f != "all"}) + ["all"]
    rows = []
    for f in fams:
        cells = []
        for lab in labels:
            t = report["models"][lab]["tasks"].get(f)
            cells.append(f"{_ci(t['accuracy'], t['lo'], t['hi'], 2)} (n={t['n']})" if t else "–")
        rows.append([f, *cells])
    return [("h2", "Task-suite accuracy (held-out prompts)"),
            ("p", f"{report['prompts']['n']} prompts from `{report['prompts']['spec']}`; mean checker score "
                  "(partial credit counts) with a 95 % Wilson interval."),
            ("table", ["family", *labels], rows), ("img", report["plots"]["accuracy"], "task accuracy")]


def _reward(report: dict) -> list[Block]:
    out: list[Block] = []
    scored = [(lab, r["rm"]) for lab, r in report["models"].items() if r.get("rm")]
    if scored:
        out += [("h2", "Reward model"), ("p", f"Normalised reward of each model's replies (`{report['config']['reward']}`),"
                                              " mean with a bootstrap 95 % interval."),
                ("table", ["model", "mean reward", "n"], [[lab, _ci(s["mean"], s["lo"], s["hi"]), s["n"]]
                                                        for lab, s in scored])]
    acc = report.get("rm_accuracy")
    if acc:
        ln = acc.get("length") or {}
        out += [("p", "RM accuracy on held-out comparisons:"),
                ("table", ["comparisons", "pairs", "accuracy", "ECE", "reward~length r"],
                 [[acc["comparisons"], acc["pairs"], _num(acc["accuracy"]), _num(acc["ece"]),
                   _num(ln.get("pearson_reward_vs_chars"), 2)]])]
    return out


def _win_rates(report: dict) -> list[Block]:
    rows = report["win_rates"]
    if not rows:
        return []
    table = [[r["baseline"], r["judge"], _num(r["win_rate"]), f"{r['wins']}/{r['losses']}/{r['ties']}",
              _interval(*r["ci_wilson"]), _interval(*r["ci_bootstrap"]),
              _ci(r["length_controlled"]["lc_win_rate"], *r["length_controlled"]["ci_bootstrap"])] for r in rows]
    out: list[Block] = [
        ("h2", f"Win rate of {report['model']}"),
        ("p", "One outcome per held-out prompt: 1 if the judge prefers the model's reply, 0 if the baseline's, "
              "0.5 for a tie (a panel votes by majority; the RM prefers the higher reward). Length-controlled: "
              "the win rate predicted at zero length difference (logistic fit, AlpacaEval-LC style)."),
        ("table", ["baseline", "judge", "win rate", "W/L/T", "Wilson 95%", "bootstrap 95%", "length-controlled"],
         table),
        ("img", report["plots"]["win_rates"], "win rates")]
    bt = report.get("bradley_terry")
    if bt:
        st = sorted(bt["strengths"].items(), key=lambda kv: kv[1]["rank"])
        out += [("p", f"Bradley–Terry strengths over all model pairs (judge `{bt['judge']}`, Elo scale, "
                      "bootstrap 95 %):"),
                ("table", ["rank", "model", "Elo", "95% interval"],
                 [[v["rank"], k, _num(v["strength"], 0), f"[{_num(v['lo'], 0)}, {_num(v['hi'], 0)}]"] for k, v in st])]
    return out


def _fluency(report: dict) -> list[Block]:
    keys = ("distinct_1", "distinct_2", "repetition_rate", "rep_4", "near_duplicate_rate", "mean_words",
            "median_words", "end_of_turn_rate")
    labels = list(report["models"])
    rows = [[k, *(_num(report["models"][lab]["text"].get(k)) for lab in labels)] for k in keys]
    return [("h2", "Fluency and coherence proxies"),
            ("p", "Distinct-n (higher = more varied), repetition (a 3-gram 3+ times in a reply), rep-4 (repeated "
                  "4-gram share), near-duplicates across prompts (mode collapse), end-of-turn rate (not cut off)."),
            ("table", ["metric", *labels], rows)]


def _general(report: dict) -> list[Block]:
    g = report.get("general") or {}
    models = {lab: r["general"] for lab, r in report["models"].items() if r.get("general")}
    if not models:
        return []

    def ci(v: dict) -> str:
        return _ci(v["mean"], v["lo"], v["hi"])

    rows = [[lab, ci(m["loss"]), ci(m["utility"]), ci(m["distinct_2"]), ci(m["repetition"]), _num(m["end_of_turn"])]
            for lab, m in models.items()]
    out: list[Block] = [
        ("h2", "General chat (the alignment tax)"),
        ("p", f"{g.get('n', 0)} human-written conversations outside the task suite ({', '.join(g.get('sources', []))}), "
              "none of whose user turns occurs in any model's training data. Held-out loss: mean next-token loss on "
              "their human-written assistant replies (per token of each model's tokenizer). The other columns score "
              "each model's own reply to the same prompts: the rule labeler's general-quality utility (0-5.75: length "
              "fit and no repetition, sane text, a clean ending, brevity), distinct-2, and the share of replies that "
              "repeat a 3-gram 3+ times. 95 % bootstrap intervals over conversations."),
        ("table", ["model", "held-out loss on human replies", "general utility", "distinct-2", "repetition",
                   "end-of-turn"], rows)]
    for base, d in (g.get("delta") or {}).items():
        cells = [f"{_num(v['delta'])} {_interval(v['lo'], v['hi'])} (n={v['n']})" if v.get("delta") is not None
                 else "–" for v in (d.get("utility", {}), d.get("loss", {}))]
        out += [("p", f"Paired change {report['model']} - {base} per conversation (loss only for a shared tokenizer; "
                      "lower loss and higher utility are better):"),
                ("table", ["general utility change", "held-out loss change"], [cells])]
    if g.get("samples"):
        labels = list(models)
        out += [("p", "Replies to open prompts:"),
                ("table", ["prompt", *labels], [[x["prompt"], *(x["replies"][lab] for lab in labels)]
                                                for x in g["samples"]])]
    return out


def _bias(report: dict) -> list[Block]:
    models = {lab: r["bias"] for lab, r in report["models"].items() if r.get("bias")}
    if not models:
        return []
    labels = list(models)
    keys = [(p, k) for p, rep in next(iter(models.values())).items() for k in rep["headline"]]
    rows = []
    for p, k in keys:
        cells = []
        for lab in labels:
            m = (models[lab].get(p) or {}).get("metrics", {}).get(k)
            cells.append(_ci(m["value"], m["lo"], m["hi"]) if m else "–")
        rows.append([f"{p}.{k}", *cells])
    out: list[Block] = [
        ("h2", "Bias probes"),
        ("p", "Deterministic subsets of Winogender and BBQ (log-likelihood) and BOLD (greedy continuations, VADER "
              "sentiment); 95 % intervals. Content warning: the probe data contain stereotypes on purpose."),
        ("table", ["metric", *labels], rows)]
    for base, d in (report.get("bias_delta") or {}).items():
        out += [("p", f"Change from baseline {base} to {report['model']}:"),
                ("table", ["metric", "baseline", "model", "delta"],
                 [[k, _num(v["baseline"]), _num(v["model"]), _num(v["delta"])] for k, v in d.items()])]
    return out


def _kl(report: dict) -> list[Block]:
    rows = []
    for label, r in report["models"].items():
        k = r.get("kl")
        if not k:
            continue
        measured = (f"skipped: {k['skipped']}" if k.get("skipped") else
                    f"{_ci(k['eval'], k['lo'], k['hi'])} on {k['n']} prompts")
        rows.append([label, str(k["reference"]), _num(k.get("run")), measured])
    if not rows:
        return []
    return [("h2", "KL to the reference"),
            ("p", "Mean KL(model || reference) per reply in nats: from the run (objective/kl, mean of its last 5 "
                  "iterations, on its training prompts) and re-measured here on the eval prompts (replies sampled "
                  "from the model at temperature 1.0, the Monte-Carlo estimate sum log p_model - log p_ref; 95 % "
                  "bootstrap interval)."),
            ("table", ["model", "reference", "KL in the run", "KL on the eval prompts"], rows)]


def _curves(report: dict) -> list[Block]:
    out: list[Block] = [("h2", "Training curves")]
    curves = report["plots"]["curves"]
    if not curves:
        out.append(("p", "No metrics.jsonl found along the model's lineage."))
    for c in curves:
        out.append(("img", c["file"], f"{c['stage']} {c['run_id']}"))
    return out


def _overlap(report: dict) -> list[Block]:
    ov = report["prompts"]["overlap"]
    text = (f"{ov['overlapping']} of {ov['n_prompts']} eval prompts occur in the training data checked "
            f"({', '.join(f'`{k}`: {v}' for k, v in ov['by_spec'].items()) or 'no training data specs found'}).")
    out: list[Block] = [("h2", "Eval / train overlap"), ("p", text)]
    if ov["unreadable"]:
        out.append(("ul", [f"not checked: {u}" for u in ov["unreadable"]]))
    return out


def _samples(report: dict) -> list[Block]:
    if not report["samples"]:
        return []
    labels = list(report["models"])
    rows = [[s["prompt"], *(s["replies"][lab] for lab in labels)] for s in report["samples"]]
    return [("h2", "Sample replies"), ("table", ["prompt", *labels], rows)]


def _previous(report: dict) -> list[Block]:
    prev = report.get("previous")
    if not prev:
        return []
    out: list[Block] = [("h2", "Previous round"), ("link", "previous report", prev["link"])]
    old, new = prev.get("headline") or {}, report["headline"]
    if old:
        keys = ("accuracy", "win_rate", "rm_mean", "lm_loss", "sft_val_loss")
        out.append(("table", ["metric", f"previous ({old.get('model')})", f"now ({new['model']})", "change"],
                    [[k, _num(old.get(k)), _num(new.get(k)),
                      _num(new[k] - old[k]) if new.get(k) is not None and old.get(k) is not None else "–"]
                     for k in keys]))
    return out


def blocks(report: dict) -> list[Block]:
    """The report's sections, in order."""
    head: list[Block] = [
        ("h1", f"Evaluation of {report['model']}"),
        ("p", f"Created {report['created_at'][:19]} UTC. Baselines: {', '.join(report['baselines']) or 'none'}. "
              f"Judge: `{report['config']['judge']}`" + (f", reward model `{report['config']['reward']}`."
                                                         if report['config'].get('reward') else ".")),
    ]
    if report["warnings"]:
        head += [("h2", "Warnings"), ("ul", report["warnings"])]
    sections = (_summary, _previous, _losses, _tasks, _reward, _win_rates, _fluency, _general, _bias, _kl, _curves, _overlap,
                _samples)
    return head + [b for fn in sections for b in fn(report)]


# ----------------------------------------------------------------------------- Markdown and HTML


def _md_cell(v: Any) -> str:
    return str(v).replace("|", "\\|").replace("\n", "<br>")


def render_markdown(report: dict) -> str:
    lines: list[str] = []
    for b in blocks(report):
        kind = b[0]
        if kind in ("h1", "h2"):
            lines += ["#" * int(kind[1]) + " " + b[1], ""]
        elif kind == "p":
            lines += [b[1], ""]
        elif kind == "ul":
            lines += [f"- {x}" for x in b[1]] + [""]
        elif kind == "link":
            lines += [f"[{b[1]}]({b[2]})", ""]
        elif kind == "img":
            lines += [f"![{b[2]}]({b[1]})", ""]
        elif kind == "table":
            lines += ["| " + " | ".join(_md_cell(h) for h in b[1]) + " |", "|" + "---|" * len(b[1])]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b[2]] + [""]
    return "\n".join(lines)


CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
       "table{border-collapse:collapse;margin:.5em 0 1.2em;font-size:.9em}"
       "td,th{border:1px solid #ccc;padding:.25em .6em;vertical-align:top;white-space:pre-wrap}"
       "th{background:#f3f3f3}img{max-width:100%}code{background:#f3f3f3;padding:0 .2em}")


def _inline_code(text: str) -> str:
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def render_html(report: dict, img_dir: Path) -> str:
    """One self-contained page: every PNG from `img_dir` inlined as a data: URI."""
    body: list[str] = []
    for b in blocks(report):
        kind = b[0]
        if kind in ("h1", "h2"):
            body.append(f"<{kind}>{html.escape(b[1])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{_inline_code(b[1])}</p>")
        elif kind == "ul":
            body.append("<ul>" + "".join(f"<li>{_inline_code(x)}</li>" for x in b[1]) + "</ul>")
        elif kind == "link":
            body.append(f'<p><a href="{html.escape(b[2])}">{html.escape(b[1])}</a></p>')
        elif kind == "img":
            data = base64.b64encode((Path(img_dir) / b[1]).read_bytes()).decode()
            body.append(f'<p><img alt="{html.escape(b[2])}" src="data:image/png;base64,{data}"></p>')
        elif kind == "table":
            head = "".join(f"<th>{html.escape(str(h))}</th>" for h in b[1])
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in b[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
    title = html.escape(f"chatforge eval: {report['model']}")
    return (f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{title}</title><style>{CSS}</style></head>"
            f"<body>\n" + "\n".join(body) + "\n</body></html>\n")
