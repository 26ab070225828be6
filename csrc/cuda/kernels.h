// Host launchers of the CUDA kernels of flux._C (bodies in csrc/cuda/*.cu).
//
// This header is shared by the nvcc-compiled kernel files and the torch-facing wrappers
// (csrc/cuda/*.cpp), so it must stay free of torch headers: the .cu files are compile-checked
// on machines without a CUDA build of torch (scripts/check_cuda_sources.sh).  Pointers are raw,
// sizes are int64_t, every launcher enqueues on the given stream only (no host synchronisation,
// so all of them are CUDA-graph capturable) and returns the first CUDA error it met.
//
// Semantics: flux/ops/contracts.md.  The wrappers have validated shapes and dtypes; the kernels
// still never read out of bounds on bad index *values* (they treat them as dropped), because
// checking values would need a device-to-host copy.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace flux {
namespace cuda {

// Element type of a floating tensor crossing the torch/CUDA boundary (bit layouts of
// c10::BFloat16 / c10::Half match __nv_bfloat16 / __half).
enum class FloatType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kFloat64 = 3 };

// ------------------------------------------------------------------------------- quantize
// w [rows, cols] contiguous (f32/bf16/f16) -> scales f32 [rows, ceil(cols/group_size)] and
// qdata: bits=8 int8 [rows, cols]; bits=4 uint8 [rows, ceil(cols/2)] (two nibbles a byte).
cudaError_t launch_quantize(const void* w, FloatType w_type, int64_t rows, int64_t cols, int bits,
                            int64_t group_size, void* qdata, float* scales, cudaStream_t stream);

// qdata/scales as above -> out [rows, cols] of out_type (f32/bf16/f16/f64).
cudaError_t launch_dequantize(const void* qdata, const float* scales, int64_t rows, int64_t cols,
                              int bits, int64_t group_size, void* out, FloatType out_type,
                              cudaStream_t stream);

// ------------------------------------------------------------------------------- route_profile
// The largest number of experts route_profile handles: a block keeps every expert's logit of its
// tokens on chip, and the top-k stage stores expert ids as bytes.
constexpr int64_t kRouteMaxExperts = 256;

// Kind of the gate matrix of route_profile.
enum class GateKind : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kInt8 = 3, kInt4 = 4 };

// x [tokens, hidden] (x_type f32/bf16/f16), gate [experts, hidden] (dense) or quantized qdata
// with gate_scales f32 [experts, ceil(hidden/group_size)].  Writes topk_weights f32 [tokens, k]
// and topk_ids int32 [tokens, k]; adds the per-expert selections to counts (int64 [experts]).
// scoring: 0 = softmax over all experts, 1 = sigmoid.  1 <= experts <= kRouteMaxExperts.
cudaError_t launch_route_profile(const void* x, FloatType x_type, int64_t tokens, int64_t hidden,
                                 const void* gate, GateKind gate_kind, const float* gate_scales,
                                 int64_t group_size, int64_t experts, int top_k, int scoring,
                                 bool renormalize, float* topk_weights, int32_t* topk_ids,
                                 int64_t* counts, cudaStream_t stream);

// ------------------------------------------------------------------------------- moe_routing
// Bytes of device scratch launch_moe_routing needs for `slots` = tokens * k slots and
// `num_groups` groups.  Pure host computation (CUB's size query enqueues nothing), so the
// wrapper can allocate the workspace without synchronising.
cudaError_t moe_routing_workspace_bytes(int64_t slots, int64_t num_groups, size_t* bytes);

// topk_ids [tokens, k] (int64 if ids_are_int64, else int32), expert_to_group int32 [experts].
// Writes group_offsets int64 [num_groups + 1], sorted_slot int32 [tokens * k] and
// pair_of_slot int32 [tokens * k].  tokens * k < 2^31 (the outputs are int32).
cudaError_t launch_moe_routing(const void* topk_ids, bool ids_are_int64, int64_t tokens, int64_t k,
                               const int32_t* expert_to_group, int64_t experts, int64_t num_groups,
                               int64_t* group_offsets, int32_t* sorted_slot, int32_t* pair_of_slot,
                               void* workspace, size_t workspace_bytes, cudaStream_t stream);

}  // namespace cuda
}  // namespace flux
