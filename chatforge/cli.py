"""The `chatforge` command: thin typer commands, one per stage (logic lives in stages/ and core/).

User errors (bad input, bad config) print one line and exit 1; run under torchrun with
`torchrun --nproc-per-node N -m chatforge.cli STAGE ...`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from chatforge.core.io import UserError

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train chat assistants the way ChatGPT was trained.")
data_app = typer.Typer(no_args_is_help=True, help="Corpus preparation.")
tokenizer_app = typer.Typer(no_args_is_help=True, help="Tokenizers.")
app.add_typer(data_app, name="data")
app.add_typer(tokenizer_app, name="tokenizer")
rm_app = typer.Typer(no_args_is_help=True, help="Reward models from K-wise rankings.")
app.add_typer(rm_app, name="rm")
models_app = typer.Typer(no_args_is_help=True, help="Base models by name (built-in, GGUF, HF dirs, hub ids).")
app.add_typer(models_app, name="models")

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config file.")
SetOpt = typer.Option(None, "--set", "-s", help="Override a config key: --set train.max_steps=100 (repeatable).")
ResumeOpt = typer.Option(True, "--resume/--no-resume", help="Resume from the out dir's last checkpoint.")


def _data_stage(stage_name: str, cfg_name: str, model_field: str, model: str | None, data: list[str] | None,
                out: Path, config: Path | None, set_: list[str] | None, resume: bool) -> None:
    """Shared body of the stages that train one model on data files (sft, rm train, dpo)."""
    import importlib

    from chatforge import config as config_mod

    cfg = config_mod.load_config(getattr(config_mod, cfg_name), config, set_)
    setattr(cfg, model_field, model or getattr(cfg, model_field))
    cfg.data.paths = list(data) if data else cfg.data.paths
    importlib.import_module(f"chatforge.stages.{stage_name}").run(cfg, out, resume=resume)


@data_app.command("prepare")
def data_prepare(
    inputs: list[Path] = typer.Argument(None, help="Files or dirs (.txt .jsonl .parquet, .gz); none = embedded corpus."),
    out: Path = typer.Option(..., "--out", "-o", help="Output dir (shards, text, tokenizer, report.json)."),
    tokenizer: Path = typer.Option(None, "--tokenizer", help="Tokenize with this HF tokenizer dir (else train one)."),
    config: Path = ConfigOpt,
    set_: list[str] = SetOpt,
) -> None:
    """Normalize, filter, dedup (exact + MinHash), split and tokenize a corpus into shards."""
    from chatforge.config import load_config
    from chatforge.core.log import console
    from chatforge.data.corpus import PrepareConfig, format_report, prepare

    cfg = load_config(PrepareConfig, config, set_)
    report = prepare(list(inputs) if inputs else None, out, cfg, tokenizer=tokenizer)
    console.print(format_report(report))
    console.print(f"wrote {out}/ (report: {out / 'report.json'})")


@tokenizer_app.command("train")
def tokenizer_train(
    inputs: list[Path] = typer.Argument(None, help="Text files, JSONL (text field) or a prepared data dir."),
    vocab_size: int = typer.Option(4096, "--vocab-size"),
    out: Path = typer.Option(..., "--out", "-o"),
    text_field: str = typer.Option("text", "--text-field"),
) -> None:
    """Train a byte-level BPE with chat special tokens and a chat template."""
    from chatforge.core.log import console
    from chatforge.core.tokenizer import train_tokenizer
    from chatforge.data.corpus import default_corpus_paths
    from chatforge.data.corpus_read import iter_documents, list_inputs

    # A prepared data dir contributes its cleaned train split; anything else is read as raw input.
    paths = []
    for p in inputs or default_corpus_paths():
        prepared = Path(p) / "text" / "train.jsonl"
        paths.append(prepared if prepared.exists() else Path(p))
    files = list_inputs(paths)
    docs = (d for f in files for d in iter_documents(f, text_field=text_field))
    tok = train_tokenizer(docs, vocab_size, out)
    console.print(f"tokenizer with {len(tok)} tokens written to {out}")


@models_app.command("list")
def models_list(as_json: bool = typer.Option(False, "--json")) -> None:
    """Built-in and imported base models."""
    import json

    from chatforge.core import hub
    from chatforge.core.log import console

    rows = hub.list_models()
    if as_json:
        print(json.dumps(rows, indent=2, default=str))
    else:
        console.print(hub.models_table(rows))


@models_app.command("import")
def models_import(
    source: str = typer.Argument(..., help="A GGUF file, a local HF dir, a built-in name or a hub id."),
    name: str = typer.Option(None, "--name", "-n"),
    overwrite: bool = typer.Option(False, "--overwrite"),
) -> None:
    """Convert/copy a model once into the chatforge home; then use it by name in every --model."""
    from chatforge.core import hub
    from chatforge.core.log import console

    console.print(f"model ready: {hub.import_model(source, name, overwrite)}")


@app.command()
def convert(
    inp: Path = typer.Argument(..., help="Input JSONL (.gz ok)."),
    to: str = typer.Option(..., "--to", help="chatforge | comparison | openai | trl | trl-pc | trl-pref | hh"),
    out: Path = typer.Option(..., "--out", "-o"),
    from_: str = typer.Option(None, "--from", help="Input format (auto-detected from the first record)."),
    opt: list[str] = typer.Option(None, "--opt", help="Importer option k=v (mode=all|best, include_synthetic=...)."),
) -> None:
    """Convert between HH / TRL / OASST / OpenAI-messages / self-instruct and chatforge formats."""
    from chatforge.core.log import console
    from chatforge.data.convert import convert as run_convert

    opts = {}
    for o in opt or []:
        if "=" not in o:
            raise UserError(f"--opt expects key=value, got '{o}'")
        k, v = o.split("=", 1)
        opts[k] = v
    console.print(run_convert(inp, to, out, from_format=from_, **opts).summary())


@app.command()
def pretrain(
    out: Path = typer.Option(..., "--out", "-o", help="Run dir."),
    config: Path = ConfigOpt,
    set_: list[str] = SetOpt,
    resume: bool = ResumeOpt,
) -> None:
    """Next-token pretraining (from scratch, sized by model.depth, or continuing model.from)."""
    from chatforge.config import PretrainConfig, load_config
    from chatforge.stages import pretrain as stage

    stage.run(load_config(PretrainConfig, config, set_), out, resume=resume)


@app.command()
def sft(
    model: str = typer.Option(None, "--model", "-m", help="Run dir, HF dir, model name or hub id."),
    data: list[str] = typer.Option(None, "--data", "-d", help="Conversations: JSONL, embedded:NAME, tasks:N."),
    out: Path = typer.Option(..., "--out", "-o", help="Run dir."),
    config: Path = ConfigOpt,
    set_: list[str] = SetOpt,
    resume: bool = ResumeOpt,
) -> None:
    """Supervised fine-tuning on conversations; loss on assistant tokens only."""
    _data_stage("sft", "SFTConfig", "model", model, data, out, config, set_, resume)


@app.command()
def sample(
    model: str = typer.Option(..., "--model", "-m"),
    prompts: str = typer.Option(..., "--prompts", "-p", help="Prompt JSONL, or tasks:N / tasks-heldout:N."),
    k: int = typer.Option(4, "--k", help="Replies per prompt."),
    out: Path = typer.Option(..., "--out", "-o", help="Ranking-task JSONL (appended to when resuming)."),
    temperature: float = typer.Option(1.0, "--temperature"),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens"),
    seed: int = typer.Option(0, "--seed"),
    batch_size: int = typer.Option(8, "--batch-size"),
    compile: bool = typer.Option(False, "--compile/--no-compile",
                                 help="Compiled decode step: ~5-20 s once per batch shape, then faster decoding."),
) -> None:
    """K replies per prompt with the KV-cache engine, written as ranking tasks."""
    from chatforge.stages import sample as stage

    cfg = stage.SampleConfig(k=k, temperature=temperature, top_p=top_p, top_k=top_k,
                             max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size, compile=compile)
    stage.run(model, prompts, out, cfg)


@app.command()
def label(
    tasks: Path = typer.Option(..., "--tasks", "-t", help="Ranking-task JSONL (from `chatforge sample`)."),
    labeler: str = typer.Option("rule", "--labeler", "-l",
                                help="rule | reference | judge:base_url=URL,model=M | panel:rule*5:temperature=0.5"),
    out: Path = typer.Option(..., "--out", "-o", help="Comparison JSONL."),
    per_task: int = typer.Option(1, "--per-task", help="Panel labelers per task (0 = every labeler)."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Simulated labelers rank the replies of each task (comparisons), with measured agreement."""
    from chatforge.core.log import console
    from chatforge.stages.label import format_stats
    from chatforge.stages.label import label as run_label

    console.print(format_stats(run_label(tasks, out, labeler, per_task=per_task, seed=seed)))


