"""`chatforge demo --quick` end to end (what `make demo` runs, at tiny sizes), and loop resume."""

import json
import os
import subprocess
import sys

import pytest

from chatforge.core.io import UserError
from chatforge.stages.loop import LoopConfig, judged_outcomes
from chatforge.stages.loop import run as run_loop


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    r = subprocess.run([sys.executable, "-m", "chatforge.cli", "demo", "--quick", "--out", str(out)],
                       env={**os.environ, "CI": "1"}, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_demo_quick_fills_every_stage(demo_dir):
    summary = json.loads((demo_dir / "demo.json").read_text())
    assert [row["model"] for row in summary["table"]] == ["sft", "round-1", "round-2"]
    for stage in ("base", "sft", "loop/round-1/rm", "loop/round-1/policy", "loop/round-2/rm", "loop/round-2/policy"):
        man = json.loads((demo_dir / stage / "manifest.json").read_text())
        assert man["status"] == "completed", stage
    for r in (1, 2):
        rdir = demo_dir / "loop" / f"round-{r}"
        tasks = [json.loads(x) for x in (rdir / "tasks.jsonl").read_text().splitlines()]
        cmps = [json.loads(x) for x in (rdir / "comparisons.jsonl").read_text().splitlines()]
        assert tasks and cmps and all("ranking" in c for c in cmps)
        ev = json.loads((rdir / "eval.json").read_text())
        wr = ev["vs_sft"]["win_rate"]
        assert wr["n"] > 0
        assert 0 <= wr["ci_wilson"][0] <= wr["win_rate"] <= wr["ci_wilson"][1] <= 1
        assert ev["policy_metrics"]["final_kl"] is not None
        rms = ev["vs_sft"]["rm_score"]  # the round's own RM on the eval prompts, policy vs SFT
        assert rms["rm"] == str(rdir / "rm") and rms["greedy"]["n_prompts"] == wr["n"]
        assert "rm_score" not in ev["vs_previous"]  # only against SFT
    # round 2's reward model continued from round 1's and saw both rounds' comparisons
    rm2 = json.loads((demo_dir / "loop/round-2/rm/manifest.json").read_text())
    assert "round-1/rm" in rm2["config"]["model"] and len(rm2["config"]["data"]["paths"]) == 2


def test_loop_resumes_at_round_boundary(demo_dir, tmp_path):
    """A loop re-run with more rounds keeps finished rounds untouched and adds the new one."""
    import shutil

    out = tmp_path / "loop"
    shutil.copytree(demo_dir / "loop", out)
    shutil.rmtree(out / "round-2")
    before = {p: p.stat().st_mtime_ns for p in (out / "round-1").rglob("*") if p.is_file()}
    cfg = LoopConfig(**json.loads((demo_dir / "loop" / "loop_config.json").read_text()))
    cfg.out = str(out)
    res = run_loop(cfg)
    assert len(res["rounds"]) == 2 and (out / "round-2" / "eval.json").exists()
    after = {p: p.stat().st_mtime_ns for p in (out / "round-1").rglob("*") if p.is_file() and p in before}
    changed = [str(p) for p in before if after.get(p) != before[p] and "registry" not in str(p)]
    assert not changed, changed


def test_judged_outcomes_majority_and_ties():
    prompt = {"id": "a", "messages": [{"role": "user", "content": "What is 2 + 3?"}]}
    out = judged_outcomes([prompt] * 3, ["5", "7", "5"], ["7", "5", "5"], "rule")
    assert out == [1.0, 0.0, 0.5]


def test_demo_from_a_pretrained_chat_model_quick(tiny_tokenizer, tiny_model_factory, tmp_path):
    """`demo --base MODEL`: no corpus or pretraining; LoRA SFT, LoRA RM, LoRA PPO with a value head on the
    policy trunk; every model is also judged against the untouched base."""
    from helpers import save_tiny_model

    from chatforge.stages import demo

    base = save_tiny_model(tmp_path / "chat-model", tiny_tokenizer, tiny_model_factory)
    summary = demo.run(tmp_path / "out", quick=True, base=str(base))
    assert [row["model"] for row in summary["table"]] == [str(base), "sft", "round-1"]
    assert not (tmp_path / "out" / "data").exists() and not (tmp_path / "out" / "base").exists()
    for stage, lora in (("sft", True), ("loop/round-1/rm", True), ("loop/round-1/policy", True)):
        man = json.loads((tmp_path / "out" / stage / "manifest.json").read_text())
        assert man["status"] == "completed" and man["config"]["lora"]["enabled"] is lora, stage
    policy = json.loads((tmp_path / "out" / "loop/round-1/policy/manifest.json").read_text())
    # the --base recipe: RLOO with K samples per prompt and the gold validation monitor keeping best_gold/
    assert policy["config"]["ppo"]["baseline"] == "rloo" and policy["config"]["ppo"]["samples_per_prompt"] == 2
    assert policy["config"]["gold"]["spec"] == "rule"
    # PPO-ptx on the general-chat demonstrations SFT mixed in (the alignment tax of the RL round)
    assert policy["config"]["ptx"]["coef"] > 0 and "embedded:sft/hh-chosen:2" in policy["config"]["ptx"]["demos"]
    rows = [json.loads(x) for x in (tmp_path / "out" / "loop/round-1/policy/metrics.jsonl").read_text().splitlines()]
    assert all(r["ppo/ptx_loss"] > 0 for r in rows if "ppo/ptx_loss" in r) and any("ppo/ptx_loss" in r for r in rows)
    ev = json.loads((tmp_path / "out" / "loop/round-1/eval.json").read_text())
    best = tmp_path / "out" / "loop/round-1/policy/best_gold"
    assert (best / "config.json").exists() and ev["policy"] == str(best)
    for key in ("vs_sft", "vs_baseline", "sft_vs_baseline"):
        assert ev[key]["win_rate"]["n"] > 0 and ev[key]["gold"]["judge"] == "rule"
        assert ev[key]["gold"]["greedy"]["n"] == ev[key]["win_rate"]["n"]
    assert ev["vs_baseline"]["baseline"] == str(base) and ev["vs_sft"]["model"] == str(best)
    # the eval set leaves out the gold validation prompts that chose the checkpoint
    from chatforge.data.tasks import normalize_prompt, prompt_text
    from chatforge.stages.sample import load_prompts

    val = {normalize_prompt(prompt_text(p)) for p in load_prompts("tasks-heldout:1:977")}
    test = [normalize_prompt(prompt_text(p)) for p in load_prompts("tasks-heldout:1:1")]
    assert ev["vs_sft"]["win_rate"]["n"] == len([t for t in test if t not in val])


def test_loop_round_with_best_of_n_distillation(demo_dir, tmp_path):
    """`loop --set algo=bon`: the round's RM picks the best of n samples and the policy is SFT on the picks."""
    import shutil

    out = tmp_path / "loop"
    shutil.copytree(demo_dir / "loop", out)
    shutil.rmtree(out / "round-2")
    cfg = LoopConfig(**json.loads((demo_dir / "loop" / "loop_config.json").read_text()))
    cfg.out, cfg.algo, cfg.report = str(out), "bon", False
    cfg.algo_set = ["bon.n=2", "bon.prompts_per_round=4", "bon.require_end_of_turn=false",
                    "rollout.max_new_tokens=8", "train.max_steps=2", "train.batch_size=2", "train.seq_len=64",
                    "log.tensorboard=false"]
    res = run_loop(cfg)
    pol = out / "round-2" / "policy"
    assert len(res["rounds"]) == 2 and (out / "round-2" / "eval.json").exists()
    assert json.loads((pol / "manifest.json").read_text())["stage"] == "bon"
    picks = [json.loads(x) for x in (pol / "round-1" / "picks.jsonl").read_text().splitlines()]
    assert len(picks) == 4 and all(p["meta"]["reward"] == str(out / "round-2" / "rm") for p in picks)


def test_rm_score_change_is_the_paired_mean_difference(demo_dir):
    """rm_score_change equals a hand computation from score_texts: per-prompt differences, sampled draws averaged
    per prompt first; a cut-off reply is scored without the end-of-turn tokens, so the same text cut off and
    finished differ."""
    import numpy as np

    from chatforge.core.reward_model import load_reward_model, score_texts
    from chatforge.stages.loop import rm_score_change
    from chatforge.stages.sample import load_prompts

    rm = str(demo_dir / "loop" / "round-1" / "rm")
    prompts = load_prompts("tasks-heldout:1:3")
    n = len(prompts)
    m = [f"answer {i} is yes" for i in range(n)]
    b = ["no" for _ in range(n)]
    stop, cut = ["stop"] * n, ["length"] * n
    res = rm_score_change(rm, prompts, {"greedy": ((m, stop), (b, stop)), "T1-s0": ((m, cut), (b, stop)),
                                        "T1-s1": ((b, stop), (b, stop))})
    model, tok, norm = load_reward_model(rm)
    msgs = [p["messages"] for p in prompts]

    def score(texts: list[str], why: list[str]) -> np.ndarray:
        return np.array(score_texts(model, tok, msgs, texts, norm, finished=[w != "length" for w in why]))

    sm, sb, smc = score(m, stop), score(b, stop), score(m, cut)
    assert res["greedy"]["change"] == pytest.approx(float((sm - sb).mean()), abs=1e-6)
    assert res["greedy"]["model"] == pytest.approx(float(sm.mean()), abs=1e-6)
    per_prompt = ((smc - sb) + 0.0) / 2  # draw s1 is the same reply on both sides: difference 0
    assert res["sampled"]["change"] == pytest.approx(float(per_prompt.mean()), abs=1e-6)
    assert res["sampled"]["draws"] == 2 and res["greedy"]["n_prompts"] == n
    assert not np.allclose(sm, smc)  # cut-off and finished replies score differently
    for d in (res["greedy"], res["sampled"]):
        lo, hi = d["ci_bootstrap"]
        assert lo <= d["change"] <= hi


def test_compare_models_sampled_replies_use_paired_seeds(tiny_tokenizer, tiny_model_factory, tmp_path):
    """A model against a copy of itself: paired seeds give identical samples, so every sampled pair ties
    (0.5 with a zero-width interval) under both the gold and the panel; unpaired draws would not."""
    import shutil

    from helpers import save_tiny_model

    from chatforge.stages.loop import compare_models
    from chatforge.stages.sample import load_prompts

    a = save_tiny_model(tmp_path / "a", tiny_tokenizer, tiny_model_factory)
    b = tmp_path / "b"
    shutil.copytree(a, b)
    prompts = load_prompts("tasks-heldout:1:3")
    res = compare_models(str(a), str(b), prompts, "panel:rule*3:temperature=0.5", max_new_tokens=6, gold="rule",
                         samples=2, temperature=1.0)
    for sampled in (res["gold"]["sampled"], res["panel_sampled"]):
        assert sampled["win_rate"] == 0.5 and sampled["ci_bootstrap"] == [0.5, 0.5]
        assert sampled["n_prompts"] == len(prompts) and sampled["paired_seeds"] == [0, 1]
    assert res["gold"]["greedy"]["ties"] == len(prompts)


def test_loop_reward_model_from_another_trunk_and_tokenizer(demo_dir, tmp_path, tiny_tokenizer, tiny_model_factory):
    """`rm_model`: the first round's RM starts from another model (here with another tokenizer than the policy's);
    PPO scores the policy's replies through it as text."""
    trunk = tmp_path / "trunk"
    tiny_model_factory(tiny_tokenizer, hidden=32, layers=1, heads=2).save_pretrained(trunk)
    tiny_tokenizer.save_pretrained(trunk)
    cfg = LoopConfig(**json.loads((demo_dir / "loop" / "loop_config.json").read_text()))
    cfg.out, cfg.rounds, cfg.report, cfg.rm_model = str(tmp_path / "loop"), 1, False, str(trunk)
    res = run_loop(cfg)
    rm_manifest = json.loads((tmp_path / "loop" / "round-1" / "rm" / "manifest.json").read_text())
    assert rm_manifest["config"]["model"] == str(trunk)
    assert len(res["rounds"]) == 1 and json.loads((tmp_path / "loop" / "round-1" / "policy" / "manifest.json")
                                                  .read_text())["status"] == "completed"
    cfg.rm_model = str(tmp_path / "missing")
    with pytest.raises(UserError, match="missing"):
        run_loop(cfg)
