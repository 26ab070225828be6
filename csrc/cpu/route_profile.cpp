// route_profile: fused router (gate GEMM, top-k, softmax/sigmoid, renormalise, histogram) in one
// pass over x (flux/ops/contracts.md).
//
// Design.  E is small, so the unfused chain (dequantize -> x @ w.t() -> softmax -> topk ->
// bincount) spends as much time writing / re-reading [T, E] tensors and in topk as in the GEMM;
// here everything after the GEMM happens while the logits are still in L2:
//  * the gate is dequantised once per call into an fp32 [E, H] buffer (at most 4 MiB);
//  * x is cut into chunks of rows (logits chunk <= 256 KiB, >= 4 chunks per thread); the
//    threads pull chunks dynamically, each computing its chunk's logits with a single-threaded
//    MKL GEMM into per-thread scratch and finishing those rows at once;
//  * AVX-512 and k <= 16: the chunk's logits are computed transposed ([E, n]) and 16 rows are
//    finished per block, one row per vector lane: a branch-free insertion network over k
//    registers (ties -> lower expert index), then softmax (max-shifted, vectorised exp) or
//    sigmoid and renormalisation for the 16 rows together.  Otherwise one row at a time
//    (AVX2 register-resident merge for k <= 8, scalar insertion, or partial_sort for k > 32);
//  * per-thread histograms are summed into `counts` at the end.
// The GEMM is the floor: MKL runs it at ~97 GFLOP/s per core here, the FMA peak (a hand-written
// AVX-512 kernel reading x in place, without MKL's packing, was no faster and was dropped).
// Measured (2 threads, 2-core AMD EPYC VM, fp32 x, int4 gate with group_size 64, interleaved
// with the unfused chain in the same process, medians; the machine is shared, so +-15%):
//   (T,H,E,k) = (4096,512,64,8):   C++ op 1.9 ms, chain 3.8 ms (2.0x); through the public
//     flux.ops.route_profile (Python custom-op layer, ~0.1-0.3 ms) 2.2-2.4 ms (1.6-1.7x)
//   (16384,256,128,8): C++ op ~9.5 ms vs chain ~24 ms (2.5x); public op 2.2-2.7x
// Before the 16-row blocks (one row at a time, branchy insertion) the first case was 1.3x.
#include "common.h"
#include "vecmath.h"

#include <algorithm>
#include <limits>
#include <mutex>
#include <atomic>
#include <cstdlib>
#include <numeric>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define FLUX_X86_SIMD 1
#else
#define FLUX_X86_SIMD 0
#endif

namespace flux_cpu {
namespace {

// sum_e exp(l[e] - shift)
FLUX_CLONES float exp_shift_sum(const float* l, int64_t n, float shift) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t e = 0; e < n; ++e) sum += fast_exp(l[e] - shift);
  return sum;
}

// Sorted insertion of the first k logits (branchy, k steps).
inline void topk_init(const float* l, int64_t k, float* vals, int32_t* idx) {
  for (int64_t e = 0; e < k; ++e) {
    const float v = l[e];
    int64_t pos = e;
    while (pos > 0 && vals[pos - 1] < v) {  // strictly less: equal values stay in front
      vals[pos] = vals[pos - 1];
      idx[pos] = idx[pos - 1];
      --pos;
    }
    vals[pos] = v;
    idx[pos] = static_cast<int32_t>(e);
  }
}

// Scalar top-k for any k <= num_experts: sorted insertion (strict comparison).
inline void topk_scalar(const float* l, int64_t num_experts, int64_t k, float* vals, int32_t* idx) {
  topk_init(l, k, vals, idx);
  for (int64_t e = k; e < num_experts; ++e) {
    const float v = l[e];
    if (!(v > vals[k - 1])) continue;
    int64_t pos = k - 1;
    while (pos > 0 && vals[pos - 1] < v) {
      vals[pos] = vals[pos - 1];
      idx[pos] = idx[pos - 1];
      --pos;
    }
    vals[pos] = v;
    idx[pos] = static_cast<int32_t>(e);
  }
}

