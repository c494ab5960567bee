"""Best-of-n distillation: the argmax is picked (ended replies only), provenance is kept, SFT trains on the
picks, and a second round samples from the first round's model."""

import json

import pytest
import torch
from helpers import save_tiny_model

from chatforge.config import BoNConfig, load_config
from chatforge.core.io import UserError
from chatforge.core.rewards import combine_scores
from chatforge.stages.bon import pick_best


def test_pick_best_is_the_argmax_among_ended_replies():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.3,   2.0, 1.0, 3.0, 0.0,   1.0, 1.0, 1.0, 1.0])
    ended = torch.tensor([1, 1, 1, 1,   1, 1, 0, 1,   0, 0, 0, 0], dtype=torch.bool)
    assert pick_best(scores, ended, 4, require_end=True) == [1, 4, None]  # 3.0 was cut off; nothing ended
    assert pick_best(scores, ended, 4, require_end=False) == [1, 6, 8]


def test_ensemble_mean_and_worst_case():
    per = [[1.0, 4.0, 0.0], [3.0, -2.0, 0.5]]
    assert combine_scores(per, "mean").tolist() == pytest.approx([2.0, 1.0, 0.25])
    assert combine_scores(per, "min").tolist() == pytest.approx([1.0, -2.0, 0.0])
    # the ensemble overrules the first RM alone, which loves the reply the second RM hates
    assert int(combine_scores(per, "mean").argmax()) == 0 and int(combine_scores(per, "min").argmax()) == 0
    assert int(torch.tensor(per[0]).argmax()) == 1


def test_bon_rounds_pick_the_best_reply_and_sft_on_it(tiny_tokenizer, tiny_model_factory, tmp_path):
    from chatforge.stages import bon

    model_dir = save_tiny_model(tmp_path / "base", tiny_tokenizer, tiny_model_factory)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "messages": [{"role": "user", "content": f"Ball {i}?"}]})
                               + "\n" for i in range(6)))
    sets = [f"policy={model_dir}", "reward=keyword:e", f"prompts={prompts}", "bon.n=4", "bon.rounds=2",
            "bon.prompts_per_round=6", "bon.require_end_of_turn=false", "rollout.max_new_tokens=10",
            "train.max_steps=3", "train.batch_size=2", "train.seq_len=64", "train.threads=1",
            "log.tensorboard=false"]
    res = bon.run(load_config(BoNConfig, None, sets), tmp_path / "bon")
    assert [r["round"] for r in res["rounds"]] == [1, 2]
    picks = [json.loads(x) for x in (tmp_path / "bon" / "round-1" / "picks.jsonl").read_text().splitlines()]
    assert len(picks) == 6
    for p in picks:
        meta = p["meta"]
        reply = p["messages"][-1]
        assert reply["role"] == "assistant" and meta["n"] == 4 and meta["rank"] == 1
        assert meta["score"] == reply["content"].lower().count("e") == meta["siblings_max"]
        assert meta["score"] >= meta["siblings_mean"] and meta["policy"] == str(model_dir)
    r1 = res["rounds"][0]
    assert r1["pick_score_mean"] >= r1["sample_score_mean"]
    assert res["rounds"][1]["policy"] == str(tmp_path / "bon" / "round-1" / "sft")  # round 2 samples round 1's model
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(tmp_path / "bon" / "model")  # the link to the last round's model
    b = AutoModelForCausalLM.from_pretrained(model_dir)
    assert any(not torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_bon_bad_settings_fail_before_work():
    from chatforge.stages import bon

    with pytest.raises(UserError, match="bon.n must be >= 2"):
        bon.check_config(load_config(BoNConfig, None, ["policy=x", "reward=tasks", "prompts=tasks:1", "bon.n=1"]))
    with pytest.raises(UserError, match="needs a reward"):
        bon.check_config(load_config(BoNConfig, None, ["policy=x", "prompts=tasks:1"]))