@app.command()
def chat(
    model: str = typer.Option(..., "--model", "-m"),
    temperature: float = typer.Option(0.7, "--temperature"),
    top_p: float = typer.Option(0.9, "--top-p"),
    top_k: int = typer.Option(0, "--top-k"),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens"),
    seed: int = typer.Option(None, "--seed"),
) -> None:
    """Terminal chat that streams tokens (/reset, /system TEXT, /set key=value, /quit)."""
    from chatforge.stages import chat as stage

    stage.run(model, temperature, top_p, top_k, max_new_tokens, seed)


@app.command()
def serve(
    model: list[str] = typer.Option(None, "--model", "-m", help="Model to serve (name, run dir, registry id, HF "
                                    "dir); repeatable. Default: the built-in smollm2-135m-instruct."),
    db: str = typer.Option(None, "--db", help="Database URL for completions and feedback (default: "
                           "sqlite:///runs/chatforge.db when storage is available; 'none' = do not store)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (127.0.0.1 = this machine only)."),
    port: int = typer.Option(8000, "--port"),
    no_auth: bool = typer.Option(False, "--no-auth", help="Accept requests without an API key (local use)."),
    max_batch: int = typer.Option(32, "--max-batch", help="Rows decoded together per step (continuous batching)."),
    queue_size: int = typer.Option(64, "--queue-size", help="Requests that may wait; past it, 429 + Retry-After."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16 | float16 (weights and compute; on a "
                              "CPU with a fast 16-bit matmul float16 decodes up to 3x faster, BENCHMARKS.md)."),
    demo: bool = typer.Option(False, "--demo", help="Also create a local admin (one-time password printed), a "
                              "campaign of ranking tasks sampled from the model and a demonstration prompt set."),
) -> None:
    """OpenAI-compatible server (/v1/chat/completions, /v1/completions, /v1/models, /metrics) with batching."""
    from chatforge.core.model import precision_of_dtype
    from chatforge.server.app import default_db_url
    from chatforge.server.app import serve as run_server

    precision = precision_of_dtype(dtype)
    if max_batch < 1 or queue_size < 1:
        raise UserError("--max-batch and --queue-size must be >= 1")
    db_url = None if db == "none" else (db or default_db_url())
    run_server(list(model) if model else None, db_url, host, port, no_auth, max_batch, queue_size,
               precision, demo=demo)


def _rl_command(stage_name: str, cfg_name: str, policy: str | None, reward: str | None, prompts: str | None,
                reference: str | None, out: Path, config: Path | None, set_: list[str] | None, resume: bool) -> None:
    import importlib

    from chatforge import config as config_mod

    cfg = config_mod.load_config(getattr(config_mod, cfg_name), config, set_)
    cfg.policy, cfg.reward = policy or cfg.policy, reward or cfg.reward
    cfg.prompts = prompts or cfg.prompts
    if hasattr(cfg, "reference"):
        cfg.reference = reference or cfg.reference
    importlib.import_module(f"chatforge.stages.{stage_name}").run(cfg, out, resume=resume)


PolicyOpt = typer.Option(None, "--policy", help="Model to train (SFT run dir, HF dir, name).")
RewardOpt = typer.Option(None, "--reward", help="RM run dir/HF dir/name | tasks | keyword:WORD[,WORD].")
PromptsOpt = typer.Option(None, "--prompts", help="Prompt JSONL or tasks:N[:SEED].")
ReferenceOpt = typer.Option(None, "--reference", help="KL reference (default: the policy as loaded; LoRA: adapters off).")


@app.command()
def ppo(policy: str = PolicyOpt, reward: str = RewardOpt, prompts: str = PromptsOpt, reference: str = ReferenceOpt,
        out: Path = typer.Option(..., "--out", "-o"), config: Path = ConfigOpt, set_: list[str] = SetOpt,
        resume: bool = ResumeOpt) -> None:
    """PPO(-ptx) against a reward model, with a per-token KL penalty to the frozen reference."""
    _rl_command("ppo", "PPOConfig", policy, reward, prompts, reference, out, config, set_, resume)


@app.command()
def grpo(policy: str = PolicyOpt, reward: str = RewardOpt, prompts: str = PromptsOpt, reference: str = ReferenceOpt,
         out: Path = typer.Option(..., "--out", "-o"), config: Path = ConfigOpt, set_: list[str] = SetOpt,
         resume: bool = ResumeOpt) -> None:
    """GRPO: groups of K replies per prompt, group-normalised advantages, optional KL to the reference."""
    _rl_command("grpo", "GRPOConfig", policy, reward, prompts, reference, out, config, set_, resume)


@app.command()
def bon(policy: str = PolicyOpt, reward: str = RewardOpt, prompts: str = PromptsOpt,
        out: Path = typer.Option(Path("runs/bon"), "--out"), config: Path = ConfigOpt, set_: list[str] = SetOpt,
        resume: bool = typer.Option(True, "--resume/--no-resume")) -> None:
    """Best-of-n distillation: sample bon.n replies per prompt, the reward picks the best, SFT on the picks."""
    from chatforge import config as config_mod
    from chatforge.stages import bon as bon_stage

    cfg = config_mod.load_config(config_mod.BoNConfig, config, set_)
    cfg.policy, cfg.reward, cfg.prompts = policy or cfg.policy, reward or cfg.reward, prompts or cfg.prompts
    bon_stage.run(cfg, out, resume=resume)

@rm_app.command("train")
def rm_train(
    model: str = typer.Option(None, "--model", "-m", help="Start from (usually the SFT run)."),
    data: list[str] = typer.Option(None, "--data", "-d", help="Comparison JSONL or embedded:NAME (repeatable)."),
    out: Path = typer.Option(..., "--out", "-o"),
    config: Path = ConfigOpt,
    set_: list[str] = SetOpt,
    resume: bool = ResumeOpt,
) -> None:
    """Train a reward model on all pairs of each K-wise ranking (InstructGPT's 1/C(K,2) weighting)."""
    _data_stage("rm", "RMConfig", "model", model, data, out, config, set_, resume)


@rm_app.command("eval")
def rm_eval_cmd(
    model: str = typer.Option(..., "--model", "-m"),
    data: list[str] = typer.Option(None, "--data", "-d", help="Held-out comparisons (accuracy, calibration)."),
    out: Path = typer.Option(None, "--out", "-o", help="Dir for eval.json / best_of_n.json and their plots."),
    split: str = typer.Option("all", "--split", help="all | val | train"),
    best_of: str = typer.Option(None, "--best-of", help="e.g. 1,2,4,8,16: the gold utility of the RM's pick among "
                                "n samples of --policy, beside the gold's own pick and a random one."),
    gold: str = typer.Option("rule", "--gold", help="With --best-of: the gold judge (rule | tasks | an RM)."),
    policy: str = typer.Option(None, "--policy", help="With --best-of: the model sampled (default: the RM's start "
                               "model, usually the SFT run)."),
    prompts: str = typer.Option("tasks-heldout:4:1", "--prompts", help="With --best-of: held-out prompts."),
    temperature: float = typer.Option(1.0, "--temperature"),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens"),
) -> None:
    """Pairwise accuracy (by source and K), calibration plot, reward-length correlation; --best-of: how far
    a policy optimised against this RM can be trusted (its pick's gold utility at each n)."""
    import json

    from chatforge.stages.rm_eval import best_of_n, evaluate, parse_best_of

    if not data and not best_of:
        raise UserError("rm eval needs --data (comparisons) and/or --best-of N,N,...")
    if best_of:
        ns = parse_best_of(best_of)
        if policy is None:
            from chatforge.core.model import resolve_model_path
            from chatforge.core.run import read_manifest

            run = resolve_model_path(model)
            man = read_manifest(run.parent if run.name == "model" else run) or {}
            policy = (man.get("config") or {}).get("model")
            if not policy:
                raise UserError(f"{model}: no start model in its manifest; name the sampled model with --policy")
        res = best_of_n(model, policy, prompts, ns, gold, temperature, max_new_tokens, out=out)
        if not data:
            print(json.dumps(res, indent=2, default=str))
            return
    print(json.dumps(evaluate(model, list(data), out, split=split), indent=2, default=str))


@rm_app.command("score")
def rm_score_cmd(
    model: str = typer.Option(..., "--model", "-m"),
    data: Path = typer.Option(..., "--data", "-d", help="Conversation JSONL (the last assistant turn is scored)."),
    out: Path = typer.Option(..., "--out", "-o"),
) -> None:
    """Score conversations with a reward model (normalised so SFT replies average 0)."""
    import json

    from chatforge.stages.rm_eval import score

    print(json.dumps(score(model, data, out), indent=2, default=str))


@app.command()
def dpo(
    policy: str = PolicyOpt,
    data: list[str] = typer.Option(None, "--data", "-d", help="Comparison JSONL or embedded:NAME (repeatable)."),
    out: Path = typer.Option(..., "--out", "-o"),
    config: Path = ConfigOpt,
    set_: list[str] = SetOpt,
    resume: bool = ResumeOpt,
) -> None:
    """DPO (sigmoid; IPO via --set loss.type=ipo) on comparisons, K-wise rankings expanded to pairs."""
    _data_stage("dpo", "DPOConfig", "policy", policy, data, out, config, set_, resume)


@app.command()
def loop(
    config: Path = ConfigOpt,
    set_: list[str] = SetOpt,
) -> None:
    """Rounds of sample → rank → reward model → PPO/DPO/GRPO → eval → register (resumable)."""
    from chatforge.server.rounds import loop_sources
    from chatforge.stages import loop as stage

    cfg = stage.load_loop_config(config, set_)
    stage.run(cfg, **loop_sources(cfg))


@app.command()
def bench(
    stage: str = typer.Argument(..., help="pretrain | generate | sft | rm | dpo | ppo | model | serve | labelers"),
    out: Path = typer.Option(None, "--out", "-o", help="Write the JSON result here."),
    quick: bool = typer.Option(False, "--quick", help="Smaller sizes, for a smoke run."),
    model: str | None = typer.Option(None, "--model", help="Benchmark this model (name, dir) instead of the "
                                     "default tiny one, where the stage supports it (e.g. smollm2-135m-instruct)."),
    batch: int | None = typer.Option(None, "--batch", help="Batch size, where the stage takes one."),
    db: str | None = typer.Option(None, "--db", help="labelers: database URL (default: a temp SQLite file)."),
    labelers: int | None = typer.Option(None, "--labelers", help="labelers: concurrent labelers (default 50)."),
    tasks_per_labeler: int | None = typer.Option(None, "--tasks-per-labeler", help="labelers: tasks each (default 4)."),
    device: str | None = typer.Option(None, "--device", help="pretrain: cpu | cuda (default: cuda when present; "
                                      "on CUDA a ~163M model, bf16, compiled, MFU vs the GPU's bf16 peak)."),
    dtype: str | None = typer.Option(None, "--dtype", help="serve: the server's --dtype (float32 | bfloat16 | "
                                     "float16; default float32)."),
) -> None:
    """Throughput, MFU vs the measured matmul peak, peak memory; side by side with a peer where one exists."""
    import json

    from chatforge.bench import run_bench
    from chatforge.core.model import precision_of_dtype

    if dtype is not None:
        precision_of_dtype(dtype)  # a bad value fails here, before the server subprocess starts
    result = run_bench(stage, quick=quick, model_path=model, batch=batch, db_url=db, labelers=labelers,
                       tasks_per_labeler=tasks_per_labeler, device=device, dtype=dtype)
    if out:
        from chatforge.core.io import write_json

        write_json(out, result)
    else:
        print(json.dumps(result, indent=2))


@app.command()
def plan(
    model: str = typer.Option(..., "--model", help="Model name, run dir, HF dir, or a config.json path."),
    stage: str = typer.Option("sft", "--stage", help="pretrain | sft | rm | dpo | ppo | grpo"),
    gpus: int = typer.Option(1, "--gpus", help="Ranks (GPUs) the job runs on."),
    gpu_mem: float = typer.Option(80.0, "--gpu-mem", help="Memory per GPU, GiB."),
    batch: int = typer.Option(8, "--batch", help="Micro-batch rows per rank."),
    seq_len: int = typer.Option(1024, "--seq-len"),
    lora: bool = typer.Option(False, "--lora", help="LoRA adapters instead of full fine-tuning."),
    fp32: bool = typer.Option(False, "--fp32", help="fp32 compute (default: bf16, as on a GPU)."),
    no_flash: bool = typer.Option(False, "--no-flash", help="Attention without a fused kernel (s x s scores kept)."),
    reply_tokens: int = typer.Option(256, "--reply-tokens", help="RL: tokens generated per reply."),
    rollout_batch: int = typer.Option(64, "--rollout-batch", help="RL: replies generated at once per rank."),
    measure: bool = typer.Option(False, "--measure", help="Also run 2 real steps on this CPU and print the peak."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Per-rank memory (weights, grads, AdamW, activations, KV cache) per strategy, and what fits."""
    from chatforge.stages import plan as planner

    p = planner.PlanInput(stage=stage, gpus=gpus, gpu_mem_gb=gpu_mem, batch=batch, seq_len=seq_len, lora=lora,
                        bf16=not fp32, flash=not no_flash, reply_tokens=reply_tokens, rollout_batch=rollout_batch)
    planner.run(model, p, as_json=as_json)
    if measure:
        r = planner.measure_peak(model, p)
        print(f"measured on this CPU (single process, fp32, eager attention): peak {r['measured_gib']:.3f} GiB "
              f"above the baseline; estimate {r['estimated_gib']:.3f} GiB")


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o"),
    quick: bool = typer.Option(False, "--quick", help="Tiny sizes (what the test suite runs)."),
    base: str | None = typer.Option(None, "--base", help="Start from this pretrained chat model (name, HF dir or "
                                    "hub id, e.g. smollm2-135m-instruct) instead of pretraining: LoRA SFT, RM, PPO."),
) -> None:
    """The pipeline on embedded data, CPU only."""
    from chatforge.stages import demo as stage

    stage.run(out, quick=quick, base=base)


registry_app = typer.Typer(no_args_is_help=True, help="Model versions with lineage.")
app.add_typer(registry_app, name="registry")
RegistryOpt = typer.Option(None, "--registry", help="registry.json (default: $CHATFORGE_REGISTRY or ./runs/registry.json).")


@app.command("eval")
def eval_cmd(
    model: str = typer.Option(None, "--model", "-m", help="Model to evaluate (run dir, HF dir or name)."),
    baseline: list[str] = typer.Option(None, "--baseline", "-b", help="Model to compare against (repeatable)."),
    models: str = typer.Option(None, "--models", help="Comma-separated models: the first is evaluated, the rest are baselines."),
    reward: str = typer.Option(None, "--reward", "-r", help="Reward model: scores replies, judges, RM accuracy."),
    judge: str = typer.Option(None, "--judge", help="Labeler spec (rule, panel:rule*5:temperature=0.5, judge:base_url=...), rm or none."),
    data_dir: str = typer.Option(None, "--data-dir", help="Prepared data dir for held-out LM loss (default: from the lineage)."),
    sft_data: str = typer.Option(None, "--sft-data", help="SFT validation conversations: tasks:N or a file."),
    comparisons: list[str] = typer.Option(None, "--comparisons", help="Held-out comparisons for RM accuracy (repeatable)."),
    prompts: str = typer.Option(None, "--prompts", "-p", help="tasks-heldout:N[:SEED] or a prompt JSONL."),
    train_prompts: list[str] = typer.Option(None, "--train-prompts", help="Training prompts to check for overlap (repeatable)."),
    bias: bool = typer.Option(None, "--bias/--no-bias", help="Run the bias probes (default on)."),
    bias_file: str = typer.Option(None, "--bias-file", help="A CrowS-Pairs-format CSV (sent_more, sent_less, "
                                  "stereo_antistereo, bias_type): the CrowS-Pairs probe on your own pairs."),
    previous: str = typer.Option(None, "--previous", help="The previous round's report dir (linked and compared)."),
    out: Path = typer.Option(..., "--out", "-o", help="Report dir: report.md, report.html, report.json, *.png."),
    config: Path = ConfigOpt,
    set_: list[str] = SetOpt,
) -> None:
    """Held-out loss, task accuracy, RM scores/accuracy, win rates with CIs, bias probes, curves: one report."""
    from chatforge.config import load_config
    from chatforge.stages.report import EvalConfig, run

    cfg = load_config(EvalConfig, config, set_)
    if models:
        first, *rest = [m.strip() for m in models.split(",") if m.strip()]
        cfg.model, cfg.baselines = first, rest + cfg.baselines
    cfg.model = model or cfg.model
    cfg.baselines = list(baseline) if baseline else cfg.baselines
    for name, value in (("reward", reward), ("judge", judge), ("data_dir", data_dir), ("sft_data", sft_data),
                        ("prompts", prompts), ("bias", bias), ("bias_file", bias_file), ("previous", previous)):
        if value is not None:
            setattr(cfg, name, value)
    cfg.comparisons = list(comparisons) if comparisons else cfg.comparisons
    cfg.train_prompts = list(train_prompts) if train_prompts else cfg.train_prompts
    run(cfg, out)


@registry_app.command("list")
def registry_list(
    registry: Path = RegistryOpt,
    stage: str = typer.Option(None, "--stage", help="Only runs of this stage."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Registered runs: id, stage, parent, data hashes, key metrics, path."""
    import json

    from chatforge.core.log import console
    from chatforge.core.registry import list_runs, registry_table

    rows = list_runs(registry, stage=stage)
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        console.print(registry_table(rows))


@registry_app.command("show")
def registry_show(
    run_id: str = typer.Argument(..., help="Run id, unique prefix, or run dir."),
    registry: Path = RegistryOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the lineage as JSON (newest first)."),
) -> None:
    """Which data and which models made this run: its lineage back to the corpus."""
    import json

    from chatforge.core.log import console
    from chatforge.core.registry import lineage, lineage_tree

    if as_json:
        print(json.dumps(lineage(run_id, registry), indent=2))
    else:
        console.print(lineage_tree(run_id, registry))


# ----------------------------------------------------------------------------- storage: keys, users, db, export
keys_app = typer.Typer(no_args_is_help=True, help="API keys (stored hashed; the secret is shown once).")
users_app = typer.Typer(no_args_is_help=True, help="Web app accounts.")
db_app = typer.Typer(no_args_is_help=True, help="The server's database (SQLite by default, PostgreSQL by URL).")
export_app = typer.Typer(no_args_is_help=True, help="Turn what people said into training data.")
app.add_typer(keys_app, name="keys")
app.add_typer(users_app, name="users")
app.add_typer(db_app, name="db")
app.add_typer(export_app, name="export")
DbOpt = typer.Option("runs/chatforge.db", "--db", help="SQLite path or URL (postgresql+psycopg://user@host/db).")


def _db(url: str):
    from chatforge.server.db import open_db

    return open_db(url)


def _repo_call(fn, *args, **kw):
    """Run a repository call, turning its client errors into one-line user errors."""
    from chatforge.server.db.repo import Invalid, NotFound

    try:
        return fn(*args, **kw)
    except (Invalid, NotFound) as e:
        raise UserError(str(e)) from None


@keys_app.command("create")
def keys_create(
    name: str = typer.Option(..., "--name", "-n", help="Who or what the key is for."),
    rate: int = typer.Option(None, "--rate", help="Requests per minute (default: unlimited)."),
    no_store: bool = typer.Option(False, "--no-store", help="Do not store this key's completions."),
    db: str = DbOpt,
) -> None:
    """Create a key and print its secret (once: only a SHA-256 of it is stored)."""
    key, token = _repo_call(_db(db).create_key, name, rate, not no_store)
    print(token)
    print(f"created {key.id} ({key.name}, rate {key.rate_per_min or 'unlimited'}/min, "
          f"{'stored' if key.store else 'not stored'}); use it as: Authorization: Bearer {key.prefix}…",
          file=sys.stderr)


@keys_app.command("list")
def keys_list(db: str = DbOpt, as_json: bool = typer.Option(False, "--json")) -> None:
    """Keys with their shown prefix, rate, storage choice, last use and revocation."""
    import json

    from rich.table import Table

    from chatforge.core.log import console

    rows = [{"id": k.id, "name": k.name, "prefix": k.prefix, "rate_per_min": k.rate_per_min, "store": k.store,
             "created_at": k.created_at.isoformat(timespec="seconds"),
             "last_used_at": k.last_used_at.isoformat(timespec="seconds") if k.last_used_at else None,
             "revoked_at": k.revoked_at.isoformat(timespec="seconds") if k.revoked_at else None}
            for k in _db(db).list_keys()]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table("name", "rate/min", "store", "created", "last used", "revoked")
    table.add_column("id", no_wrap=True, min_width=20)  # the id is what `keys revoke` takes: never cut
    table.add_column("prefix", no_wrap=True, min_width=11)
    for r in rows:
        table.add_row(r["name"], str(r["rate_per_min"] or "-"), "yes" if r["store"] else "no", r["created_at"][:10],
                      (r["last_used_at"] or "-")[:10], (r["revoked_at"] or "-")[:10], r["id"], r["prefix"] + "…")
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: str = typer.Argument(..., help="Key id (key_…) or its shown prefix."), db: str = DbOpt) -> None:
    """Revoke a key: requests with it get 401 from now on."""
    key = _repo_call(_db(db).revoke_key, key_id)
    print(f"revoked {key.id} ({key.name})")


@users_app.command("create")
def users_create(
    username: str = typer.Argument(..., help="Login name."),
    admin: bool = typer.Option(False, "--admin", help="Same as --role admin."),
    role: str = typer.Option("user", "--role", help="admin | labeler | user"),
    password: str = typer.Option(None, "--password", hide_input=True, help="Prompted for when not given."),
    one_time: bool = typer.Option(False, "--one-time", help="Print a random one-time password instead; the first "
                                  "login asks the person to choose their own."),
    force: bool = typer.Option(False, "--force", help="The user exists: set the new (or one-time) password."),
    email: str = typer.Option(None, "--email"),
    db: str = DbOpt,
) -> None:
    """Create a web app account (argon2 password hash), or reset one with --force."""
    from sqlalchemy import select

    from chatforge.server.auth import hash_password
    from chatforge.server.db import repo
    from chatforge.server.db.models import User
    from chatforge.server.web.security import one_time_password, password_problem

    if one_time:
        password = one_time_password()
    elif password is None:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    if problem := password_problem(password):
        raise UserError(problem)
    role = "admin" if admin else role
    with _db(db).session() as s:
        user = s.scalar(select(User).where(User.username == username))
        if user is not None and not force:
            raise UserError(f"user '{username}' exists (use --force to set a new password)")
        if user is None:
            user = _repo_call(repo.create_user, s, username, hash_password(password), role, email)
            verb = "created"
        else:
            user.password_hash, user.is_active = hash_password(password), True
            verb = "reset"
        user.must_change_password = one_time
        print(f"{verb} user {user.username} ({user.id}, role {user.role})")
    if one_time:
        print(f"one-time password: {password}  (the first login asks for a new one)")


@users_app.command("invite")
def users_invite(
    role: str = typer.Option("labeler", "--role", help="admin | labeler | user"),
    days: float = typer.Option(7.0, "--days", help="The link works once, for this many days."),
    base_url: str = typer.Option("http://127.0.0.1:8000", "--base-url", help="Where the server answers."),
    db: str = DbOpt,
) -> None:
    """Print a one-use invitation link: whoever opens it picks a username and password and gets ROLE."""
    from datetime import timedelta

    from chatforge.server.db.models import ROLES
    from chatforge.server.web import campaigns as cp
    from chatforge.server.web.security import create_invite

    if role not in ROLES:
        raise UserError(f"--role must be one of {', '.join(ROLES)}, not '{role}'")
    if days <= 0:
        raise UserError("--days must be > 0")
    with _db(db).session() as s:
        token = create_invite(s, None, role, timedelta(days=days))
        cp.audit(s, None, "invite.create", role, role=role, source="cli")
    print(f"{base_url.rstrip('/')}/app/invite/{token}")


@users_app.command("list")
def users_list(db: str = DbOpt, as_json: bool = typer.Option(False, "--json")) -> None:
    """Accounts with their role, state and creation date."""
    import json

    from rich.table import Table
    from sqlalchemy import select

    from chatforge.core.log import console
    from chatforge.server.db.models import User

    with _db(db).session() as s:
        rows = [{"username": u.username, "id": u.id, "role": u.role, "active": u.is_active,
                 "must_change_password": u.must_change_password, "created_at": u.created_at.isoformat(timespec="seconds")}
                for u in s.scalars(select(User).order_by(User.username))]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table("username", "role", "active", "one-time password", "created", "id")
    for r in rows:
        table.add_row(r["username"], r["role"], "yes" if r["active"] else "no",
                      "yes" if r["must_change_password"] else "no", r["created_at"][:10], r["id"])
    console.print(table)


@db_app.command("upgrade")
def db_upgrade(db: str = DbOpt) -> None:
    """Apply the Alembic migrations (serve does this on start too)."""
    from chatforge.server.db.engine import make_engine
    from chatforge.server.db.migrate import upgrade

    engine = make_engine(db)
    before, after = upgrade(engine)
    where = engine.url.render_as_string(hide_password=True)
    print(f"{where}: at revision {after}" + ("" if before == after else f" (was {before or 'empty'})"))


@export_app.command("feedback")
def export_feedback_cmd(
    db: str = DbOpt,
    out: Path = typer.Option(..., "--out", "-o", help="Directory for comparisons/demonstrations/feedback JSONL."),
    max_policy_age: int = typer.Option(None, "--max-policy-age", help="Drop replies from versions older than N rounds."),
    scrub: str = typer.Option("default", "--scrub", help="PII scrub: default (emails, phones) | none | module:function."),
) -> None:
    """Thumbs, chosen regenerates and edits as comparisons (rm train, dpo, loop) and demonstrations (sft)."""
    import json

    from chatforge.server.export import export_feedback, load_scrub

    print(json.dumps(export_feedback(_db(db), out, max_policy_age, load_scrub(scrub)), indent=2))


@export_app.command("rankings")
def export_rankings_cmd(
    db: str = DbOpt,
    out: Path = typer.Option(..., "--out", "-o", help="JSONL file to write (atomically; .gz is gzipped)."),
    campaign: str = typer.Option(None, "--campaign", help="Campaign id or name (default: all)."),
    since: str = typer.Option(None, "--since", help="Rankings submitted at or after this ISO date/time (UTC)."),
    until: str = typer.Option(None, "--until", help="... and at or before this one."),
    labeler: str = typer.Option(None, "--labeler", help="Only this labeler's rankings."),
    model_version: str = typer.Option(None, "--model-version", help="Only tasks with a reply from this run id."),
    consensus: bool = typer.Option(False, "--consensus", help="One aggregated ranking per task (see --method)."),
    method: str = typer.Option("bradley_terry", "--method", help="Consensus: bradley_terry | ranked_pairs | borda."),
    fmt: str = typer.Option("chatforge", "--format", help="chatforge (comparisons) | trl (preference pairs) | oasst."),
) -> None:
    """Rankings people submitted in the app: every labeler's own or a consensus per task, with provenance."""
    from chatforge.server.web.exports import parse_when, write_rankings

    with _db(db).session() as s:
        n = write_rankings(s, out, fmt, campaign=campaign, since=parse_when(since, "--since"),
                           until=parse_when(until, "--until"), labeler=labeler, model_version=model_version,
                           consensus=consensus, method=method)
    print(f"wrote {n} {'consensus ' if consensus else ''}{'rows' if fmt != 'chatforge' else 'comparisons'} to {out}")


@export_app.command("demos")
def export_demos_cmd(
    db: str = DbOpt,
    out: Path = typer.Option(..., "--out", "-o", help="JSONL file to write (atomically)."),
    author: str = typer.Option(None, "--author", help="Only this trainer's demonstrations."),
    prompt_set: str = typer.Option(None, "--prompt-set", help="Only those written on this prompt set (id or name)."),
    fmt: str = typer.Option("chatforge", "--format", help="chatforge | openai | trl ({messages})."),
) -> None:
    """Demonstrations people wrote in the app (latest revision each) as SFT conversations (`sft --data`)."""
    from chatforge.data.convert import CONV_WRITERS
    from chatforge.data.formats import write_jsonl_records
    from chatforge.server.web.demos import demo_conversations

    if fmt not in ("chatforge", "openai", "trl"):
        raise UserError(f"--format must be chatforge, openai or trl, not '{fmt}'")
    with _db(db).session() as s:
        convs = demo_conversations(s, author, prompt_set)
    n = write_jsonl_records(out, [row for c in convs for row in CONV_WRITERS[fmt](c)])
    print(f"wrote {n} demonstrations to {out}")


def main() -> None:
    try:
        app(standalone_mode=False)
    except UserError as e:
        from chatforge.core.log import err_console

        err_console.print(f"[red]error:[/red] {e}", soft_wrap=True)
        sys.exit(1)
    except (typer.Exit, SystemExit) as e:
        sys.exit(getattr(e, "exit_code", getattr(e, "code", 0)))
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:
        usage, abort = _click_errors()
        if isinstance(e, usage):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, abort):
            sys.exit(1)
        raise


def _click_errors() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """Usage-error and abort classes: click's, and those of the click copy newer typer releases vendor
    (typer._click), whose errors are not click's (a mistyped option would otherwise print a traceback)."""
    import importlib

    usage: list[type] = []
    abort: list[type] = []
    for name in ("click.exceptions", "typer._click.exceptions", "typer.exceptions"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        usage += [c for c in (getattr(mod, "ClickException", None),) if c]
        abort += [c for c in (getattr(mod, "Abort", None),) if c]
    return tuple(usage), tuple(abort)


if __name__ == "__main__":
    main()