#if FLUX_X86_SIMD
#pragma GCC diagnostic push
// GCC 12 flags the _mm512_undefined_* inside _mm512_permutexvar_* (a known false positive).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// The running top-k lives in one vector register (values) plus one (indices); after sorting the
// first k logits, the logits are compared 16 (8) at a time against the current k-th value and
// only those above it are merged, each by a branch-free step: lane j keeps its value if it is
// >= v, takes v if lane j-1 keeps its own (or j = 0), else takes lane j-1's.  ">=" keeps equal
// values in front, so ties go to the lower expert index.  Lanes >= k never influence lanes < k.
__attribute__((target("avx512f"))) void topk_avx512(const float* l, int64_t num_experts, int64_t k,
                                                     float* out_vals, int32_t* out_idx) {
  alignas(64) float v0[16];
  alignas(64) int32_t i0[16];
  for (int j = 0; j < 16; ++j) {
    v0[j] = -std::numeric_limits<float>::infinity();
    i0[j] = 0;
  }
  topk_init(l, k, v0, i0);
  __m512 vals = _mm512_load_ps(v0);
  __m512i idx = _mm512_load_si512(i0);
  const __m512i shift = _mm512_set_epi32(14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 0);
  const __m512i kth = _mm512_set1_epi32(static_cast<int>(k - 1));
  for (int64_t e = k; e < num_experts; e += 16) {
    const int64_t left = num_experts - e;
    const __mmask16 valid = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
    const __m512 block = _mm512_maskz_loadu_ps(valid, l + e);
    unsigned m = _mm512_mask_cmp_ps_mask(valid, block, _mm512_permutexvar_ps(kth, vals), _CMP_GT_OQ);
    while (m) {
      const int b = __builtin_ctz(m);
      m &= m - 1;
      const __m512 v = _mm512_set1_ps(l[e + b]);
      const __m512i id = _mm512_set1_epi32(static_cast<int>(e + b));
      const __m512 prev = _mm512_permutexvar_ps(shift, vals);
      const __m512i prev_idx = _mm512_permutexvar_epi32(shift, idx);
      const __mmask16 keep = _mm512_cmp_ps_mask(vals, v, _CMP_GE_OQ);
      const __mmask16 prev_keep = _mm512_cmp_ps_mask(prev, v, _CMP_GE_OQ) | __mmask16(1);
      vals = _mm512_mask_blend_ps(keep, _mm512_mask_blend_ps(prev_keep, prev, v), vals);
      idx = _mm512_mask_blend_epi32(keep, _mm512_mask_blend_epi32(prev_keep, prev_idx, id), idx);
    }
  }
  _mm512_store_ps(v0, vals);
  _mm512_store_si512(i0, idx);
  for (int64_t j = 0; j < k; ++j) {
    out_vals[j] = v0[j];
    out_idx[j] = i0[j];
  }
}

__attribute__((target("avx2"), always_inline)) inline void merge_avx2(__m256& vals, __m256& idx,
                                                                       float x, int32_t i) {
  const __m256i shift = _mm256_set_epi32(6, 5, 4, 3, 2, 1, 0, 0);
  const __m256 lane0 = _mm256_castsi256_ps(_mm256_set_epi32(0, 0, 0, 0, 0, 0, 0, -1));
  const __m256 v = _mm256_set1_ps(x);
  const __m256 id = _mm256_castsi256_ps(_mm256_set1_epi32(i));
  const __m256 prev = _mm256_permutevar8x32_ps(vals, shift);
  const __m256 prev_idx = _mm256_permutevar8x32_ps(idx, shift);
  const __m256 keep = _mm256_cmp_ps(vals, v, _CMP_GE_OQ);
  const __m256 prev_keep = _mm256_or_ps(_mm256_cmp_ps(prev, v, _CMP_GE_OQ), lane0);
  vals = _mm256_blendv_ps(_mm256_blendv_ps(prev, v, prev_keep), vals, keep);
  idx = _mm256_blendv_ps(_mm256_blendv_ps(prev_idx, id, prev_keep), idx, keep);
}

