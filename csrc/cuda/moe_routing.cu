// moe_routing (flux/ops/contracts.md): group offsets, the slot permutation sorted by group, and
// the pair index of every slot, built on the device without any host synchronisation (so
// merged_moe can be captured in a CUDA graph and never stalls the CPU).
//
//   1. keys:    per slot s = t*k + j: group g (an out-of-range id or group counts as dropped:
//               the kernels cannot raise, and must not read out of bounds), whether s is the
//               first slot of its token with that group (primary), and the sort key: g for a
//               primary slot, G for every other slot.
//   2. sort:    stable radix sort of (key, s) over only the bits that G needs.  Stability is
//               what makes the order deterministic and equal to the reference: primary slots
//               by (group, s), then all others by s.
//   3. bounds:  offsets[g] = number of keys < g, read off the sorted keys at the positions where
//               the key changes (each offset is written by exactly one thread: no atomics, no
//               memset, no scan); and the inverse permutation pair_of_slot[sorted[p]] = p.
//   4. dups:    a duplicate slot takes the position of its token's primary slot, a dropped slot -1.
#include "cuda/common.cuh"

// Our CUB instantiations get their own namespace (whatever the build defines), so they can never
// collide with the ones inside libtorch_cuda, which wraps its own CUB copy the same way, when
// both libraries are loaded into one process.
#undef CUB_WRAPPED_NAMESPACE
#define CUB_WRAPPED_NAMESPACE flux_cub
#include <cub/device/device_radix_sort.cuh>

namespace flux {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr size_t kAlign = 256;

using Key = uint32_t;

// Radix-sort bits for keys in [0, G]: the bit width of G.
int key_bits(int64_t num_groups) {
  int bits = 0;
  while (bits < 63 && (int64_t{1} << bits) <= num_groups) ++bits;
  return bits;
}

size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

// Workspace layout: keys in, keys out, slot indices in, first slot of each slot's (token, group),
// then CUB's temporary storage.
struct Workspace {
  Key* keys_in;
  Key* keys_out;
  int32_t* slots_in;
  int32_t* first_slot;
  void* cub_temp;
  size_t cub_bytes;
};

Workspace carve(void* base, int64_t slots, size_t cub_bytes) {
  char* p = static_cast<char*>(base);
  const size_t key_bytes = align_up(sizeof(Key) * static_cast<size_t>(slots));
  const size_t idx_bytes = align_up(sizeof(int32_t) * static_cast<size_t>(slots));
  Workspace ws;
  ws.keys_in = reinterpret_cast<Key*>(p);
  p += key_bytes;
  ws.keys_out = reinterpret_cast<Key*>(p);
  p += key_bytes;
  ws.slots_in = reinterpret_cast<int32_t*>(p);
  p += idx_bytes;
  ws.first_slot = reinterpret_cast<int32_t*>(p);
  p += idx_bytes;
  ws.cub_temp = p;
  ws.cub_bytes = cub_bytes;
  return ws;
}

size_t fixed_bytes(int64_t slots) {
  return 2 * align_up(sizeof(Key) * static_cast<size_t>(slots)) +
         2 * align_up(sizeof(int32_t) * static_cast<size_t>(slots));
}

cudaError_t cub_sort_bytes(int64_t slots, int64_t num_groups, size_t* bytes) {
  *bytes = 0;
  if (slots == 0) return cudaSuccess;
  // With a null temp pointer CUB only computes the size (host-side arithmetic and cached device
  // attributes): nothing is enqueued and nothing waits on the device.
  return CUB_NS_QUALIFIER::DeviceRadixSort::SortPairs(nullptr, *bytes, static_cast<const Key*>(nullptr),
                                         static_cast<Key*>(nullptr),
                                         static_cast<const int32_t*>(nullptr),
                                         static_cast<int32_t*>(nullptr), static_cast<int>(slots), 0,
                                         key_bits(num_groups), cudaStream_t{nullptr});
}

// Group of a routed id, or -1 (dropped) for a dropped expert and for any out-of-range value.
template <typename Id>
__device__ __forceinline__ int64_t group_of(Id id, const int32_t* __restrict__ expert_to_group,
                                            int64_t experts, int64_t num_groups) {
  const int64_t e = static_cast<int64_t>(id);
  if (e < 0 || e >= experts) return -1;
  const int64_t g = expert_to_group[e];
  return (g < 0 || g >= num_groups) ? -1 : g;
}

// One thread per slot; the scan over the earlier slots of the token is O(k) and reads data the
// neighbouring threads of the same token read too (L1 hits).
template <typename Id>
__global__ void __launch_bounds__(kThreads)
    routing_keys_kernel(const Id* __restrict__ topk_ids, int64_t slots, int64_t k,
                        const int32_t* __restrict__ expert_to_group, int64_t experts,
                        int64_t num_groups, Key* __restrict__ keys, int32_t* __restrict__ slot_ids,
                        int32_t* __restrict__ first_slot) {
  for (int64_t s = global_thread_index(); s < slots; s += grid_stride()) {
    const int64_t j = s % k;
    const int64_t base = s - j;
    const int64_t g = group_of(topk_ids[s], expert_to_group, experts, num_groups);
    int64_t first = -1;
    if (g >= 0) {
      first = s;
      for (int64_t jj = 0; jj < j; ++jj) {
        if (group_of(topk_ids[base + jj], expert_to_group, experts, num_groups) == g) {
          first = base + jj;
          break;
        }
      }
    }
    keys[s] = static_cast<Key>(first == s ? g : num_groups);
    slot_ids[s] = static_cast<int32_t>(s);
    first_slot[s] = static_cast<int32_t>(first);
  }
}

// p in [0, slots]: the offsets of the groups g with sorted_keys[p-1] < g <= sorted_keys[p]
// (sentinels -1 before the first key and G + 1 after the last) are p.  Every g in [0, G] lies in
// exactly one such interval, so each offset is written once, also when slots == 0.
__global__ void __launch_bounds__(kThreads)
    routing_bounds_kernel(const Key* __restrict__ sorted_keys, const int32_t* __restrict__ sorted_slot,
                          int64_t slots, int64_t num_groups, int64_t* __restrict__ group_offsets,
                          int32_t* __restrict__ pair_of_slot) {
  for (int64_t p = global_thread_index(); p <= slots; p += grid_stride()) {
    if (p < slots) pair_of_slot[sorted_slot[p]] = static_cast<int32_t>(p);
    const int64_t prev = p == 0 ? -1 : static_cast<int64_t>(sorted_keys[p - 1]);
    const int64_t cur = p == slots ? num_groups + 1 : static_cast<int64_t>(sorted_keys[p]);
    const int64_t last = cur < num_groups ? cur : num_groups;
    for (int64_t g = prev + 1; g <= last; ++g) group_offsets[g] = p;
  }
}

// A slot that is not primary copies its primary's position (or -1 if dropped).  Primary slots
// are never written here, so reading pair_of_slot[first] races with nothing.
__global__ void __launch_bounds__(kThreads)
    routing_duplicates_kernel(const int32_t* __restrict__ first_slot, int64_t slots,
                              int32_t* __restrict__ pair_of_slot) {
  for (int64_t s = global_thread_index(); s < slots; s += grid_stride()) {
    const int32_t first = first_slot[s];
    if (first != s) pair_of_slot[s] = first < 0 ? -1 : pair_of_slot[first];
  }
}

}  // namespace

