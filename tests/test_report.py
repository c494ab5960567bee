"""`chatforge eval`: every report section filled from real computations on tiny models, planted replies."""

import base64
import json
import math

import pytest
import torch
from helpers import make_data_dir, save_tiny_model

from chatforge.core.io import UserError, sha256_path
from chatforge.data.sft_data import load_conversations
from chatforge.data.tasks import check_conversation, find_family, heldout_prompts, reference_of
from chatforge.stages.report import EvalConfig, judge_outcomes, rm_outcomes, run

PROMPTS = "tasks-heldout:2"  # 2 per family -> 16 prompts
N_PROMPTS = 16
WRONG = " ".join(["zzz"] * 12)  # no family gives it even partial credit


def _manifest(d, run_id, stage, parent=None, inputs=None, config=None, metrics=None, **extra):
    d.mkdir(parents=True, exist_ok=True)
    (d / "manifest.json").write_text(json.dumps({
        "run_id": run_id, "stage": stage, "status": "completed", "parent": parent, "inputs": inputs or {},
        "config": config or {}, "metrics": metrics or {}, "created_at": "2026-01-01T00:00:00+00:00", **extra}))


def _metrics(d, rows):
    (d / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, **r}) + "\n" for i, r in enumerate(rows)))


def _tiny_rm(path, tok):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(7)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512, num_labels=1,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def lineage(tmp_path_factory, tiny_tokenizer, tiny_model_factory):
    """pretrain -> sft -> ppo run dirs (fake manifests + metrics, tiny real models), a baseline, an RM."""
    root = tmp_path_factory.mktemp("eval")
    tok = tiny_tokenizer
    data = make_data_dir(root / "data", tok)
    pre, sft, ppo = root / "pre", root / "sft", root / "ppo"
    save_tiny_model(pre / "model", tok, tiny_model_factory, seed=1)
    _manifest(pre, "pretrain-a", "pretrain", inputs={"data": {"path": str(data / "meta.json"),
                                                              "sha256": sha256_path(data / "meta.json")}},
              data_dir=str(data))
    _metrics(pre, [{"train/loss": 6.0 - i * 0.1, "val/loss": 6.1 - i * 0.1} for i in range(6)])
    save_tiny_model(sft / "model", tok, tiny_model_factory, seed=2)
    _manifest(sft, "sft-b", "sft", parent="pretrain-a", inputs={"model": {"path": str(pre / "model")}},
              config={"data": {"paths": ["tasks:3"]}})
    _metrics(sft, [{"train/loss": 3.0 - i * 0.2} for i in range(5)])
    save_tiny_model(ppo / "model", tok, tiny_model_factory, seed=3)
    _manifest(ppo, "ppo-c", "ppo", parent="sft-b", inputs={"policy": {"path": str(sft / "model")}},
              config={"prompts": "tasks:4", "policy": str(sft / "model")}, metrics={"guards_fired": {"kl": 1}})
    _metrics(ppo, [{"objective/kl": 0.1 * i, "objective/entropy": 2.0 - 0.1 * i, "objective/scores": 0.2 * i,
                    "guards/kl": float(i == 3),
                    **({"objective/gold": 0.5 - 0.1 * (i - 2) ** 2, "objective/proxy": 0.3 * i} if i % 2 == 0 else {})}
                   for i in range(5)])
    other = save_tiny_model(root / "other", tok, tiny_model_factory, seed=4)
    rm = _tiny_rm(root / "rm", tok)
    cmp = root / "cmp.jsonl"
    user = [{"role": "user", "content": "Say something nice."}]
    cmp.write_text("".join(json.dumps({"task_id": f"t{i}", "prompt": {"messages": user}, "ranking": [["a"], ["b"]],
                                       "responses": [{"response_id": "a", "content": f"ball {i} is red"},
                                                     {"response_id": "b", "content": "no"}]}) + "\n"
                           for i in range(4)))
    return {"root": root, "data": data, "pre": pre, "sft": sft, "ppo": ppo, "other": other, "rm": rm, "cmp": cmp}


