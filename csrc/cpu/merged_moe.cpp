// merged_moe_fwd / merged_moe_bwd: grouped expert MLP over (token, group) pairs
// (flux/ops/contracts.md).
//
// Design.  moe_routing sorts the pairs by group, so group g owns pair rows [lo, hi).  The work
// is cut into tasks (a group's rows in chunks of <= 512 rows at H = 512; in the backward a group
// whose stack needs weight gradients is one task, its chunks accumulating into grad_W[g]).  Each
// task, with per-thread buffers that stay in cache:
//   fwd: gather x rows -> X_g; pre_act[lo:hi] = X_g @ gate_up[g]^T (MKL, transposed view, no
//        copy); A = pw * f(gate) * up (fused, vectorised exp); out[lo:hi] = A @ down[g]^T.
//   bwd: gather grad_y rows (any strides) -> dY_g; G = dY_g @ down[g]; one fused row pass gives
//        grad_pair_weight = <G, act> (no extra GEMM), d_pre (activation derivative of pw * G)
//        and pw * act; grad_x rows = d_pre @ gate_up[g]; grad_down[g] = dY_g^T @ (pw * act),
//        grad_gate_up[g] = d_pre^T @ X_g (skipped for stacks without need_grad_stacks).
// A final pass, parallel over tokens, sums each token's primary pairs in slot order (fp32, or
// fp64 for float64): the summation order is fixed, so results are deterministic run to run
// (no atomics, no schedule-dependent accumulation).
//
// Scheduling: with >= 2 threads and enough balanced tasks, the tasks run in parallel, one
// worker per thread pulling the largest remaining task, each with single-threaded GEMMs;
// otherwise (one huge group, 1 thread, or called inside a parallel region) the tasks run one
// after another with multithreaded MKL and parallel elementwise loops.  FLUX_MOE_MODE=1 / 2
// forces serial / parallel (for tests and measurements).
//
// Measured (2 threads on the 2-core AMD EPYC dev VM, shared with other jobs, fp32, T=4096,
// H=512, I=256, E=64, k=8, uniform routing, every expert its own group, forward + backward with
// grads of x, topk_weights and the weights; medians of 7 interleaved in one process):
//   flux cpp 0.527 s | F.grouped_mm path 0.797 s (cpp 1.51x faster) | dense floor over N=T*k
//   rows 0.577 s with grad x (cpp 0.91x of it), 0.461 s without grad x (cpp 1.14x of it) |
//   reference backend 0.767 s.  Serial-groups schedule (FLUX_MOE_MODE=1) in the same
//   conditions: 0.58-0.66 s (1.02x the floor) and far worse whenever another process takes a
//   core (its ~10 barriers per group stall; the parallel schedule has one).
//   FLUX layout (16 trainable experts on their own groups + 48 experts merged into 4 frozen
//   groups, second stack without grad): 0.279 s vs 0.771 s for the unmerged grouped_mm path
//   (2.8x).  benchmarks/run.py --quick agreed: 1.62x vs grouped_mm, 0.91x floor, FLUX 3.08x.
// Variant dropped: serial groups with a scatter-add of each group's output straight into y (no
// [N, H] buffer): same speed on an idle machine, much slower under contention, and its
// summation order would depend on the schedule.
#include "common.h"
#include "vecmath.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <functional>
#include <type_traits>
#include <vector>