cudaError_t moe_routing_workspace_bytes(int64_t slots, int64_t num_groups, size_t* bytes) {
  if (slots < 0 || slots > 0x7fffffffLL || num_groups < 1 || num_groups >= 0x7fffffffLL) {
    *bytes = 0;
    return cudaErrorInvalidValue;
  }
  size_t cub_bytes = 0;
  FLUX_RETURN_IF_ERROR(cub_sort_bytes(slots, num_groups, &cub_bytes));
  *bytes = fixed_bytes(slots) + cub_bytes;
  return cudaSuccess;
}

cudaError_t launch_moe_routing(const void* topk_ids, bool ids_are_int64, int64_t tokens, int64_t k,
                               const int32_t* expert_to_group, int64_t experts, int64_t num_groups,
                               int64_t* group_offsets, int32_t* sorted_slot, int32_t* pair_of_slot,
                               void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (tokens < 0 || k < 1 || experts < 0) return cudaErrorInvalidValue;
  const int64_t slots = tokens * k;
  size_t needed = 0;
  FLUX_RETURN_IF_ERROR(moe_routing_workspace_bytes(slots, num_groups, &needed));
  if (workspace_bytes < needed) return cudaErrorInvalidValue;
  const size_t cub_bytes = needed - fixed_bytes(slots);
  const Workspace ws = carve(workspace, slots, cub_bytes);

  if (slots > 0) {
    const unsigned int blocks = grid_for(slots, kThreads);
    if (ids_are_int64) {
      routing_keys_kernel<int64_t><<<blocks, kThreads, 0, stream>>>(
          static_cast<const int64_t*>(topk_ids), slots, k, expert_to_group, experts, num_groups,
          ws.keys_in, ws.slots_in, ws.first_slot);
    } else {
      routing_keys_kernel<int32_t><<<blocks, kThreads, 0, stream>>>(
          static_cast<const int32_t*>(topk_ids), slots, k, expert_to_group, experts, num_groups,
          ws.keys_in, ws.slots_in, ws.first_slot);
    }
    FLUX_RETURN_IF_ERROR(cudaGetLastError());
    size_t temp_bytes = ws.cub_bytes;
    FLUX_RETURN_IF_ERROR(CUB_NS_QUALIFIER::DeviceRadixSort::SortPairs(
        ws.cub_temp, temp_bytes, ws.keys_in, ws.keys_out, ws.slots_in, sorted_slot,
        static_cast<int>(slots), 0, key_bits(num_groups), stream));
  }
  routing_bounds_kernel<<<grid_for(slots + 1, kThreads), kThreads, 0, stream>>>(
      ws.keys_out, sorted_slot, slots, num_groups, group_offsets, pair_of_slot);
  FLUX_RETURN_IF_ERROR(cudaGetLastError());
  if (slots > 0) {
    routing_duplicates_kernel<<<grid_for(slots, kThreads), kThreads, 0, stream>>>(
        ws.first_slot, slots, pair_of_slot);
    FLUX_RETURN_IF_ERROR(cudaGetLastError());
  }
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace flux