LOOP = "ball " * 30  # a degenerate reply to an open prompt: one word over and over
GOOD = "Here is a short and clear answer to your question, with one example."


def _planted(spec, model, tok, prompts):
    """The ppo policy answers even prompts correctly; every other model says WRONG (cut off). Open prompts (outside
    the task suite): the ppo policy loops, every other model answers plainly."""
    if find_family(prompts[0]) is None:
        return [LOOP.strip() if spec.endswith("ppo") else GOOD] * len(prompts), ["stop"] * len(prompts)
    if spec.endswith("ppo"):
        replies = [reference_of(p) if i % 2 == 0 else WRONG for i, p in enumerate(prompts)]
        return replies, ["stop"] * len(prompts)
    return [WRONG] * len(prompts), ["length"] * len(prompts)


@pytest.fixture(scope="module")
def report(lineage):
    train = lineage["root"] / "train_prompts.jsonl"
    first = heldout_prompts(2)[0]  # plant one eval prompt in "training data" to trip the overlap check
    # and the first OpenAssistant conversation, which the general-chat section must then leave out
    trained = load_conversations(["embedded:sft/oasst-best:1"])[0]["messages"][:1]
    train.write_text(json.dumps({"messages": first["messages"]}) + "\n" + json.dumps({"messages": trained}) + "\n")
    cfg = EvalConfig(model=str(lineage["ppo"]), baselines=[str(lineage["sft"]), str(lineage["other"])],
                     reward=str(lineage["rm"]), judge="panel:rule*3", sft_data="tasks:1", prompts=PROMPTS,
                     comparisons=[str(lineage["cmp"])], train_prompts=[str(train)], bias_max_examples=6,
                     bias_bold_per_group=1, bias_new_tokens=4, n_boot=100, lm_batches=2, seq_len=64, general_n=6)
    out = lineage["root"] / "report"
    return run(cfg, out, reply_fn=_planted), out


def test_every_section_written(report):
    rep, out = report
    md = (out / "report.md").read_text()
    for title in ("Summary", "Held-out loss", "Task-suite accuracy", "Reward model", "Win rate of ppo-c",
                  "Fluency", "Bias probes", "KL to the reference", "Training curves", "Eval / train overlap",
                  "Sample replies", "Warnings"):
        assert f"## {title}" in md, title
    assert json.loads((out / "report.json").read_text())["headline"] == rep["headline"]
    for label in ("ppo-c", "sft-b", "other"):
        r = rep["models"][label]
        assert r["lm"]["loss"] > 0 and r["sft_val"]["loss"] > 0 and r["rm"]["n"] == N_PROMPTS
        assert set(r["bias"]) == {"winogender", "bbq", "bold"}
        assert r["text"]["end_of_turn_rate"] == (1.0 if label == "ppo-c" else 0.0)
    assert rep["rm_accuracy"]["pairs"] == 4 and 0 <= rep["rm_accuracy"]["accuracy"] <= 1
    assert set(rep["bias_delta"]) == {"sft-b", "other"} and "bbq.acc_ambig" in rep["bias_delta"]["sft-b"]