namespace flux_cpu {
namespace {

constexpr float kSqrtHalf = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;

// ----------------------------------------------------------------------------- row kernels
// fp32 rows; compiled per ISA (FLUX_CLONES).  `scale` is the pair weight.

FLUX_CLONES void silu_fwd_row(const float* g, const float* u, float* out, int64_t n, float scale) {
  for (int64_t i = 0; i < n; ++i) out[i] = scale * (g[i] / (1.f + fast_exp(-g[i]))) * u[i];
}

void gelu_fwd_row(const float* g, const float* u, float* out, int64_t n, float scale) {
  for (int64_t i = 0; i < n; ++i)
    out[i] = scale * (0.5f * g[i] * (1.f + std::erf(g[i] * kSqrtHalf))) * u[i];
}

// From the gate/up halves of pre_act and ga = grad of the unweighted expert output w.r.t. act:
// dg/du = d pre_act halves (of pw * act), aw = pw * act; returns <ga, act>.
FLUX_CLONES float silu_bwd_row(const float* g, const float* u, const float* ga, float pw,
                               float* dg, float* du, float* aw, int64_t n) {
  float dot = 0.f;
#pragma omp simd reduction(+ : dot)
  for (int64_t i = 0; i < n; ++i) {
    const float s = 1.f / (1.f + fast_exp(-g[i]));
    const float f = g[i] * s;
    const float df = s * (1.f + g[i] * (1.f - s));
    const float a = f * u[i];
    dot += ga[i] * a;
    const float da = pw * ga[i];
    dg[i] = da * u[i] * df;
    du[i] = da * f;
    aw[i] = pw * a;
  }
  return dot;
}

float gelu_bwd_row(const float* g, const float* u, const float* ga, float pw, float* dg,
                   float* du, float* aw, int64_t n) {
  float dot = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    const float cdf = 0.5f * (1.f + std::erf(g[i] * kSqrtHalf));
    const float f = g[i] * cdf;
    const float df = cdf + g[i] * std::exp(-0.5f * g[i] * g[i]) * kInvSqrt2Pi;
    const float a = f * u[i];
    dot += ga[i] * a;
    const float da = pw * ga[i];
    dg[i] = da * u[i] * df;
    du[i] = da * f;
    aw[i] = pw * a;
  }
  return dot;
}

// float64: plain scalar code in double.
void act_fwd_row_f64(const double* g, const double* u, double* out, int64_t n, double scale,
                     bool silu) {
  for (int64_t i = 0; i < n; ++i) {
    const double f = silu ? g[i] / (1.0 + std::exp(-g[i]))
                          : 0.5 * g[i] * (1.0 + std::erf(g[i] * 0.70710678118654752440));
    out[i] = scale * f * u[i];
  }
}

double act_bwd_row_f64(const double* g, const double* u, const double* ga, double pw, double* dg,
                       double* du, double* aw, int64_t n, bool silu) {
  double dot = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    double f, df;
    if (silu) {
      const double s = 1.0 / (1.0 + std::exp(-g[i]));
      f = g[i] * s;
      df = s * (1.0 + g[i] * (1.0 - s));
    } else {
      const double cdf = 0.5 * (1.0 + std::erf(g[i] * 0.70710678118654752440));
      f = g[i] * cdf;
      df = cdf + g[i] * std::exp(-0.5 * g[i] * g[i]) * 0.39894228040143268;
    }
    const double a = f * u[i];
    dot += ga[i] * a;
    const double da = pw * ga[i];
    dg[i] = da * u[i] * df;
    du[i] = da * f;
    aw[i] = pw * a;
  }
  return dot;
}

template <typename T>
inline void load_f32(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
template <typename T>
inline void store_f32(const float* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}
template <typename A, typename T>
inline void store_f32_like(const A* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

inline int64_t grain_rows(int64_t row_elems) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(row_elems, 1));
}

// act[i] = pw[i] * f(pre[i, :I]) * pre[i, I:], rows in parallel.
template <typename scalar_t>
void act_forward(const scalar_t* pre, scalar_t* act, const float* pw, int64_t n, int64_t inter,
                 bool silu) {
  at::parallel_for(0, n, grain_rows(3 * inter), [&](int64_t i0, int64_t i1) {
    if constexpr (std::is_same_v<scalar_t, double>) {
      for (int64_t i = i0; i < i1; ++i)
        act_fwd_row_f64(pre + i * 2 * inter, pre + i * 2 * inter + inter, act + i * inter, inter,
                        pw[i], silu);
    } else {
      std::vector<float> buf(std::is_same_v<scalar_t, float> ? 0 : 3 * inter);
      for (int64_t i = i0; i < i1; ++i) {
        const float *g, *u;
        float* o;
        if constexpr (std::is_same_v<scalar_t, float>) {
          g = pre + i * 2 * inter;
          u = g + inter;
          o = act + i * inter;
        } else {
          load_f32(pre + i * 2 * inter, buf.data(), 2 * inter);
          g = buf.data();
          u = g + inter;
          o = buf.data() + 2 * inter;
        }
        if (silu)
          silu_fwd_row(g, u, o, inter, pw[i]);
        else
          gelu_fwd_row(g, u, o, inter, pw[i]);
        if constexpr (!std::is_same_v<scalar_t, float>) store_f32(o, act + i * inter, inter);
      }
    }
  });
}

