"""Smoke tests for the peer benchmarks: the chatforge side runs and the missing peer is reported, not fatal."""

import math
import sys

import pytest


def test_trl_rows_feed_trl_the_same_tokens_and_targets():
    from chatforge.bench.sft import trl_rows
    from chatforge.core.tokenizer import IGNORE_INDEX

    inputs, targets = [5, 6, 7, 8], [IGNORE_INDEX, 7, 8, 9]  # chatforge: targets[t] is predicted at t
    (row,) = trl_rows([(inputs, targets)])
    assert row["input_ids"] == inputs
    # TRL shifts inside the model: labels[t + 1] is predicted at t
    assert row["labels"] == [IGNORE_INDEX, IGNORE_INDEX, 7, 8]
    assert len(row["labels"]) == len(row["input_ids"])


def test_bench_sft_quick_without_trl(monkeypatch):
    from chatforge.bench import sft

    monkeypatch.setitem(sys.modules, "trl", None)  # `import trl` raises ImportError
    res = sft.run(quick=True, threads=0)
    assert res["trl"] is None and res["speedup_vs_trl"] is None
    assert "not installed" in res["note"]
    cf = res["chatforge"]
    assert cf["tokens_per_sec"] > 0 and cf["tokens_per_step"] > 0
    assert math.isfinite(cf["final_loss"])
    assert res["conversations"] > 0 and res["unit"].startswith("non-pad")


def test_bench_ppo_quick_without_trl_venv(monkeypatch, tmp_path):
    from chatforge.bench import ppo

    monkeypatch.setattr(ppo, "TRL_PYTHON", tmp_path / "missing" / "python")
    res = ppo.run(quick=True, threads=0)
    assert res["trl"] is None and res["speedup_vs_trl"] is None
    assert "setup.sh" in res["note"]
    cf = res["chatforge"]
    assert cf["steps_per_sec"] > 0
    assert 0 < cf["reply_tokens_per_step"] <= res["batch"] * res["reply_len"]
    assert res["prompts"] >= res["batch"]


def test_bench_ppo_reports_a_failing_trl_runner(monkeypatch, tmp_path):
    """A TRL venv that exists but fails raises with the runner's exit code and stderr (run() records it as the note)."""
    from chatforge.bench import ppo

    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'ModuleNotFoundError: No module named trl' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setattr(ppo, "TRL_PYTHON", fake)
    with pytest.raises(RuntimeError, match="exit 3.*No module named trl"):
        ppo.bench_trl(tmp_path, 2, 1, 1, 4, 1, 1, 1, 1e-5)


def test_bench_model_quick_on_a_model_dir(tiny_tokenizer, tiny_model_factory, tmp_path):
    """`bench model` on any HF dir: engine vs generate, full and LoRA SFT, LoRA RM and PPO all measured."""
    from helpers import save_tiny_model

    from chatforge.bench import model as model_bench

    path = save_tiny_model(tmp_path / "m", tiny_tokenizer, tiny_model_factory)
    res = model_bench.run(quick=True, model_path=str(path), threads=1)
    g = res["generate"]["batch_2"]
    assert g["hf_tokens_per_sec"] > 0 and g["chatforge_tokens_per_sec"] > 0 and g["compiled_tokens_per_sec"] > 0
    for key in ("sft_full", "sft_lora"):
        assert res[key]["tokens_per_sec"] > 0 and 0 < res[key]["mfu"] < 1 and math.isfinite(res[key]["final_loss"])
    assert res["rm_lora"]["pairs_per_sec"] > 0 and 0 < res["rm_lora"]["mfu"] < 1
    assert res["ppo_lora"]["seconds_per_iteration"] > 0 and res["ppo_lora"]["mean_reply_tokens"] > 0


def test_bench_pretrain_gpu_peak_lookup_and_clear_device_errors():
    import pytest
    import torch

    from chatforge.bench.pretrain import gpu_bf16_peak, run
    from chatforge.core.io import UserError

    assert gpu_bf16_peak("NVIDIA H100 80GB HBM3") == 989.4e12  # SXM
    assert gpu_bf16_peak("NVIDIA H100 PCIe") == 756.0e12  # not the SXM figure
    assert gpu_bf16_peak("NVIDIA A100-SXM4-80GB") == 312.0e12
    assert gpu_bf16_peak("Some Future GPU") is None  # then the measured bf16 GEMM is the reference
    with pytest.raises(UserError, match="choose cpu or cuda"):
        run(quick=True, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            run(quick=True, device="cuda")
    r = run(quick=True, device="cpu", steps=2)
    assert r["mfu_against"] == "measured fp32 GEMM" and 0 < r["mfu"] < 1 and r["tokens_per_sec"] > 0
