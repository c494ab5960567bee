"""Terminal multi-turn chat that streams tokens from the generation engine.

    chatforge chat --model runs/sft [--temperature 0.7 --top-p 0.9 --max-new-tokens 256]

Commands inside the chat: /reset (forget the conversation), /system TEXT (set the system prompt),
/set temperature=0.5 (or top_p, top_k, max_new_tokens, seed), /quit.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import Any, TextIO

import torch

from chatforge.core.log import console
from chatforge.core.model import load_model_and_tokenizer
from chatforge.core.tokenizer import render_for_completion, stop_token_ids

HELP = "commands: /reset  /system TEXT  /set key=value (temperature, top_p, top_k, max_new_tokens, seed)  /quit"


def apply_command(line: str, messages: list[dict], params: Any) -> tuple[list[dict], Any, str]:
    """Handle a /command; returns (messages, params, message to show)."""
    cmd, _, arg = line.partition(" ")
    if cmd == "/reset":
        system = [m for m in messages if m["role"] == "system"]
        return system, params, "conversation reset"
    if cmd == "/system":
        rest = [m for m in messages if m["role"] != "system"]
        return ([{"role": "system", "content": arg.strip()}] if arg.strip() else []) + rest, params, "system prompt set"
    if cmd == "/set":
        key, _, value = arg.partition("=")
        key = key.strip()
        casts = {"temperature": float, "top_p": float, "top_k": int, "max_new_tokens": int, "seed": int}
        if key not in casts:
            return messages, params, f"unknown setting '{key}'; one of {', '.join(casts)}"
        try:
            return messages, replace(params, **{key: casts[key](value)}), f"{key} = {value.strip()}"
        except ValueError:
            return messages, params, f"bad value for {key}: {value!r}"
    return messages, params, HELP


def chat_loop(model: Any, tok: Any, params: Any, inp: TextIO = sys.stdin, out: TextIO = sys.stdout) -> list[dict]:
    """Read user lines from `inp`, stream replies to `out`; returns the final conversation."""
    from chatforge.core.generation import stream

    messages: list[dict] = []
    stops = stop_token_ids(tok)
    out.write(f"chatforge chat — {HELP}\n")
    while True:
        out.write("\nyou> ")
        out.flush()
        line = inp.readline()
        if not line or line.strip() in ("/quit", "/exit"):
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.startswith("/"):
            messages, params, msg = apply_command(line, messages, params)
            out.write(f"[{msg}]\n")
            continue
        messages.append({"role": "user", "content": line})
        out.write("assistant> ")
        reply = []
        with torch.inference_mode():
            for delta in stream(model, render_for_completion(tok, messages), params, stop_token_ids=stops,
                                tokenizer=tok):
                reply.append(delta)
                out.write(delta)
                out.flush()
        out.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply).strip()})
    return messages


def run(model_spec: str, temperature: float, top_p: float, top_k: int, max_new_tokens: int, seed: int | None) -> None:
    from chatforge.core.generation import SamplingParams

    model, tok, path = load_model_and_tokenizer(model_spec)
    model.eval()
    console.print(f"[dim]model: {path}[/dim]")
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
                            seed=seed)
    chat_loop(model, tok, params)
