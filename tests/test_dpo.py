"""DPO: loss equals core/rl.py's on hand-computed log-probs, K-wise expansion and truncation, learning a
synthetic preference, exact resume after SIGKILL, LoRA export, one-line data errors."""

import json
import os
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

from chatforge.core.rl import dpo_ipo_loss, dpo_sigmoid_loss
from chatforge.core.tokenizer import render_for_completion
from chatforge.data.formats import Comparison
from chatforge.data.pref_data import build_pairs, collate, compute_reference, policy_logps
from chatforge.stages.dpo import dpo_loss, make_loss

THINGS = ["ball", "sun", "park", "girl", "day", "time", "play", "red"]


def comparison(i: int, prompt: list[dict], replies: dict[str, str], ranking: list) -> dict:
    return {"task_id": f"t{i}", "prompt": {"messages": prompt},
            "responses": [{"response_id": k, "content": v} for k, v in replies.items()], "ranking": ranking}


def synthetic(n: int) -> list[dict]:
    """K=3 rankings: the reply that mentions Lily is best, the other two tie below it (2 pairs each)."""
    rows = []
    for i in range(n):
        t = THINGS[i % len(THINGS)]
        rows.append(comparison(i, [{"role": "user", "content": f"Tell me about the {t} {i}."}],
                               {"a": f"The {t} is for Lily.", "b": f"The {t} is big.", "c": f"She saw the {t}."},
                               [["a"], ["b", "c"]]))
    return rows


def hand_logps(model, prompt: list[int], reply: list[int], average: bool) -> float:
    """Sequence log-prob of `reply` after `prompt`, from one unpadded forward and a full log_softmax."""
    ids = torch.tensor([prompt + reply])
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)
    per_token = logp.gather(1, ids[0, 1:, None])[-len(reply):, 0]
    return float(per_token.mean() if average else per_token.sum())


