// route_profile (flux/ops/contracts.md): gate matmul with an int4/int8 gate dequantized on the
// fly, scoring, top-k, and the per-expert selection histogram, in one pass over x.
//
// One block owns kTokens tokens and *all* experts, so a token's logits never leave the chip:
// the top-k stage reads them from shared memory instead of a [T, E] round trip through HBM.
// That is what caps the expert count (kRouteMaxExperts): the block's logit tile, its
// gate-chunk tile and the byte-sized expert ids of the top-k stage must fit the 48 KB of static
// shared memory.
//
// Phase 1 (logits): loop over H in chunks of kChunk columns; stage the x chunk (converted to
// fp32) and the dequantized gate chunk in shared memory, transposed so that the inner product
// loop reads both with unit stride across the lanes; each thread accumulates a TM x TN
// register tile of (token, expert) logits with fp32 FMAs in ascending h order.
// Phase 2 (top-k): one warp per token; k rounds of a warp argmax over the token's logits with
// the lower expert index winning ties (the reference's stable descending sort); softmax
// denominators from the same registers; counts go to a shared histogram first so that global
// atomics are one per (block, expert) rather than one per selection.
//
// Where the time goes (leads for tuning on the device): the contract asks for fp32 logits, so the
// gate product runs on the fp32 FMA units, 2*E flop per x element.  With bf16 x (2 bytes an
// element) that is compute-bound from about E = 24 on an H100 (~67 TFLOP/s fp32 vs ~3 TB/s), and
// small E is bound by reading x.  Untried: 16-byte vector loads and cp.async double buffering of
// the staged tiles, larger register tiles for E >= 128, and a split-bf16/3xTF32 tensor-core
// product (only if it keeps the fp32 top-k ranking within the tests' 1e-4).
#include <cmath>

#include "cuda/common.cuh"

