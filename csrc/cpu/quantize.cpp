// quantize / dequantize: symmetric per-group int4 / int8 (flux/ops/contracts.md).
//
// Bit-exact with the reference backend: the scale is absmax / qmax in fp32, q is
// nearbyint(float(w) / scale) (round half to even, fp32 division, never a reciprocal multiply),
// and dequantisation is float(q) * scale in fp32 before the cast to the output dtype.
// Both run in parallel over rows.
#include "common.h"

#include <algorithm>
#include <vector>

namespace flux_cpu {
namespace {

template <typename scalar_t>
void quantize_rows(const at::Tensor& w, int64_t bits, int64_t group_size, at::Tensor& qdata,
                   at::Tensor& scales) {
  const int64_t rows = w.size(0), cols = w.size(1);
  const int64_t n_groups = scales.size(1);
  const float qmax = static_cast<float>(qmax_of(bits));
  const scalar_t* src = w.data_ptr<scalar_t>();
  float* scale_ptr = scales.data_ptr<float>();
  uint8_t* q_u8 = bits == 4 ? qdata.data_ptr<uint8_t>() : nullptr;
  int8_t* q_i8 = bits == 8 ? qdata.data_ptr<int8_t>() : nullptr;
  const int64_t qcols = qdata.size(1);

  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)),
                   [&](int64_t r0, int64_t r1) {
    std::vector<float> row(cols);
    std::vector<int8_t> qrow(cols);
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* in = src + r * cols;
      for (int64_t c = 0; c < cols; ++c) row[c] = static_cast<float>(in[c]);
      for (int64_t g = 0; g < n_groups; ++g) {
        const int64_t c0 = g * group_size, c1 = std::min(cols, c0 + group_size);
        // NaN propagates into the scale like torch.amax (std::max would skip it), so a group
        // holding NaN / Inf dequantizes to NaN instead of silently losing the value.
        float absmax = 0.f;
        for (int64_t c = c0; c < c1; ++c) {
          const float a = std::fabs(row[c]);
          if (a > absmax || std::isnan(a)) absmax = a;
          if (std::isnan(absmax)) break;
        }
        const float scale = absmax / qmax;
        scale_ptr[r * n_groups + g] = scale;
        if (!std::isfinite(scale)) {  // q = 0 (casting NaN to an integer is undefined)
          for (int64_t c = c0; c < c1; ++c) qrow[c] = 0;
          continue;
        }
        const float safe = scale > 0.f ? scale : 1.f;
        for (int64_t c = c0; c < c1; ++c) {
          float q = std::nearbyint(row[c] / safe);
          q = std::min(std::max(q, -qmax), qmax);
          qrow[c] = static_cast<int8_t>(q);
        }
      }
      if (bits == 8) {
        std::memcpy(q_i8 + r * cols, qrow.data(), cols);
      } else {
        uint8_t* out = q_u8 + r * qcols;
        for (int64_t b = 0; b < qcols; ++b) {
          const int64_t c = 2 * b;
          const uint8_t lo = static_cast<uint8_t>(qrow[c] + 8);
          const uint8_t hi = c + 1 < cols ? static_cast<uint8_t>(qrow[c + 1] + 8) : uint8_t(8);
          out[b] = static_cast<uint8_t>(lo | (hi << 4));
        }
      }
    }
  });
}

