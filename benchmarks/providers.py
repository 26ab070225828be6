"""Providers: for one case and pass, a :class:`Bench` holding the callable to time and the work
it does.

MoE layer (``merged_moe`` cases):

- ``loop``: per-expert Python loop, exactly transformers' eager experts (one-hot mask, index the
  tokens of each hit expert, SwiGLU, ``index_add_``).
- ``grouped_mm``: transformers' ``grouped_mm`` experts path (sort slots by expert, histc counts,
  int32 cumsum offsets, two ``torch.nn.functional.grouped_mm`` calls, weight, un-permute, sum).
- ``floor``: the dense-matmul floor: one dense SwiGLU MLP over N = T*k rows with the same H and
  I (no routing, no gathers), fwd+bwd by autograd.
- ``flux:<backend>``: ``flux.ops.merged_moe`` with that backend forced (``flux:auto`` = the
  automatic choice, listed on CUDA only).

The baselines always run the *unmerged* layer (E experts, all trainable); in the ``merged``
routing flux gets the FLUX setting (trainable tuning groups + frozen merged groups).

Router (``route_profile`` cases):

- ``unfused``: the plain torch chain (dequantize, matmul, softmax, topk, bincount).
- ``flux:<backend>``: ``flux.ops.route_profile`` with that backend forced.

Passes: ``fwd`` runs under ``torch.no_grad()``; ``fwd+bwd`` clears the leaves' ``.grad``, runs
the forward with grad and ``y.backward(grad_y)`` (x, topk_weights and the trainable weights
require grad, a frozen stack does not).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

import flux.ops as ops
from flux.ops import backends as flux_backends
from benchmarks.shapes import MoECase, RouteCase
from benchmarks.timing import moe_flops, route_bytes

MOE_BASELINES = ("loop", "grouped_mm", "floor")
ROUTE_BASELINES = ("unfused",)
FLUX_BACKENDS = tuple(flux_backends.BACKENDS)  # reference, cpp, cuda, triton


class Skip(Exception):
    """A provider that cannot run this case here (the message says why)."""


@dataclass
class Bench:
    fn: Callable[[], object]  # one timed call
    flops: int | None = None
    bytes: int | None = None
    # After one call of fn (given its return value): named tensors to check for correctness.
    results: Callable[[object], dict[str, Tensor]] | None = None


def moe_providers(device_type: str) -> list[str]:
    names = list(MOE_BASELINES) + [f"flux:{b}" for b in FLUX_BACKENDS]
    return names + (["flux:auto"] if device_type == "cuda" else [])


def route_providers(device_type: str) -> list[str]:
    names = list(ROUTE_BASELINES) + [f"flux:{b}" for b in FLUX_BACKENDS]
    return names + (["flux:auto"] if device_type == "cuda" else [])


def rel_err(a: Tensor, ref: Tensor) -> float:
    """Relative Frobenius error of ``a`` against ``ref`` (fp32 on the tensors' device: full-size
    weight grads would not fit in host memory as fp64)."""
    a, ref = a.detach().float(), ref.detach().float().to(a.device)
    denom = ref.norm().item()
    diff = (a - ref).norm().item()
    return diff / denom if denom > 0 else diff


# ----------------------------------------------------------------------------- flux backends

MOE_OPS = {"fwd": ("moe_routing", "merged_moe_fwd"), "fwd+bwd": ("moe_routing", "merged_moe_fwd", "merged_moe_bwd")}
ROUTE_OPS = ("route_profile",)


def backend_unavailable(backend: str, op_names: tuple[str, ...], device_type: str) -> str | None:
    """None if flux backend ``backend`` runs every op of ``op_names`` on ``device_type``, else why not."""
    if backend == "auto":
        return None if device_type == "cuda" else "flux:auto is listed on CUDA only (on CPU it is flux:cpp)"
    state = flux_backends.availability()[backend]
    if state != "available":
        return state
    if backend == "triton" and device_type == "cpu":
        return "Triton on CPU runs only in the interpreter (TRITON_INTERPRET=1): a correctness tool, not timed"
    module = flux_backends._load(backend)
    for op in op_names:
        if not flux_backends._supports(module, op, device_type):
            return f"backend {backend!r} has no {op} kernel for {device_type} tensors"
    return None


@contextlib.contextmanager
def forced_backend(backend: str) -> Iterator[None]:
    """Force ``backend`` (``auto``: the automatic choice) for the block.

    ``flux.ops.use_backend`` is thread-local, and autograd runs CUDA backward nodes on its own
    device threads, so the choice is also put into ``FLUX_BACKEND`` for the duration: the
    backward of a forced forward must run the same backend.
    """
    name = None if backend == "auto" else backend
    previous = os.environ.pop("FLUX_BACKEND", None)
    if name is not None:
        os.environ["FLUX_BACKEND"] = name
    try:
        with ops.use_backend(name):
            yield
    finally:
        os.environ.pop("FLUX_BACKEND", None)
        if previous is not None:
            os.environ["FLUX_BACKEND"] = previous


# ----------------------------------------------------------------------------- MoE baselines


def eager_experts(x: Tensor, topk_ids: Tensor, topk_weights: Tensor, gate_up: Tensor, down: Tensor) -> Tensor:
    """transformers' eager experts forward (transformers/integrations/moe.py), SwiGLU."""
    num_experts = gate_up.shape[0]
    final = torch.zeros_like(x)
    with torch.no_grad():
        expert_mask = F.one_hot(topk_ids.long(), num_classes=num_experts + 1).permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    for expert_idx in expert_hit:
        expert_idx = expert_idx[0]
        if expert_idx == num_experts:
            continue
        top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
        current = x[token_idx]
        gate, up = F.linear(current, gate_up[expert_idx]).chunk(2, dim=-1)
        current = F.silu(gate) * up
        current = F.linear(current, down[expert_idx])
        current = current * topk_weights[token_idx, top_k_pos, None]
        final.index_add_(0, token_idx, current.to(final.dtype))
    return final