def test_general_chat_measures_the_alignment_tax(report):
    """Open prompts outside the task suite: the looping model's utility, distinct-2 and repetition are worse than
    the plain answers' with intervals that exclude no change; the held-out loss on human replies is each model's
    own; a conversation whose prompt is in the training data is left out."""
    from chatforge.data.utility import rule_utility

    rep, out = report
    g = rep["general"]
    assert g["n"] == 6 and len(g["samples"]) == 6
    held_out = [x["prompt"] for x in g["samples"]]
    oasst = load_conversations(["embedded:sft/oasst-best"])
    assert oasst[0]["messages"][-2]["content"] not in held_out  # its opening prompt is in train_prompts
    assert held_out[0] == oasst[1]["messages"][-2]["content"]  # the next one is used (sources taken in turn)
    ppo, sft = rep["models"]["ppo-c"]["general"], rep["models"]["sft-b"]["general"]
    assert ppo["utility"]["mean"] == pytest.approx(rule_utility({"messages": []}, LOOP.strip()))
    assert sft["utility"]["mean"] == pytest.approx(rule_utility({"messages": []}, GOOD))
    assert ppo["repetition"]["mean"] == 1.0 and sft["repetition"]["mean"] == 0.0
    assert ppo["distinct_2"]["mean"] < sft["distinct_2"]["mean"]
    d = g["delta"]["sft-b"]
    assert d["utility"]["delta"] == pytest.approx(ppo["utility"]["mean"] - sft["utility"]["mean"])
    assert d["utility"]["hi"] < 0 and d["utility"]["n"] == 6
    assert ppo["loss"]["n"] > 0 and ppo["loss"]["mean"] != pytest.approx(sft["loss"]["mean"])  # different weights
    assert d["loss"]["delta"] == pytest.approx(
        sum(a - b for a, b in zip(ppo["loss"]["per"], sft["loss"]["per"]) if a is not None and b is not None)
        / d["loss"]["n"])
    assert "## General chat (the alignment tax)" in (out / "report.md").read_text()


def test_task_accuracy_matches_direct_computation(report):
    rep, _ = report
    prompts = heldout_prompts(2)
    replies, _ = _planted("ppo", None, None, prompts)
    scores = [check_conversation(p, r) for p, r in zip(prompts, replies)]
    acc = rep["models"]["ppo-c"]["tasks"]
    assert acc["all"]["n"] == N_PROMPTS
    assert acc["all"]["accuracy"] == pytest.approx(sum(scores) / len(scores))
    assert acc["all"]["accuracy"] == pytest.approx(0.5)  # references are right, WRONG is wrong
    assert acc["all"]["lo"] < 0.5 < acc["all"]["hi"]
    assert rep["models"]["sft-b"]["tasks"]["all"]["accuracy"] == 0.0
    assert set(acc) - {"all"} == {"arithmetic", "reverse", "sort", "count", "caps", "n_words", "json_keys",
                                  "passage_qa"}


def test_win_rates_count_planted_outcomes(report):
    rep, _ = report
    panel = [w for w in rep["win_rates"] if w["judge"] == "panel:rule*3"]
    assert [w["baseline"] for w in panel] == ["sft-b", "other"]
    for w in panel:  # even prompts: correct vs WRONG -> win; odd: identical WRONG -> tie
        assert (w["wins"], w["losses"], w["ties"]) == (8, 0, 8)
        assert w["outcomes"] == [1.0 if i % 2 == 0 else 0.5 for i in range(N_PROMPTS)]
        assert w["win_rate"] == pytest.approx(0.75)
        assert w["ci_wilson"][0] < 0.75 < w["ci_wilson"][1] and w["ci_bootstrap"][0] <= 0.75 <= w["ci_bootstrap"][1]
        assert "lc_win_rate" in w["length_controlled"]
    by_rm = next(w for w in rep["win_rates"] if w["judge"] == "rm" and w["baseline"] == "sft-b")
    expect = rm_outcomes(rep["models"]["ppo-c"]["rm"]["scores"], rep["models"]["sft-b"]["rm"]["scores"])
    assert by_rm["outcomes"] == expect
    assert by_rm["ties"] == sum(o == 0.5 for o in expect)
    # odd prompts: the same WRONG text, ended by ppo-c but cut off for sft-b: the RM scores what the labelers
    # see, so the cut-off copy never gets the ended copy's reward
    ppo_rm, sft_rm = rep["models"]["ppo-c"]["rm"]["scores"], rep["models"]["sft-b"]["rm"]["scores"]
    assert all(abs(ppo_rm[i] - sft_rm[i]) > 1e-4 for i in range(1, N_PROMPTS, 2))
    bt = rep["bradley_terry"]["strengths"]
    assert bt["ppo-c"]["rank"] == 1 and bt["ppo-c"]["strength"] > bt["sft-b"]["strength"]


