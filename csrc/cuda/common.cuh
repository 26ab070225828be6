// Device helpers shared by the kernel files (no torch headers: see kernels.h).
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda/kernels.h"

// Launchers stop at the first failed launch: later kernels would read what it did not write.
#define FLUX_RETURN_IF_ERROR(expr)             \
  do {                                         \
    const cudaError_t flux_err_ = (expr);      \
    if (flux_err_ != cudaSuccess) {            \
      return flux_err_;                        \
    }                                          \
  } while (0)

namespace flux {
namespace cuda {

// Conversions in and out of fp32, the precision every kernel computes in.
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

// Round-to-nearest-even, as torch's .to(dtype) does.
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ double from_float<double>(float v) {
  return static_cast<double>(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}

// Grid for a grid-stride loop over `work` items: enough blocks to fill any current GPU many
// times over, capped so that the block count always fits the launch limit (the loops take the
// rest, with 64-bit indices).
inline unsigned int grid_for(int64_t work, int threads) {
  const int64_t kMaxBlocks = int64_t{1} << 20;
  int64_t blocks = (work + threads - 1) / threads;
  if (blocks < 1) blocks = 1;
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  return static_cast<unsigned int>(blocks);
}

// Global index / stride of a grid-stride loop, in 64 bits (T*H can exceed 2^31 elements).
__device__ __forceinline__ int64_t global_thread_index() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t grid_stride() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}

}  // namespace cuda
}  // namespace flux