// Per row i: d_pre[i] (x.dtype [2I]), actw[i] = pw * act (x.dtype [I]), gpw[i] = <ga, act>.
template <typename scalar_t>
void act_backward(const scalar_t* pre, const scalar_t* ga, const float* pw, scalar_t* dpre,
                  scalar_t* actw, float* gpw, int64_t n, int64_t inter, bool silu) {
  at::parallel_for(0, n, grain_rows(6 * inter), [&](int64_t i0, int64_t i1) {
    if constexpr (std::is_same_v<scalar_t, double>) {
      for (int64_t i = i0; i < i1; ++i) {
        const double* p = pre + i * 2 * inter;
        gpw[i] = static_cast<float>(act_bwd_row_f64(p, p + inter, ga + i * inter, pw[i],
                                                    dpre + i * 2 * inter, dpre + i * 2 * inter + inter,
                                                    actw + i * inter, inter, silu));
      }
    } else {
      std::vector<float> buf(std::is_same_v<scalar_t, float> ? 0 : 6 * inter);
      for (int64_t i = i0; i < i1; ++i) {
        const float *g, *u, *a;
        float *dg, *du, *aw;
        if constexpr (std::is_same_v<scalar_t, float>) {
          g = pre + i * 2 * inter;
          u = g + inter;
          a = ga + i * inter;
          dg = dpre + i * 2 * inter;
          du = dg + inter;
          aw = actw + i * inter;
        } else {
          float* b = buf.data();
          load_f32(pre + i * 2 * inter, b, 2 * inter);
          load_f32(ga + i * inter, b + 2 * inter, inter);
          g = b;
          u = b + inter;
          a = b + 2 * inter;
          dg = b + 3 * inter;
          du = b + 4 * inter;
          aw = b + 5 * inter;
        }
        gpw[i] = silu ? silu_bwd_row(g, u, a, pw[i], dg, du, aw, inter)
                      : gelu_bwd_row(g, u, a, pw[i], dg, du, aw, inter);
        if constexpr (!std::is_same_v<scalar_t, float>) {
          store_f32(dg, dpre + i * 2 * inter, 2 * inter);  // dg and du are adjacent
          store_f32(aw, actw + i * inter, inter);
        }
      }
    }
  });
}

// dst[i] = src[token_of_pair[i]] for n rows of width h; src rows/cols have any strides.
template <typename scalar_t>
void gather_rows(const scalar_t* src, int64_t s0, int64_t s1, const int32_t* tokens, int64_t n,
                 int64_t h, scalar_t* dst) {
  at::parallel_for(0, n, grain_rows(h), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const scalar_t* row = src + static_cast<int64_t>(tokens[i]) * s0;
      scalar_t* out = dst + i * h;
      if (s1 == 1) {
        std::memcpy(out, row, h * sizeof(scalar_t));
      } else {
        for (int64_t c = 0; c < h; ++c) out[c] = row[c * s1];
      }
    }
  });
}

// ----------------------------------------------------------------------------- metadata
struct Problem {
  int64_t tokens = 0, k = 0, hidden = 0, inter = 0, groups = 0, pairs = 0;
  std::vector<at::Tensor> w1, w2;  // per global group: [2I, H], [H, I] views
  std::vector<int64_t> stack_of;   // per global group
  std::vector<int64_t> offsets;    // [G + 1]
  std::vector<int32_t> token_of_pair;  // [N]
};

