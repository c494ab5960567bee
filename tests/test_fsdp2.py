"""FSDP2 (`train.strategy=fsdp2`, torchrun, gloo on CPU): the same loss trajectory as one process on the same
global batch, Distributed Checkpoint resume on the same and on a different world size (2 -> 1 reshards),
a final model/ that plain transformers loads, and clear errors for strategies that cannot work.

Tolerance: per-step losses within 1e-4 (float32 reductions in another order); in practice they agree to 1e-5.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import make_data_dir, save_tiny_model, torchrun

CLI = [sys.executable, "-m", "chatforge.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "1"}
TOL = 1e-4
BASE = ["model.depth=2", "model.aspect=64", "model.head_dim=32", "train.seq_len=32", "train.warmup_steps=2",
        "train.log_every=1", "log.tensorboard=false", "train.checkpoint_every=3", "train.eval_every=0",
        "train.threads=1"]


def sets(items):
    return sum([["--set", s] for s in items], [])


def losses(out):
    return [json.loads(x)["train/loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if "train/loss" in x]


def run(cmd):
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def data_dir(tiny_tokenizer, tmp_path_factory):
    return make_data_dir(tmp_path_factory.mktemp("data"), tiny_tokenizer)


@pytest.fixture(scope="module")
def pretrain_runs(data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp2")
    common = [*BASE, f"data.dir={data_dir}", "train.max_steps=6"]
    run([*CLI, "pretrain", "--out", str(root / "single"), *sets([*common, "train.batch_size=4"])])
    run(torchrun("pretrain", "--out", str(root / "fsdp2"), *sets([*common, "train.batch_size=2", "train.strategy=fsdp2"])))
    return root, common


def test_pretrain_fsdp2_matches_one_process_and_saves_a_plain_model(pretrain_runs):
    root, _ = pretrain_runs
    one, two = losses(root / "single"), losses(root / "fsdp2")
    assert len(one) == len(two) == 6 and max(abs(a - b) for a, b in zip(one, two)) < TOL
    meta = json.loads((root / "fsdp2" / "checkpoints" / "step-6" / "meta.json").read_text())
    assert meta["format"] == "dcp" and meta["world_size"] == 2 and meta["optimizers"] == {"optimizer": "model"}
    assert list((root / "fsdp2" / "checkpoints" / "step-6" / "dcp").glob("*.distcp"))  # sharded files, one per rank
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(root / "single" / "model").state_dict()
    b = AutoModelForCausalLM.from_pretrained(root / "fsdp2" / "model").state_dict()
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4


@pytest.mark.parametrize("world", [1, 2])
def test_dcp_resume_on_same_and_other_world_size(pretrain_runs, tmp_path, world):
    root, common = pretrain_runs
    out = tmp_path / "resumed"
    shutil.copytree(root / "fsdp2", out)
    shutil.rmtree(out / "checkpoints" / "step-6")
    shutil.rmtree(out / "model")
    rows = [x for x in (out / "metrics.jsonl").read_text().splitlines() if json.loads(x).get("step", 0) <= 3]
    (out / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    if world == 1:  # 2 -> 1: the same global batch on one rank, the shards gathered into full tensors
        r = run([*CLI, "pretrain", "--out", str(out), *sets([*common, "train.batch_size=4"])])
    else:
        r = run(torchrun("pretrain", "--out", str(out), *sets([*common, "train.batch_size=2", "train.strategy=fsdp2"])))
    assert "resumed from" in r.stdout and "step-3" in r.stdout  # resumed, not retrained from scratch
    full = losses(root / "fsdp2")
    again = losses(out)
    assert len(again) == 6 and max(abs(a - b) for a, b in zip(full[3:], again[3:])) < TOL


def test_sft_fsdp2_matches_one_process(tiny_tokenizer, tiny_model_factory, tmp_path):
    model = save_tiny_model(tmp_path / "base", tiny_tokenizer, tiny_model_factory)
    data = tmp_path / "convs.jsonl"
    data.write_text("".join(json.dumps({"id": f"c{i}", "messages": [
        {"role": "user", "content": f"What is {i % 10} + {(i * 7) % 10}?"},
        {"role": "assistant", "content": str(i % 10 + (i * 7) % 10)}]}) + "\n" for i in range(40)))
    common = ["train.max_steps=4", "train.seq_len=64", "train.eval_every=0", "train.log_every=1",
              "train.warmup_steps=1", "log.tensorboard=false", "train.threads=1", "train.checkpoint_every=4"]
    args = ["sft", "--model", str(model), "--data", str(data)]
    run([*CLI, *args, "--out", str(tmp_path / "one"), *sets([*common, "train.batch_size=4"])])
    run(torchrun(*args, "--out", str(tmp_path / "two"), *sets([*common, "train.batch_size=2", "train.strategy=fsdp2"])))
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 4 and max(abs(a - b) for a, b in zip(one, two)) < TOL, (one, two)


def test_strategies_that_cannot_work_fail_before_any_work(data_dir, tmp_path):
    r = subprocess.run([*CLI, "pretrain", "--out", str(tmp_path / "x"),
                        *sets([*BASE, f"data.dir={data_dir}", "train.strategy=fsdp2"])],
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "needs several processes" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x" / "checkpoints").exists()
    r = subprocess.run([*CLI, "pretrain", "--out", str(tmp_path / "y"),
                        *sets([*BASE, f"data.dir={data_dir}", "train.fsdp_cpu_offload=true"])],
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "fsdp_cpu_offload needs train.strategy=fsdp2" in r.stderr


def test_a_ddp_checkpoint_is_not_resumed_under_fsdp2(pretrain_runs, tmp_path):
    root, common = pretrain_runs
    out = tmp_path / "single"
    shutil.copytree(root / "single", out)
    shutil.rmtree(out / "model")
    r = subprocess.run(torchrun("pretrain", "--out", str(out), *sets([*common, "train.batch_size=2",
                                                                      "train.strategy=fsdp2", "train.max_steps=9"])),
                       env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "written without FSDP2" in r.stderr


def test_grad_sync_skips_the_reduction_on_accumulation_steps():
    from chatforge.core.distributed import grad_sync

    calls = []

    class Sharded(torch.nn.Module):  # what FSDP2 exposes
        def set_requires_gradient_sync(self, flag):
            calls.append(("fsdp2", flag))

    class Replicated(torch.nn.Module):  # what DDP exposes
        def no_sync(self):
            import contextlib

            calls.append(("ddp", "no_sync"))
            return contextlib.nullcontext()

    with grad_sync([Sharded(), Replicated(), None], sync=False):
        pass
    with grad_sync([Sharded(), Replicated()], sync=True):
        pass
    assert calls == [("fsdp2", False), ("ddp", "no_sync"), ("fsdp2", True)]


@pytest.mark.parametrize("stage", ["rm", "dpo"])
def test_rm_and_dpo_fsdp2_match_one_process(stage, tiny_tokenizer, tiny_model_factory, tmp_path):
    """The reward model (sequence-classification head on the sharded trunk) and DPO (policy sharded, reference
    log-probs computed once before sharding) give one process's per-step losses on the same global batch."""
    from test_dpo import synthetic

    model = save_tiny_model(tmp_path / "base", tiny_tokenizer, tiny_model_factory)
    data = tmp_path / "cmp.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic(40)))
    common = ["train.max_steps=4", "train.seq_len=64", "train.eval_every=0", "train.log_every=1", "train.lr=3e-3",
              "train.warmup_steps=1", "log.tensorboard=false", "train.threads=1", "train.checkpoint_every=4",
              "data.val_fraction=0.1"]
    args = ["rm", "train", "--model", str(model)] if stage == "rm" else ["dpo", "--policy", str(model)]
    args += ["--data", str(data)]
    run([*CLI, *args, "--out", str(tmp_path / "one"), *sets([*common, "train.batch_size=4"])])
    run(torchrun(*args, "--out", str(tmp_path / "two"), *sets([*common, "train.batch_size=2", "train.strategy=fsdp2"])))
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 4 and max(abs(a - b) for a, b in zip(one, two)) < TOL, (one, two)
    assert one[0] != one[-1]  # it trained
    meta = json.loads((tmp_path / "two" / "checkpoints" / "step-4" / "meta.json").read_text())
    assert meta["format"] == "dcp" and meta["world_size"] == 2


