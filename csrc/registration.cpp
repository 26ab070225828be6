// Schemas of the native ops (namespace flux_C) and the Python module entry of flux._C.
//
// Each op has one schema here and one kernel per device key, registered next to the kernel
// (TORCH_LIBRARY_IMPL(flux_C, CPU|CUDA, m)).  The Python package wraps these in the public
// custom ops of namespace `flux` (flux/ops/library.py), which add fake kernels, autograd and
// backend selection.  The exact semantics are written down in flux/ops/contracts.md.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(flux_C, m) {
  m.def("quantize(Tensor w, int bits, int group_size) -> (Tensor qdata, Tensor scales)");
  m.def(
      "dequantize(Tensor qdata, Tensor scales, int bits, int group_size, int cols, "
      "ScalarType dtype) -> Tensor");
  m.def(
      "route_profile(Tensor x, Tensor gate, Tensor? gate_scales, int gate_bits, int group_size, "
      "int top_k, str scoring, bool renormalize, Tensor(a!) counts) -> (Tensor, Tensor)");
  m.def(
      "moe_routing(Tensor topk_ids, Tensor expert_to_group, int num_groups) "
      "-> (Tensor group_offsets, Tensor sorted_slot, Tensor pair_of_slot)");
  m.def(
      "merged_moe_fwd(Tensor x, Tensor topk_weights, Tensor[] gate_up, Tensor[] down, "
      "Tensor group_offsets, Tensor sorted_slot, Tensor pair_of_slot, str activation) "
      "-> (Tensor y, Tensor pre_act, Tensor pair_weight)");
  m.def(
      "merged_moe_bwd(Tensor grad_y, Tensor x, Tensor topk_weights, Tensor[] gate_up, "
      "Tensor[] down, Tensor pre_act, Tensor pair_weight, Tensor group_offsets, "
      "Tensor sorted_slot, Tensor pair_of_slot, str activation, bool need_grad_x, "
      "bool need_grad_weights, bool[] need_grad_stacks) "
      "-> (Tensor grad_x, Tensor grad_topk_weights, Tensor[] grad_gate_up, Tensor[] grad_down)");
}

// `import flux._C` loads the library (which runs the registrations above); the module itself
// is empty.  torch must be imported first: the library links against libtorch/libc10.
static PyModuleDef flux_c_module = {PyModuleDef_HEAD_INIT, "_C", "FLUX native kernels", -1,
                                    nullptr};
extern "C" PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&flux_c_module); }