__attribute__((target("avx2"))) void topk_avx2(const float* l, int64_t num_experts, int64_t k,
                                                float* out_vals, int32_t* out_idx) {
  alignas(32) float v0[8];
  alignas(32) int32_t i0[8];
  for (int j = 0; j < 8; ++j) {
    v0[j] = -std::numeric_limits<float>::infinity();
    i0[j] = 0;
  }
  topk_init(l, k, v0, i0);
  __m256 vals = _mm256_load_ps(v0);
  __m256 idx = _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(i0)));
  const __m256i kth = _mm256_set1_epi32(static_cast<int>(k - 1));
  int64_t e = k;
  for (; e + 8 <= num_experts; e += 8) {
    const __m256 block = _mm256_loadu_ps(l + e);
    unsigned m = _mm256_movemask_ps(
        _mm256_cmp_ps(block, _mm256_permutevar8x32_ps(vals, kth), _CMP_GT_OQ));
    while (m) {
      const int b = __builtin_ctz(m);
      m &= m - 1;
      merge_avx2(vals, idx, l[e + b], static_cast<int32_t>(e + b));
    }
  }
  for (; e < num_experts; ++e) merge_avx2(vals, idx, l[e], static_cast<int32_t>(e));
  _mm256_store_ps(v0, vals);
  _mm256_store_si256(reinterpret_cast<__m256i*>(i0), _mm256_castps_si256(idx));
  for (int64_t j = 0; j < k; ++j) {
    out_vals[j] = v0[j];
    out_idx[j] = i0[j];
  }
}

// 2 = AVX-512, 1 = AVX2, 0 = scalar; FLUX_CPU_SIMD=<n> caps it (to test every path on one CPU).
inline int simd_level() {
  static const int level = [] {
    int l = __builtin_cpu_supports("avx512f") ? 2 : __builtin_cpu_supports("avx2") ? 1 : 0;
    if (const char* cap = std::getenv("FLUX_CPU_SIMD")) l = std::min(l, std::atoi(cap));
    return l;
  }();
  return level;
}
#pragma GCC diagnostic pop
#endif

// Top-k of one row of logits: vals/idx in descending order, ties by ascending index.
inline void topk_row(const float* l, int64_t num_experts, int64_t k, float* vals, int32_t* idx,
                     std::vector<int32_t>& order) {
  // NaN ranks above every number (torch.sort / torch.topk semantics), so a NaN logit is picked
  // and its NaN weight propagates.  The fast paths below would skip it: rows holding a NaN take
  // the sort path with an explicit NaN-first order instead.
  bool has_nan = false;
  for (int64_t e = 0; e < num_experts; ++e) has_nan |= std::isnan(l[e]);
  if (has_nan) {
    order.resize(num_experts);
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [l](int32_t a, int32_t b) {
      const float va = l[a], vb = l[b];
      const bool na = std::isnan(va), nb = std::isnan(vb);
      if (na != nb) return na;
      if (!na && va != vb) return va > vb;
      return a < b;
    });
    for (int64_t j = 0; j < k; ++j) {
      idx[j] = order[j];
      vals[j] = l[order[j]];
    }
    return;
  }
#if FLUX_X86_SIMD
  const int level = simd_level();
  if (level == 2 && k <= 16) return topk_avx512(l, num_experts, k, vals, idx);
  if (level >= 1 && k <= 8) return topk_avx2(l, num_experts, k, vals, idx);
#endif
  if (k <= 32) return topk_scalar(l, num_experts, k, vals, idx);
  order.resize(num_experts);
  std::iota(order.begin(), order.end(), 0);
  // (NaN-free here: rows holding a NaN were handled above.)
  std::partial_sort(order.begin(), order.begin() + k, order.end(), [l](int32_t a, int32_t b) {
    return l[a] > l[b] || (l[a] == l[b] && a < b);
  });
  for (int64_t j = 0; j < k; ++j) {
    idx[j] = order[j];
    vals[j] = l[order[j]];
  }
}