LOCKSTEP = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from chatforge.config import TrainConfig
from chatforge.core.distributed import init_distributed, wrap_model
from chatforge.core.generation import SamplingParams, generate
from chatforge.core.tokenizer import stop_token_ids
model_dir, out = sys.argv[1], sys.argv[2]
info = init_distributed("cpu")
tok = AutoTokenizer.from_pretrained(model_dir)
plain = AutoModelForCausalLM.from_pretrained(model_dir)
sharded = wrap_model(AutoModelForCausalLM.from_pretrained(model_dir), info,
                     TrainConfig(strategy="fsdp2"), trainable=False)
# rank 0 asks for 2 tokens, rank 1 for 12: without lockstep rank 0 would stop its all-gathers first and hang
n = 2 if info.rank == 0 else 12
prompts = [tok.encode(f"Once upon a time {i}") for i in range(3)]
kw = dict(stop_token_ids=stop_token_ids(tok), pad_id=tok.pad_token_id, num_samples=2)
params = [SamplingParams(max_new_tokens=n, temperature=1.0, seed=10 * info.rank + i) for i in range(3)]
a = generate(sharded, prompts, params, **kw)
b = generate(plain, prompts, params, **kw)
json.dump({"sharded": [[g.token_ids for g in grp] for grp in a], "plain": [[g.token_ids for g in grp] for grp in b]},
          open(f"{out}/rank{info.rank}.json", "w"))
