// Shared helpers of the CPU kernels (csrc/cpu/*.cpp): argument checks, dtype dispatch, and the
// dequantisation used by both dequantize and route_profile.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

namespace flux_cpu {

// ----------------------------------------------------------------------------- checks
inline void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), name, " must be a defined tensor");
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor for the C++ kernels, got ", t.device());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK(t.dim() == dim, name, " must be ", dim, "-D, got shape ", t.sizes());
}

inline void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous (got shape ", t.sizes(), ", strides ",
              t.strides(), ")");
}

inline void check_dtype(const at::Tensor& t, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ", t.scalar_type());
}

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK(is_float_dtype(t.scalar_type()), name,
              " must be float32/float64/bfloat16/float16, got ", t.scalar_type());
}

// Every float kernel is dispatched over these four dtypes; accumulation runs in
// at::opmath_type<scalar_t> (float, or double for float64).
#define FLUX_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

constexpr int qmax_of(int64_t bits) { return bits == 4 ? 7 : 127; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ----------------------------------------------------------------------------- scratch memory
// Grow-only per-thread scratch, viewed as a non-owning CPU tensor of `sizes` / `dtype`.  Reusing
// it avoids the page faults of fresh large allocations on every call.  The tensor stays valid
// until the next thread_scratch call with the same slot on the same thread; it must never be
// returned to the caller.  The memory is kept until the thread exits.
constexpr int kScratchSlots = 4;
at::Tensor thread_scratch(int slot, at::IntArrayRef sizes, at::ScalarType dtype);

// ----------------------------------------------------------------------------- quantized rows
// Dequantizes qdata (bits 4: uint8 [R, ceil(cols/2)]; bits 8: int8 [R, cols]) with fp32
// scales [R, ceil(cols/group_size)] into `out` [R, cols] (contiguous, any float dtype).
// Arguments must already be validated (see check_quantized).
void dequantize_into(const at::Tensor& qdata, const at::Tensor& scales, int64_t bits,
                     int64_t group_size, int64_t cols, at::Tensor& out);

// Full validation of a quantized matrix of `cols` columns (names the arguments in errors).
void check_quantized(const at::Tensor& qdata, const at::Tensor& scales, int64_t bits,
                     int64_t group_size, int64_t cols, const char* qname, const char* sname);

}  // namespace flux_cpu