#if FLUX_X86_SIMD
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// exp for 16 floats: the same range reduction and polynomial as fast_exp (vecmath.h).
__attribute__((target("avx512f"), always_inline)) inline __m512 exp16(__m512 in) {
  // (constant, x) operand order: min/max return the second operand for NaN, so NaN propagates.
  const __m512 x = _mm512_max_ps(_mm512_set1_ps(-87.3f), _mm512_min_ps(_mm512_set1_ps(88.3f), in));
  const __m512 magic = _mm512_set1_ps(12582912.0f);
  const __m512 t = _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), magic);
  const __m512 n = _mm512_sub_ps(t, magic);
  const __m512i ni = _mm512_sub_epi32(_mm512_castps_si512(t), _mm512_set1_epi32(0x4B400000));
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(ni, _mm512_set1_epi32(127)), 23));
  __m512 out = _mm512_mul_ps(p, s);
  out = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(in, _mm512_set1_ps(-87.3f), _CMP_LT_OQ), out,
                             _mm512_setzero_ps());
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(in, _mm512_set1_ps(88.3f), _CMP_GT_OQ), out,
                              _mm512_set1_ps(std::numeric_limits<float>::infinity()));
}

// 16 rows at once, one row per lane, from transposed logits lt[e * ld + lane] (lanes outside
// `valid` are ignored): the running top-KMAX of every row lives in KMAX value and KMAX index
// registers (position-major), and each expert's 16 logits (one load) bubble down
// through them: at position j a lane swaps when (v, id) ranks before (vals[j], idx[j]) in
// (value descending, index ascending) order, so ties keep the lower expert index.  Branch-free,
// no per-row latency chain.  Then softmax / sigmoid and renormalisation for the 16 rows in the
// same layout.  Returns the lanes whose row holds a NaN (their top-k may still hold the
// sentinel) or has a non-finite maximum; the caller redoes those rows with the scalar path.
template <int KMAX>
__attribute__((target("avx512f"))) unsigned topk16_avx512(const float* lt, int64_t ld,
                                                            int64_t num_experts, __mmask16 valid,
                                                            int64_t k, bool softmax, bool renormalize,
                                                            float* weights, int32_t* ids) {
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  __m512 vals[KMAX];
  __m512i idx[KMAX];
#pragma GCC unroll 16
  for (int j = 0; j < KMAX; ++j) {
    vals[j] = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    idx[j] = _mm512_set1_epi32(std::numeric_limits<int32_t>::max());  // sentinel
  }
  __mmask16 bad = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    __m512 v = _mm512_maskz_loadu_ps(valid, lt + e * ld);
    bad |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    __m512i id = _mm512_set1_epi32(static_cast<int>(e));
#pragma GCC unroll 16
    for (int j = 0; j < KMAX; ++j) {
      // (value desc, index asc): the carried logit may be a displaced one with a lower index.
      const __mmask16 m = _mm512_cmp_ps_mask(v, vals[j], _CMP_GT_OQ) |
                          (_mm512_cmp_ps_mask(v, vals[j], _CMP_EQ_OQ) &
                           _mm512_cmplt_epi32_mask(id, idx[j]));
      const __m512 old_v = vals[j];
      const __m512i old_i = idx[j];
      vals[j] = _mm512_mask_blend_ps(m, old_v, v);
      idx[j] = _mm512_mask_blend_epi32(m, old_i, id);
      v = _mm512_mask_blend_ps(m, v, old_v);
      id = _mm512_mask_blend_epi32(m, id, old_i);
    }
  }
  __m512 w[KMAX];
  const __m512 one = _mm512_set1_ps(1.0f);
