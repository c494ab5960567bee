"""Which precision should serve SmolLM2-135M-Instruct? fp32 vs bf16 vs fp16 (core.model.PRECISIONS) vs PyTorch's
dynamic int8 quantisation of every nn.Linear (`torch.ao.quantization.quantize_dynamic`, not offered): quality
(held-out loss on human-written assistant replies; greedy replies on task prompts, identical to fp32's and task
accuracy) and single-stream decode speed, alternated in one process. The bar for offering a precision: held-out
loss within 1 % of fp32. (Measured: int8 +73 %, so no int8; BENCHMARKS.md.)

    python benchmarks/serve_precision.py --out runs/exp/precision.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from chatforge.core.generation import SamplingParams, generate
from chatforge.core.model import for_inference, load_model_and_tokenizer
from chatforge.core.tokenizer import render_for_completion, stop_token_ids
from chatforge.data.prompts import load_prompts
from chatforge.data.tasks import check_conversation
from chatforge.stages.report import load_sft_eval, sft_val_loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--loss-data", default="embedded:sft/oasst-best")
    ap.add_argument("--prompts", default="tasks-heldout:5:1")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out")
    a = ap.parse_args()
    torch.manual_seed(0)
    base, tok, _ = load_model_and_tokenizer(a.model)
    models = {"fp32": for_inference(base, "fp32"),
              "int8": torch.ao.quantization.quantize_dynamic(copy.deepcopy(base), {torch.nn.Linear}, dtype=torch.qint8),
              "bf16": for_inference(copy.deepcopy(base), "bf16"), "fp16": for_inference(copy.deepcopy(base), "fp16")}
    convs = load_sft_eval(a.loss_data)
    prompts = load_prompts(a.prompts)
    ids = [render_for_completion(tok, p["messages"]) for p in prompts]
    kw = dict(stop_token_ids=stop_token_ids(tok), pad_id=tok.pad_token_id, tokenizer=tok)
    res: dict = {"model": a.model, "threads": torch.get_num_threads(), "loss_data": a.loss_data,
                 "conversations": len(convs), "prompts": len(prompts)}
    greedy = {}
    for name, m in models.items():
        res[f"{name}_loss"] = sft_val_loss(m, tok, convs, 512, 4)["loss"]
        out = generate(m, ids, SamplingParams(max_new_tokens=48, temperature=0.0), batch_size=8, **kw)
        greedy[name] = [g[0].text for g in out]
        res[f"{name}_task_accuracy"] = sum(check_conversation(p, t) or 0.0 for p, t in zip(prompts, greedy[name])) / len(ids)
    others = [n for n in models if n != "fp32"]
    for name in others:
        res[f"{name}_loss_vs_fp32"] = res[f"{name}_loss"] / res["fp32_loss"] - 1
        res[f"{name}_greedy_identical"] = sum(x == y for x, y in zip(greedy[name], greedy["fp32"])) / len(ids)
    one = [render_for_completion(tok, [{"role": "user", "content": "Tell me a story about a dragon."}])]
    speed: dict[str, list[float]] = {n: [] for n in models}
    for _ in range(a.rounds):  # alternate: the machine's load affects every precision alike
        for name, m in models.items():
            t = time.perf_counter()
            g = generate(m, one, SamplingParams(max_new_tokens=a.new_tokens, temperature=1.0, seed=0),
                         stop_token_ids=[], pad_id=tok.pad_token_id)[0][0]
            speed[name].append(len(g.token_ids) / (time.perf_counter() - t))
    for name, v in speed.items():
        res[f"{name}_tok_s"] = sorted(v)[len(v) // 2]
    for name in others:
        res[f"{name}_speedup"] = res[f"{name}_tok_s"] / res["fp32_tok_s"]
    print(json.dumps(res, indent=2))
    if a.out:
        from chatforge.core.io import write_json

        write_json(a.out, res)


if __name__ == "__main__":
    main()