torch.distributed.destroy_process_group()
"""


def test_sharded_generation_runs_in_lockstep_and_equals_the_plain_model(tiny_tokenizer, tiny_model_factory,
                                                                        tmp_path):
    """Generation with an FSDP2-sharded model when the ranks want different numbers of tokens: every rank
    keeps stepping until the last one is done, and each reply equals the unsharded model's."""
    model = save_tiny_model(tmp_path / "base", tiny_tokenizer, tiny_model_factory)
    script = tmp_path / "lockstep.py"
    script.write_text(LOCKSTEP)
    from helpers import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           str(script), str(model), str(tmp_path)]
    run(cmd)
    for rank, n in ((0, 2), (1, 12)):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["sharded"] == got["plain"], rank
        assert max(len(t) for grp in got["sharded"] for t in grp) <= n
    assert max(len(t) for grp in json.loads((tmp_path / "rank1.json").read_text())["sharded"] for t in grp) > 2


@pytest.mark.parametrize("stage,baseline,reward,frozen", [
    ("ppo", "critic", "keyword:e", "shard"), ("ppo", "rloo", "keyword:e", "shard"),
    ("ppo", "critic", "rm", "shard"), ("ppo", "critic", "rm", "replicate"), ("grpo", None, "rm", "shard")])
def test_rl_fsdp2_matches_ddp(stage, baseline, reward, frozen, tiny_tokenizer, tiny_model_factory, tmp_path):
    """PPO with policy, critic and reference sharded (the reward replicated), and GRPO with policy and reference
    sharded, take the steps DDP takes with the same 2 ranks, seeds and prompts: the same per-step losses, KL and
    scores; the final model/ is plain.
    (Against DDP, not one process: rollout seeds are drawn per rank, so a 1-process run samples other replies.)"""
    model = save_tiny_model(tmp_path / "base", tiny_tokenizer, tiny_model_factory)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "messages": [
        {"role": "user", "content": f"Tell me about ball {i}."}]}) + "\n" for i in range(32)))
    if reward == "rm":  # a learned RM: the critic starts from it, and it is sharded or replicated by fsdp_frozen
        from chatforge.stages.rm import RewardNorm, init_reward_model, save_reward_model

        rm, rm_tok, _ = init_reward_model(str(model), seed=0)
        save_reward_model(rm, rm_tok, RewardNorm(mean=0.0, std=1.0), tmp_path / "rm")
        reward = str(tmp_path / "rm")
    common = [f"policy={model}", f"prompts={prompts}", f"reward={reward}", "train.max_steps=3", "train.batch_size=4",
              "rollout.max_new_tokens=8", "train.log_every=1", "log.tensorboard=false", "train.checkpoint_every=3",
              "train.threads=1"]
    common += (["ppo.minibatch_size=2", "ppo.epochs=1", f"ppo.baseline={baseline}", "ppo.samples_per_prompt=2"]
               if stage == "ppo" else ["grpo.group_size=2", "grpo.minibatch_size=4", "grpo.beta=0.05"])
    for strategy in ("ddp", "fsdp2"):
        run(torchrun(stage, "--out", str(tmp_path / strategy), *sets([*common, f"train.strategy={strategy}",
                                                                       f"train.fsdp_frozen={frozen}"])))
    rows = {s: [json.loads(x) for x in (tmp_path / s / "metrics.jsonl").read_text().splitlines() if "train/loss" in x]
            for s in ("ddp", "fsdp2")}
    assert len(rows["ddp"]) == len(rows["fsdp2"]) == 3
    for key in ("train/loss", "objective/kl", "objective/scores"):
        a, b = [r[key] for r in rows["ddp"]], [r[key] for r in rows["fsdp2"]]
        assert max(abs(x - y) for x, y in zip(a, b)) < TOL, (key, a, b)
    assert abs(rows["fsdp2"][-1]["objective/kl"]) > 1e-6  # the policy moved away from its reference
    meta = json.loads((tmp_path / "fsdp2" / "checkpoints" / "step-3" / "meta.json").read_text())
    assert meta["format"] == "dcp" and meta["world_size"] == 2
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(tmp_path / "ddp" / "model").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp2" / "model").state_dict()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4