namespace flux {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTokens = 32;  // tokens per block
constexpr int kChunk = 32;   // hidden columns staged per step
constexpr int kNone = 0x7fffffff;

// Thread layout of the logit tile for EP (experts padded to a power of two >= 8): TX threads
// along experts (a whole warp where EP >= 32, so gate reads are conflict-free and x reads are
// broadcasts), TY along tokens; each thread holds TM tokens x TN experts.
template <int EP>
struct Tile {
  static constexpr int TN = EP >= 32 ? EP / 32 : 1;
  static constexpr int TX = EP / TN;
  static constexpr int TY = kThreads / TX;
  static constexpr int TM = kTokens / TY;
  static constexpr int PerLane = EP >= 32 ? EP / 32 : 1;  // experts per lane in the top-k stage
  static_assert(TX * TY == kThreads && TM * TY == kTokens && TM >= 1, "bad tile");
};

template <int EP>
struct Smem {
  union {
    // +1 column: the transposed stores (consecutive threads walk h) hit distinct banks.
    struct {
      float x[kChunk][kTokens + 1];
      float w[kChunk][EP + 1];
    } mm;
    float logits[kTokens][EP + 1];
  } u;
  uint8_t ids[kWarps][EP];  // top-k ids of the token a warp works on (E <= 256 fits a byte)
  int counts[EP];
};

// Descending order with NaN first and the lower index first among equals: a strict total order,
// so a butterfly reduction leaves every lane with the same winner and each round picks a
// distinct, in-range expert whatever the data (the reference's torch.sort puts NaN first too).
__device__ __forceinline__ bool better(float a, int ia, float b, int ib) {
  const bool a_nan = a != a;
  const bool b_nan = b != b;
  if (a_nan != b_nan) return a_nan;
  if (a_nan) return ia < ib;
  return a > b || (a == b && ia < ib);
}

// Dequantized (or converted) gate element W[e, h] in fp32, for one gate kind.
template <GateKind K>
__device__ __forceinline__ float load_gate(const void* gate, const float* scales, int64_t hidden,
                                           int64_t n_groups, int64_t group_size, int64_t e,
                                           int64_t h) {
  if constexpr (K == GateKind::kFloat32) {
    return static_cast<const float*>(gate)[e * hidden + h];
  } else if constexpr (K == GateKind::kBFloat16) {
    return to_float(static_cast<const __nv_bfloat16*>(gate)[e * hidden + h]);
  } else if constexpr (K == GateKind::kFloat16) {
    return to_float(static_cast<const __half*>(gate)[e * hidden + h]);
  } else if constexpr (K == GateKind::kInt8) {
    const int q = static_cast<const int8_t*>(gate)[e * hidden + h];
    return __fmul_rn(static_cast<float>(q), scales[e * n_groups + h / group_size]);
  } else {
    const uint8_t byte = static_cast<const uint8_t*>(gate)[e * ((hidden + 1) / 2) + (h >> 1)];
    const int q = static_cast<int>((h & 1) ? (byte >> 4) : (byte & 0x0F)) - 8;
    return __fmul_rn(static_cast<float>(q), scales[e * n_groups + h / group_size]);
  }
}

// Stages gate columns [h0, h0 + kChunk) of every expert, transposed, zero-padded past E and H.
// Not unrolled fully on purpose: at EP = 256 that is 32 loads per thread, whose addresses and
// values alone exhaust the register file (the gate is small and L2-resident anyway).
template <GateKind K, int EP>
__device__ __forceinline__ void stage_gate(float (*w_s)[EP + 1], const void* gate,
                                           const float* scales, int64_t hidden, int64_t n_groups,
                                           int64_t group_size, int experts, int64_t h0) {
#pragma unroll 4
  for (int r = 0; r < EP * kChunk / kThreads; ++r) {
    const int i = threadIdx.x + r * kThreads;
    const int e = i / kChunk;
    const int hh = i % kChunk;
    const int64_t h = h0 + hh;
    w_s[hh][e] = (e < experts && h < hidden)
                     ? load_gate<K>(gate, scales, hidden, n_groups, group_size, e, h)
                     : 0.0f;
  }
}

// Stages x[t0 .. t0 + kTokens, h0 .. h0 + kChunk) in fp32, transposed, zero-padded past T and H.
// Consecutive threads take consecutive h of one row: coalesced global reads.
template <typename XT>
__device__ __forceinline__ void stage_x(float (*x_s)[kTokens + 1], const XT* x, int64_t tokens,
                                        int64_t hidden, int64_t t0, int64_t h0) {
#pragma unroll
  for (int r = 0; r < kTokens * kChunk / kThreads; ++r) {
    const int i = threadIdx.x + r * kThreads;
    const int tt = i / kChunk;
    const int hh = i % kChunk;
    const int64_t t = t0 + tt;
    const int64_t h = h0 + hh;
    x_s[hh][tt] = (t < tokens && h < hidden) ? to_float(x[t * hidden + h]) : 0.0f;
  }
}

// The dtypes are block-uniform run-time switches rather than template parameters: staging is a
// small part of the kernel, and 6 instantiations instead of 18 keep nvcc fast.
template <int EP>
__global__ void __launch_bounds__(kThreads)
    route_profile_kernel(const void* __restrict__ x, FloatType x_type, int64_t tokens, int64_t hidden,
                         const void* __restrict__ gate, GateKind gate_kind,
                         const float* __restrict__ gate_scales, int64_t group_size, int experts,
                         int top_k, int scoring, bool renormalize, float* __restrict__ topk_weights,
                         int32_t* __restrict__ topk_ids, int64_t* __restrict__ counts) {
  using L = Tile<EP>;
  __shared__ Smem<EP> sm;
  const int tid = threadIdx.x;
  const int tx = tid % L::TX;
  const int ty = tid / L::TX;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kTokens;
  const int64_t n_groups = gate_kind == GateKind::kInt8 || gate_kind == GateKind::kInt4
                               ? (hidden + group_size - 1) / group_size
                               : 0;

  for (int e = tid; e < EP; e += kThreads) sm.counts[e] = 0;

  // ---- phase 1: logits -------------------------------------------------------------------
  float acc[L::TM][L::TN];
#pragma unroll
  for (int m = 0; m < L::TM; ++m)
#pragma unroll
    for (int n = 0; n < L::TN; ++n) acc[m][n] = 0.0f;

  for (int64_t h0 = 0; h0 < hidden; h0 += kChunk) {
    switch (x_type) {  // block-uniform
      case FloatType::kBFloat16:
        stage_x(sm.u.mm.x, static_cast<const __nv_bfloat16*>(x), tokens, hidden, t0, h0);
        break;
      case FloatType::kFloat16:
        stage_x(sm.u.mm.x, static_cast<const __half*>(x), tokens, hidden, t0, h0);
        break;
      default:
        stage_x(sm.u.mm.x, static_cast<const float*>(x), tokens, hidden, t0, h0);
        break;
    }
    switch (gate_kind) {  // block-uniform
      case GateKind::kFloat32:
        stage_gate<GateKind::kFloat32, EP>(sm.u.mm.w, gate, gate_scales, hidden, n_groups,
                                           group_size, experts, h0);
        break;
      case GateKind::kBFloat16:
        stage_gate<GateKind::kBFloat16, EP>(sm.u.mm.w, gate, gate_scales, hidden, n_groups,
                                            group_size, experts, h0);
        break;
      case GateKind::kFloat16:
        stage_gate<GateKind::kFloat16, EP>(sm.u.mm.w, gate, gate_scales, hidden, n_groups,
                                           group_size, experts, h0);
        break;
      case GateKind::kInt8:
        stage_gate<GateKind::kInt8, EP>(sm.u.mm.w, gate, gate_scales, hidden, n_groups,
                                        group_size, experts, h0);
        break;
      case GateKind::kInt4:
        stage_gate<GateKind::kInt4, EP>(sm.u.mm.w, gate, gate_scales, hidden, n_groups,
                                        group_size, experts, h0);
        break;
    }
    __syncthreads();
#pragma unroll 8
    for (int hh = 0; hh < kChunk; ++hh) {
      float a[L::TM];
      float b[L::TN];
#pragma unroll
      for (int m = 0; m < L::TM; ++m) a[m] = sm.u.mm.x[hh][ty + m * L::TY];
#pragma unroll
      for (int n = 0; n < L::TN; ++n) b[n] = sm.u.mm.w[hh][tx + n * L::TX];
#pragma unroll
      for (int m = 0; m < L::TM; ++m)
#pragma unroll
        for (int n = 0; n < L::TN; ++n) acc[m][n] = fmaf(a[m], b[n], acc[m][n]);
    }
    __syncthreads();  // the next chunk (or the logits below) overwrites the staged tiles
  }

#pragma unroll
  for (int m = 0; m < L::TM; ++m)
#pragma unroll
    for (int n = 0; n < L::TN; ++n) sm.u.logits[ty + m * L::TY][tx + n * L::TX] = acc[m][n];
  __syncthreads();

  // ---- phase 2: scoring and top-k, one warp per token ------------------------------------
  const int lane = tid & 31;
  const int warp = tid >> 5;
  for (int tt = warp; tt < kTokens; tt += kWarps) {
    const int64_t t = t0 + tt;
    if (t >= tokens) break;  // warp-uniform: tt only grows
    float v[L::PerLane];
    unsigned int avail = 0;  // bit i: expert lane + 32 i exists and is not yet chosen
    float row_max = -INFINITY;
#pragma unroll
    for (int i = 0; i < L::PerLane; ++i) {
      const int e = lane + 32 * i;
      v[i] = e < experts ? sm.u.logits[tt][e] : -INFINITY;
      if (e < experts) {
        avail |= 1u << i;
        row_max = fmaxf(row_max, v[i]);
      }
    }
    float denom = 0.0f;
    if (scoring == 0) {
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1)
        row_max = fmaxf(row_max, __shfl_xor_sync(0xffffffffu, row_max, offset));
#pragma unroll
      for (int i = 0; i < L::PerLane; ++i)
        if (avail & (1u << i)) denom += expf(v[i] - row_max);
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1)
        denom += __shfl_xor_sync(0xffffffffu, denom, offset);
    }

