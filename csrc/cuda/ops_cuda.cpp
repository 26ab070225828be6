// Torch-facing wrappers of the CUDA kernels (csrc/cuda/*.cu): argument checks that name the
// argument, output allocation, the current stream, and the CUDA dispatch-key registrations of
// the flux_C ops declared in csrc/registration.cpp.  Compiled only with a CUDA build of torch.
//
// Nothing here reads device data on the host: every op is asynchronous and CUDA-graph
// capturable.  Shapes and dtypes are checked here; index *values* are not (that would need a
// device-to-host copy), and the kernels treat out-of-range ones as dropped instead.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <string>
#include <tuple>

#include "cuda/kernels.h"

namespace {

namespace fc = flux::cuda;

void check_on_device(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but the op runs on ",
              ref.device());
}

fc::FloatType float_type(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return fc::FloatType::kFloat32;
    case at::kBFloat16:
      return fc::FloatType::kBFloat16;
    case at::kHalf:
      return fc::FloatType::kFloat16;
    default:
      TORCH_CHECK(false, name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
  return fc::FloatType::kFloat32;  // unreachable: TORCH_CHECK(false) throws
}

// The kernels compute in fp32 and read fp32/bf16/fp16; an fp64 input is converted (exactly the
// reference's `.float()`), anything else is rejected by float_type.
at::Tensor as_kernel_float(const at::Tensor& t) {
  return (t.scalar_type() == at::kDouble ? t.to(at::kFloat) : t).contiguous();
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

void check_bits(int64_t bits, int64_t group_size) {
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8, got ", bits);
  TORCH_CHECK(group_size >= 1, "group_size must be >= 1, got ", group_size);
}

// qdata/scales of an [rows, cols] matrix quantized with (bits, group_size).
void check_quantized(const at::Tensor& qdata, const at::Tensor& scales, int64_t bits,
                     int64_t group_size, int64_t cols, const char* qname, const char* sname) {
  TORCH_CHECK(qdata.dim() == 2, qname, " must be 2-D, got shape ", qdata.sizes());
  const int64_t rows = qdata.size(0);
  if (bits == 8) {
    TORCH_CHECK(qdata.scalar_type() == at::kChar, qname, " must be int8 for bits=8, got ",
                qdata.scalar_type());
    TORCH_CHECK(qdata.size(1) == cols, qname, " must be [R, ", cols, "], got ", qdata.sizes());
  } else {
    TORCH_CHECK(qdata.scalar_type() == at::kByte, qname, " must be uint8 for bits=4, got ",
                qdata.scalar_type());
    TORCH_CHECK(qdata.size(1) == ceil_div(cols, 2), qname, " must be [R, ", ceil_div(cols, 2),
                "] (two int4 values a byte), got ", qdata.sizes());
  }
  TORCH_CHECK(scales.scalar_type() == at::kFloat, sname, " must be float32, got ",
              scales.scalar_type());
  const int64_t n_groups = cols == 0 ? 0 : ceil_div(cols, group_size);
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == rows && scales.size(1) == n_groups, sname,
              " must be [", rows, ", ", n_groups, "], got ", scales.sizes());
}

// ------------------------------------------------------------------------------- quantize
std::tuple<at::Tensor, at::Tensor> quantize_cuda(const at::Tensor& w, int64_t bits,
                                                 int64_t group_size) {
  TORCH_CHECK(w.is_cuda(), "w must be a CUDA tensor, got device ", w.device());
  TORCH_CHECK(w.dim() == 2, "w must be 2-D [R, C], got shape ", w.sizes());
  check_bits(bits, group_size);
  const c10::cuda::CUDAGuard guard(w.device());
  const at::Tensor wc = as_kernel_float(w);
  const fc::FloatType type = float_type(wc, "w");
  const int64_t rows = wc.size(0);
  const int64_t cols = wc.size(1);
  const int64_t n_groups = cols == 0 ? 0 : ceil_div(cols, group_size);
  at::Tensor qdata = bits == 8 ? at::empty({rows, cols}, wc.options().dtype(at::kChar))
                               : at::empty({rows, ceil_div(cols, 2)}, wc.options().dtype(at::kByte));
  at::Tensor scales = at::empty({rows, n_groups}, wc.options().dtype(at::kFloat));
  if (rows > 0 && cols > 0) {
    C10_CUDA_CHECK(fc::launch_quantize(wc.data_ptr(), type, rows, cols, static_cast<int>(bits),
                                       group_size, qdata.data_ptr(), scales.data_ptr<float>(),
                                       c10::cuda::getCurrentCUDAStream()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {qdata, scales};
}

at::Tensor dequantize_cuda(const at::Tensor& qdata, const at::Tensor& scales, int64_t bits,
                           int64_t group_size, int64_t cols, at::ScalarType dtype) {
  TORCH_CHECK(qdata.is_cuda(), "qdata must be a CUDA tensor, got device ", qdata.device());
  check_on_device(scales, "scales", qdata);
  check_bits(bits, group_size);
  TORCH_CHECK(cols >= 0, "cols must be >= 0, got ", cols);
  check_quantized(qdata, scales, bits, group_size, cols, "qdata", "scales");
  fc::FloatType out_type = fc::FloatType::kFloat32;
  switch (dtype) {
    case at::kFloat:
      out_type = fc::FloatType::kFloat32;
      break;
    case at::kBFloat16:
      out_type = fc::FloatType::kBFloat16;
      break;
    case at::kHalf:
      out_type = fc::FloatType::kFloat16;
      break;
    case at::kDouble:
      out_type = fc::FloatType::kFloat64;
      break;
    default:
      TORCH_CHECK(false, "dtype must be a floating dtype (float32/bfloat16/float16/float64), got ",
                  dtype);
  }
  const c10::cuda::CUDAGuard guard(qdata.device());
  const at::Tensor q = qdata.contiguous();
  const at::Tensor s = scales.contiguous();
  const int64_t rows = q.size(0);
  at::Tensor out = at::empty({rows, cols}, q.options().dtype(dtype));
  if (rows > 0 && cols > 0) {
    C10_CUDA_CHECK(fc::launch_dequantize(q.data_ptr(), s.data_ptr<float>(), rows, cols,
                                         static_cast<int>(bits), group_size, out.data_ptr(),
                                         out_type, c10::cuda::getCurrentCUDAStream()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

// ------------------------------------------------------------------------------- route_profile
std::tuple<at::Tensor, at::Tensor> route_profile_cuda(
    const at::Tensor& x, const at::Tensor& gate, const std::optional<at::Tensor>& gate_scales,
    int64_t gate_bits, int64_t group_size, int64_t top_k, c10::string_view scoring,
    bool renormalize, const at::Tensor& counts) {
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK(x.dim() == 2, "x must be 2-D [T, H], got shape ", x.sizes());
  check_on_device(gate, "gate", x);
  check_on_device(counts, "counts", x);
  TORCH_CHECK(gate.dim() == 2, "gate must be 2-D [E, H], got shape ", gate.sizes());
  const int64_t tokens = x.size(0);
  const int64_t hidden = x.size(1);
  const int64_t experts = gate.size(0);
  TORCH_CHECK(experts >= 1 && experts <= fc::kRouteMaxExperts,
              "route_profile on CUDA supports 1 to ", fc::kRouteMaxExperts,
              " experts (gate rows), got ", experts,
              "; use the triton or reference backend (FLUX_BACKEND) for more");
  TORCH_CHECK(top_k >= 1 && top_k <= experts, "top_k must be in [1, ", experts, "], got ", top_k);
  int scoring_code = 0;
  if (scoring == c10::string_view("softmax")) {
    scoring_code = 0;
  } else if (scoring == c10::string_view("sigmoid")) {
    scoring_code = 1;
  } else {
    TORCH_CHECK(false, "scoring must be \"softmax\" or \"sigmoid\", got \"",
                std::string(scoring.data(), scoring.size()), "\"");
  }
  TORCH_CHECK(counts.scalar_type() == at::kLong, "counts must be int64, got ",
              counts.scalar_type());
  TORCH_CHECK(counts.dim() == 1 && counts.size(0) == experts, "counts must be [", experts,
              "], got shape ", counts.sizes());
  TORCH_CHECK(counts.is_contiguous(), "counts must be contiguous (it is updated in place)");

  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = as_kernel_float(x);
  const fc::FloatType x_type = float_type(xc, "x");

  at::Tensor gate_c;
  at::Tensor scales_c;
  fc::GateKind kind = fc::GateKind::kFloat32;
  if (gate_bits == 0) {
    TORCH_CHECK(!gate_scales.has_value() || !gate_scales->defined() || gate_scales->numel() == 0,
                "gate_scales must be None for a dense gate (gate_bits=0)");
    TORCH_CHECK(gate.size(1) == hidden, "gate must be [E, ", hidden, "] (H = x.shape[1]), got ",
                gate.sizes());
    gate_c = as_kernel_float(gate);
    switch (float_type(gate_c, "gate")) {
      case fc::FloatType::kBFloat16:
        kind = fc::GateKind::kBFloat16;
        break;
      case fc::FloatType::kFloat16:
        kind = fc::GateKind::kFloat16;
        break;
      default:
        kind = fc::GateKind::kFloat32;
        break;
    }
  } else {
    TORCH_CHECK(gate_bits == 4 || gate_bits == 8, "gate_bits must be 0, 4 or 8, got ", gate_bits);
    TORCH_CHECK(group_size >= 1, "group_size must be >= 1, got ", group_size);
    TORCH_CHECK(gate_scales.has_value() && gate_scales->defined(),
                "gate_scales is required for a quantized gate (gate_bits=", gate_bits, ")");
    check_on_device(*gate_scales, "gate_scales", x);
    check_quantized(gate, *gate_scales, gate_bits, group_size, hidden, "gate", "gate_scales");
    gate_c = gate.contiguous();
    scales_c = gate_scales->contiguous();
    kind = gate_bits == 8 ? fc::GateKind::kInt8 : fc::GateKind::kInt4;
  }

  at::Tensor weights = at::empty({tokens, top_k}, xc.options().dtype(at::kFloat));
  at::Tensor ids = at::empty({tokens, top_k}, xc.options().dtype(at::kInt));
  if (tokens == 0) return {weights, ids};
  C10_CUDA_CHECK(fc::launch_route_profile(
      xc.data_ptr(), x_type, tokens, hidden, gate_c.data_ptr(), kind,
      scales_c.defined() ? scales_c.data_ptr<float>() : nullptr, group_size, experts,
      static_cast<int>(top_k), scoring_code, renormalize, weights.data_ptr<float>(),
      ids.data_ptr<int32_t>(), counts.data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {weights, ids};
}

// ------------------------------------------------------------------------------- moe_routing
std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_routing_cuda(const at::Tensor& topk_ids,
                                                                const at::Tensor& expert_to_group,
                                                                int64_t num_groups) {
  TORCH_CHECK(topk_ids.is_cuda(), "topk_ids must be a CUDA tensor, got device ",
              topk_ids.device());
  check_on_device(expert_to_group, "expert_to_group", topk_ids);
  TORCH_CHECK(topk_ids.dim() == 2, "topk_ids must be 2-D [T, k], got shape ", topk_ids.sizes());
  TORCH_CHECK(topk_ids.scalar_type() == at::kInt || topk_ids.scalar_type() == at::kLong,
              "topk_ids must be int32 or int64, got ", topk_ids.scalar_type());
  TORCH_CHECK(expert_to_group.dim() == 1, "expert_to_group must be 1-D [E], got shape ",
              expert_to_group.sizes());
  TORCH_CHECK(expert_to_group.scalar_type() == at::kInt ||
                  expert_to_group.scalar_type() == at::kLong,
              "expert_to_group must be int32, got ", expert_to_group.scalar_type());
  TORCH_CHECK(num_groups >= 1 && num_groups < std::numeric_limits<int32_t>::max(),
              "num_groups must be in [1, 2^31 - 1), got ", num_groups);
  const int64_t tokens = topk_ids.size(0);
  const int64_t k = topk_ids.size(1);
  TORCH_CHECK(k >= 1, "topk_ids must have k >= 1 columns, got shape ", topk_ids.sizes());
  const int64_t slots = tokens * k;
  TORCH_CHECK(slots <= std::numeric_limits<int32_t>::max(),
              "topk_ids has ", slots, " slots; sorted_slot and pair_of_slot are int32, so T*k must "
              "be < 2^31");

  const c10::cuda::CUDAGuard guard(topk_ids.device());
  const at::Tensor ids = topk_ids.contiguous();
  const at::Tensor e2g = expert_to_group.to(at::kInt).contiguous();
  const auto int_opts = ids.options().dtype(at::kInt);
  at::Tensor group_offsets = at::empty({num_groups + 1}, ids.options().dtype(at::kLong));
  at::Tensor sorted_slot = at::empty({slots}, int_opts);
  at::Tensor pair_of_slot = at::empty({tokens, k}, int_opts);

  size_t workspace_bytes = 0;
  C10_CUDA_CHECK(fc::moe_routing_workspace_bytes(slots, num_groups, &workspace_bytes));
  // Allocated through the caching allocator on the current stream: freed at the end of this
  // function, it is reused only by work ordered after ours on that stream.
  at::Tensor workspace =
      at::empty({static_cast<int64_t>(workspace_bytes)}, ids.options().dtype(at::kByte));
  C10_CUDA_CHECK(fc::launch_moe_routing(
      ids.data_ptr(), ids.scalar_type() == at::kLong, tokens, k, e2g.data_ptr<int32_t>(),
      e2g.numel(), num_groups, group_offsets.data_ptr<int64_t>(), sorted_slot.data_ptr<int32_t>(),
      pair_of_slot.data_ptr<int32_t>(), workspace.data_ptr(), workspace_bytes,
      c10::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {group_offsets, sorted_slot, pair_of_slot};
}

}  // namespace

TORCH_LIBRARY_IMPL(flux_C, CUDA, m) {
  m.impl("quantize", &quantize_cuda);
  m.impl("dequantize", &dequantize_cuda);
  m.impl("route_profile", &route_profile_cuda);
  m.impl("moe_routing", &moe_routing_cuda);
}