Problem check_problem(const at::Tensor& x, const at::Tensor& topk_weights, at::TensorList gate_up,
                      at::TensorList down, const at::Tensor& group_offsets,
                      const at::Tensor& sorted_slot, const at::Tensor& pair_of_slot) {
  Problem P;
  check_cpu(x, "x");
  check_dim(x, 2, "x");
  check_floating(x, "x");
  check_contiguous(x, "x");
  P.tokens = x.size(0);
  P.hidden = x.size(1);
  check_cpu(pair_of_slot, "pair_of_slot");
  check_dim(pair_of_slot, 2, "pair_of_slot");
  check_dtype(pair_of_slot, at::kInt, "pair_of_slot");
  check_contiguous(pair_of_slot, "pair_of_slot");
  TORCH_CHECK(pair_of_slot.size(0) == P.tokens, "pair_of_slot must be [T, k] with T = ",
              P.tokens, ", got shape ", pair_of_slot.sizes());
  P.k = pair_of_slot.size(1);
  TORCH_CHECK(P.k >= 1, "pair_of_slot must have k >= 1 columns");
  const int64_t slots = P.tokens * P.k;
  TORCH_CHECK(slots < (int64_t(1) << 31), "T * k = ", slots, " exceeds the int32 slot range");
  check_cpu(topk_weights, "topk_weights");
  TORCH_CHECK(topk_weights.sizes() == pair_of_slot.sizes(), "topk_weights must be [", P.tokens,
              ", ", P.k, "], got shape ", topk_weights.sizes());
  TORCH_CHECK(topk_weights.scalar_type() == at::kFloat || topk_weights.scalar_type() == x.scalar_type(),
              "topk_weights must be float32 or x.dtype (", x.scalar_type(), "), got ",
              topk_weights.scalar_type());
  check_contiguous(topk_weights, "topk_weights");

  TORCH_CHECK(!gate_up.empty(), "gate_up must hold at least one stack");
  TORCH_CHECK(gate_up.size() == down.size(), "gate_up has ", gate_up.size(), " stacks but down has ",
              down.size());
  for (size_t s = 0; s < gate_up.size(); ++s) {
    const auto& w1 = gate_up[s];
    const auto& w2 = down[s];
    const std::string n1 = "gate_up[" + std::to_string(s) + "]";
    const std::string n2 = "down[" + std::to_string(s) + "]";
    check_cpu(w1, n1.c_str());
    check_cpu(w2, n2.c_str());
    check_dim(w1, 3, n1.c_str());
    check_dim(w2, 3, n2.c_str());
    check_dtype(w1, x.scalar_type(), n1.c_str());
    check_dtype(w2, x.scalar_type(), n2.c_str());
    check_contiguous(w1, n1.c_str());
    check_contiguous(w2, n2.c_str());
    if (s == 0) {
      TORCH_CHECK(w1.size(1) % 2 == 0 && w1.size(1) > 0, n1,
                  " must be [G, 2I, H] with an even, non-zero 2I, got shape ", w1.sizes());
      P.inter = w1.size(1) / 2;
    }
    TORCH_CHECK(w1.size(1) == 2 * P.inter && w1.size(2) == P.hidden, n1, " must be [G, ",
                2 * P.inter, ", ", P.hidden, "], got shape ", w1.sizes());
    TORCH_CHECK(w2.size(0) == w1.size(0) && w2.size(1) == P.hidden && w2.size(2) == P.inter, n2,
                " must be [", w1.size(0), ", ", P.hidden, ", ", P.inter, "], got shape ",
                w2.sizes());
    for (int64_t i = 0; i < w1.size(0); ++i) {
      P.w1.push_back(w1.detach().select(0, i));
      P.w2.push_back(w2.detach().select(0, i));
      P.stack_of.push_back(static_cast<int64_t>(s));
    }
  }
  P.groups = static_cast<int64_t>(P.w1.size());

  check_cpu(group_offsets, "group_offsets");
  check_dim(group_offsets, 1, "group_offsets");
  check_dtype(group_offsets, at::kLong, "group_offsets");
  TORCH_CHECK(group_offsets.size(0) == P.groups + 1, "group_offsets must have G + 1 = ",
              P.groups + 1, " entries (G = groups over all stacks), got ", group_offsets.size(0));
  auto off = group_offsets.contiguous();
  const int64_t* o = off.data_ptr<int64_t>();
  P.offsets.assign(o, o + P.groups + 1);
  TORCH_CHECK_INDEX(P.offsets[0] == 0, "group_offsets[0] must be 0, got ", P.offsets[0]);
  for (int64_t g = 0; g < P.groups; ++g) {
    TORCH_CHECK_INDEX(P.offsets[g + 1] >= P.offsets[g] && P.offsets[g + 1] <= slots,
                      "group_offsets[", g + 1, "] = ", P.offsets[g + 1],
                      " must be non-decreasing and <= T * k = ", slots);
  }
  P.pairs = P.offsets[P.groups];

  check_cpu(sorted_slot, "sorted_slot");
  check_dim(sorted_slot, 1, "sorted_slot");
  check_dtype(sorted_slot, at::kInt, "sorted_slot");
  check_contiguous(sorted_slot, "sorted_slot");
  TORCH_CHECK(sorted_slot.size(0) == slots, "sorted_slot must have T * k = ", slots,
              " entries, got ", sorted_slot.size(0));
  const int32_t* ss = sorted_slot.data_ptr<int32_t>();
  P.token_of_pair.resize(P.pairs);
  for (int64_t p = 0; p < P.pairs; ++p) {
    TORCH_CHECK_INDEX(ss[p] >= 0 && ss[p] < slots, "sorted_slot[", p, "] = ", ss[p],
                      " is out of range [0, ", slots, ")");
    P.token_of_pair[p] = static_cast<int32_t>(ss[p] / P.k);
  }
  const int32_t* pos = pair_of_slot.data_ptr<int32_t>();
  for (int64_t s = 0; s < slots; ++s) {
    TORCH_CHECK_INDEX(pos[s] >= -1 && pos[s] < P.pairs, "pair_of_slot[", s / P.k, ", ", s % P.k,
                      "] = ", pos[s], " is out of range [-1, ", P.pairs, ") (N = number of pairs)");
  }
  return P;
}

