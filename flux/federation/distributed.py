"""Process layout: one process without a process group, W spawned local ranks, or torchrun.

``torch.distributed`` is only used for collectives of Python objects (updates, profiles, the
evaluation result): gloo on CPU, NCCL when the ranks drive GPUs.  A rank that dies makes the
others' next collective fail after ``rank_timeout_s`` instead of hanging; the runner turns that
into a clear error.
"""
from __future__ import annotations

import datetime
import os
import socket
from typing import Any, Callable

import torch
import torch.distributed as dist


def under_torchrun() -> bool:
    """torchrun (or any launcher) exported the rendezvous environment."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_group(rank: int, world: int, *, timeout_s: float, device: torch.device, init_method: str | None = None) -> None:
    """Join the default process group (no-op for world 1 or when already initialised)."""
    if world <= 1 or dist.is_initialized():
        return
    kwargs: dict[str, Any] = {"backend": backend_for(device), "rank": rank, "world_size": world,
                              "timeout": datetime.timedelta(seconds=timeout_s)}
    if init_method is not None:
        kwargs["init_method"] = init_method
    if device.type == "cuda":
        kwargs["device_id"] = device
    dist.init_process_group(**kwargs)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank_and_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather_dict(local: dict) -> dict:
    """Union of every rank's dict (keys must not collide)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return dict(local)
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    out: dict = {}
    for part in parts:
        out.update(part)
    return out


def broadcast(obj: Any, src: int = 0) -> Any:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn: Callable[..., Any], world: int, args: tuple) -> None:
    """Run ``fn(rank, world, init_method, *args)`` in ``world`` fresh processes and wait.

    If any rank fails, the others are terminated and the first failure is re-raised here
    (``torch.multiprocessing`` semantics)."""
    import torch.multiprocessing as mp

    init_method = f"tcp://127.0.0.1:{free_port()}"
    mp.start_processes(fn, args=(world, init_method, *args), nprocs=world, join=True, start_method="spawn")
