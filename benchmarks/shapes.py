"""Benchmark registry: MoE layer shapes, router shapes, routing distributions, and the case
tensors built from them (deterministic by seed).

Shapes come in two sizes per model family: the full size (GPU, bf16) and a CPU-sized variant
that runs in seconds on 2 cores (fp32).  ``olmoe-cpu`` is the CPU performance-target shape
(E=64, k=8, H=512, I=256, T=4096).

Routing distributions (:data:`ROUTINGS`):

- ``uniform``: every token picks k distinct experts uniformly at random.
- ``skewed``: k distinct experts drawn without replacement with Zipf-like probabilities
  ``p_e ~ 1 / rank(e)^1.2`` over a seeded random ranking of the experts (Gumbel-top-k).
- ``merged``: the FLUX setting.  Uniform top-k over the E original experts; E/4 of them (16 of
  64) are *tuning* experts, each its own trainable group; the other 3E/4 (48 of 64) are merged
  into E/16 (4) *frozen* groups passed as a second weight stack that does not require grad.
  The baselines (per-expert loop, grouped_mm) run the same routing *unmerged*: all E experts,
  all trainable, which is what one would run without FLUX.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache

import torch
from torch import Tensor


@dataclass(frozen=True)
class MoEShape:
    """One MoE layer: E experts, top-k routing, hidden H, expert intermediate I, T tokens."""

    name: str
    E: int
    k: int
    H: int
    I: int  # noqa: E741 (the usual name of the intermediate size)
    T: int
    family: str
    size: str  # "cpu" (CPU-sized variant) or "full" (GPU size)

    @property
    def slots(self) -> int:
        return self.T * self.k

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RouteShape:
    """One router: T tokens of hidden H routed over E experts, top-k."""

    name: str
    T: int
    H: int
    E: int
    k: int
    size: str

    def as_dict(self) -> dict:
        return asdict(self)


MOE_SHAPES: dict[str, MoEShape] = {
    s.name: s
    for s in (
        # Full sizes (GPU, bf16).
        MoEShape("mixtral", E=8, k=2, H=4096, I=14336, T=8192, family="mixtral", size="full"),
        MoEShape("deepseek-moe", E=64, k=6, H=2048, I=1408, T=16384, family="deepseek-moe", size="full"),
        MoEShape("olmoe", E=64, k=8, H=2048, I=1024, T=8192, family="olmoe", size="full"),
        # CPU-sized variants (fp32, 2 cores): same E and k, smaller H, I, T.
        MoEShape("mixtral-cpu", E=8, k=2, H=512, I=1792, T=1024, family="mixtral", size="cpu"),
        MoEShape("deepseek-moe-cpu", E=64, k=6, H=256, I=176, T=2048, family="deepseek-moe", size="cpu"),
        MoEShape("olmoe-cpu", E=64, k=8, H=512, I=256, T=4096, family="olmoe", size="cpu"),
    )
}

# Router shapes: each MoE shape's (T, H, E, k), plus a wide router (E=128) with many tokens.
ROUTE_SHAPES: dict[str, RouteShape] = {
    **{
        s.name: RouteShape(s.name, T=s.T, H=s.H, E=s.E, k=s.k, size=s.size)
        for s in MOE_SHAPES.values()
    },
    "router-e128": RouteShape("router-e128", T=65536, H=2048, E=128, k=8, size="full"),
    "router-e128-cpu": RouteShape("router-e128-cpu", T=16384, H=256, E=128, k=8, size="cpu"),
}

ROUTINGS = ("uniform", "skewed", "merged")
PASSES = ("fwd", "fwd+bwd")
# Router gate formats: (bits, group_size); bits 0 = dense gate in x.dtype.
GATES = {"int4-g64": (4, 64), "int8-g64": (8, 64), "dense": (0, 0)}

ZIPF_EXPONENT = 1.2


def moe_shapes(size: str) -> list[MoEShape]:
    return [s for s in MOE_SHAPES.values() if s.size == size]


def route_shapes(size: str) -> list[RouteShape]:
    return [s for s in ROUTE_SHAPES.values() if s.size == size]


# ----------------------------------------------------------------------------- routing


@dataclass
class Routing:
    """Routing of one batch: which experts each token uses, and how experts map to groups.

    ``expert_to_group`` int32 [E]; groups [0, n_tune) are trainable (one per tuning expert in
    the merged setting), groups [n_tune, num_groups) are frozen merged groups.
    """

    kind: str
    topk_ids: Tensor  # int32 [T, k]
    topk_weights: Tensor  # fp32 [T, k]
    expert_to_group: Tensor  # int32 [E]
    num_groups: int
    n_tune: int  # trainable groups (= num_groups unless merged)
    tune_experts: Tensor  # int64 [n_tune]: the expert of each trainable group
    stats: dict = field(default_factory=dict)


def merged_layout(num_experts: int, gen: torch.Generator) -> tuple[Tensor, int, int, Tensor]:
    """(expert_to_group int32 [E], G, n_tune, tune_experts): E/4 tuning experts (own groups,
    numbered first), the rest merged round-robin into E/16 frozen groups."""
    n_tune = max(1, num_experts // 4)
    n_frozen = max(1, num_experts // 16)
    if n_tune >= num_experts:  # E = 1: nothing to merge
        return torch.zeros(1, dtype=torch.int32), 1, 1, torch.zeros(1, dtype=torch.long)
    perm = torch.randperm(num_experts, generator=gen)
    tune_experts = perm[:n_tune].sort().values
    rest = perm[n_tune:].sort().values
    e2g = torch.empty(num_experts, dtype=torch.int32)
    e2g[tune_experts] = torch.arange(n_tune, dtype=torch.int32)
    e2g[rest] = n_tune + (torch.arange(rest.numel(), dtype=torch.int32) % n_frozen)
    return e2g, n_tune + n_frozen, n_tune, tune_experts


def make_routing(kind: str, tokens: int, num_experts: int, k: int, seed: int = 0) -> Routing:
    """A deterministic routing of ``tokens`` tokens (CPU tensors)."""
    if kind not in ROUTINGS:
        raise ValueError(f"routing must be one of {ROUTINGS}, got {kind!r}")
    gen = torch.Generator().manual_seed(seed)
    if kind == "skewed":
        rank = torch.randperm(num_experts, generator=gen).double() + 1
        log_p = -ZIPF_EXPONENT * rank.log()
        gumbel = -torch.empty(tokens, num_experts, dtype=torch.float64).exponential_(generator=gen).log()
        ids = (log_p + gumbel).topk(k, dim=1).indices  # k draws without replacement, prob ~ p
    else:
        ids = torch.rand(tokens, num_experts, generator=gen).topk(k, dim=1).indices
    weights = torch.rand(tokens, k, generator=gen) + 0.1
    weights = weights / weights.sum(dim=1, keepdim=True)
    if kind == "merged":
        e2g, groups, n_tune, tune_experts = merged_layout(num_experts, gen)
    else:
        e2g, groups, n_tune = torch.arange(num_experts, dtype=torch.int32), num_experts, num_experts
        tune_experts = torch.arange(num_experts)
    ids = ids.to(torch.int32).contiguous()
    counts = torch.bincount(ids.flatten().long(), minlength=num_experts)
    gids = e2g.long()[ids.long()]
    primary = torch.stack([(gids[:, j : j + 1] != gids[:, :j]).all(dim=1) for j in range(k)], dim=1)
    pairs = int(primary.sum())
    trainable_pairs = int((primary & (gids < n_tune)).sum())
    stats = {
        "max_expert_load_over_mean": round(float(counts.max()) / max(1e-9, float(counts.float().mean())), 3),
        "empty_experts": int((counts == 0).sum()),
        "pairs": pairs,  # (token, group) pairs after de-duplication
        "trainable_pairs": trainable_pairs,  # pairs whose group is trainable
        "num_groups": groups,
        "trainable_groups": n_tune,
    }
    return Routing(kind, ids, weights.contiguous(), e2g, groups, n_tune, tune_experts, stats)


# ----------------------------------------------------------------------------- case tensors


@dataclass
class MoECase:
    """Tensors of one (shape, routing) benchmark case, on the target device and dtype.

    ``gate_up``/``down`` [E, ...] are the per-expert weights the unmerged baselines use;
    ``stacks_gate_up``/``stacks_down`` are the weight stacks flux gets (one stack of E groups,
    or [trainable tuning groups, frozen merged groups] in the merged setting).
    """

    shape: MoEShape
    routing: Routing
    dtype: torch.dtype
    device: torch.device
    x: Tensor
    topk_ids: Tensor
    topk_weights: Tensor
    expert_to_group: Tensor
    gate_up: Tensor  # [E, 2I, H]
    down: Tensor  # [E, H, I]
    stacks_gate_up: list[Tensor]
    stacks_down: list[Tensor]
    grad_y: Tensor  # [T, H]

    @property
    def merged(self) -> bool:
        return len(self.stacks_gate_up) > 1

    def expanded_weights(self) -> tuple[Tensor, Tensor]:
        """[E, 2I, H], [E, H, I]: each expert's weights = its group's (the merged model,
        unmerged), for checking flux against a per-expert computation."""
        e2g = self.expert_to_group.long()
        with torch.no_grad():
            return torch.cat(self.stacks_gate_up)[e2g], torch.cat(self.stacks_down)[e2g]


def build_moe_case(shape: MoEShape, routing_kind: str, dtype: torch.dtype, device, seed: int = 0) -> MoECase:
    device = torch.device(device)
    routing = make_routing(routing_kind, shape.T, shape.E, shape.k, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(shape.T, shape.H, generator=gen)
    gate_up = torch.randn(shape.E, 2 * shape.I, shape.H, generator=gen) / math.sqrt(shape.H)
    down = torch.randn(shape.E, shape.H, shape.I, generator=gen) / math.sqrt(shape.I)
    grad_y = torch.randn(shape.T, shape.H, generator=gen)

    def to(t: Tensor, dt: torch.dtype = dtype) -> Tensor:
        return t.to(device=device, dtype=dt).contiguous()

    if routing_kind == "merged":
        e2g = routing.expert_to_group.long()
        groups_gu, groups_dn = [], []
        for g in range(routing.num_groups):  # merged group = mean of its members
            members = (e2g == g).nonzero().flatten()
            groups_gu.append(gate_up[members].mean(0))
            groups_dn.append(down[members].mean(0))
        gu, dn = torch.stack(groups_gu), torch.stack(groups_dn)
        n = routing.n_tune
        stacks_gate_up = [to(gu[:n]), to(gu[n:])]
        stacks_down = [to(dn[:n]), to(dn[n:])]
        full_gu, full_dn = to(gate_up), to(down)
    else:
        full_gu, full_dn = to(gate_up), to(down)
        stacks_gate_up, stacks_down = [full_gu], [full_dn]
    case = MoECase(
        shape=shape,
        routing=routing,
        dtype=dtype,
        device=device,
        x=to(x),
        topk_ids=routing.topk_ids.to(device),
        topk_weights=to(routing.topk_weights, torch.float32),
        expert_to_group=routing.expert_to_group.to(device),
        gate_up=full_gu,
        down=full_dn,
        stacks_gate_up=stacks_gate_up,
        stacks_down=stacks_down,
        grad_y=to(grad_y),
    )
    # Leaves of fwd+bwd: x, the routing weights and the trainable weights; the frozen stack of
    # the merged setting stays without grad.  (Forward-only passes run under no_grad.)
    for t in (case.x, case.topk_weights, case.gate_up, case.down, case.stacks_gate_up[0], case.stacks_down[0]):
        t.requires_grad_(True)
    return case


@lru_cache(maxsize=1)
def cached_moe_case(shape_name: str, routing_kind: str, dtype: torch.dtype, device: str, seed: int = 0) -> MoECase:
    """The last case built (the tests run the providers of one case in a row)."""
    return build_moe_case(MOE_SHAPES[shape_name], routing_kind, dtype, device, seed)


@dataclass
class RouteCase:
    shape: RouteShape
    gate_name: str
    dtype: torch.dtype
    device: torch.device
    x: Tensor  # [T, H]
    gate_dense: Tensor  # [E, H] fp32 (the dequantized gate when quantized)
    gate: object  # QuantizedTensor or a dense [E, H] tensor in x.dtype
    bits: int
    group_size: int


def build_route_case(shape: RouteShape, gate_name: str, dtype: torch.dtype, device, seed: int = 0) -> RouteCase:
    import flux.ops as ops

    device = torch.device(device)
    bits, group_size = GATES[gate_name]
    gen = torch.Generator().manual_seed(seed + 2)
    x = torch.randn(shape.T, shape.H, generator=gen).to(device=device, dtype=dtype)
    w = (torch.randn(shape.E, shape.H, generator=gen) / math.sqrt(shape.H)).to(device)
    if bits:
        with ops.use_backend("reference"):  # set-up only: the same bytes whichever backend runs
            gate = ops.quantize(w, bits=bits, group_size=group_size)
            gate_dense = gate.dequantize(torch.float32)
    else:
        gate = w.to(dtype).contiguous()
        gate_dense = gate.float()
    return RouteCase(shape, gate_name, dtype, device, x, gate_dense, gate, bits, group_size)


@lru_cache(maxsize=1)
def cached_route_case(shape_name: str, gate_name: str, dtype: torch.dtype, device: str, seed: int = 0) -> RouteCase:
    return build_route_case(ROUTE_SHAPES[shape_name], gate_name, dtype, device, seed)