def test_rm_scores_match_direct_scoring(report, lineage):
    from chatforge.stages.rm_eval import load_reward_model, score_texts

    rep, _ = report
    model, tok, norm = load_reward_model(str(lineage["rm"]), "cpu")
    prompts = heldout_prompts(2)
    for label, spec in (("ppo-c", "ppo"), ("sft-b", "sft")):
        replies, reasons = _planted(spec, None, None, prompts)
        direct = score_texts(model, tok, [p["messages"] for p in prompts], replies, norm,
                             finished=[why != "length" for why in reasons])
        assert rep["models"][label]["rm"]["scores"] == pytest.approx(direct, abs=1e-5)


def test_lm_loss_matches_direct_computation(report, lineage):
    from chatforge.core.model import load_model_and_tokenizer
    from chatforge.data.lm_loader import eval_batches, load_split

    rep, _ = report
    model, _, _ = load_model_and_tokenizer(str(lineage["ppo"]))
    with torch.no_grad():
        losses = [torch.nn.functional.cross_entropy(model(input_ids=x).logits.flatten(0, 1), y.flatten(),
                                                    reduction="sum")
                  for x, y in eval_batches(load_split(lineage["data"], "val"), 64, 16, 2)]
    n = sum(y.numel() for _, y in eval_batches(load_split(lineage["data"], "val"), 64, 16, 2))
    lm = rep["models"]["ppo-c"]["lm"]
    assert lm["data_dir"] == str(lineage["data"])  # found through ppo -> sft -> pretrain manifests
    assert lm["loss"] == pytest.approx(float(sum(losses)) / n, rel=1e-4)
    assert lm["ppl"] == pytest.approx(math.exp(lm["loss"]), rel=1e-6)


def test_curves_guards_and_overlap(report):
    rep, out = report
    curves = {c["stage"]: c for c in rep["plots"]["curves"]}
    assert set(curves) == {"pretrain", "sft", "ppo"}
    assert {"objective/kl", "objective/entropy"} <= set(curves["ppo"]["keys"]) and "val/loss" in curves["pretrain"]["keys"]
    assert {"objective/gold", "objective/proxy"} <= set(curves["ppo"]["keys"])  # the gold/proxy vs sqrt(KL) panel
    assert "objective/gold" not in curves["sft"]["keys"]
    assert any("guard 'kl'" in w and "ppo-c" in w for w in rep["warnings"])
    ov = rep["prompts"]["overlap"]
    assert ov["overlapping"] == 1 and ov["overlapping_ids"] == [0]
    assert "tasks:3" in ov["by_spec"] and "tasks:4" in ov["by_spec"]  # specs read from the lineage manifests
    assert any("also occur in training data" in w for w in rep["warnings"])


def test_html_is_self_contained(report):
    rep, out = report
    page = (out / "report.html").read_text()
    imgs = page.count('src="data:image/png;base64,')
    assert imgs == 2 + len(rep["plots"]["curves"]) == 5
    assert 'src="accuracy.png"' not in page and "<table>" in page
    blob = page.split('src="data:image/png;base64,')[1].split('"')[0]
    assert base64.b64decode(blob)[:8] == b"\x89PNG\r\n\x1a\n"
    assert all((out / p).exists() for p in ("accuracy.png", "win_rates.png"))


def test_previous_round_and_foreign_tokenizer_baseline(report, lineage, tmp_path, tiny_model_factory):
    from chatforge.core.tokenizer import train_tokenizer

    _, first = report
    tok2 = train_tokenizer(["a b c d e f g hello world " * 50], vocab_size=300, out_dir=tmp_path / "tok2")
    foreign = save_tiny_model(tmp_path / "foreign", tok2, tiny_model_factory, seed=5)
    cfg = EvalConfig(model=str(lineage["ppo"]), baselines=[str(foreign)], prompts=PROMPTS, bias=False,
                     previous=str(first), n_boot=50, lm_batches=1, seq_len=64)
    rep = run(cfg, tmp_path / "second", reply_fn=_planted)
    assert "skipped" in rep["models"]["foreign"]["lm"]  # another tokenizer: no loss on these shards
    assert rep["win_rates"][0]["wins"] == 8  # but text-level comparisons still work
    assert rep["previous"]["headline"]["accuracy"] == pytest.approx(0.5)
    md = (tmp_path / "second" / "report.md").read_text()
    assert "## Previous round" in md and "report.html" in md


