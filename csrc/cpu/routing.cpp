// moe_routing: (token, group) pairs sorted by group, by a serial counting sort over the T*k slots
// (flux/ops/contracts.md).  T*k is small next to the expert GEMMs, so one thread is enough:
// pass 1 validates every id, finds each slot's group and whether it is primary (first slot
// of its token to hit that group, found with a per-group "last token seen" stamp, so the cost
// is O(T*k + E + G) even for k = E); pass 2 places the slots (stable by slot index).
#include "common.h"

#include <vector>

namespace flux_cpu {
namespace {

template <typename id_t>
void route(const id_t* ids, const int64_t* e2g, int64_t tokens, int64_t k, int64_t num_experts,
           int64_t num_groups, int64_t* offsets, int32_t* sorted_slot, int32_t* pair_of_slot) {
  const int64_t slots = tokens * k;
  // group of each slot (-1 dropped); first slot of the token with that group (for primaries
  // it is the slot itself).
  std::vector<int32_t> group(slots), first(slots);
  std::vector<int64_t> seen_token(num_groups, -1);
  std::vector<int32_t> seen_slot(num_groups, 0);
  std::vector<int64_t> sizes(num_groups + 1, 0);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t j = 0; j < k; ++j) {
      const int64_t s = t * k + j;
      const int64_t e = static_cast<int64_t>(ids[s]);
      TORCH_CHECK_INDEX(e >= 0 && e < num_experts, "topk_ids[", t, ", ", j, "] = ", e,
                        " is out of range [0, ", num_experts, ") (number of experts)");
      const int64_t g = e2g[e];
      group[s] = static_cast<int32_t>(g);
      if (g < 0) {
        first[s] = -1;
        sizes[num_groups] += 1;
        continue;
      }
      if (seen_token[g] != t) {
        seen_token[g] = t;
        seen_slot[g] = static_cast<int32_t>(s);
        first[s] = static_cast<int32_t>(s);
        sizes[g] += 1;
      } else {
        first[s] = seen_slot[g];
        sizes[num_groups] += 1;
      }
    }
  }
  offsets[0] = 0;
  for (int64_t g = 0; g < num_groups; ++g) offsets[g + 1] = offsets[g] + sizes[g];
  std::vector<int64_t> cursor(offsets, offsets + num_groups);
  int64_t rest = offsets[num_groups];  // non-primary slots go after the N pairs, in slot order
  std::vector<int32_t> position(slots);
  for (int64_t s = 0; s < slots; ++s) {
    const int32_t g = group[s];
    const int64_t p = (g >= 0 && first[s] == s) ? cursor[g]++ : rest++;
    sorted_slot[p] = static_cast<int32_t>(s);
    position[s] = static_cast<int32_t>(p);
  }
  for (int64_t s = 0; s < slots; ++s)
    pair_of_slot[s] = group[s] >= 0 ? position[first[s]] : -1;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_routing_cpu(const at::Tensor& topk_ids,
                                                                const at::Tensor& expert_to_group,
                                                                int64_t num_groups) {
  check_cpu(topk_ids, "topk_ids");
  check_cpu(expert_to_group, "expert_to_group");
  check_dim(topk_ids, 2, "topk_ids");
  check_dim(expert_to_group, 1, "expert_to_group");
  TORCH_CHECK(topk_ids.scalar_type() == at::kInt || topk_ids.scalar_type() == at::kLong,
              "topk_ids must be int32 or int64, got ", topk_ids.scalar_type());
  TORCH_CHECK(expert_to_group.scalar_type() == at::kInt || expert_to_group.scalar_type() == at::kLong,
              "expert_to_group must be int32, got ", expert_to_group.scalar_type());
  TORCH_CHECK(num_groups >= 1, "num_groups must be >= 1, got ", num_groups);
  const int64_t tokens = topk_ids.size(0), k = topk_ids.size(1);
  const int64_t num_experts = expert_to_group.size(0);
  TORCH_CHECK(tokens * k < (int64_t(1) << 31), "topk_ids has ", tokens * k,
              " slots; at most 2^31 - 1 are supported (int32 slot indices)");

  auto e2g = expert_to_group.to(at::kLong).contiguous();
  const int64_t* e2g_ptr = e2g.data_ptr<int64_t>();
  for (int64_t e = 0; e < num_experts; ++e) {
    TORCH_CHECK_INDEX(e2g_ptr[e] >= -1 && e2g_ptr[e] < num_groups, "expert_to_group[", e,
                      "] = ", e2g_ptr[e], " is out of range [-1, ", num_groups,
                      ") (-1 = dropped, else a group index)");
  }
  auto ids = topk_ids.contiguous();
  auto opts = topk_ids.options();
  auto offsets = at::empty({num_groups + 1}, opts.dtype(at::kLong));
  auto sorted_slot = at::empty({tokens * k}, opts.dtype(at::kInt));
  auto pair_of_slot = at::empty({tokens, k}, opts.dtype(at::kInt));
  if (ids.scalar_type() == at::kInt) {
    route<int32_t>(ids.data_ptr<int32_t>(), e2g_ptr, tokens, k, num_experts, num_groups,
                   offsets.data_ptr<int64_t>(), sorted_slot.data_ptr<int32_t>(),
                   pair_of_slot.data_ptr<int32_t>());
  } else {
    route<int64_t>(ids.data_ptr<int64_t>(), e2g_ptr, tokens, k, num_experts, num_groups,
                   offsets.data_ptr<int64_t>(), sorted_slot.data_ptr<int32_t>(),
                   pair_of_slot.data_ptr<int32_t>());
  }
  return {offsets, sorted_slot, pair_of_slot};
}

}  // namespace
}  // namespace flux_cpu

TORCH_LIBRARY_IMPL(flux_C, CPU, m) { m.impl("moe_routing", &flux_cpu::moe_routing_cpu); }