def grouped_mm_experts(x: Tensor, topk_ids: Tensor, topk_weights: Tensor, gate_up: Tensor, down: Tensor) -> Tensor:
    """transformers' grouped_mm experts forward (transformers/integrations/moe.py), SwiGLU,
    no bias, no expert parallelism."""
    num_experts = gate_up.shape[0]
    num_tokens, top_k = topk_ids.shape
    hidden = x.shape[-1]
    sample_weights = topk_weights.reshape(-1)
    expert_ids = topk_ids.reshape(-1)
    expert_ids_g, perm = torch.sort(expert_ids)
    selected = x[perm // top_k]
    sample_weights_g = sample_weights[perm]
    histc_input = expert_ids_g.float() if x.device.type in ("cpu", "mps") else expert_ids_g.int()
    tokens_per_expert = torch.histc(histc_input, bins=num_experts, min=0, max=num_experts - 1)
    offsets = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)
    proj = F.grouped_mm(selected.to(gate_up.dtype), gate_up.transpose(-2, -1), offs=offsets)
    gate, up = proj.chunk(2, dim=-1)
    proj = F.silu(gate) * up
    proj = F.grouped_mm(proj, down.transpose(-2, -1), offs=offsets)
    weighted = proj * sample_weights_g.unsqueeze(-1)
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.size(0), device=x.device)
    weighted = weighted[inv_perm]
    return weighted.view(num_tokens, top_k, hidden).sum(dim=1).to(x.dtype)


def grouped_mm_unsupported(x: Tensor, gate_up: Tensor, down: Tensor) -> str | None:
    """Why F.grouped_mm cannot run these operands here (None if it can)."""
    if not hasattr(F, "grouped_mm"):
        return f"torch {torch.__version__} has no torch.nn.functional.grouped_mm"
    if x.device.type == "cpu":
        elt = x.element_size()
        inter, hidden = down.shape[2], down.shape[1]
        if (hidden * elt) % 16 or (inter * elt) % 16:
            return f"F.grouped_mm on CPU needs rows that are multiples of 16 bytes (H={hidden}, I={inter}, {x.dtype})"
        if any(t.data_ptr() % 16 for t in (x, gate_up, down)):
            return "F.grouped_mm on CPU needs 16-byte aligned operands"
    if x.device.type == "cuda":
        if torch.cuda.get_device_capability(x.device) < (8, 0):
            return "F.grouped_mm on CUDA needs SM80+"
    return None