#pragma GCC unroll 16
  for (int j = 0; j < KMAX; ++j) {
    if (j >= k) break;
    bad |= _mm512_cmpeq_epi32_mask(idx[j], _mm512_set1_epi32(std::numeric_limits<int32_t>::max()));
  }
  // A non-finite row maximum (all -inf, or +inf) makes the scores NaN: scalar path, like torch.
  bad |= _mm512_cmp_ps_mask(_mm512_sub_ps(vals[0], vals[0]), _mm512_setzero_ps(), _CMP_NEQ_UQ);
  if (softmax) {
    const __m512 m = vals[0];
    __m512 denom = _mm512_setzero_ps();
    for (int64_t e = 0; e < num_experts; ++e)
      denom = _mm512_add_ps(denom, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(valid, lt + e * ld), m)));
#pragma GCC unroll 16
    for (int j = 0; j < KMAX; ++j) w[j] = _mm512_div_ps(exp16(_mm512_sub_ps(vals[j], m)), denom);
  } else {
#pragma GCC unroll 16
    for (int j = 0; j < KMAX; ++j)
      w[j] = _mm512_div_ps(one, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), vals[j]))));
  }
  if (renormalize) {
    __m512 s = _mm512_setzero_ps();
#pragma GCC unroll 16
    for (int j = 0; j < KMAX; ++j)
      if (j < k) s = _mm512_add_ps(s, w[j]);
#pragma GCC unroll 16
    for (int j = 0; j < KMAX; ++j) w[j] = _mm512_div_ps(w[j], s);
  }
  const __m512i out_off = _mm512_mullo_epi32(lane, _mm512_set1_epi32(static_cast<int>(k)));
#pragma GCC unroll 16
  for (int j = 0; j < KMAX; ++j) {
    if (j >= k) break;
    _mm512_mask_i32scatter_ps(weights + j, valid, out_off, w[j], 4);
    _mm512_mask_i32scatter_epi32(ids + j, valid, out_off, idx[j], 4);
  }
  return bad & valid;
}
#pragma GCC diagnostic pop
#endif

// One row: top-k, scores, renormalisation.
inline void finish_row(const float* l, int64_t num_experts, int64_t top_k, bool softmax,
                       bool renormalize, float* wrow, int32_t* irow, float* vals, int32_t* idx,
                       std::vector<int32_t>& order) {
  topk_row(l, num_experts, top_k, vals, idx, order);
  if (softmax) {
    const float m = vals[0];
    const float denom = exp_shift_sum(l, num_experts, m);
    for (int64_t j = 0; j < top_k; ++j) wrow[j] = fast_exp(vals[j] - m) / denom;
  } else {
    for (int64_t j = 0; j < top_k; ++j) wrow[j] = 1.f / (1.f + std::exp(-vals[j]));
  }
  if (renormalize) {
    float s = 0.f;
    for (int64_t j = 0; j < top_k; ++j) s += wrow[j];
    for (int64_t j = 0; j < top_k; ++j) wrow[j] /= s;
  }
  for (int64_t j = 0; j < top_k; ++j) irow[j] = idx[j];
}

// Rows [0, n) of a row-major logits chunk [n, E].
inline void finish_rows(const float* lp, int64_t n, int64_t num_experts, int64_t top_k, bool softmax,
                        bool renormalize, float* weights, int32_t* ids, float* vals, int32_t* idx,
                        std::vector<int32_t>& order) {
  for (int64_t i = 0; i < n; ++i)
    finish_row(lp + i * num_experts, num_experts, top_k, softmax, renormalize, weights + i * top_k,
               ids + i * top_k, vals, idx, order);
}

