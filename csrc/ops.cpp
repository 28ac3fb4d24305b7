// Every schema of the deepfm_fast library lives here; backends register kernels in their own
// files with TORCH_LIBRARY_IMPL, and fake kernels and autograd are registered from Python.
#include <Python.h>
#include <torch/library.h>

// Importing deepfm_fast._C loads this shared object, which runs the static registrations below.
// The module itself is empty: the ops are reached through torch.ops.deepfm_fast.
// (PyMODINIT_FUNC exports the symbol despite -fvisibility=hidden.)
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(deepfm_fast, m) {
  const std::vector<at::Tag> pt2 = {at::Tag::pt2_compliant_tag};
  // [B, F, K] -> [B] (or [B, K] with reduce_sum=False): 0.5 * sum_k((sum_f e)^2 - sum_f e^2).
  m.def("fm_interaction(Tensor emb, bool reduce_sum=True) -> Tensor", pt2);
  // grad_out is [B] or [B, K]; returns d/d emb = grad_out * (sum_f e - e), contiguous [B, F, K].
  m.def("fm_interaction_backward(Tensor grad_out, Tensor emb) -> Tensor", pt2);
}