def _clear(leaves: tuple[Tensor, ...]) -> None:
    for t in leaves:
        t.grad = None


def _make_pass(forward: Callable[[], Tensor], pass_: str, leaves: tuple[Tensor, ...], grad_y: Tensor,
               context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> Callable[[], Tensor]:
    if pass_ == "fwd":
        def fwd() -> Tensor:
            with context(), torch.no_grad():
                return forward()
        return fwd

    def fwd_bwd() -> Tensor:
        _clear(leaves)
        with context():
            y = forward()
            y.backward(grad_y)
        return y

    return fwd_bwd


def _moe_results(pass_: str, x: Tensor, weights: Tensor, gate_up: Tensor, down: Tensor, rows: Tensor | None):
    """Named outputs after a call: y, and in fwd+bwd the grads of x, the routing weights and the
    trainable weights (``rows``: the experts/groups whose weight grads are compared)."""

    def results(y: Tensor) -> dict[str, Tensor]:
        out = {"y": y.detach()}
        if pass_ == "fwd+bwd":
            out["grad_x"] = x.grad
            out["grad_topk_weights"] = weights.grad
            out["grad_gate_up"] = gate_up.grad if rows is None else gate_up.grad[rows]
            out["grad_down"] = down.grad if rows is None else down.grad[rows]
        return out

    return results


def build_moe(provider: str, case: MoECase, pass_: str) -> Bench:
    """The :class:`Bench` of ``provider`` on ``case`` (raises :class:`Skip` with the reason)."""
    shape, routing = case.shape, case.routing
    x, ids, tw = case.x, case.topk_ids, case.topk_weights
    slots = shape.T * shape.k
    if provider in ("loop", "grouped_mm"):
        gate_up, down = case.gate_up, case.down
        if provider == "grouped_mm":
            why = grouped_mm_unsupported(x, gate_up, down)
            if why:
                raise Skip(why)
            impl = grouped_mm_experts
        else:
            impl = eager_experts
        leaves = (x, tw, gate_up, down)
        fn = _make_pass(lambda: impl(x, ids, tw, gate_up, down), pass_, leaves, case.grad_y)
        rows = case.routing.tune_experts.to(x.device) if case.merged else None
        return Bench(fn, flops=moe_flops(pass_, slots, slots, shape.H, shape.I),
                     results=_moe_results(pass_, x, tw, gate_up, down, rows))
    if provider == "floor":
        return _build_floor(case, pass_)
    if provider.startswith("flux:"):
        backend = provider.split(":", 1)[1]
        why = backend_unavailable(backend, MOE_OPS[pass_], x.device.type)
        if why:
            raise Skip(why)
        gu, dn, e2g = case.stacks_gate_up, case.stacks_down, case.expert_to_group
        leaves = (x, tw, gu[0], dn[0])

        def forward() -> Tensor:
            return ops.merged_moe(x, ids, tw, gu, dn, e2g)

        fn = _make_pass(forward, pass_, leaves, case.grad_y, lambda: forced_backend(backend))
        flops = moe_flops(pass_, routing.stats["pairs"], routing.stats["trainable_pairs"], shape.H, shape.I)
        return Bench(fn, flops=flops, results=_moe_results(pass_, x, tw, gu[0], dn[0], None))
    raise ValueError(f"unknown MoE provider {provider!r}")


def _build_floor(case: MoECase, pass_: str) -> Bench:
    """Dense SwiGLU MLP over N = T*k rows (same H, I): the matmul floor of the layer."""
    shape = case.shape
    slots = shape.T * shape.k
    with torch.no_grad():
        rows = case.x.detach().repeat_interleave(shape.k, dim=0).requires_grad_(pass_ == "fwd+bwd")
        w1 = case.gate_up[0].detach().clone().requires_grad_(pass_ == "fwd+bwd")  # [2I, H]
        w2 = case.down[0].detach().clone().requires_grad_(pass_ == "fwd+bwd")  # [H, I]
        grad = case.grad_y.repeat_interleave(shape.k, dim=0)

    def forward() -> Tensor:
        gate, up = F.linear(rows, w1).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, w2)

    fn = _make_pass(forward, pass_, (rows, w1, w2), grad)
    return Bench(fn, flops=moe_flops(pass_, slots, slots, shape.H, shape.I))