template <typename out_t>
void dequantize_rows(const at::Tensor& qdata, const at::Tensor& scales, int64_t bits,
                     int64_t group_size, int64_t cols, at::Tensor& out) {
  const int64_t rows = qdata.size(0);
  const int64_t qcols = qdata.size(1);
  const int64_t n_groups = scales.size(1);
  const float* scale_ptr = scales.data_ptr<float>();
  const uint8_t* q_u8 = bits == 4 ? qdata.data_ptr<uint8_t>() : nullptr;
  const int8_t* q_i8 = bits == 8 ? qdata.data_ptr<int8_t>() : nullptr;
  out_t* dst = out.data_ptr<out_t>();

  // Grain ~64K elements: a router gate (E x H, E <= 256) mostly dequantises on one thread,
  // which is cheaper than waking the pool for ~20 us of work.
  at::parallel_for(0, rows, std::max<int64_t>(1, 65536 / std::max<int64_t>(cols, 1)),
                   [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* sc = scale_ptr + r * n_groups;
      out_t* o = dst + r * cols;
      if (bits == 8) {
        const int8_t* q = q_i8 + r * qcols;
        for (int64_t g = 0; g < n_groups; ++g) {
          const int64_t c0 = g * group_size, c1 = std::min(cols, c0 + group_size);
          const float s = sc[g];
          for (int64_t c = c0; c < c1; ++c) o[c] = static_cast<out_t>(static_cast<float>(q[c]) * s);
        }
      } else {
        const uint8_t* q = q_u8 + r * qcols;
        for (int64_t g = 0; g < n_groups; ++g) {
          const int64_t c0 = g * group_size, c1 = std::min(cols, c0 + group_size);
          const float s = sc[g];
          for (int64_t c = c0; c < c1; ++c) {
            const uint8_t byte = q[c >> 1];
            const int nib = (c & 1) ? (byte >> 4) : (byte & 0x0F);
            o[c] = static_cast<out_t>(static_cast<float>(nib - 8) * s);
          }
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> quantize_cpu(const at::Tensor& w, int64_t bits,
                                                int64_t group_size) {
  check_cpu(w, "w");
  check_dim(w, 2, "w");
  check_floating(w, "w");
  check_contiguous(w, "w");
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8, got ", bits);
  TORCH_CHECK(group_size >= 1, "group_size must be >= 1, got ", group_size);
  const int64_t rows = w.size(0), cols = w.size(1);
  const int64_t n_groups = cols ? ceil_div(cols, group_size) : 0;
  auto scales = at::empty({rows, n_groups}, w.options().dtype(at::kFloat));
  auto qdata = bits == 8 ? at::empty({rows, cols}, w.options().dtype(at::kChar))
                         : at::empty({rows, (cols + 1) / 2}, w.options().dtype(at::kByte));
  if (rows == 0 || cols == 0) return {qdata, scales};
  FLUX_DISPATCH_FLOATING(w.scalar_type(), "flux_quantize", [&] {
    quantize_rows<scalar_t>(w, bits, group_size, qdata, scales);
  });
  return {qdata, scales};
}

at::Tensor dequantize_cpu(const at::Tensor& qdata, const at::Tensor& scales, int64_t bits,
                          int64_t group_size, int64_t cols, at::ScalarType dtype) {
  check_quantized(qdata, scales, bits, group_size, cols, "qdata", "scales");
  TORCH_CHECK(is_float_dtype(dtype), "dtype must be a floating dtype, got ", dtype);
  auto out = at::empty({qdata.size(0), cols}, qdata.options().dtype(dtype));
  dequantize_into(qdata, scales, bits, group_size, cols, out);
  return out;
}

}  // namespace

void check_quantized(const at::Tensor& qdata, const at::Tensor& scales, int64_t bits,
                     int64_t group_size, int64_t cols, const char* qname, const char* sname) {
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8, got ", bits);
  TORCH_CHECK(group_size >= 1, "group_size must be >= 1, got ", group_size);
  TORCH_CHECK(cols >= 0, "cols must be >= 0, got ", cols);
  check_cpu(qdata, qname);
  check_cpu(scales, sname);
  check_dim(qdata, 2, qname);
  check_dim(scales, 2, sname);
  check_contiguous(qdata, qname);
  check_contiguous(scales, sname);
  if (bits == 8) {
    check_dtype(qdata, at::kChar, qname);
    TORCH_CHECK(qdata.size(1) == cols, qname, " (int8) must have ", cols, " columns, got shape ",
                qdata.sizes());
  } else {
    check_dtype(qdata, at::kByte, qname);
    TORCH_CHECK(qdata.size(1) == (cols + 1) / 2, qname, " (packed int4) must have ceil(", cols,
                " / 2) = ", (cols + 1) / 2, " columns, got shape ", qdata.sizes());
  }
  check_dtype(scales, at::kFloat, sname);
  const int64_t n_groups = cols ? ceil_div(cols, group_size) : 0;
  TORCH_CHECK(scales.size(0) == qdata.size(0) && scales.size(1) == n_groups, sname,
              " must have shape [", qdata.size(0), ", ", n_groups, "] (rows of ", qname,
              ", ceil(cols / group_size)), got ", scales.sizes());
}

void dequantize_into(const at::Tensor& qdata, const at::Tensor& scales, int64_t bits,
                     int64_t group_size, int64_t cols, at::Tensor& out) {
  TORCH_CHECK(out.is_contiguous() && out.dim() == 2 && out.size(0) == qdata.size(0) &&
                  out.size(1) == cols,
              "dequantize: bad output buffer");
  if (out.numel() == 0) return;
  FLUX_DISPATCH_FLOATING(out.scalar_type(), "flux_dequantize", [&] {
    dequantize_rows<scalar_t>(qdata, scales, bits, group_size, cols, out);
  });
}

}  // namespace flux_cpu

TORCH_LIBRARY_IMPL(flux_C, CPU, m) {
  m.impl("quantize", &flux_cpu::quantize_cpu);
  m.impl("dequantize", &flux_cpu::dequantize_cpu);
}
