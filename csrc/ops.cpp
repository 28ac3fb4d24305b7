// Every schema of the deepfm_fast library lives here; backends register kernels in their own
// files with TORCH_LIBRARY_IMPL, and fake kernels and autograd are registered from Python.
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <atomic>

#include "bounds_check.h"

namespace deepfm_fast {
namespace {
std::atomic<int> g_cuda_bounds_check{kBoundsError};
}  // namespace

int cuda_bounds_check() { return g_cuda_bounds_check.load(std::memory_order_relaxed); }

void set_cuda_bounds_check(int mode) {
  TORCH_CHECK(mode >= kBoundsError && mode <= kBoundsOff, "set_cuda_bounds_check: mode must be 0 (error), ",
              "1 (clamp) or 2 (off), got ", mode);
  g_cuda_bounds_check.store(mode, std::memory_order_relaxed);
}
}  // namespace deepfm_fast

// Importing deepfm_fast._C loads this shared object, which runs the static registrations below;
// the ops are reached through torch.ops.deepfm_fast. The module itself holds only process-wide
// settings, which are not ops (no schema, no graph node).
PYBIND11_MODULE(_C, m) {
  m.def("set_cuda_bounds_check", &deepfm_fast::set_cuda_bounds_check, pybind11::arg("mode"),
        "Bounds-check mode of the CUDA kernels: 0 error, 1 clamp, 2 off (see deepfm_fast.ops.set_cuda_bounds_check).");
  m.def("get_cuda_bounds_check", &deepfm_fast::cuda_bounds_check, "The current bounds-check mode code.");
}

TORCH_LIBRARY(deepfm_fast, m) {
  const std::vector<at::Tag> pt2 = {at::Tag::pt2_compliant_tag};
  // [B, F, K] -> [B] (or [B, K] with reduce_sum=False): 0.5 * sum_k((sum_f e)^2 - sum_f e^2).
  m.def("fm_interaction(Tensor emb, bool reduce_sum=True) -> Tensor", pt2);
  // grad_out is [B] or [B, K]; returns d/d emb = grad_out * (sum_f e - e), contiguous [B, F, K].
  m.def("fm_interaction_backward(Tensor grad_out, Tensor emb) -> Tensor", pt2);
  // Fused embedding gather + pooling + FM second order + first order over CSR bags.
  // weight [N, K]; indices [nnz] and offsets [B*F+1] (int32/int64, sample-major bags, offsets[-1] ==
  // nnz); per_sample_weights [nnz] (feature values x_i) or None; linear_weight [N] or None.
  // mode: 0 = field (FM over the F pooled field vectors), 1 = feature (FM over every x_i V[j_i]).
  // pooling: one entry for every field or F entries, 0 = sum, 1 = mean (an empty bag pools to 0).
  // Returns fm [B], linear [B] (sum_i w[j_i] x_i; zeros without linear_weight) and pooled [B, F, K]
  // (the field vectors e_f) when return_pooled, else an empty tensor.
  m.def("embedding_fm(Tensor weight, Tensor indices, Tensor offsets, Tensor? per_sample_weights, "
        "Tensor? linear_weight, int num_fields, int mode, int[] pooling, bool return_pooled) "
        "-> (Tensor fm, Tensor linear, Tensor pooled)", pt2);
  // The coalesced gradient of embedding_fm: unique_ids [U] (sorted, int64) are the touched rows,
  // row_grads [U, K] and linear_row_grads [U] (empty without linear_weight) their summed
  // gradients, grad_per_sample_weights [nnz] (empty without per_sample_weights). Deterministic.
  // This is what the dense and sparse table gradients and the fused optimizers are built from.
  // pooled: the forward's field vectors [B, F, K], if it returned them. In field mode the backward
  // then reads them instead of gathering every table row again (a cache miss per row of a large
  // table); it changes no result. per_sample_weights_grad=False skips dL/dx (it needs the rows)
  // and returns it empty.
  m.def("embedding_fm_backward(Tensor grad_fm, Tensor grad_linear, Tensor? grad_pooled, Tensor weight, "
        "Tensor indices, Tensor offsets, Tensor? per_sample_weights, Tensor? linear_weight, int num_fields, "
        "int mode, int[] pooling, Tensor? pooled=None, bool per_sample_weights_grad=True) -> "
        "(Tensor unique_ids, Tensor row_grads, Tensor linear_row_grads, Tensor grad_per_sample_weights)", pt2);
  // A fused optimizer step, in place, on the rows `ids` (sorted, unique) of every table in `tables`
  // (e.g. the embedding table [N, K] and the first-order weights as [N, 1]: one pass updates both),
  // with the summed row gradients row_grads[t] [U, D_t]: what the fused-optimizer backward of
  // EmbeddingFM calls after embedding_fm_backward. optimizer: 0 SGD, 1 row-wise Adagrad (one state
  // [N] per table), 2 Adagrad (one [N, D_t]), 3 Adam on touched rows (exp_avg and exp_avg_sq
  // [N, D_t]; `step` >= 1 counts steps for bias correction). `state` lists the states table by
  // table; they are float32 (float64 for float64 tables). weight_decay is L2 added to the gradient
  // of the touched rows only.
  m.def("fused_row_update(Tensor(a!)[] tables, Tensor(b!)[] state, Tensor ids, Tensor[] row_grads, int optimizer, "
        "float lr, float eps, float beta1, float beta2, float weight_decay, int step) -> ()", pt2);
}