// ----------------------------------------------------------------------------- scheduling
// Rows of a group processed at once (per-thread buffers of a few [rows, max(H, 2I)]).  Small
// enough to stay near L2/L3, large enough that the weight-gradient GEMMs (K = rows, C re-read
// once per chunk) stay compute-bound: 512 rows at H = 512, 256 rows from H = 1024 on.
inline int64_t chunk_rows(const Problem& P) {
  const int64_t width = std::max<int64_t>(P.hidden, 2 * P.inter);
  return std::min<int64_t>(1024, std::max<int64_t>(256, (int64_t(1) << 18) / std::max<int64_t>(width, 1)));
}

// 0 = auto, 1 = groups one after another with multithreaded GEMMs, 2 = tasks in parallel.
inline int schedule_mode() {
  static const int mode = [] {
    const char* v = std::getenv("FLUX_MOE_MODE");
    return v ? std::atoi(v) : 0;
  }();
  return mode;
}

// Per-pair row buffers ([N, H], about as large as pre_act) are reused per calling thread
// (thread_scratch): fresh pages cost a page fault each (measured 3-5% of the whole fwd+bwd at the
// benchmark size).  Above kMaxCachedBytes they are allocated per call instead, so at most that
// much memory stays reserved per calling thread.
constexpr int64_t kMaxCachedBytes = int64_t(256) << 20;
at::Tensor pair_rows_buffer(int64_t rows, int64_t cols, const at::TensorOptions& opts) {
  const auto dtype = c10::typeMetaToScalarType(opts.dtype());
  const int64_t bytes = rows * cols * static_cast<int64_t>(c10::elementSize(dtype));
  if (bytes > kMaxCachedBytes) return at::empty({rows, cols}, opts);
  return thread_scratch(1, {rows, cols}, dtype);
}

struct Task {
  int64_t group, lo, hi;  // pair rows [lo, hi) of one group
};

// Work items: a group split into row chunks, except where `whole[g]` (the weight gradients of
// the group accumulate over its chunks, so one thread owns the whole group).  Largest first.
std::vector<Task> make_tasks(const Problem& P, int64_t chunk, const std::vector<bool>& whole) {
  std::vector<Task> tasks;
  for (int64_t g = 0; g < P.groups; ++g) {
    const int64_t lo = P.offsets[g], hi = P.offsets[g + 1];
    if (hi == lo) continue;
    if (whole[g]) {
      tasks.push_back({g, lo, hi});
    } else {
      const int64_t pieces = ceil_div(hi - lo, chunk);
      const int64_t step = ceil_div(hi - lo, pieces);  // even pieces
      for (int64_t r = lo; r < hi; r += step) tasks.push_back({g, r, std::min(hi, r + step)});
    }
  }
  std::stable_sort(tasks.begin(), tasks.end(),
                   [](const Task& a, const Task& b) { return a.hi - a.lo > b.hi - b.lo; });
  return tasks;
}

// Runs fn(worker_state, task) for every task: either in parallel (one worker per thread pulls
// tasks from an atomic counter; everything inside runs single-threaded, including the GEMMs,
// because ATen and MKL do not nest parallel regions) or one after another on this thread with
// multithreaded GEMMs / elementwise loops.  Parallel wins when there are enough tasks to
// balance; one large group (E = 1, or few big frozen groups with weight gradients) runs serial.
template <typename State, typename Fn>
void run_tasks(const std::vector<Task>& tasks, const std::function<State()>& make_state, Fn&& fn) {
  const int64_t threads = at::get_num_threads();
  int64_t total = 0, largest = 0;
  for (const auto& t : tasks) {
    total += t.hi - t.lo;
    largest = std::max(largest, t.hi - t.lo);
  }
  int mode = schedule_mode();
  if (mode == 0) {
    const bool balanced = static_cast<int64_t>(tasks.size()) >= 2 * threads &&
                          largest * threads * 4 <= total * 3;
    mode = threads > 1 && balanced && !at::in_parallel_region() ? 2 : 1;
  }
  if (mode == 2 && threads > 1 && tasks.size() > 1) {
    std::atomic<int64_t> next{0};
    at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
      // Worker threads do not inherit the caller's dispatch state: stay below autograd.
      at::AutoDispatchBelowADInplaceOrView guard;
      State state = make_state();
      for (int64_t i; (i = next.fetch_add(1)) < static_cast<int64_t>(tasks.size());) fn(state, tasks[i]);
    });
  } else {
    State state = make_state();
    for (const auto& t : tasks) fn(state, t);
  }
}