#if FLUX_X86_SIMD
// Rows [0, n) of a transposed logits chunk [E, n] (AVX-512, k <= 16): 16 rows per block; a row
// the block flags (NaN, non-finite maximum) is copied out and redone by the scalar path.
inline void finish_rows_t(const float* lt, int64_t n, int64_t num_experts, int64_t top_k,
                          bool softmax, bool renormalize, float* weights, int32_t* ids, float* vals,
                          int32_t* idx, std::vector<int32_t>& order, std::vector<float>& row) {
  auto block = top_k <= 2 ? &topk16_avx512<2>
               : top_k <= 4 ? &topk16_avx512<4>
               : top_k <= 8 ? &topk16_avx512<8>
                            : &topk16_avx512<16>;
  row.resize(num_experts);
  for (int64_t i = 0; i < n; i += 16) {
    const int64_t left = n - i;
    const __mmask16 valid = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
    unsigned bad = block(lt + i, n, num_experts, valid, top_k, softmax, renormalize,
                         weights + i * top_k, ids + i * top_k);
    while (bad) {
      const int b = __builtin_ctz(bad);
      bad &= bad - 1;
      for (int64_t e = 0; e < num_experts; ++e) row[e] = lt[e * n + i + b];
      finish_row(row.data(), num_experts, top_k, softmax, renormalize, weights + (i + b) * top_k,
                 ids + (i + b) * top_k, vals, idx, order);
    }
  }
}
#endif

// Fills weights / ids for all rows of x; returns the histogram of the ids.
std::vector<int64_t> route_chunks(const at::Tensor& x, const at::Tensor& w, int64_t top_k,
                                  bool softmax, bool renormalize, float* weights, int32_t* ids) {
  const int64_t tokens = x.size(0), hidden = x.size(1), num_experts = w.size(0);
  const bool need_convert = x.scalar_type() != at::kFloat;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const at::Tensor wt = w.t();
  // Rows per chunk: logits chunk <= 256 KiB, converted x chunk <= 2 MiB, and >= 4 chunks per
  // thread so that the dynamic hand-out absorbs a late worker (an idle OpenMP worker takes
  // ~0.2 ms to wake up on this VM).
  int64_t chunk = std::max<int64_t>(16, (int64_t(1) << 16) / num_experts);
  if (need_convert) chunk = std::min(chunk, std::max<int64_t>(16, (int64_t(1) << 19) / std::max<int64_t>(hidden, 1)));
  chunk = std::min(chunk, std::max<int64_t>(16, ceil_div(tokens, 4 * threads)));
  chunk = std::min(chunk, tokens);
  const int64_t n_chunks = ceil_div(tokens, chunk);
#if FLUX_X86_SIMD
  // AVX-512 and k <= 16: logits computed transposed ([E, n] = W @ x_chunk^T, same MKL speed) so
  // that the 16-rows-per-block top-k reads one contiguous vector per expert.
  const bool transposed = simd_level() == 2 && top_k <= 16;
#else
  const bool transposed = false;
#endif
  std::vector<int64_t> hist(num_experts, 0);
  std::mutex hist_mutex;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(threads, n_chunks), 1, [&](int64_t, int64_t) {
    // Worker threads do not inherit the caller's dispatch state (x may require grad).
    at::AutoDispatchBelowADInplaceOrView guard;
    // Per-thread scratch (<= 256 KiB), reused across calls.
    at::Tensor logits = thread_scratch(0, {chunk * num_experts}, at::kFloat);
    at::Tensor xbuf;
    if (need_convert) xbuf = at::empty({chunk, hidden}, x.options().dtype(at::kFloat));
    std::vector<float> vals(top_k), row;
    std::vector<int32_t> idx(top_k), order;
    std::vector<int64_t> local(num_experts, 0);
    for (int64_t c; (c = next.fetch_add(1)) < n_chunks;) {
      const int64_t r0 = c * chunk, n = std::min(chunk, tokens - r0);
      at::Tensor xc = x.narrow(0, r0, n);
      if (need_convert) {
        at::Tensor dst = xbuf.narrow(0, 0, n);
        dst.copy_(xc);
        xc = dst;
      }
      float* wout = weights + r0 * top_k;
      int32_t* iout = ids + r0 * top_k;
      if (transposed) {
#if FLUX_X86_SIMD
        at::Tensor lc = logits.narrow(0, 0, num_experts * n).view({num_experts, n});
        at::mm_out(lc, w, xc.t());
        finish_rows_t(lc.data_ptr<float>(), n, num_experts, top_k, softmax, renormalize, wout, iout,
                      vals.data(), idx.data(), order, row);
#endif
      } else {
        at::Tensor lc = logits.narrow(0, 0, n * num_experts).view({n, num_experts});
        at::mm_out(lc, xc, wt);
        finish_rows(lc.data_ptr<float>(), n, num_experts, top_k, softmax, renormalize, wout, iout,
                    vals.data(), idx.data(), order);
      }
      for (int64_t s = 0; s < n * top_k; ++s) local[iout[s]] += 1;
    }
    std::lock_guard<std::mutex> lock(hist_mutex);
    for (int64_t e = 0; e < num_experts; ++e) hist[e] += local[e];
  });
  return hist;
}

