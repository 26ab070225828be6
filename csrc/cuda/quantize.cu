// quantize / dequantize (flux/ops/contracts.md): symmetric per-group int8 and packed int4.
//
// Bit-exactness with the reference matters (the tests compare qdata exactly), so the arithmetic
// spells out the IEEE operations: __fdiv_rn for the fp32 division (independent of any
// fast-math flag), rintf for round-half-to-even (torch.round), __fmul_rn for q * scale.
#include "cuda/common.cuh"

namespace flux {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;

// absmax that propagates NaN like torch.amax, so a NaN group gets a NaN scale as in the
// reference (and then, like the reference, q = 0 for its values).
__device__ __forceinline__ float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }

__device__ __forceinline__ int quantize_one(float v, float scale, float qmax) {
  // A non-finite scale (the group holds NaN / Inf) gives q = 0 (contracts.md): the group then
  // dequantizes to NaN, and no NaN is ever converted to an integer.
  if (!isfinite(scale)) return 0;
  // The reference divides by 1 where scale is 0: the group is all zeros, so q = 0.
  const float safe = scale > 0.0f ? scale : 1.0f;
  const float q = rintf(__fdiv_rn(v, safe));
  return static_cast<int>(fminf(fmaxf(q, -qmax), qmax));
}

// One warp per (row, group): the lanes read the group's consecutive columns (coalesced) and
// reduce their absmax.  Groups are independent, so no cross-warp communication is needed.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    quantize_scales_kernel(const T* __restrict__ w, int64_t rows, int64_t cols, int64_t group_size,
                           int64_t n_groups, float qmax, float* __restrict__ scales) {
  const int lane = threadIdx.x & 31;
  const int64_t total = rows * n_groups;
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
       item < total; item += warp_stride) {
    const int64_t r = item / n_groups;
    const int64_t g = item - r * n_groups;
    const int64_t c0 = g * group_size;
    const int64_t c1 = min(c0 + group_size, cols);
    const T* row = w + r * cols;
    float m = 0.0f;
    for (int64_t c = c0 + lane; c < c1; c += 32) {
      m = nan_max(m, fabsf(to_float(row[c])));
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      m = nan_max(m, __shfl_xor_sync(0xffffffffu, m, offset));
    }
    if (lane == 0) {
      scales[item] = __fdiv_rn(m, qmax);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    quantize_int8_kernel(const T* __restrict__ w, const float* __restrict__ scales, int64_t rows,
                         int64_t cols, int64_t group_size, int64_t n_groups,
                         int8_t* __restrict__ qdata) {
  const int64_t total = rows * cols;
  for (int64_t i = global_thread_index(); i < total; i += grid_stride()) {
    const int64_t r = i / cols;
    const int64_t c = i - r * cols;
    const float scale = scales[r * n_groups + c / group_size];
    qdata[i] = static_cast<int8_t>(quantize_one(to_float(w[i]), scale, 127.0f));
  }
}

// One thread per output byte: a byte's two columns may belong to different groups (odd
// group_size), so each nibble looks up its own scale.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    quantize_int4_kernel(const T* __restrict__ w, const float* __restrict__ scales, int64_t rows,
                         int64_t cols, int64_t group_size, int64_t n_groups,
                         uint8_t* __restrict__ qdata) {
  const int64_t row_bytes = (cols + 1) / 2;
  const int64_t total = rows * row_bytes;
  for (int64_t i = global_thread_index(); i < total; i += grid_stride()) {
    const int64_t r = i / row_bytes;
    const int64_t c = 2 * (i - r * row_bytes);
    const T* row = w + r * cols;
    const float* row_scales = scales + r * n_groups;
    const int lo = quantize_one(to_float(row[c]), row_scales[c / group_size], 7.0f) + 8;
    // The padding nibble of an odd column count stores q = 0.
    const int hi =
        c + 1 < cols ? quantize_one(to_float(row[c + 1]), row_scales[(c + 1) / group_size], 7.0f) + 8
                     : 8;
    qdata[i] = static_cast<uint8_t>(lo | (hi << 4));
  }
}

template <typename Out>
__global__ void __launch_bounds__(kThreads)
    dequantize_kernel(const void* __restrict__ qdata, const float* __restrict__ scales, int64_t rows,
                      int64_t cols, int bits, int64_t group_size, int64_t n_groups,
                      Out* __restrict__ out) {
  const int64_t total = rows * cols;
  const int64_t row_bytes = bits == 8 ? cols : (cols + 1) / 2;
  for (int64_t i = global_thread_index(); i < total; i += grid_stride()) {
    const int64_t r = i / cols;
    const int64_t c = i - r * cols;
    int q;
    if (bits == 8) {
      q = static_cast<const int8_t*>(qdata)[i];
    } else {
      const uint8_t byte = static_cast<const uint8_t*>(qdata)[r * row_bytes + (c >> 1)];
      q = static_cast<int>((c & 1) ? (byte >> 4) : (byte & 0x0F)) - 8;
    }
    const float v = __fmul_rn(static_cast<float>(q), scales[r * n_groups + c / group_size]);
    out[i] = from_float<Out>(v);
  }
}

template <typename T>
cudaError_t quantize_typed(const T* w, int64_t rows, int64_t cols, int bits, int64_t group_size,
                           void* qdata, float* scales, cudaStream_t stream) {
  const int64_t n_groups = (cols + group_size - 1) / group_size;
  const float qmax = bits == 8 ? 127.0f : 7.0f;
  const int64_t warps = rows * n_groups;
  const unsigned int scale_blocks = grid_for(warps * 32, kThreads);  // one warp per group
  quantize_scales_kernel<T><<<scale_blocks, kThreads, 0, stream>>>(w, rows, cols, group_size,
                                                                   n_groups, qmax, scales);
  FLUX_RETURN_IF_ERROR(cudaGetLastError());
  if (bits == 8) {
    quantize_int8_kernel<T><<<grid_for(rows * cols, kThreads), kThreads, 0, stream>>>(
        w, scales, rows, cols, group_size, n_groups, static_cast<int8_t*>(qdata));
  } else {
    quantize_int4_kernel<T><<<grid_for(rows * ((cols + 1) / 2), kThreads), kThreads, 0, stream>>>(
        w, scales, rows, cols, group_size, n_groups, static_cast<uint8_t*>(qdata));
  }
  return cudaGetLastError();
}

template <typename Out>
cudaError_t dequantize_typed(const void* qdata, const float* scales, int64_t rows, int64_t cols,
                             int bits, int64_t group_size, Out* out, cudaStream_t stream) {
  const int64_t n_groups = (cols + group_size - 1) / group_size;
  dequantize_kernel<Out><<<grid_for(rows * cols, kThreads), kThreads, 0, stream>>>(
      qdata, scales, rows, cols, bits, group_size, n_groups, out);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_quantize(const void* w, FloatType w_type, int64_t rows, int64_t cols, int bits,
                            int64_t group_size, void* qdata, float* scales, cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return cudaSuccess;
  if ((bits != 4 && bits != 8) || group_size < 1) return cudaErrorInvalidValue;
  switch (w_type) {
    case FloatType::kFloat32:
      return quantize_typed(static_cast<const float*>(w), rows, cols, bits, group_size, qdata,
                            scales, stream);
    case FloatType::kBFloat16:
      return quantize_typed(static_cast<const __nv_bfloat16*>(w), rows, cols, bits, group_size,
                            qdata, scales, stream);
    case FloatType::kFloat16:
      return quantize_typed(static_cast<const __half*>(w), rows, cols, bits, group_size, qdata,
                            scales, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t launch_dequantize(const void* qdata, const float* scales, int64_t rows, int64_t cols,
                              int bits, int64_t group_size, void* out, FloatType out_type,
                              cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return cudaSuccess;
  if ((bits != 4 && bits != 8) || group_size < 1) return cudaErrorInvalidValue;
  switch (out_type) {
    case FloatType::kFloat32:
      return dequantize_typed(qdata, scales, rows, cols, bits, group_size,
                              static_cast<float*>(out), stream);
    case FloatType::kBFloat16:
      return dequantize_typed(qdata, scales, rows, cols, bits, group_size,
                              static_cast<__nv_bfloat16*>(out), stream);
    case FloatType::kFloat16:
      return dequantize_typed(qdata, scales, rows, cols, bits, group_size,
                              static_cast<__half*>(out), stream);
    case FloatType::kFloat64:
      return dequantize_typed(qdata, scales, rows, cols, bits, group_size,
                              static_cast<double*>(out), stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace flux