// y[t] = sum over the primary slots of token t of rows[pair_of_slot[t, j]] (acc_t), in slot order.
template <typename scalar_t>
at::Tensor combine_pairs(const Problem& P, const at::Tensor& rows, const at::Tensor& pair_of_slot,
                         const at::Tensor& like) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = P.hidden, k = P.k;
  auto out = at::empty({P.tokens, H}, like.options());
  if (P.tokens == 0) return out;
  const scalar_t* src = rows.data_ptr<scalar_t>();
  const int32_t* pos = pair_of_slot.data_ptr<int32_t>();
  scalar_t* dst = out.data_ptr<scalar_t>();
  at::parallel_for(0, P.tokens, grain_rows(H * k), [&](int64_t t0, int64_t t1) {
    std::vector<acc_t> acc(std::is_same_v<acc_t, scalar_t> ? 0 : H);
    for (int64_t t = t0; t < t1; ++t) {
      acc_t* a = std::is_same_v<acc_t, scalar_t> ? reinterpret_cast<acc_t*>(dst + t * H) : acc.data();
      std::fill(a, a + H, acc_t(0));
      const int32_t* pt = pos + t * k;
      for (int64_t j = 0; j < k; ++j) {
        const int32_t p = pt[j];
        if (p < 0) continue;
        bool dup = false;
        for (int64_t jj = 0; jj < j; ++jj) dup |= pt[jj] == p;
        if (dup) continue;
        const scalar_t* r = src + static_cast<int64_t>(p) * H;
        for (int64_t c = 0; c < H; ++c) a[c] += static_cast<acc_t>(r[c]);
      }
      if constexpr (!std::is_same_v<acc_t, scalar_t>) store_f32_like(a, dst + t * H, H);
    }
  });
  return out;
}