def moe_expected(case: MoECase, pass_: str) -> dict[str, Tensor]:
    """What flux must produce on ``case`` (fp32): transformers' grouped_mm path (or the eager
    loop where grouped_mm cannot run) over the per-expert weights of the merged model, with the
    weight grads taken at the trainable experts (one per trainable group)."""
    with torch.no_grad():
        gu_exp, dn_exp = case.expanded_weights()
        x = case.x.detach().float().clone().requires_grad_()
        tw = case.topk_weights.detach().float().clone().requires_grad_()
        gu = gu_exp.float().contiguous().requires_grad_()
        dn = dn_exp.float().contiguous().requires_grad_()
    # fp32 grouped_mm is a CPU path; on CUDA (bf16-only grouped GEMMs) the eager loop is the oracle.
    use_grouped = x.device.type == "cpu" and grouped_mm_unsupported(x, gu, dn) is None
    impl = grouped_mm_experts if use_grouped else eager_experts
    fn = _make_pass(lambda: impl(x, case.topk_ids, tw, gu, dn), pass_, (x, tw, gu, dn), case.grad_y.float())
    rows = case.routing.tune_experts.to(x.device)
    return _moe_results(pass_, x, tw, gu, dn, rows)(fn())


# ----------------------------------------------------------------------------- router


def dequantize_torch(qdata: Tensor, scales: Tensor, bits: int, group_size: int, cols: int) -> Tensor:
    """Plain-torch dequantization of an int4 (packed) / int8 [R, C] weight to fp32."""
    if bits == 4:
        low = (qdata & 0x0F).to(torch.int8) - 8
        high = (qdata >> 4).to(torch.int8) - 8
        q = torch.stack((low, high), dim=-1).view(qdata.shape[0], -1)[:, :cols]
    else:
        q = qdata
    return q.float() * scales.repeat_interleave(group_size, dim=1)[:, :cols]


def unfused_route(x: Tensor, case: RouteCase, top_k: int, counts: Tensor) -> tuple[Tensor, Tensor]:
    """The unfused torch chain: dequantize, matmul, softmax, topk, bincount."""
    gate = case.gate
    if case.bits:
        w = dequantize_torch(gate.qdata, gate.scales, case.bits, case.group_size, case.shape.H)
    else:
        w = gate.float()
    logits = x.float() @ w.t()
    probs = logits.softmax(dim=-1)
    weights, ids = probs.topk(top_k, dim=-1)
    counts += torch.bincount(ids.flatten(), minlength=counts.numel())
    return weights, ids.to(torch.int32)


def build_route(provider: str, case: RouteCase) -> Bench:
    shape, x = case.shape, case.x
    counts = torch.zeros(shape.E, dtype=torch.int64, device=x.device)
    gate_bytes = case.gate.nbytes if case.bits else case.gate.numel() * case.gate.element_size()
    nbytes = route_bytes(shape.T, shape.H, shape.E, shape.k, x.element_size(), gate_bytes)
    flops = 2 * shape.T * shape.H * shape.E  # the gate matmul

    def results(out) -> dict[str, Tensor]:
        weights, ids = out[0], out[1]
        return {"topk_weights": weights, "topk_ids": ids}

    if provider == "unfused":
        return Bench(lambda: unfused_route(x, case, shape.k, counts), flops=flops, bytes=nbytes, results=results)
    if provider.startswith("flux:"):
        backend = provider.split(":", 1)[1]
        why = backend_unavailable(backend, ROUTE_OPS, x.device.type)
        if why:
            raise Skip(why)

        def fn():
            with forced_backend(backend):
                return ops.route_profile(x, case.gate, shape.k, counts=counts)

        return Bench(fn, flops=flops, bytes=nbytes, results=results)
    raise ValueError(f"unknown route provider {provider!r}")