    float weight_sum = 0.0f;  // identical in every lane: same winners, same order
    for (int j = 0; j < top_k; ++j) {
      float best_v = -INFINITY;
      int best_e = kNone;
#pragma unroll
      for (int i = 0; i < L::PerLane; ++i) {
        const int e = lane + 32 * i;
        if ((avail & (1u << i)) && (best_e == kNone || better(v[i], e, best_v, best_e))) {
          best_v = v[i];
          best_e = e;
        }
      }
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) {
        const float other_v = __shfl_xor_sync(0xffffffffu, best_v, offset);
        const int other_e = __shfl_xor_sync(0xffffffffu, best_e, offset);
        if (other_e != kNone && (best_e == kNone || better(other_v, other_e, best_v, best_e))) {
          best_v = other_v;
          best_e = other_e;
        }
      }
      // top_k <= experts, so a winner always exists; guard anyway rather than index with kNone.
      if (best_e == kNone) best_e = 0;
      if ((best_e & 31) == lane) avail &= ~(1u << (best_e >> 5));
      if (lane == 0) sm.ids[warp][j] = static_cast<uint8_t>(best_e);
      weight_sum += scoring == 0 ? expf(best_v - row_max) / denom : 1.0f / (1.0f + expf(-best_v));
    }
    __syncwarp();  // lane 0's id stores -> every lane's reads below

    // Coalesced stores of the k results; each weight is recomputed from the staged logit, the
    // same expression as in the rounds, so renormalisation divides consistent values.
    for (int j = lane; j < top_k; j += 32) {
      const int e = sm.ids[warp][j];
      const float l = sm.u.logits[tt][e];
      float w = scoring == 0 ? expf(l - row_max) / denom : 1.0f / (1.0f + expf(-l));
      if (renormalize) w = w / weight_sum;
      topk_weights[t * top_k + j] = w;
      topk_ids[t * top_k + j] = e;
      atomicAdd(&sm.counts[e], 1);
    }
    __syncwarp();  // the next token's rounds overwrite sm.ids[warp]
  }
  __syncthreads();

  for (int e = tid; e < experts; e += kThreads) {
    const int c = sm.counts[e];
    // int64 counts updated as unsigned 64-bit: two's complement addition is the same bits.
    if (c != 0)
      atomicAdd(reinterpret_cast<unsigned long long*>(counts + e), static_cast<unsigned long long>(c));
  }
}