def test_fsdp2_exact_resume_after_sigkill(pretrain_runs, tmp_path):
    """SIGKILL the whole 2-process FSDP2 job (launcher and ranks) once its step-3 checkpoint is committed; the
    rerun resumes from it and ends where the uninterrupted run ended (per-step losses and final weights)."""
    import signal
    import time

    from helpers import assert_resumed

    root, common = pretrain_runs
    out = tmp_path / "killed"
    cmd = torchrun("pretrain", "--out", str(out), *sets([*common, "train.batch_size=2", "train.strategy=fsdp2"]))
    p = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step-3" / "meta.json").exists():
        assert p.poll() is None and time.time() < deadline, "the run ended before its checkpoint"
        time.sleep(0.02)
    os.killpg(p.pid, signal.SIGKILL)  # the launcher and both ranks, at once
    p.wait()
    assert not (out / "model").exists(), "killed too late to test resume"
    r = run(cmd)
    assert assert_resumed(r, out, 3) >= 3
    full, again = losses(root / "fsdp2"), losses(out)
    assert len(again) >= 6 and max(abs(a - b) for a, b in zip(full[-3:], again[-3:])) < TOL, (full, again)
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(root / "fsdp2" / "model").state_dict()
    b = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


def test_a_checkpoint_of_another_model_is_refused_with_the_mismatch_named(pretrain_runs, tmp_path):
    root, common = pretrain_runs
    out = tmp_path / "other"
    shutil.copytree(root / "fsdp2", out)
    shutil.rmtree(out / "model")
    other = [s for s in common if not s.startswith("model.depth=")] + ["model.depth=1", "train.max_steps=9"]
    r = subprocess.run(torchrun("pretrain", "--out", str(out), *sets([*other, "train.batch_size=2",
                                                                       "train.strategy=fsdp2"])),
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "made with another config" in r.stderr and "model_config" in r.stderr, r.stderr[-2000:]
    assert not (out / "model").exists()


def test_offload_without_the_host_memory_for_it_is_refused(monkeypatch, tiny_tokenizer, tiny_model_factory):
    from chatforge.config import TrainConfig
    from chatforge.core.distributed import DistInfo, check_offload_memory
    from chatforge.core.io import UserError

    model = tiny_model_factory(tiny_tokenizer)
    info = DistInfo(rank=0, local_rank=0, world_size=2, device=torch.device("cpu"))
    check_offload_memory(model, TrainConfig(strategy="fsdp2", fsdp_cpu_offload=True), info)  # fits: no error
    monkeypatch.setattr(os, "sysconf", lambda name: 1 if name == "SC_AVPHYS_PAGES" else 4096)  # 4 KiB free
    with pytest.raises(UserError, match="needs about .* GiB of host RAM .* only 0.0 GiB is free"):
        check_offload_memory(model, TrainConfig(strategy="fsdp2", fsdp_cpu_offload=True), info)