def test_judge_outcomes_majority_and_errors(lineage, tmp_path):
    from chatforge.stages.label import parse_labeler_spec

    prompts = heldout_prompts(1)[:2]
    good = [reference_of(p) for p in prompts]
    assert judge_outcomes(prompts, good, [WRONG, WRONG], parse_labeler_spec("panel:rule*3")) == [1.0, 1.0]
    assert judge_outcomes(prompts, [WRONG, WRONG], good, parse_labeler_spec("rule")) == [0.0, 0.0]
    with pytest.raises(UserError, match="needs --reward"):
        run(EvalConfig(model=str(lineage["ppo"]), judge="rm"), tmp_path / "x")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a report dir"):
        run(EvalConfig(model=str(lineage["ppo"])), tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").exists()


def test_bias_file_runs_crows_pairs_and_a_bad_file_fails_first(tmp_path, tiny_tokenizer, tiny_model_factory):
    from chatforge.core.io import DataError
    from chatforge.stages.report import bias_report

    model = tiny_model_factory(tiny_tokenizer)
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text("sent_more,sent_less,stereo_antistereo,bias_type\n"
                        "The girl liked the red ball.,The boy liked the red ball.,stereo,gender\n"
                        "She ran to the park.,He ran to the park.,antistereo,gender\n"
                        "Lily saw a big sun.,Tom saw a big sun.,stereo,race-color\n")
    cfg = EvalConfig(model="x", bias_file=str(csv_path), bias_max_examples=2, bias_bold_per_group=0, n_boot=50)
    rep = bias_report(model, tiny_tokenizer, cfg)
    crows = rep["crows_pairs"]
    assert crows["n"] == 3 and set(crows["by_bias_type"]) == {"gender", "race-color"}
    assert 0.0 <= crows["metrics"]["stereo_preference"]["value"] <= 1.0
    bad = tmp_path / "bad.csv"
    bad.write_text("sent_more,sent_less,stereo_antistereo,bias_type\nA,B,maybe,gender\n")
    with pytest.raises(DataError, match="bad.csv:2: stereo_antistereo"):
        run(EvalConfig(model="no-such-model", bias_file=str(bad)), tmp_path / "out")  # before any model load


def test_kl_to_the_reference_from_the_run_and_re_measured(report, lineage):
    from chatforge.core.model import load_model_and_tokenizer
    from chatforge.stages.report import reply_logps, sample_rows

    rep, _ = report
    kl = rep["models"]["ppo-c"]["kl"]
    assert kl["reference"] == str(lineage["sft"] / "model") and kl["temperature"] == 1.0
    assert kl["run"] == pytest.approx(0.2)  # mean objective/kl of the last 5 iterations: 0, .1, .2, .3, .4
    assert kl["n"] == N_PROMPTS and kl["lo"] <= kl["eval"] <= kl["hi"]  # two near-uniform random models: KL ~ 0
    assert rep["models"]["sft-b"]["kl"] is None  # not an RL run
    model, tok, _ = load_model_and_tokenizer(str(lineage["ppo"] / "model"))
    rows = sample_rows(model, tok, heldout_prompts(1)[:3], 6, 1.0, 0, batch_size=2)
    lp = reply_logps(model, rows, tok.pad_token_id, batch_size=2)
    q, a = rows[0]
    with torch.no_grad():
        logits = model(torch.tensor([q + a])).logits[0, :-1].log_softmax(-1)
    by_hand = sum(float(logits[len(q) - 1 + i, t]) for i, t in enumerate(a))
    assert lp[0] == pytest.approx(by_hand, abs=1e-4)  # padding and batching change nothing
    assert reply_logps(model, rows, tok.pad_token_id) - lp == pytest.approx(0, abs=1e-5)  # KL to itself is 0