template <int EP>
cudaError_t launch_padded(const void* x, FloatType x_type, int64_t tokens, int64_t hidden,
                          const void* gate, GateKind gate_kind, const float* gate_scales,
                          int64_t group_size, int experts, int top_k, int scoring,
                          bool renormalize, float* topk_weights, int32_t* topk_ids,
                          int64_t* counts, cudaStream_t stream) {
  const int64_t blocks = (tokens + kTokens - 1) / kTokens;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  route_profile_kernel<EP><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
      x, x_type, tokens, hidden, gate, gate_kind, gate_scales, group_size, experts, top_k,
      scoring, renormalize, topk_weights, topk_ids, counts);
  return cudaGetLastError();
}

}  // namespace

static_assert(kRouteMaxExperts == 256, "the largest EP case and the byte-sized ids assume 256");

cudaError_t launch_route_profile(const void* x, FloatType x_type, int64_t tokens, int64_t hidden,
                                 const void* gate, GateKind gate_kind, const float* gate_scales,
                                 int64_t group_size, int64_t experts, int top_k, int scoring,
                                 bool renormalize, float* topk_weights, int32_t* topk_ids,
                                 int64_t* counts, cudaStream_t stream) {
  if (tokens <= 0) return cudaSuccess;
  if (experts < 1 || experts > kRouteMaxExperts || top_k < 1 || top_k > experts || hidden < 0)
    return cudaErrorInvalidValue;
  const bool quantized = gate_kind == GateKind::kInt8 || gate_kind == GateKind::kInt4;
  if (quantized && (group_size < 1 || gate_scales == nullptr)) return cudaErrorInvalidValue;
  if (x_type != FloatType::kFloat32 && x_type != FloatType::kBFloat16 &&
      x_type != FloatType::kFloat16)
    return cudaErrorInvalidValue;
  const int e = static_cast<int>(experts);
  // The smallest padded expert count that holds E: fewer wasted FMAs for small E.
#define FLUX_ROUTE_CASE(EP)                                                                 \
  if (e <= EP)                                                                              \
    return launch_padded<EP>(x, x_type, tokens, hidden, gate, gate_kind, gate_scales,       \
                             group_size, e, top_k, scoring, renormalize, topk_weights,      \
                             topk_ids, counts, stream);
  FLUX_ROUTE_CASE(8)
  FLUX_ROUTE_CASE(16)
  FLUX_ROUTE_CASE(32)
  FLUX_ROUTE_CASE(64)
  FLUX_ROUTE_CASE(128)
  FLUX_ROUTE_CASE(256)
#undef FLUX_ROUTE_CASE
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace flux
