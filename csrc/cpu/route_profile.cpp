// route_profile: fused router (gate GEMM, top-k, softmax/sigmoid, renormalise, histogram) in one
// pass over x (flux/ops/contracts.md).
//
// Design (bytes moved, not FLOPs, decide here: E is small, so the unfused chain is dominated by
// writing and re-reading [T, E] logits/probabilities several times and by topk/bincount):
//  * the gate is dequantised once per call into an fp32 [E, H] buffer (at most 4 MiB);
//  * x is cut into chunks of rows; each thread takes whole chunks: converts the chunk to fp32
//    if needed, computes its logits with a single-threaded MKL GEMM into a thread-local buffer
//    that stays in L2 (<= 256 KiB), and then, row by row while the logits are hot: top-k by
//    insertion (strict comparison, so ties keep the lower expert index), softmax (max-shifted,
//    fp32, vectorised exp) or sigmoid, optional renormalisation;
//  * the histogram is one serial pass over the T*k ids at the end (cheaper than the per-thread
//    tables it would need, and deterministic).
#include "common.h"
#include "vecmath.h"

#include <algorithm>
#include <numeric>
#include <vector>

namespace flux_cpu {
namespace {

// sum_e exp(l[e] - shift)
FLUX_CLONES float exp_shift_sum(const float* l, int64_t n, float shift) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t e = 0; e < n; ++e) sum += fast_exp(l[e] - shift);
  return sum;
}

// Top-k of one row of logits: vals/idx in descending order, ties by ascending index.
inline void topk_row(const float* l, int64_t num_experts, int64_t k, float* vals, int32_t* idx,
                     std::vector<int32_t>& order) {
  if (k <= 32) {
    int64_t cnt = 0;
    for (int64_t e = 0; e < num_experts; ++e) {
      const float v = l[e];
      if (cnt == k && !(v > vals[k - 1])) continue;
      int64_t pos = cnt < k ? cnt++ : k - 1;
      while (pos > 0 && vals[pos - 1] < v) {  // strictly less: equal values stay in front
        vals[pos] = vals[pos - 1];
        idx[pos] = idx[pos - 1];
        --pos;
      }
      vals[pos] = v;
      idx[pos] = static_cast<int32_t>(e);
    }
    // Only NaN logits can leave fewer than k entries; fill with the lowest unused ids.
    for (int64_t e = 0; cnt < k && e < num_experts; ++e) {
      bool used = false;
      for (int64_t j = 0; j < cnt; ++j) used |= idx[j] == e;
      if (!used) {
        vals[cnt] = l[e];
        idx[cnt++] = static_cast<int32_t>(e);
      }
    }
    return;
  }
  order.resize(num_experts);
  std::iota(order.begin(), order.end(), 0);
  std::partial_sort(order.begin(), order.begin() + k, order.end(), [l](int32_t a, int32_t b) {
    return l[a] > l[b] || (!(l[b] > l[a]) && a < b);
  });
  for (int64_t j = 0; j < k; ++j) {
    idx[j] = order[j];
    vals[j] = l[order[j]];
  }
}

template <typename scalar_t>
void route_chunks(const at::Tensor& x, const at::Tensor& w, int64_t top_k, bool softmax,
                  bool renormalize, float* weights, int32_t* ids) {
  const int64_t tokens = x.size(0), hidden = x.size(1), num_experts = w.size(0);
  const bool need_convert = x.scalar_type() != at::kFloat;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  // Rows per chunk: logits chunk <= 256 KiB, converted x chunk <= 2 MiB, and enough chunks to
  // keep every thread busy.
  int64_t chunk = std::max<int64_t>(16, (int64_t(1) << 16) / num_experts);
  if (need_convert) chunk = std::min(chunk, std::max<int64_t>(16, (int64_t(1) << 19) / std::max<int64_t>(hidden, 1)));
  chunk = std::min(chunk, std::max<int64_t>(16, ceil_div(tokens, threads)));
  chunk = std::min(chunk, tokens);
  const int64_t n_chunks = ceil_div(tokens, chunk);
  const at::Tensor wt = w.t();

  at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
    auto logits = at::empty({chunk, num_experts}, x.options().dtype(at::kFloat));
    at::Tensor xbuf;
    if (need_convert) xbuf = at::empty({chunk, hidden}, x.options().dtype(at::kFloat));
    std::vector<float> vals(top_k);
    std::vector<int32_t> idx(top_k), order;
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t r0 = c * chunk, n = std::min(chunk, tokens - r0);
      at::Tensor xc = x.narrow(0, r0, n);
      if (need_convert) {
        auto dst = xbuf.narrow(0, 0, n);
        dst.copy_(xc);
        xc = dst;
      }
      auto lc = logits.narrow(0, 0, n);
      at::mm_out(lc, xc, wt);
      const float* lp = lc.data_ptr<float>();
      for (int64_t i = 0; i < n; ++i) {
        const float* l = lp + i * num_experts;
        topk_row(l, num_experts, top_k, vals.data(), idx.data(), order);
        float* wrow = weights + (r0 + i) * top_k;
        int32_t* irow = ids + (r0 + i) * top_k;
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
    }
  });
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
    w = gate.to(at::kFloat).contiguous();
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
  const at::Tensor xin = x.scalar_type() == at::kDouble ? x.to(at::kFloat) : x;
  FLUX_DISPATCH_FLOATING(xin.scalar_type(), "flux_route_profile", [&] {
    route_chunks<scalar_t>(xin, w, top_k, scoring == "softmax", renormalize,
                           weights.data_ptr<float>(), ids.data_ptr<int32_t>());
  });
  int64_t* cnt = counts.data_ptr<int64_t>();
  const int32_t* id = ids.data_ptr<int32_t>();
  for (int64_t s = 0, n = tokens * top_k; s < n; ++s) cnt[id[s]] += 1;
  return {weights, ids};
}

}  // namespace
}  // namespace flux_cpu

TORCH_LIBRARY_IMPL(flux_C, CPU, m) { m.impl("route_profile", &flux_cpu::route_profile_cpu); }
