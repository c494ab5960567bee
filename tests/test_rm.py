"""Reward model: K-wise loss = naive pairwise loss, last-token scoring, normalisation, learning, resume, bad input."""

import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    assert_resumed,
    run_killed_then_resumed,
    run_probed,
    save_tiny_model,
)

from chatforge.config import RMConfig, load_config
from chatforge.core.io import DataError, UserError
from chatforge.core.tokenizer import render_conversation
from chatforge.data.formats import Comparison
from chatforge.data.rm_data import (
    build_examples,
    collate_comparisons,
    pad_batch,
    pairwise_loss,
    render_scored,
    rm_loss,
    sequence_rewards,
)

WORDS = "once upon a time there was little girl named Lily she liked to play outside in the sun one day saw big red"
WORDS = WORDS.split()
USER = [{"role": "user", "content": "Tell me a story."}]


def synthetic_comparisons(n: int, k: int = 4, seed: int = 0) -> list[dict]:
    """Replies that mention "ball" beat those that don't (tied within each group)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        n_ball = rng.randint(1, k - 1)
        resp = []
        for j in range(k):
            w = [rng.choice(WORDS) for _ in range(rng.randint(4, 9))]
            if j < n_ball:
                w.insert(rng.randrange(len(w) + 1), "ball")
            resp.append({"response_id": f"r{j}", "content": " ".join(w), "policy": "sft-1" if j else "other"})
        rng.shuffle(resp)
        good = [r["response_id"] for r in resp if "ball" in r["content"]]
        bad = [r["response_id"] for r in resp if "ball" not in r["content"]]
        rows.append({"task_id": f"t{i}", "prompt": {"messages": [{"role": "user", "content": f"Tell me a story {i}."}]},
                     "responses": resp, "ranking": [good, bad], "source": "synth" if i % 3 else "synth-b"})
    return rows


def _cmp(ranking, ratings=None, k=None, task="t"):
    ids = [rid for g in ranking for rid in (g if isinstance(g, list) else [g])]
    obj = {"task_id": task, "prompt": {"messages": USER},
           "responses": [{"response_id": rid, "content": f"She saw {rid} {'big ' * i}ball."} for i, rid in enumerate(ids)],
           "ranking": ranking, "ratings": ratings or {}}
    return Comparison.from_dict(obj)


# ----------------------------------------------------------------------------- the loss


def test_kwise_loss_equals_naive_weighted_pairs(tiny_tokenizer):
    tok = tiny_tokenizer
    cmps = [_cmp([["a"], ["b"], ["c"], ["d"]], ratings={"a": 7, "b": 5, "d": 2}, task="full"),
            _cmp([["x", "y"], ["z"]], task="tied"),  # x=y: pairs (x,z), (y,z) only
            _cmp([["p", "q"]], task="all-tied")]  # no pair at all: only the tie term
    margin_scale, tie_weight = 0.5, 0.3
    _, st = build_examples(tok, cmps, 128, margin_scale=margin_scale)
    assert st.skipped_comparisons == 1 and st.pairs == 6 + 2  # without a tie loss all-tied is skipped
    examples, st = build_examples(tok, cmps, 128, margin_scale=margin_scale, keep_ties=True)
    assert [e.task_id for e in examples] == ["full", "tied", "all-tied"] and st.ties == 2
    batch = collate_comparisons(examples, tok.pad_token_id)
    index = {}
    for ex in examples:
        for rid in ex.reply_ids:
            index[rid] = len(index)
    torch.manual_seed(0)
    r = torch.randn(len(index))
    loss, stats = pairwise_loss(r, batch, tie_weight)

    def nll(b, w, m=0.0):
        return -math.log(1 / (1 + math.exp(-(float(r[index[b]] - r[index[w]]) - m))))

    ratings = {"a": 7, "b": 5, "d": 2}
    full = sum(nll(b, w, max(0.0, margin_scale * (ratings[b] - ratings[w])) if b in ratings and w in ratings else 0)
               for b, w in [("a", "b"), ("a", "c"), ("a", "d"), ("b", "c"), ("b", "d"), ("c", "d")]) / math.comb(4, 2)
    tied = (nll("x", "z") + nll("y", "z")) / math.comb(3, 2)  # ties: no pair, weight stays 1/C(3,2)
    tie_term = tie_weight * (float(r[index["x"]] - r[index["y"]]) ** 2 / math.comb(3, 2)
                             + float(r[index["p"]] - r[index["q"]]) ** 2 / math.comb(2, 2))
    assert float(loss) == pytest.approx((full + tied + tie_term) / 3, rel=1e-5)
    assert stats["rewards/accuracies"] == pytest.approx(
        sum(float(r[index[b]] > r[index[w]]) for b, w in [("a", "b"), ("a", "c"), ("a", "d"), ("b", "c"),
                                                          ("b", "d"), ("c", "d"), ("x", "z"), ("y", "z")]) / 8)
    # without margin/ties and with one K, it is exactly the mean of the pairwise losses
    ex2, _ = build_examples(tok, [_cmp([["a"], ["b"], ["c"]], task="u"), _cmp([["c"], ["a"], ["b"]], task="v")], 128)
    b2 = collate_comparisons(ex2, tok.pad_token_id)
    r2 = torch.randn(6)
    naive = -F.logsigmoid(r2[b2["better"]] - r2[b2["worse"]]).mean()
    assert float(pairwise_loss(r2, b2)[0]) == pytest.approx(float(naive), rel=1e-6)


def test_flat_pairs_mode_same_loss_more_forwards(tiny_tokenizer, tiny_model_factory, tmp_path):
    from chatforge.stages.rm import init_reward_model

    tok = tiny_tokenizer
    model, tok, _ = init_reward_model(str(save_tiny_model(tmp_path / "m", tok, tiny_model_factory)), seed=0)
    model.eval()
    cmps = [Comparison.from_dict(c) for c in synthetic_comparisons(3)]
    examples, st = build_examples(tok, cmps, 128)
    kwise = collate_comparisons(examples, tok.pad_token_id)
    flat = collate_comparisons(examples, tok.pad_token_id, flat=True)
    assert kwise["input_ids"].shape[0] == 12 and flat["input_ids"].shape[0] == 2 * st.pairs
    with torch.no_grad():
        lk, _, _ = rm_loss(model, kwise)
        lf, _, _ = rm_loss(model, flat)
    assert float(lk) == pytest.approx(float(lf), abs=1e-5)


def test_truncation_cuts_old_turns_never_the_reply(tiny_tokenizer):
    tok = tiny_tokenizer
    prompt = [{"role": "system", "content": "Be kind."},
              {"role": "user", "content": "Once upon a time there was a little girl named Lily."},
              {"role": "assistant", "content": "She liked to play outside in the sun."},
              {"role": "user", "content": "What did she see?"}]
    replies = {"a": "A ball.", "b": "She saw a big red ball. " * 30, "c": "The sun."}
    asst = [{"role": "assistant", "content": replies["a"]}]
    want = render_conversation(tok, [prompt[0], prompt[3]] + asst)[0]  # system + last user turn + reply
    seq_len = len(want) + 2
    assert len(render_conversation(tok, prompt + asst)[0]) > seq_len
    cmp = Comparison.from_dict({"task_id": "t", "prompt": {"messages": prompt}, "ranking": [["a"], ["c"], ["b"]],
                                "responses": [{"response_id": k, "content": v} for k, v in replies.items()]})
    (ex,), st = build_examples(tok, [cmp], seq_len)
    assert st.truncated_prompts == 1 and st.skipped_replies == 1 and st.skipped_comparisons == 0
    assert ex.reply_ids == ["a", "c"] and ex.seqs[0] == want and ex.pairs == [(0, 1, 0.0)] and ex.weight == 1.0
    ex, st = build_examples(tok, [cmp], 8)  # nothing fits: the comparison is skipped and counted
    assert ex == [] and st.skipped_comparisons == 1 and st.skipped_replies == 3
    ids, cut, clipped = render_scored(tok, prompt, replies["b"], seq_len)  # scoring always returns a number
    assert cut and clipped and len(ids) == seq_len


def test_several_labelers_as_is_or_aggregated(tmp_path):
    from chatforge.data.rm_data import load_comparisons

    base = {"task_id": "t", "prompt": {"messages": USER},
            "responses": [{"response_id": r, "content": r} for r in ("a", "b", "c")]}
    rankings = [[["a"], ["b"], ["c"]], [["a"], ["c"], ["b"]], [["b"], ["a"], ["c"]]]
    path = tmp_path / "cmp.jsonl"
    path.write_text("".join(json.dumps({**base, "ranking": r, "labeler": f"l{i}"}) + "\n"
                            for i, r in enumerate(rankings)))
    assert len(load_comparisons([str(path)])) == 3  # default: each record as is
    (consensus,) = load_comparisons([str(path)], aggregate="bradley_terry")
    assert consensus.ranking[0] == ["a"] and consensus.labeler == "aggregate:bradley_terry"


# ----------------------------------------------------------------------------- scoring


def test_score_taken_at_last_real_token(tiny_tokenizer, tiny_model_factory, tmp_path, monkeypatch):
    from chatforge.stages.rm import ensure_pad_token, init_reward_model

    model, tok, _ = init_reward_model(str(save_tiny_model(tmp_path / "m", tiny_tokenizer, tiny_model_factory)), 0)
    model.eval()
    replies = ["Lily.", "She liked to play outside in the sun with a big red ball.", "One day she saw a ball."]
    seqs = [render_scored(tok, USER, r, 128)[0] for r in replies]
    pad = tok.pad_token_id
    with torch.no_grad():
        alone = [float(sequence_rewards(model, pad_batch([s], pad))[0]) for s in seqs]
        right = sequence_rewards(model, pad_batch(seqs, pad, "right")).tolist()
        left = sequence_rewards(model, pad_batch(seqs, pad, "left")).tolist()
        assert right == pytest.approx(alone, abs=1e-5)
        assert left == pytest.approx(alone, abs=1e-4)
        # the test can fail: reading the head at the final column of a right-padded batch sees pads
        b = pad_batch(seqs, pad, "right")
        h = model.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        wrong = model.score(h[:, -1])[:, 0].tolist()
        assert wrong[0] != pytest.approx(alone[0], abs=1e-3)
    # score_sequences scores each distinct sequence once (a panel repeats every reply once per labeler) and
    # returns the scores in input order
    import chatforge.data.rm_data as rm_data

    scored_rows = []
    real = rm_data.sequence_rewards

    def counting(m, batch):
        scored_rows.append(batch["input_ids"].shape[0])
        return real(m, batch)

    monkeypatch.setattr(rm_data, "sequence_rewards", counting)
    got = rm_data.score_sequences(model, [seqs[2], seqs[0], seqs[2], seqs[1], seqs[0]], pad, batch_size=8)
    assert sum(scored_rows) == 3
    assert got == pytest.approx([alone[2], alone[0], alone[2], alone[1], alone[0]], abs=1e-4)
    # a pad token equal to the end-of-turn token would end real sequences: it gets replaced
    tok2 = type(tok).from_pretrained(tmp_path / "m")
    tok2.pad_token = "<|end|>"
    ensure_pad_token(model, tok2)
    assert tok2.pad_token_id != tok2.convert_tokens_to_ids("<|end|>") and model.config.pad_token_id == tok2.pad_token_id


# ----------------------------------------------------------------------------- training a tiny RM


@pytest.fixture(scope="module")
def rm_setup(tiny_tokenizer, tiny_model_factory, tmp_path_factory):
    root = tmp_path_factory.mktemp("rm")
    base = save_tiny_model(root / "base", tiny_tokenizer, tiny_model_factory)
    data = root / "cmp.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_comparisons(160)))
    return base, data


def _sets(steps):
    return [f"train.max_steps={steps}", "train.batch_size=4", "train.seq_len=64", "train.lr=3e-3",
            "train.warmup_steps=3", "train.log_every=5", "train.eval_every=20", "train.checkpoint_every=5",
            "data.val_fraction=0.15", "log.tensorboard=false", "train.threads=1"]


@pytest.fixture(scope="module")
def trained(rm_setup, tmp_path_factory):
    from chatforge.stages import rm

    base, data = rm_setup
    out = tmp_path_factory.mktemp("rm-run") / "run"
    cfg = load_config(RMConfig, None, [f"model={base}", f"data.paths={data}", *_sets(40)])
    return out, rm.run(cfg, out, resume=False)


def test_rm_learns_synthetic_preference(trained):
    out, res = trained
    assert res["val_comparisons"] >= 15 and res["val_accuracy"] >= 0.9, res
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/loss" in r]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        assert key in train_rows[-1]
    assert train_rows[-1]["train/loss"] < train_rows[0]["train/loss"]
    assert any("val/accuracy" in r for r in rows)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "rm" and manifest["metrics"]["reward_norm"]["policy"] == "sft-1"
    # loads with plain transformers, no chatforge import needed
    from transformers import AutoModelForSequenceClassification

    m = AutoModelForSequenceClassification.from_pretrained(out / "model")
    assert m.config.num_labels == 1 and m.config.pad_token_id is not None


def test_normalisation_centres_sft_policy_replies(trained, rm_setup):
    from chatforge.data.rm_data import split_comparisons
    from chatforge.stages.rm_eval import load_reward_model, score_texts

    out, _ = trained
    _, data = rm_setup
    model, tok, norm = load_reward_model(str(out), "cpu")
    assert norm.policy == "sft-1" and norm.n > 0 and norm.std > 0
    cmps = [Comparison.from_dict(c) for c in synthetic_comparisons(160)]
    train, _ = split_comparisons(cmps, 0.15)
    sft = [(c.prompt_dicts(), r.content) for c in train for r in c.responses if r.policy == "sft-1"]
    assert len(sft) == norm.n
    scores = score_texts(model, tok, [p for p, _ in sft], [r for _, r in sft], norm, batch_size=7)
    assert abs(sum(scores) / len(scores)) < 1e-3 * norm.std
    raw = score_texts(model, tok, [p for p, _ in sft], [r for _, r in sft], None)
    assert abs(sum(raw) / len(raw) - norm.mean) < 1e-3 * norm.std  # the offset was real, not ~0 by chance
    assert abs(norm.mean) > 1e-2


def test_eval_and_score_commands(trained, rm_setup, tmp_path):
    from chatforge.stages.rm_eval import calibration, evaluate, score

    out, res = trained
    _, data = rm_setup
    ev = evaluate(str(out), [str(data)], tmp_path / "eval", split="val", device="cpu")
    assert ev["accuracy"] == pytest.approx(res["val_accuracy"])  # same held-out split as training
    assert set(ev["by_source"]) == {"synth", "synth-b"} and set(ev["by_k"]) == {"4"}
    assert (tmp_path / "eval" / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["pairs"] == ev["pairs"]
    # two pairs right and one wrong with |gap| 3: both orientations -> 3 points near 0.95, 2 of them observed
    cal = calibration([3.0, 3.0, -3.0])
    top, p = cal["bins"][-1], 1 / (1 + math.exp(-3))
    assert top["n"] == 3 and top["observed"] == pytest.approx(2 / 3) and cal["ece"] == pytest.approx(p - 2 / 3)
    convs = tmp_path / "convs.jsonl"
    convs.write_text("".join(json.dumps({"id": f"c{i}", "messages": USER + [{"role": "assistant", "content": r}]}) + "\n"
                             for i, r in enumerate(["a big red ball", "a big red sun"])))
    s = score(str(out), convs, tmp_path / "scores.jsonl", device="cpu")
    rows = [json.loads(x) for x in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert s["n"] == 2 and [r["id"] for r in rows] == ["c0", "c1"] and rows[0]["score"] > rows[1]["score"]
    norm = json.loads((out / "model" / "reward_norm.json").read_text())
    assert rows[0]["score"] == pytest.approx(rows[0]["raw_score"] - norm["mean"], abs=1e-5)


# ----------------------------------------------------------------------------- CLI: resume and bad input


def _cli(base, data, out, steps):
    return [sys.executable, "-m", "chatforge.cli", "rm", "train", "--model", str(base), "--data", str(data),
            "--out", str(out), *sum([["--set", s] for s in _sets(steps)], [])]


def test_rm_exact_resume_after_sigkill(rm_setup, tmp_path):
    base, data = rm_setup
    env = {**os.environ, "CI": "1"}
    ref = tmp_path / "ref"
    r = subprocess.run(_cli(base, data, ref, 30), env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "killed"
    r = run_killed_then_resumed(_cli(base, data, out, 30), out, 10, env)
    assert r.returncode == 0, r.stderr
    assert assert_resumed(r, out, 10) < 30  # resumed from the killed run's checkpoint, not retrained
    assert (ref / "model" / "model.safetensors").read_bytes() == (out / "model" / "model.safetensors").read_bytes()
    assert (ref / "model" / "reward_norm.json").read_text() == (out / "model" / "reward_norm.json").read_text()


def test_rm_under_torchrun_two_processes(rm_setup, tmp_path):
    """DDP: each rank scores its own comparisons of every global batch; the ranks end with the same weights."""
    base, data = rm_setup
    out = tmp_path / "ddp"
    recs = run_probed(_cli(base, data, out, 3)[3:], out, steps=3)
    assert all(len(idx) == 4 for rec in recs.values() for _, _, idx in rec["batches"])
    state = torch.load(out / "checkpoints" / "step-3" / "state.pt", weights_only=False)
    assert state["data"]["cursor"] == 3 * 2 * 4


BAD = {
    "unknown id": ({"ranking": [["r0"], ["nope"]]}, "unknown response id 'nope'"),
    "repeated id": ({"ranking": [["r0", "r1"], ["r1"]]}, "'r1' twice"),
    "K<2": ({"responses": [{"response_id": "r0", "content": "hi"}], "ranking": [["r0"]]}, "K >= 2"),
    "rating out of range": ({"ratings": {"r0": 9}}, "ratings.r0"),
}


def _bad_file(tmp_path, case):
    good = {"task_id": "t", "prompt": {"messages": USER}, "ranking": [["r0"], ["r1"]],
            "responses": [{"response_id": "r0", "content": "ball"}, {"response_id": "r1", "content": "sun"}]}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(good) + "\n" + json.dumps({**good, **BAD[case][0]}) + "\n")
    return bad


def test_bad_comparison_is_one_line_cli_error(rm_setup, tmp_path):
    base, _ = rm_setup
    bad, out = _bad_file(tmp_path, "unknown id"), tmp_path / "o"
    r = subprocess.run(_cli(base, bad, out, 2), capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and f"{bad}:2" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not out.exists()


@pytest.mark.parametrize("case", ["repeated id", "K<2", "rating out of range"])
def test_bad_comparison_names_file_and_line(rm_setup, tmp_path, case):
    from chatforge.stages import rm

    base, _ = rm_setup
    bad, out = _bad_file(tmp_path, case), tmp_path / "o"
    cfg = load_config(RMConfig, None, [f"model={base}", f"data.paths={bad}", *_sets(2)])
    with pytest.raises(DataError, match=f"{bad}:2: .*{BAD[case][1]}"):
        rm.run(cfg, out)
    assert not out.exists()


def test_lora_rm_trains_adapters_and_head_and_saves_merged(rm_setup, tmp_path):
    from safetensors.torch import load_file

    from chatforge.stages import rm

    base, data = rm_setup
    out = tmp_path / "lora-rm"
    cfg = load_config(RMConfig, None, [f"model={base}", f"data.paths={data}", *_sets(30), "lora.enabled=true",
                                       "lora.r=4", "lora.alpha=8", "train.lr=1e-2"])
    res = rm.run(cfg, out, resume=False)
    assert res["val_accuracy"] >= 0.7, res  # adapters + head learn the synthetic preference
    saved = load_file(out / "model" / "model.safetensors")
    assert not any("lora" in k for k in saved)  # merged: a plain HF sequence classifier, no peft needed
    before = load_file(base / "model.safetensors")
    name = next(k for k in before if k.endswith("q_proj.weight"))
    assert not torch.equal(saved[name], before[name])  # the adapters were merged into the frozen weights


def test_labeler_agreement_of_heldout_comparisons():
    from chatforge.stages.rm_eval import labeler_agreement

    a = _cmp([["a"], ["b"], ["c"]], task="t1")
    b = _cmp([["a"], ["c"], ["b"]], task="t1")  # agrees on a>b, a>c; not on b vs c
    lone = _cmp([["c"], ["b"], ["a"]], task="t2")  # one labeler: no agreement to measure
    c = _cmp([["a"], ["b"], ["c"]], task="t3")
    d = _cmp([["a"], ["b"], ["c"]], task="t3")
    c.source = d.source = "tasks/sort"  # a second source on which the two labelers agree fully
    res = labeler_agreement([a, b, lone, c, d])
    assert res["agreement"] == pytest.approx(5 / 6) and res["pairs"] == 6
    assert res["by_source"]["tasks/sort"] == {"agreement": 1.0, "pairs": 3}
    other = res["by_source"]["unknown" if not a.source else a.source]
    assert other == {"agreement": pytest.approx(2 / 3), "pairs": 3}
    assert labeler_agreement([lone]) is None


def test_normalisation_sample_spans_the_whole_file():
    from chatforge.stages.rm import normalisation_sample

    items = [f"{fam}-{i}" for fam in ("arith", "caps", "sort", "json") for i in range(100)]  # family by family
    pick = normalisation_sample(items, 40, seed=3)
    assert len(pick) == 40 == len(set(pick)) and pick == sorted(pick, key=items.index)  # file order kept
    assert {p.split("-")[0] for p in pick} == {"arith", "caps", "sort", "json"}  # the first 40 rows: arith only
    assert normalisation_sample(items, 40, seed=3) == pick and normalisation_sample(items[:5], 40, 0) == items[:5]


def test_best_of_n_rm_pick_vs_oracle_and_random(trained, rm_setup, tmp_path):
    from chatforge.stages.rm_eval import best_of_n, parse_best_of

    out, _ = trained
    base, _ = rm_setup
    res = best_of_n(str(out), str(base), "tasks-heldout:1:1", [1, 2, 4], "rule", max_new_tokens=6, out=tmp_path)
    rows = res["rows"]
    assert [r["n"] for r in rows] == [1, 2, 4] and res["n_prompts"] == 8
    one = rows[0]
    assert one["rm_pick"] == pytest.approx(one["oracle"]) == pytest.approx(one["random"]) and one["kl_nats"] == 0
    assert all(r["oracle"] >= r["rm_pick"] - 1e-9 and r["oracle"] >= r["random"] - 1e-9 for r in rows)
    assert rows[2]["oracle"] >= rows[1]["oracle"] >= rows[0]["oracle"]
    assert rows[2]["kl_nats"] == pytest.approx(math.log(4) - 3 / 4)
    assert (tmp_path / "best_of_n.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "best_of_n.json").read_text())["rows"][1]["n"] == 2
    # a proxy that is the gold picks exactly the oracle's reply: the RM column is the selection, not a copy
    same = best_of_n("rule", str(base), "tasks-heldout:1:1", [4], "rule", max_new_tokens=6)["rows"][0]
    assert same["rm_pick"] == pytest.approx(same["oracle"]) and same["recovered"] in (None, pytest.approx(1.0))
    with pytest.raises(UserError, match="task-suite checker cannot score"):
        prompts = tmp_path / "p.jsonl"
        prompts.write_text(json.dumps({"messages": USER}) + "\n")
        best_of_n(str(out), str(base), str(prompts), [2], "tasks")
    with pytest.raises(UserError, match="integers"):
        parse_best_of("1,two")
    assert parse_best_of("8,1,2,2") == [1, 2, 8]


# ----------------------------------------------------------------------------- replies cut off at the length limit


def test_cut_off_reply_is_rendered_without_the_end_of_turn(tiny_tokenizer):
    from chatforge.core.tokenizer import assistant_turn_suffix

    tok = tiny_tokenizer
    suffix = assistant_turn_suffix(tok)
    assert suffix, "the tiny template closes a turn with a fixed suffix"
    ended, _, _ = render_scored(tok, USER, "She saw a big", 128)
    cut, _, _ = render_scored(tok, USER, "She saw a big", 128, finished=False)
    assert ended == cut + suffix
    obj = {"task_id": "t", "prompt": {"messages": USER},
           "responses": [{"response_id": "a", "content": "She saw a ball.", "finish_reason": "stop"},
                         {"response_id": "b", "content": "She saw a ball.", "params": {"finish_reason": "length"}}],
           "ranking": [["a"], ["b"]]}
    c = Comparison.from_dict(obj)
    assert [r.finished for r in c.responses] == [True, False]
    assert c.to_dict()["responses"][0]["finish_reason"] == "stop"
    (ex,), _ = build_examples(tok, [c], 128)
    assert ex.seqs[0] == ex.seqs[1] + suffix


def test_rm_learns_that_a_cut_off_reply_is_worse(rm_setup, tmp_path):
    """Same text twice, once ended and once cut off, the ended one ranked first (as a labeler who sees the
    finish_reason ranks): only the end-of-turn tokens tell the two apart, so an RM that renders both alike
    stays at chance."""
    from chatforge.stages import rm
    from chatforge.stages.rm_eval import load_reward_model, score_texts

    base, _ = rm_setup
    rng = random.Random(3)
    rows = []
    for i in range(120):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9)))
        resp = [{"response_id": "done", "content": text, "finish_reason": "stop", "policy": "sft-1"},
                {"response_id": "cut", "content": text, "finish_reason": "length", "policy": "sft-1"}]
        rng.shuffle(resp)
        rows.append({"task_id": f"t{i}", "prompt": {"messages": [{"role": "user", "content": f"Story {i}."}]},
                     "responses": resp, "ranking": [["done"], ["cut"]]})
    data = tmp_path / "cut.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(RMConfig, None, [f"model={base}", f"data.paths={data}", *_sets(30)])
    res = rm.run(cfg, tmp_path / "run", resume=False)
    assert res["val_accuracy"] >= 0.9, res
    model, tok, norm = load_reward_model(str(tmp_path / "run"))
    texts = ["Lily liked the big red ball.", "One day she saw the sun.", "Once upon a time there was a girl."]
    prompts = [[{"role": "user", "content": "Tell me something."}]] * len(texts)
    ended = score_texts(model, tok, prompts, texts, norm)
    cut = score_texts(model, tok, prompts, texts, norm, finished=[False] * len(texts))
    assert all(e > c for e, c in zip(ended, cut)), (ended, cut)