MULTI = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2 + 2?"},
         {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3 + 3?"}]


def test_kwise_expansion_and_truncation(tiny_tokenizer):
    tok = tiny_tokenizer
    cmps = [Comparison.from_dict(c) for c in [
        comparison(0, MULTI, {"a": "6.", "b": "7.", "c": "Lily."}, [["a"], ["b"], ["c"]]),  # 3 pairs
        comparison(1, MULTI, {"a": "6.", "b": "7.", "c": "Lily."}, [["a"], ["b", "c"]]),  # 2 pairs
        comparison(2, MULTI, {"a": "6.", "b": "7."}, [["a", "b"]]),  # all tied: none
    ]]
    pairs, st = build_pairs(tok, cmps, 256)
    assert [p.task_id for p in pairs] == ["t0"] * 3 + ["t1"] * 2 and st.no_pairs == 1 and st.pairs == 5
    first = pairs[0]
    assert first.prompt == render_for_completion(tok, MULTI)
    assert tok.decode(first.chosen) == "6.<|end|>" and tok.decode(first.rejected) == "7.<|end|>"
    # Room for the last user turn (+ system) only: the earlier exchange goes, the system message stays.
    short = [MULTI[0], MULTI[3]]
    need = len(render_for_completion(tok, short)) + max(len(p.rejected) for p in pairs)
    pairs, st = build_pairs(tok, cmps[:1], need)
    assert len(pairs) == 3 and st.truncated_pairs == 3 and pairs[0].prompt == render_for_completion(tok, short)
    # A reply that cannot fit even then: that pair is skipped and counted, the others kept.
    long_reply = "Once upon a time there was a little girl named Lily. " * 3
    cmp = Comparison.from_dict(comparison(3, MULTI, {"a": "6.", "b": "7.", "c": long_reply}, [["a"], ["b"], ["c"]]))
    pairs, st = build_pairs(tok, [cmp], need)
    assert len(pairs) == 1 and st.skipped_too_long == 2


@pytest.mark.parametrize("layout", ["pairs", "packed"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_batch_loss_equals_rl_loss_by_hand(tiny_tokenizer, tiny_model_factory, layout, loss_type):
    from chatforge.config import DPOLossConfig

    tok = tiny_tokenizer
    reference, policy = tiny_model_factory(tok, seed=0), tiny_model_factory(tok, seed=1)
    rows = synthetic(3) + [comparison(9, MULTI, {"a": "6, of course.", "b": "7", "c": "Lily saw a ball."},
                                      [["a"], ["c"], ["b"]])]
    pairs, _ = build_pairs(tok, [Comparison.from_dict(r) for r in rows], 256)
    assert len(pairs) == 9
    for p, (c, r) in zip(pairs, compute_reference(reference, pairs, tok.pad_token_id, 4, layout, torch.device("cpu"))):
        p.ref_chosen, p.ref_rejected = c, r
        assert c == pytest.approx(hand_logps(reference, p.prompt, p.chosen, False), abs=1e-4)
        assert r == pytest.approx(hand_logps(reference, p.prompt, p.rejected, False), abs=1e-4)
    average = loss_type == "ipo"
    loss_fn, avg = make_loss(DPOLossConfig(type=loss_type, beta=0.5))
    assert avg == average
    batch = collate(pairs, tok.pad_token_id, layout)
    loss, stats, n_tokens = dpo_loss(policy, batch, loss_fn, 0.5, average)

    def col(model, which):
        return torch.tensor([hand_logps(model, p.prompt, getattr(p, which), average) for p in pairs])

    by_hand = dpo_ipo_loss if loss_type == "ipo" else dpo_sigmoid_loss
    expected, chosen_r, rejected_r = by_hand(col(policy, "chosen"), col(policy, "rejected"),
                                             col(reference, "chosen"), col(reference, "rejected"), 0.5)
    assert float(loss.detach()) == pytest.approx(float(expected.mean()), abs=1e-4)
    assert stats["rewards/margins"] == pytest.approx(float((chosen_r - rejected_r).mean()), abs=1e-4)
    assert stats["logps/chosen"] == pytest.approx(float(col(policy, "chosen").mean()), abs=1e-4)
    if layout == "pairs":  # TRL's layout: 2B rows, the prompt twice
        assert batch["input_ids"].shape[0] == 2 * len(pairs) and n_tokens == sum(p.tokens for p in pairs)
    else:  # prompt once (+1 copy of its last token per reply segment), several pairs per row
        assert batch["input_ids"].shape[0] < len(pairs)
        assert n_tokens == sum(len(p.prompt) + len(p.chosen) + len(p.rejected) + 1 for p in pairs)
    loss.backward()  # differentiable end to end, and no NaN from padded rows
    assert all(torch.isfinite(q.grad).all() for q in policy.parameters() if q.grad is not None)


@pytest.fixture(scope="module")
def dpo_setup(tiny_tokenizer, tiny_model_factory, tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    model_dir = save_tiny_model(root / "base", tiny_tokenizer, tiny_model_factory)
    data = root / "cmp.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic(60)))
    return model_dir, data


def _dpo_cmd(model_dir, data, out, steps, *extra):
    sets = [f"train.max_steps={steps}", "train.batch_size=8", "train.seq_len=64", "train.lr=3e-3",
            "train.checkpoint_every=6", "train.eval_every=12", "train.log_every=6", "train.warmup_steps=2",
            "data.val_fraction=0.2", "log.tensorboard=false", "train.threads=1", *extra]
    return [sys.executable, "-m", "chatforge.cli", "dpo", "--policy", str(model_dir), "--data", str(data),
            "--out", str(out), *sum([["--set", s] for s in sets], [])]


@pytest.fixture(scope="module")
def reference_run(dpo_setup, tmp_path_factory):
    model_dir, data = dpo_setup
    out = tmp_path_factory.mktemp("dpo-ref") / "run"
    r = subprocess.run(_dpo_cmd(model_dir, data, out, 24), env={**os.environ, "CI": "1"}, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return out


def test_dpo_learns_synthetic_preference(dpo_setup, reference_run, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from chatforge.data.formats import read_comparisons
    from chatforge.data.rm_data import split_comparisons

    model_dir, data = dpo_setup
    rows = [json.loads(x) for x in (reference_run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val/rewards/accuracies" in r]
    assert val and val[-1]["val/rewards/accuracies"] >= 0.9  # at step 0 it is 0: policy == reference
    train = [r for r in rows if "rewards/margins" in r]
    assert {"train/loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen",
            "logps/rejected"} <= set(train[-1]) and train[-1]["train/loss"] < train[0]["train/loss"]
    # Held-out pairs: the policy's own log-prob margin log π(chosen) − log π(rejected) grows.
    _, val_c = split_comparisons(read_comparisons(data), 0.2)
    pairs, _ = build_pairs(tiny_tokenizer, val_c, 64)
    batch = collate(pairs, tiny_tokenizer.pad_token_id)

    def margin(path):
        with torch.no_grad():
            c, r = policy_logps(AutoModelForCausalLM.from_pretrained(path).eval(), batch)
        return float((c - r).mean())

    before, after = margin(model_dir), margin(reference_run / "model")
    assert after > before + 1.0, (before, after)
    manifest = json.loads((reference_run / "manifest.json").read_text())
    assert manifest["stage"] == "dpo" and manifest["metrics"]["train_pairs"] + manifest["metrics"]["val_pairs"] == 120


def test_dpo_exact_resume_after_sigkill(dpo_setup, reference_run, tmp_path):
    model_dir, data = dpo_setup
    out = tmp_path / "killed"
    r = run_killed_then_resumed(_dpo_cmd(model_dir, data, out, 24), out, 6, {**os.environ, "CI": "1"})
    assert r.returncode == 0, r.stderr
    assert assert_resumed(r, out, 6) < 24  # resumed from the killed run's checkpoint, not retrained
    ref_bytes = (reference_run / "model" / "model.safetensors").read_bytes()
    assert (out / "model" / "model.safetensors").read_bytes() == ref_bytes
    # the resumed run read the stored reference log-probs back instead of recomputing them
    assert json.loads((out / "manifest.json").read_text())["metrics"]["reference_logps"] == "cached"


def test_dpo_lora_exports_plain_model(dpo_setup, tmp_path):
    from transformers import AutoModelForCausalLM

    from chatforge.config import DPOConfig, load_config
    from chatforge.stages import dpo

    model_dir, data = dpo_setup
    cfg = load_config(DPOConfig, None, ["train.max_steps=3", "train.batch_size=8", "train.seq_len=64",
                                        "log.tensorboard=false", "lora.enabled=true", "lora.r=4",
                                        "data.layout=packed", "loss.type=ipo"])
    cfg.policy, cfg.data.paths = str(model_dir), [str(data)]
    res = dpo.run(cfg, tmp_path / "lora")
    assert res["steps"] == 3 and res["reference_logps"] == "computed"
    files = sorted(p.name for p in (tmp_path / "lora" / "model").iterdir())
    assert "model.safetensors" in files and "adapter_config.json" not in files
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "lora" / "model")
    assert not any("lora" in k for k in m.state_dict())


def test_dpo_bad_comparison_names_file_and_line(dpo_setup, tmp_path):
    model_dir, _ = dpo_setup
    good, bad_row = synthetic(2)
    bad_row["ranking"] = [["a"], ["b"], ["zz"]]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(good) + "\n" + json.dumps(bad_row) + "\n")
    out = tmp_path / "o"
    r = subprocess.run(_dpo_cmd(model_dir, bad, out, 2), capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and f"{bad}:2" in r.stderr and "zz" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_dpo_config_problems_are_collected():
    from chatforge.config import DPOConfig, load_config
    from chatforge.core.io import UserError
    from chatforge.stages.dpo import check_config

    cfg = load_config(DPOConfig, None, ["loss.type=ipo", "loss.label_smoothing=0.1", "loss.beta=0"])
    with pytest.raises(UserError) as e:
        check_config(cfg)
    msg = str(e.value)
    assert all(s in msg for s in ("--policy", "--data", "loss.beta", "label_smoothing only applies"))


def test_dpo_under_torchrun_two_processes(dpo_setup, tmp_path):
    model_dir, data = dpo_setup
    out = tmp_path / "ddp"
    # each rank read its own pairs (none twice, by any rank) and the ranks end with the same weights
    recs = run_probed(_dpo_cmd(model_dir, data, out, 4, "train.batch_size=4")[3:], out, steps=4)
    state = torch.load(out / "checkpoints" / "step-4" / "state.pt", weights_only=False)
    assert state["data"]["cursor"] == 4 * 2 * 4, "a global batch is 2 x batch_size pairs"
    assert all(len(idx) == 4 for rec in recs.values() for _, _, idx in rec["batches"])
