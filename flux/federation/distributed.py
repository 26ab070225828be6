"""Process layout: one process without a process group, W spawned local ranks, or torchrun.

``torch.distributed`` carries the run's objects (updates, profiles, the evaluation result) as
pickle-free payloads (:mod:`flux.federation.wire`: a typed header plus raw tensor bytes, decoded
with checks): a rank can send garbage but never code.  gloo on CPU, NCCL when the ranks drive
GPUs.  A rank that dies makes the others' next collective fail after ``rank_timeout_s`` instead
of hanging; the runner turns that into a clear error.
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


def _multi_rank(group: Any = None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _wire_device(group: Any = None) -> torch.device:
    """Where collective buffers must live: the current GPU for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_payloads(payload: bytes, group: Any = None) -> list[bytes]:
    """Every rank's byte string (any lengths), in rank order."""
    if not _multi_rank(group):
        return [payload]
    device = _wire_device(group)
    world = dist.get_world_size(group)
    size = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    lengths = [int(x.item()) for x in sizes]
    buf = torch.zeros(max(lengths), dtype=torch.uint8, device=device)
    if payload:
        buf[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device)
    parts = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(parts, buf, group=group)
    return [p[:n].cpu().numpy().tobytes() for p, n in zip(parts, lengths)]


def all_gather_objects(obj: Any, group: Any = None) -> list[Any]:
    """Every rank's ``obj`` (pickle-free, :func:`flux.federation.wire.encode`), in rank order.

    A rank whose payload does not decode yields the :class:`~flux.federation.wire.WireError`
    instance in its place (the caller decides: reject that rank's contribution or fail)."""
    from flux.federation.wire import WireError, decode, encode

    if not _multi_rank(group):
        return [obj]
    out: list[Any] = []
    for rank, payload in enumerate(all_gather_payloads(encode(obj), group)):
        try:
            out.append(decode(payload))
        except WireError as exc:
            out.append(WireError(f"rank {rank}: {exc}"))
    return out


def all_gather_dict(local: dict) -> dict:
    """Union of every rank's dict (keys must not collide); a payload that does not decode is an
    error naming its rank."""
    from flux.federation.wire import WireError

    out: dict = {}
    for part in all_gather_objects(dict(local)):
        if isinstance(part, WireError):
            raise part
        if not isinstance(part, dict):
            raise WireError(f"expected a dict from every rank, got a {type(part).__name__}")
        out.update(part)
    return out


def broadcast(obj: Any, src: int = 0, group: Any = None) -> Any:
    """``obj`` from rank ``src`` on every rank (pickle-free; identity without a process group)."""
    from flux.federation.wire import decode, encode

    if not _multi_rank(group):
        return obj
    device = _wire_device(group)
    payload = encode(obj) if dist.get_rank(group) == src else b""
    size = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    dist.broadcast(size, src=src, group=group)
    buf = torch.zeros(int(size.item()), dtype=torch.uint8, device=device)
    if payload:
        buf.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device))
    dist.broadcast(buf, src=src, group=group)
    return obj if dist.get_rank(group) == src else decode(buf.cpu())


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