std::tuple<at::Tensor, at::Tensor> route_profile_cpu(
    const at::Tensor& x, const at::Tensor& gate, const std::optional<at::Tensor>& gate_scales,
    int64_t gate_bits, int64_t group_size, int64_t top_k, std::string_view scoring,
    bool renormalize, const at::Tensor& counts) {
  check_cpu(x, "x");
  check_dim(x, 2, "x");
  check_floating(x, "x");
  check_contiguous(x, "x");
  const int64_t tokens = x.size(0), hidden = x.size(1);
  check_cpu(gate, "gate");
  check_dim(gate, 2, "gate");
  at::Tensor w;  // fp32 [E, H]
  if (gate_bits == 0) {
    check_floating(gate, "gate");
    TORCH_CHECK(gate.size(1) == hidden, "gate must be [E, ", hidden, "] (H = x.shape[1]), got shape ",
                gate.sizes());
    w = gate.detach().to(at::kFloat).contiguous();
  } else {
    TORCH_CHECK(gate_bits == 4 || gate_bits == 8, "gate_bits must be 0 (dense), 4 or 8, got ",
                gate_bits);
    TORCH_CHECK(gate_scales.has_value() && gate_scales->defined(),
                "gate_scales is required for a quantized gate (gate_bits = ", gate_bits, ")");
    check_quantized(gate, *gate_scales, gate_bits, group_size, hidden, "gate", "gate_scales");
    w = at::empty({gate.size(0), hidden}, x.options().dtype(at::kFloat));
    dequantize_into(gate, *gate_scales, gate_bits, group_size, hidden, w);
  }
  const int64_t num_experts = w.size(0);
  TORCH_CHECK(num_experts >= 1, "gate must have at least one expert (row), got shape ", gate.sizes());
  TORCH_CHECK(top_k >= 1 && top_k <= num_experts, "top_k must be in [1, ", num_experts, "], got ",
              top_k);
  TORCH_CHECK(scoring == "softmax" || scoring == "sigmoid",
              "scoring must be \"softmax\" or \"sigmoid\", got \"", std::string(scoring), "\"");
  check_cpu(counts, "counts");
  check_dtype(counts, at::kLong, "counts");
  TORCH_CHECK(counts.dim() == 1 && counts.size(0) == num_experts, "counts must be int64 [",
              num_experts, "], got shape ", counts.sizes());
  check_contiguous(counts, "counts");

  auto weights = at::empty({tokens, top_k}, x.options().dtype(at::kFloat));
  auto ids = at::empty({tokens, top_k}, x.options().dtype(at::kInt));
  if (tokens == 0) return {weights, ids};
  const at::Tensor xin = x.scalar_type() == at::kDouble ? x.detach().to(at::kFloat) : x.detach();
  const auto hist = route_chunks(xin, w, top_k, scoring == "softmax", renormalize,
                                 weights.data_ptr<float>(), ids.data_ptr<int32_t>());
  int64_t* cnt = counts.data_ptr<int64_t>();
  for (int64_t e = 0; e < num_experts; ++e) cnt[e] += hist[e];
  return {weights, ids};
}

}  // namespace
}  // namespace flux_cpu

TORCH_LIBRARY_IMPL(flux_C, CPU, m) { m.impl("route_profile", &flux_cpu::route_profile_cpu); }
