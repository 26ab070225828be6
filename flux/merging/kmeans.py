"""PCA features of expert weights and cosine K-Means, fused over all layers.

FLUX clusters each layer's non-tuning experts into B_non(l) groups.  Features are the PCA scores
of the flattened expert weights (all weight matrices of an expert concatenated), clustering uses
cosine distance (spherical K-Means: unit-norm points, centroid = normalised mean).

:func:`fused_kmeans` runs every layer in one batched computation on a padded ``[L, N_max, D]``
tensor.  The paper describes a single K-Means over all experts with cross-layer pairs masked; the
batched layout is the same computation with the block-diagonal mask built in (points only ever
meet centroids of their own layer), and padded points / unused centroid slots are masked out.
:func:`per_layer_kmeans` is the plain per-layer loop.  Both use the same deterministic
initialisation, assignment tie-breaking (lowest centroid index) and empty-cluster repair, so they
return identical assignments (float64 throughout; tested).

Decisions (see docs/techniques.md): PCA dimension 16 by default; init "kmeans++" with a seeded
exponential race (identical in the fused and per-layer code) or deterministic "farthest" point;
at most 50 Lloyd iterations, stopping when no assignment changes; k >= n gives every point its
own cluster (cluster i = point i); an empty cluster takes the point farthest from its centroid
among clusters with more than one point.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

DEFAULT_PCA_DIM = 16
DEFAULT_ITERS = 50
INITS = ("kmeans++", "farthest")

# Column chunk for the Gram matrix: bounds the working copy to ~n * 2^18 values.
_GRAM_CHUNK = 1 << 18


@dataclass
class KMeansResult:
    """Output of :func:`fused_kmeans` / :func:`per_layer_kmeans`.

    Attributes:
        assignments: int64 [L, N_max]; cluster of each point in ``[0, k_l)``, -1 at padding.
        centroids: float64 [L, K_max, D]; unit-norm (or zero) centroids, zero rows beyond k_l.
        iterations: Lloyd iterations run (the maximum over layers).
    """

    assignments: Tensor
    centroids: Tensor
    iterations: int


# --------------------------------------------------------------------------------------------
# PCA features


def pca_features(weights: Tensor | Sequence[Tensor], dim: int = DEFAULT_PCA_DIM, *, center: bool = True) -> Tensor:
    """PCA scores of n experts' flattened weights.

    Args:
        weights: one tensor [n, ...] or several (e.g. ``gate_up[idx]`` [n, 2I, H] and
            ``down[idx]`` [n, H, I]); row i of every tensor belongs to expert i.  Any float dtype.
        dim: number of principal components kept (>= 1); at most n are returned.
        center: subtract the mean expert first (standard PCA).

    Returns:
        float64 [n, min(dim, n)]: scores along the leading components.  Cosine similarities
        between rows do not depend on the eigenvector signs; signs are fixed anyway (largest
        entry of each component positive) for reproducibility.

    Computed from the n x n Gram matrix of the centred weights (cost O(n^2 P) for P weights per
    expert, memory O(n^2) plus a column chunk; fp32 chunk products summed in fp64), which is
    exact up to rounding and much cheaper than an SVD of [n, P] when P >> n.
    """
    tensors = [weights] if isinstance(weights, Tensor) else list(weights)
    if not tensors:
        raise ValueError("pca_features needs at least one weight tensor")
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be an int >= 1, got {dim!r}")
    n = tensors[0].shape[0]
    for t in tensors:
        if t.shape[0] != n:
            raise ValueError(f"all weight tensors need the same expert count, got {[t.shape[0] for t in tensors]}")
    if n == 0:
        return torch.zeros(0, 0, dtype=torch.float64)
    gram = torch.zeros(n, n, dtype=torch.float64)
    with torch.no_grad():
        for t in tensors:
            flat = t.detach().reshape(n, -1)
            # fp32 chunks (fp64 for fp64 input), chunk Grams summed in fp64: the clustering needs
            # no more precision, and an fp64 copy of every expert would double the cost.
            work = torch.float64 if flat.dtype == torch.float64 else torch.float32
            mean = flat.mean(0, dtype=work) if center else None
            for start in range(0, flat.shape[1], _GRAM_CHUNK):
                chunk = flat[:, start:start + _GRAM_CHUNK].to(work)
                if mean is not None:
                    chunk = chunk - mean[start:start + _GRAM_CHUNK]
                gram += (chunk @ chunk.T).double().cpu()
    evals, evecs = torch.linalg.eigh(gram)  # ascending
    keep = min(dim, n)
    evals = evals.flip(0)[:keep].clamp_min(0.0)
    evecs = evecs.flip(1)[:, :keep]
    signs = torch.sign(evecs.gather(0, evecs.abs().argmax(0, keepdim=True)))
    signs[signs == 0] = 1.0
    return evecs * signs * evals.sqrt()


def pad_features(features: Sequence[Tensor], dim: int | None = None) -> tuple[Tensor, Tensor]:
    """Stack per-layer features into the padded layout of :func:`fused_kmeans`.

    Args:
        features: L tensors [n_l, d_l] (n_l may be 0).
        dim: feature width D of the result (default max d_l); narrower rows are zero-padded,
            which leaves cosine similarities unchanged.

    Returns:
        (features float64 [L, N_max, D], mask bool [L, N_max]) with N_max = max n_l.
    """
    feats = list(features)
    n_max = max((f.shape[0] for f in feats), default=0)
    width = max((f.shape[1] for f in feats if f.dim() == 2), default=0) if dim is None else dim
    out = torch.zeros(len(feats), n_max, width, dtype=torch.float64)
    mask = torch.zeros(len(feats), n_max, dtype=torch.bool)
    for l, f in enumerate(feats):
        if f.numel() == 0:
            continue
        if f.dim() != 2 or f.shape[1] > width:
            raise ValueError(f"layer {l}: features must be [n, d] with d <= {width}, got {tuple(f.shape)}")
        out[l, : f.shape[0], : f.shape[1]] = f.double()
        mask[l, : f.shape[0]] = True
    return out, mask


# --------------------------------------------------------------------------------------------
# shared helpers (used identically by the fused and the per-layer code)
#
# Fused and per-layer results must agree bit for bit (a last-bit difference flips a near tie).
# BLAS matmuls do not promise that across shapes, so similarities are an elementwise product
# reduced over the contiguous feature dim (its summation order depends on D only) and centroid
# sums use index_add_ (adds points in index order); both are shape-independent.


def _normalize(x: Tensor) -> Tensor:
    norm = (x * x).sum(-1, keepdim=True).sqrt()
    return torch.where(norm > 0, x / torch.where(norm > 0, norm, torch.ones_like(norm)), torch.zeros_like(x))


def _cos_sim(x: Tensor, c: Tensor) -> Tensor:
    """[..., N, D] x [..., K, D] -> [..., N, K] dot products of unit vectors."""
    return (x.unsqueeze(-2) * c.unsqueeze(-3)).sum(-1)


def _centroids(x: Tensor, assign: Tensor, k: int) -> Tensor:
    """Normalised cluster means: x [N, D] (or [L*N, D] with flat ids), assign [N] in [0, k)."""
    out = torch.zeros(k, x.shape[-1], dtype=x.dtype)
    out.index_add_(0, assign, x)
    return _normalize(out)


def _exp_draws(num_layers: int, k_max: int, n_max: int, seed: int) -> Tensor:
    """Exp(1) draws [L, K_max, N_max] for the k-means++ exponential race (argmax w_i / e_i picks
    i with probability w_i / sum w): elementwise, so batched and per-layer code agree exactly."""
    gen = torch.Generator().manual_seed(int(seed))
    u = torch.rand(num_layers, k_max, n_max, dtype=torch.float64, generator=gen)
    # u < 1 so finite; the clamp keeps a (probability ~1e-16) zero draw from dividing by zero
    return (-torch.log1p(-u)).clamp_min(1e-300)


def _check_inputs(features: Tensor, mask: Tensor, k_per_layer: Sequence[int], iters: int, init: str) -> list[int]:
    if features.dim() != 3:
        raise ValueError(f"features must be [L, N_max, D], got shape {tuple(features.shape)}")
    if mask.shape != features.shape[:2] or mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool {tuple(features.shape[:2])}, got {mask.dtype} {tuple(mask.shape)}")
    ks = [int(k) for k in k_per_layer]
    if len(ks) != features.shape[0]:
        raise ValueError(f"k_per_layer has {len(ks)} entries for {features.shape[0]} layers")
    counts = mask.sum(1).tolist()
    for l, (k, n) in enumerate(zip(ks, counts)):
        if k < 0 or (k == 0 and n > 0):
            raise ValueError(f"layer {l}: k={k} clusters for {n} points (need k >= 1 when there are points)")
        # padding must be a suffix: point i of a layer is row i
        if n and not bool(mask[l, :n].all()):
            raise ValueError(f"layer {l}: mask must mark a prefix of the rows as valid")
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be an int >= 1, got {iters!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    return ks


# --------------------------------------------------------------------------------------------
# fused (batched over layers)


def fused_kmeans(
    features: Tensor,
    mask: Tensor,
    k_per_layer: Sequence[int],
    *,
    iters: int = DEFAULT_ITERS,
    init: str = "kmeans++",
    seed: int = 0,
) -> KMeansResult:
    """Cosine K-Means of every layer at once.

    Args:
        features: float [L, N_max, D] padded features (see :func:`pad_features`).
        mask: bool [L, N_max]; True for real points, which must be a prefix of each row.
        k_per_layer: L ints, clusters per layer (>= 1 where a layer has points; k >= n_l gives
            one cluster per point).
        iters: maximum Lloyd iterations; stops early when no assignment changes.
        init: "kmeans++" (seeded D^2 sampling) or "farthest" (deterministic farthest point,
            starting from the point with the largest feature norm, i.e. farthest from the mean
            expert for centred PCA features).
        seed: seed of the k-means++ draws.

    Returns:
        :class:`KMeansResult`; identical to :func:`per_layer_kmeans` on the same input.
    """
    ks = _check_inputs(features, mask, k_per_layer, iters, init)
    features, mask = features.detach().cpu(), mask.cpu()  # small; CPU keeps results bit-stable
    num_layers, n_max, width = features.shape
    n_per = mask.sum(1)
    k_eff = torch.minimum(torch.tensor(ks, dtype=torch.int64), n_per)  # [L]
    k_max = int(k_eff.max()) if num_layers else 0
    assign = torch.full((num_layers, n_max), -1, dtype=torch.int64)
    centroids = torch.zeros(num_layers, k_max, width, dtype=torch.float64)
    if k_max == 0:
        return KMeansResult(assign, centroids, 0)
    raw = features.double() * mask[..., None]
    x = _normalize(raw)
    kvalid = torch.arange(k_max)[None, :] < k_eff[:, None]  # [L, K]
    trivial = torch.tensor(ks) >= n_per  # every point its own cluster
    layers = torch.arange(num_layers)
    neg_inf = torch.tensor(float("-inf"), dtype=torch.float64)

    # ---- initialisation: k_l points per layer
    draws = _exp_draws(num_layers, k_max, n_max, seed) if init == "kmeans++" else None
    if init == "kmeans++":
        first = torch.where(mask, -draws[:, 0, :], neg_inf).argmax(1)  # uniform among valid
    else:
        first = torch.where(mask, (raw * raw).sum(-1), neg_inf).argmax(1)
    centroids[:, 0] = x[layers, first]
    min_dist = 1.0 - _cos_sim(x, centroids[:, :1])[..., 0]
    for j in range(1, k_max):
        d = min_dist.clamp_min(0.0)
        score = d * d / draws[:, j, :] if init == "kmeans++" else d
        pick = torch.where(mask, score, neg_inf).argmax(1)
        active = kvalid[:, j]
        centroids[:, j] = torch.where(active[:, None], x[layers, pick], centroids[:, j])
        min_dist = torch.minimum(min_dist, 1.0 - _cos_sim(x, centroids[:, j:j + 1])[..., 0])

    # ---- Lloyd iterations
    prev = None
    it = 0
    offsets = (layers * k_max)[:, None]
    for it in range(1, iters + 1):
        sim = torch.where(kvalid[:, None, :], _cos_sim(x, centroids), neg_inf)  # [L, N, K]
        cur = sim.argmax(2)  # ties: lowest centroid index
        cur = torch.where(trivial[:, None], torch.arange(n_max)[None, :], cur)
        cur = torch.where(mask, cur, -1)
        own_dist = torch.where(mask, 1.0 - sim.gather(2, cur.clamp_min(0)[..., None])[..., 0], neg_inf)
        _repair_empty_batched(cur, own_dist, mask, kvalid)
        if prev is not None and torch.equal(cur, prev):
            break
        flat = (cur + offsets)[mask]
        centroids = _centroids(x[mask], flat, num_layers * k_max).reshape(num_layers, k_max, width)
        prev = cur
    return KMeansResult(cur, centroids, it)


def _repair_empty_batched(assign: Tensor, own_dist: Tensor, mask: Tensor, kvalid: Tensor) -> None:
    """In place: every valid cluster j that is empty takes the point farthest from its own
    centroid among clusters with more than one point (ties: lowest point index), j ascending."""
    k_max = kvalid.shape[1]
    counts = torch.zeros(assign.shape[0], k_max, dtype=torch.int64)
    counts.scatter_add_(1, assign.clamp_min(0), mask.long())
    if not bool((kvalid & (counts == 0)).any()):
        return
    layers = torch.arange(assign.shape[0])
    own_dist = own_dist.clone()
    for j in range(k_max):
        need = kvalid[:, j] & (counts[:, j] == 0)
        if not bool(need.any()):
            continue
        movable = mask & (counts.gather(1, assign.clamp_min(0)) > 1)
        pick = torch.where(movable, own_dist, float("-inf")).argmax(1)
        for l in layers[need].tolist():  # rare, and few layers: keep the order explicit
            p = int(pick[l])
            counts[l, assign[l, p]] -= 1
            assign[l, p] = j
            counts[l, j] += 1
            own_dist[l, p] = 0.0


# --------------------------------------------------------------------------------------------
# per-layer loop (reference)


def per_layer_kmeans(
    features: Tensor,
    mask: Tensor,
    k_per_layer: Sequence[int],
    *,
    iters: int = DEFAULT_ITERS,
    init: str = "kmeans++",
    seed: int = 0,
) -> KMeansResult:
    """The plain loop: cosine K-Means of each layer on its own ``[n_l, D]`` points.

    Same arguments and result as :func:`fused_kmeans` (it is the reference the fused version is
    tested against, and the baseline of the fused-vs-per-layer speed comparison).
    """
    ks = _check_inputs(features, mask, k_per_layer, iters, init)
    features, mask = features.detach().cpu(), mask.cpu()
    num_layers, n_max, width = features.shape
    n_per = mask.sum(1).tolist()
    k_eff = [min(k, n) for k, n in zip(ks, n_per)]
    k_max = max(k_eff, default=0)
    assign = torch.full((num_layers, n_max), -1, dtype=torch.int64)
    centroids = torch.zeros(num_layers, k_max, width, dtype=torch.float64)
    if k_max == 0:
        return KMeansResult(assign, centroids, 0)
    draws = _exp_draws(num_layers, k_max, n_max, seed) if init == "kmeans++" else None
    max_it = 0
    for l in range(num_layers):
        n, k = n_per[l], k_eff[l]
        if n == 0:
            continue
        layer_draws = None if draws is None else draws[l, :k, :n]
        a, c, it = _single_layer(features[l, :n].double(), k, ks[l] >= n, iters, init, layer_draws)
        assign[l, :n] = a
        centroids[l, :k] = c
        max_it = max(max_it, it)
    return KMeansResult(assign, centroids, max_it)


def _single_layer(raw: Tensor, k: int, trivial: bool, iters: int, init: str, draws: Tensor | None) -> tuple[Tensor, Tensor, int]:
    n = raw.shape[0]
    x = _normalize(raw)
    if init == "kmeans++":
        first = int((-draws[0]).argmax())
    else:
        first = int((raw * raw).sum(-1).argmax())
    chosen = [x[first]]
    min_dist = 1.0 - _cos_sim(x, x[first][None])[:, 0]
    for j in range(1, k):
        d = min_dist.clamp_min(0.0)
        score = d * d / draws[j] if init == "kmeans++" else d
        pick = int(score.argmax())
        chosen.append(x[pick])
        min_dist = torch.minimum(min_dist, 1.0 - _cos_sim(x, x[pick][None])[:, 0])
    centroids = torch.stack(chosen)

    prev = None
    it = 0
    for it in range(1, iters + 1):
        sim = _cos_sim(x, centroids)  # [n, k]
        cur = torch.arange(n) if trivial else sim.argmax(1)
        own_dist = 1.0 - sim.gather(1, cur[:, None])[:, 0]
        counts = torch.bincount(cur, minlength=k)
        for j in range(k):  # empty-cluster repair, same rule as the fused version
            if counts[j] == 0:
                movable = counts[cur] > 1
                p = int(torch.where(movable, own_dist, float("-inf")).argmax())
                counts[cur[p]] -= 1
                cur[p] = j
                counts[j] += 1
                own_dist[p] = 0.0
        if prev is not None and torch.equal(cur, prev):
            break
        centroids = _centroids(x, cur, k)
        prev = cur
    return cur, centroids, it
