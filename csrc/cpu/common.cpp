// Shared helpers of the CPU kernels (see common.h).
#include "common.h"

#include <array>
#include <cstdlib>

namespace flux_cpu {
namespace {

// Plain aligned memory: freeing it at thread exit is always safe, unlike a thread_local
// at::Tensor whose allocator may already be gone when the thread ends at shutdown.
struct ScratchBlock {
  void* ptr = nullptr;
  size_t bytes = 0;
  ~ScratchBlock() { std::free(ptr); }
};

}  // namespace

at::Tensor thread_scratch(int slot, at::IntArrayRef sizes, at::ScalarType dtype) {
  thread_local std::array<ScratchBlock, kScratchSlots> blocks;
  TORCH_CHECK(slot >= 0 && slot < kScratchSlots, "thread_scratch: bad slot ", slot);
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t need = static_cast<size_t>(std::max<int64_t>(numel, 1)) * c10::elementSize(dtype);
  ScratchBlock& b = blocks[slot];
  if (b.bytes < need) {
    std::free(b.ptr);
    b.ptr = nullptr;
    b.bytes = 0;
    const size_t rounded = (need + 63) / 64 * 64;
    b.ptr = std::aligned_alloc(64, rounded);
    TORCH_CHECK(b.ptr != nullptr, "thread_scratch: out of memory allocating ", rounded, " bytes");
    b.bytes = rounded;
  }
  return at::from_blob(b.ptr, sizes, at::TensorOptions().dtype(dtype).device(at::kCPU));
}

}  // namespace flux_cpu