// ----------------------------------------------------------------------------- forward
template <typename scalar_t>
at::Tensor forward_impl(const Problem& P, const at::Tensor& x, const float* pw,
                        const at::Tensor& pair_of_slot, at::Tensor& pre_act, bool silu) {
  const int64_t H = P.hidden, I = P.inter;
  const int64_t CH = chunk_rows(P);
  auto opts = x.options();
  // Per-pair expert outputs (already scaled by the pair weight), rows [0, N).
  auto out = pair_rows_buffer(std::max<int64_t>(P.pairs, 1), H, opts);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  struct State {
    at::Tensor xg, act;
  };
  const auto tasks = make_tasks(P, CH, std::vector<bool>(P.groups, false));
  run_tasks<State>(
      tasks, [&] { return State{at::empty({CH, H}, opts), at::empty({CH, I}, opts)}; },
      [&](State& st, const Task& task) {
        const int64_t g = task.group;
        for (int64_t r = task.lo; r < task.hi; r += CH) {
          const int64_t n = std::min(CH, task.hi - r);
          const int32_t* tok = P.token_of_pair.data() + r;
          at::Tensor xg_n = st.xg.narrow(0, 0, n);
          at::Tensor act_n = st.act.narrow(0, 0, n);
          at::Tensor pre = pre_act.narrow(0, r, n);
          gather_rows<scalar_t>(xp, H, 1, tok, n, H, xg_n.data_ptr<scalar_t>());
          at::mm_out(pre, xg_n, P.w1[g].t());  // [n, H] @ [H, 2I]
          act_forward<scalar_t>(pre.data_ptr<scalar_t>(), act_n.data_ptr<scalar_t>(), pw + r, n, I, silu);
          at::Tensor out_n = out.narrow(0, r, n);
          at::mm_out(out_n, act_n, P.w2[g].t());  // [n, I] @ [I, H]
        }
      });
  return combine_pairs<scalar_t>(P, out, pair_of_slot, x);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> merged_moe_fwd_cpu(
    const at::Tensor& x, const at::Tensor& topk_weights, at::TensorList gate_up,
    at::TensorList down, const at::Tensor& group_offsets, const at::Tensor& sorted_slot,
    const at::Tensor& pair_of_slot, std::string_view activation) {
  TORCH_CHECK(activation == "silu" || activation == "gelu",
              "activation must be \"silu\" or \"gelu\", got \"", std::string(activation), "\"");
  const Problem P = check_problem(x, topk_weights, gate_up, down, group_offsets, sorted_slot, pair_of_slot);
  const int64_t slots = P.tokens * P.k;
  auto pair_weight = at::zeros({slots}, x.options().dtype(at::kFloat));
  {
    auto tw = topk_weights.to(at::kFloat).contiguous();
    const float* w = tw.data_ptr<float>();
    const int32_t* pos = pair_of_slot.data_ptr<int32_t>();
    float* pwp = pair_weight.data_ptr<float>();
    for (int64_t s = 0; s < slots; ++s)
      if (pos[s] >= 0) pwp[pos[s]] += w[s];
  }
  auto pre_act = at::empty({slots, 2 * P.inter}, x.options());
  if (slots > P.pairs) pre_act.narrow(0, P.pairs, slots - P.pairs).zero_();
  at::Tensor y;
  FLUX_DISPATCH_FLOATING(x.scalar_type(), "flux_merged_moe_fwd", [&] {
    y = forward_impl<scalar_t>(P, x, pair_weight.data_ptr<float>(), pair_of_slot, pre_act,
                               activation == "silu");
  });
  return {y, pre_act, pair_weight};
}

// ----------------------------------------------------------------------------- backward
template <typename scalar_t>
at::Tensor backward_impl(const Problem& P, const at::Tensor& grad_y, const at::Tensor& x,
                         const at::Tensor& pre_act, const float* pw, const at::Tensor& pair_of_slot,
                         bool silu, bool need_grad_x, bool need_grad_weights,
                         const std::vector<bool>& need_w, float* gpw, std::vector<at::Tensor>& gw1,
                         std::vector<at::Tensor>& gw2) {
  const int64_t H = P.hidden, I = P.inter;
  const int64_t CH = chunk_rows(P);
  auto opts = x.options();
  at::Tensor gx_pairs;  // per-pair grad_x rows [N, H]
  if (need_grad_x) gx_pairs = pair_rows_buffer(std::max<int64_t>(P.pairs, 1), H, opts);
  bool any_w = false;
  for (bool b : need_w) any_w |= b;
  const scalar_t* gyp = grad_y.data_ptr<scalar_t>();
  const int64_t gs0 = grad_y.stride(0), gs1 = grad_y.stride(1);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  struct State {
    at::Tensor dyg, gact, dpre, actw, xg;
  };
  std::vector<Task> tasks;
  {
    std::vector<bool> keep(P.groups, false);
    for (int64_t g = 0; g < P.groups; ++g)
      if (need_grad_x || need_grad_weights || need_w[g]) keep[g] = true;
    for (const auto& t : make_tasks(P, CH, need_w))
      if (keep[t.group]) tasks.push_back(t);
  }
  run_tasks<State>(
      tasks,
      [&] {
        State st{at::empty({CH, H}, opts), at::empty({CH, I}, opts), at::empty({CH, 2 * I}, opts),
                 at::empty({CH, I}, opts), at::Tensor()};
        if (any_w) st.xg = at::empty({CH, H}, opts);
        return st;
      },
      [&](State& st, const Task& task) {
        const int64_t g = task.group;
        for (int64_t r = task.lo; r < task.hi; r += CH) {
          const int64_t n = std::min(CH, task.hi - r);
          const int32_t* tok = P.token_of_pair.data() + r;
          at::Tensor dyg_n = st.dyg.narrow(0, 0, n);
          at::Tensor gact_n = st.gact.narrow(0, 0, n);
          at::Tensor dpre_n = st.dpre.narrow(0, 0, n);
          at::Tensor actw_n = st.actw.narrow(0, 0, n);
          gather_rows<scalar_t>(gyp, gs0, gs1, tok, n, H, dyg_n.data_ptr<scalar_t>());
          at::mm_out(gact_n, dyg_n, P.w2[g]);  // [n, H] @ [H, I]
          act_backward<scalar_t>(pre_act.narrow(0, r, n).data_ptr<scalar_t>(),
                                 gact_n.data_ptr<scalar_t>(), pw + r, dpre_n.data_ptr<scalar_t>(),
                                 actw_n.data_ptr<scalar_t>(), gpw + r, n, I, silu);
          if (need_grad_x) {
            at::Tensor gx_n = gx_pairs.narrow(0, r, n);
            at::mm_out(gx_n, dpre_n, P.w1[g]);  // [n, 2I] @ [2I, H]
          }
          if (need_w[g]) {
            at::Tensor xg_n = st.xg.narrow(0, 0, n);
            gather_rows<scalar_t>(xp, H, 1, tok, n, H, xg_n.data_ptr<scalar_t>());
            if (r == task.lo) {
              at::mm_out(gw2[g], dyg_n.t(), actw_n);  // [H, n] @ [n, I]
              at::mm_out(gw1[g], dpre_n.t(), xg_n);   // [2I, n] @ [n, H]
            } else {
              gw2[g].addmm_(dyg_n.t(), actw_n);
              gw1[g].addmm_(dpre_n.t(), xg_n);
            }
          }
        }
      });
  if (!need_grad_x) return at::empty({0}, opts);
  return combine_pairs<scalar_t>(P, gx_pairs, pair_of_slot, x);
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>
merged_moe_bwd_cpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& topk_weights,
                   at::TensorList gate_up, at::TensorList down, const at::Tensor& pre_act,
                   const at::Tensor& pair_weight, const at::Tensor& group_offsets,
                   const at::Tensor& sorted_slot, const at::Tensor& pair_of_slot,
                   std::string_view activation, bool need_grad_x, bool need_grad_weights,
                   const c10::List<bool>& need_grad_stacks) {
  TORCH_CHECK(activation == "silu" || activation == "gelu",
              "activation must be \"silu\" or \"gelu\", got \"", std::string(activation), "\"");
  const Problem P = check_problem(x, topk_weights, gate_up, down, group_offsets, sorted_slot, pair_of_slot);
  const int64_t slots = P.tokens * P.k;
  check_cpu(grad_y, "grad_y");
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.size(0) == P.tokens && grad_y.size(1) == P.hidden,
              "grad_y must be [", P.tokens, ", ", P.hidden, "], got shape ", grad_y.sizes());
  check_dtype(grad_y, x.scalar_type(), "grad_y");
  check_cpu(pre_act, "pre_act");
  TORCH_CHECK(pre_act.dim() == 2 && pre_act.size(0) == slots && pre_act.size(1) == 2 * P.inter,
              "pre_act must be [T * k, 2I] = [", slots, ", ", 2 * P.inter, "], got shape ",
              pre_act.sizes());
  check_dtype(pre_act, x.scalar_type(), "pre_act");
  check_contiguous(pre_act, "pre_act");
  check_cpu(pair_weight, "pair_weight");
  TORCH_CHECK(pair_weight.dim() == 1 && pair_weight.size(0) == slots, "pair_weight must be [T * k] = [",
              slots, "], got shape ", pair_weight.sizes());
  check_dtype(pair_weight, at::kFloat, "pair_weight");
  check_contiguous(pair_weight, "pair_weight");
  TORCH_CHECK(need_grad_stacks.size() == gate_up.size(), "need_grad_stacks has ",
              need_grad_stacks.size(), " entries but there are ", gate_up.size(), " stacks");

  // Weight gradients: every group with pairs is fully written by its GEMMs; zero the rest.
  std::vector<at::Tensor> grad_gate_up, grad_down, gw1, gw2;
  std::vector<bool> need_w;  // per global group
  for (size_t s = 0; s < gate_up.size(); ++s) {
    const bool need = need_grad_stacks.get(s);
    if (need) {
      grad_gate_up.push_back(at::empty_like(gate_up[s], at::MemoryFormat::Contiguous));
      grad_down.push_back(at::empty_like(down[s], at::MemoryFormat::Contiguous));
    } else {
      grad_gate_up.push_back(at::empty({0}, gate_up[s].options()));
      grad_down.push_back(at::empty({0}, down[s].options()));
    }
    for (int64_t local = 0; local < gate_up[s].size(0); ++local) {
      const int64_t g = static_cast<int64_t>(need_w.size());
      need_w.push_back(need);
      if (need) {
        gw1.push_back(grad_gate_up[s].select(0, local));
        gw2.push_back(grad_down[s].select(0, local));
        if (P.offsets[g + 1] == P.offsets[g]) {
          gw1.back().zero_();
          gw2.back().zero_();
        }
      } else {
        gw1.emplace_back();
        gw2.emplace_back();
      }
    }
  }

  auto gpw = at::zeros({slots}, x.options().dtype(at::kFloat));
  at::Tensor grad_x;
  FLUX_DISPATCH_FLOATING(x.scalar_type(), "flux_merged_moe_bwd", [&] {
    grad_x = backward_impl<scalar_t>(P, grad_y, x, pre_act, pair_weight.data_ptr<float>(),
                                     pair_of_slot, activation == "silu", need_grad_x,
                                     need_grad_weights, need_w, gpw.data_ptr<float>(), gw1, gw2);
  });

  at::Tensor grad_w;
  if (need_grad_weights) {
    auto gw = at::empty({P.tokens, P.k}, x.options().dtype(at::kFloat));
    const int32_t* pos = pair_of_slot.data_ptr<int32_t>();
    const float* src = gpw.data_ptr<float>();
    float* dst = gw.data_ptr<float>();
    for (int64_t s = 0; s < slots; ++s) dst[s] = pos[s] >= 0 ? src[pos[s]] : 0.f;
    grad_w = topk_weights.scalar_type() == at::kFloat ? gw : gw.to(topk_weights.scalar_type());
  } else {
    grad_w = at::empty({0}, topk_weights.options());
  }
  return {grad_x, grad_w, grad_gate_up, grad_down};
}

}  // namespace
}  // namespace flux_cpu

TORCH_LIBRARY_IMPL(flux_C, CPU, m) {
  m.impl("merged_moe_fwd", &flux_cpu::merged_moe_fwd_cpu);
  m.impl("merged_moe_bwd", &flux_cpu::merged_moe_bwd_cpu);
}
