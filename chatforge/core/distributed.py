"""torchrun detection and set-up (nanochat's compute_init pattern), without a framework.

Under `torchrun --nproc-per-node N` every process reads RANK / WORLD_SIZE / LOCAL_RANK; on CPU the
gloo backend is used, on GPUs nccl. DDP wraps the model; only rank 0 writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(spec: str = "auto", local_rank: int = 0) -> torch.device:
    if spec == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(spec)


def init_distributed(device: str = "auto") -> DistInfo:
    """Initialise the process group when launched by torchrun; a no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Average a dict of floats across ranks (one collective)."""
    if not info.enabled or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=info.device)  # nccl needs GPU
    dist.all_reduce(t)
    return {k: v / info.world_size for k, v in zip(keys, t.cpu().tolist())}


def all_reduce_sum(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(x)
    return x


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap_ddp(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)


# ----------------------------------------------------------------------------- strategies (single | ddp | fsdp2)


def resolve_strategy(cfg: Any, info: DistInfo) -> str:
    """`train.strategy` for this launch; an impossible choice is a UserError before any work starts."""
    from chatforge.core.io import UserError

    s = cfg.strategy
    if s == "auto":
        s = "ddp" if info.enabled else "single"
    if s in ("ddp", "fsdp2") and not info.enabled:
        raise UserError(f"train.strategy={s} needs several processes; launch with "
                        f"`torchrun --nproc-per-node N -m chatforge.cli ...` or set train.strategy=single")
    if s == "single" and info.enabled:
        raise UserError(f"train.strategy=single under torchrun ({info.world_size} processes) would train "
                        f"{info.world_size} unsynchronised copies; use ddp or fsdp2")
    if cfg.fsdp_cpu_offload and s != "fsdp2":
        raise UserError(f"train.fsdp_cpu_offload needs train.strategy=fsdp2 (got {s})")
    return s


def check_offload_memory(model: torch.nn.Module, cfg: Any, info: DistInfo) -> None:
    """CPU offload keeps this rank's shard of fp32 params, grads and two AdamW moments in host RAM:
    refuse when the host cannot hold it (every local rank shares the same RAM)."""
    from chatforge.core.io import UserError

    if not cfg.fsdp_cpu_offload:
        return
    n = sum(p.numel() for p in model.parameters())
    need = n * 4 * 4 // info.world_size * max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # not POSIX: cannot tell, let it run
        return
    if need > avail:
        raise UserError(f"train.fsdp_cpu_offload needs about {need / 2**30:.1f} GiB of host RAM for the "
                        f"offloaded shards on this node, only {avail / 2**30:.1f} GiB is free; "
                        "turn offload off or use more nodes")


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of an HF causal LM (or of a value/reward model wrapping one)."""
    if getattr(model, "_no_split_modules", None):
        names = set(model._no_split_modules)
        layers = [m for m in model.modules() if type(m).__name__ in names]
        if layers:
            return layers
    for m in model.modules():  # fallback: the first ModuleList of identical blocks
        if isinstance(m, torch.nn.ModuleList) and len(m) and len({type(c) for c in m}) == 1:
            return list(m)
    return []


def fsdp2_shard(model: torch.nn.Module, cfg: Any, info: DistInfo) -> torch.nn.Module:
    """`fully_shard` each decoder layer, then the root (torchtune's shard_model), in place.

    Mixed precision: with dtype=bfloat16 (or auto on a bf16 GPU) params are cast to bf16 for compute,
    gradients are reduced in fp32 and the sharded master weights and AdamW state stay fp32.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    # explicit True: torch's default (None) leaves the root unsharded after forward, so the optimizer's
    # DTensor params would no longer be the module's parameters when a checkpoint is written
    kw: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": True}
    bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and info.device.type == "cuda"
                                       and torch.cuda.is_bf16_supported())
    if bf16:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cfg.fsdp_cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=info.device.type == "cuda")
    for layer in decoder_layers(model):
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model


def wrap_model(model: torch.nn.Module, info: DistInfo, cfg: Any, trainable: bool = True) -> torch.nn.Module:
    """Wrap a model for `train.strategy`: itself (single), DDP, or FSDP2-sharded in place.

    Frozen models (reference, reward) pass trainable=False: under ddp they stay plain replicas, under
    fsdp2 they are sharded too (no gradients, so only the all-gather on forward).
    """
    strategy = resolve_strategy(cfg, info)
    if cfg.activation_checkpointing and trainable and hasattr(model, "gradient_checkpointing_enable"):
        # non-reentrant: works with DDP, FSDP2 and frozen inputs
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if strategy == "fsdp2":
        check_offload_memory(model, cfg, info)
        return fsdp2_shard(model, cfg, info)
    if strategy == "ddp" and trainable:
        return wrap_ddp(model, info)
    return model


def rank_share(items: list, info: DistInfo) -> list:
    """This rank's equal share of `items` (every world_size-th, the remainder dropped): under FSDP2 every
    rank must run the same number of forwards, since each forward all-gathers parameters."""
    whole = len(items) // info.world_size * info.world_size
    return items[:whole][info.rank::info.world_size]


def is_sharded(model: Any) -> bool:
    """True for a model sharded with FSDP2 (`fully_shard`)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, FSDPModule)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole (unsharded) state dict of an FSDP2 model on CPU, on rank 0 (a collective: every rank calls)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def grad_sync(modules: list[Any], sync: bool) -> Any:
    """Skip the gradient all-reduce / reduce-scatter on accumulation micro-batches: DDP's `no_sync`,
    FSDP2's `set_requires_gradient_sync(False)` (re-enabled for the last micro-batch)."""
    import contextlib

    stack = contextlib.ExitStack()
    for m in modules:
        if m is None:
            continue
        if hasattr(m, "set_requires_gradient_sync"):
            m.set_requires_gradient_sync(sync)
        elif not sync and hasattr(m, "no_sync"):
            stack.enter_context(m.no_sync())
    return stack
