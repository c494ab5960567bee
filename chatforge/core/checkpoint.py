"""Checkpoints: `DIR/checkpoints/step-N/`, atomic (temp dir, fsync, rename), keep the last N.

Layout of one checkpoint (weights kept apart from recipe state, torchtune-style):
  <name>.safetensors   weights of each trained module (policy, critic, ...)
  state.pt             optimizer / scheduler / data-position / controller state dicts
  rng-rank<R>.pt       every RNG state of each rank (python, numpy, torch, cuda)
  meta.json            step, loop state, config fingerprint
A directory is only ever visible under its final name once it is complete.

Under FSDP2 (any module sharded) the weights and optimizer states are written with PyTorch's
Distributed Checkpoint instead (`dcp/`: every rank writes its own shards, through
`get_model_state_dict` / `get_optimizer_state_dict`, so the names are parameter FQNs). Ranks write into
a temp dir that rank 0 renames after a barrier (the commit). Loading reshards: a checkpoint saved by 2
ranks resumes on 1 (plain model, full tensors) or on 2 (shards).
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from chatforge.core.distributed import DistInfo, barrier, is_sharded
from chatforge.core.io import UserError, atomic_dir

_STEP_DIR = re.compile(r"^step-(\d+)$")


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    if not ckpt_root.exists():
        return []
    out = []
    for p in ckpt_root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / "meta.json").exists():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    cks = list_checkpoints(ckpt_root)
    return cks[-1][1] if cks else None


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    modules: dict[str, torch.nn.Module],
    stateful: dict[str, Any],
    meta: dict,
    info: DistInfo,
    keep: int = 2,
) -> Path | None:
    """Save on rank 0 (gathering every rank's RNG state first); all ranks must call this."""
    rng = rng_state()
    if info.enabled:
        rngs: list[Any] = [None] * info.world_size
        torch.distributed.all_gather_object(rngs, rng)
    else:
        rngs = [rng]
    if any(is_sharded(m) for m in modules.values()):
        return _save_dcp(ckpt_root, step, modules, stateful, meta, info, keep, rngs)
    final = ckpt_root / f"step-{step}"
    if info.is_main:
        with atomic_dir(final) as tmp:
            for name, module in modules.items():
                save_model(module, str(tmp / f"{name}.safetensors"))
            torch.save({k: v.state_dict() for k, v in stateful.items()}, tmp / "state.pt")
            for r, s in enumerate(rngs):
                torch.save(s, tmp / f"rng-rank{r}.pt")
            (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=2), encoding="utf-8")
        for _, old in list_checkpoints(ckpt_root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(
    path: Path, modules: dict[str, torch.nn.Module], stateful: dict[str, Any], info: DistInfo, fingerprint: dict
) -> dict:
    """Restore weights, state dicts and this rank's RNG; refuse a checkpoint from another config."""
    meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    theirs = meta.get("fingerprint", {})
    diff = sorted(k for k in set(theirs) | set(fingerprint) if theirs.get(k) != fingerprint.get(k))
    if diff:
        details = ", ".join(f"{k}: checkpoint={theirs.get(k)!r} now={fingerprint.get(k)!r}" for k in diff)
        raise UserError(f"checkpoint {path} was made with another config ({details}); use a new --out or --no-resume")
    dcp_optims = meta.get("optimizers", {}) if meta.get("format") == "dcp" else {}
    if meta.get("format") == "dcp":
        _load_dcp(path, modules, stateful, meta)  # weights and optimizer states, resharded
    elif any(is_sharded(m) for m in modules.values()):
        raise UserError(f"checkpoint {path} was written without FSDP2 (train.strategy single or ddp); resume it with "
                        "that strategy, or start a new --out")
    else:
        for name, module in modules.items():
            f = path / f"{name}.safetensors"
            if not f.exists():
                raise UserError(f"checkpoint {path} has no weights for '{name}'")
            load_model(module, str(f))
    state = torch.load(path / "state.pt", weights_only=False)
    for k, obj in stateful.items():
        if k in dcp_optims:
            continue
        if k not in state:
            raise UserError(f"checkpoint {path} has no state for '{k}'")
        obj.load_state_dict(state[k])
    rng_file = path / f"rng-rank{info.rank}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return meta


# ----------------------------------------------------------------------------- FSDP2: Distributed Checkpoint


def _owner(opt: torch.optim.Optimizer, modules: dict[str, torch.nn.Module]) -> str:
    """The module whose parameters `opt` updates."""
    first = next((p for g in opt.param_groups for p in g["params"]), None)
    for name, m in modules.items():
        if first is not None and any(p is first for p in m.parameters()):
            return name
    raise UserError("an optimizer in the checkpoint updates none of the checkpointed modules")


def _dcp_state(modules: dict[str, torch.nn.Module], optims: dict[str, tuple[str, torch.optim.Optimizer]]) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    sd: dict[str, Any] = {f"model.{n}": get_model_state_dict(m) for n, m in modules.items()}
    for k, (owner, opt) in optims.items():
        sd[f"optim.{k}"] = get_optimizer_state_dict(modules[owner], opt)
    return sd


def _save_dcp(ckpt_root: Path, step: int, modules: dict[str, torch.nn.Module], stateful: dict[str, Any], meta: dict,
              info: DistInfo, keep: int, rngs: list[Any]) -> Path:
    import torch.distributed.checkpoint as dcp

    final, tmp = ckpt_root / f"step-{step}", ckpt_root / f".step-{step}.tmp"
    optims = {k: (_owner(v, modules), v) for k, v in stateful.items() if isinstance(v, torch.optim.Optimizer)}
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    dcp.save(_dcp_state(modules, optims), checkpoint_id=str(tmp / "dcp"))  # each rank its shards
    barrier()
    if info.is_main:
        torch.save({k: v.state_dict() for k, v in stateful.items() if k not in optims}, tmp / "state.pt")
        for r, s in enumerate(rngs):
            torch.save(s, tmp / f"rng-rank{r}.pt")
        (tmp / "meta.json").write_text(json.dumps({"step": step, "format": "dcp", "world_size": info.world_size,
                                                   "optimizers": {k: o for k, (o, _) in optims.items()}, **meta},
                                                  indent=2), encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        tmp.replace(final)  # the commit: the step dir appears complete or not at all
        for _, old in list_checkpoints(ckpt_root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def _load_dcp(path: Path, modules: dict[str, torch.nn.Module], stateful: dict[str, Any], meta: dict) -> None:
    """Load weights and optimizer states from `dcp/`, resharding to this launch's world size."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    optims = {}
    for k, owner in meta.get("optimizers", {}).items():
        if k not in stateful or owner not in modules:
            raise UserError(f"checkpoint {path} has optimizer '{k}' for module '{owner}', which this run does not have")
        optims[k] = (owner, stateful[k])
    sd = _dcp_state(modules, optims)
    dcp.load(sd, checkpoint_id=str(path / "dcp"))
    for n, m in modules.items():
        set_model_state_dict(m, sd[f"model.{n}"])
    for k, (owner, opt) in optims.items():
        set_optimizer_state_dict(modules[owner], opt, sd[f"optim.{k}"])
