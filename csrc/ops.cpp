// Every schema of the deepfm_fast library lives here; backends register kernels in their own
// files with TORCH_LIBRARY_IMPL, and fake kernels and autograd are registered from Python.
#ifndef DEEPFM_FAST_NO_PYTHON  // the Python-free op library of examples/aoti_serve defines it
#include <pybind11/pybind11.h>
#endif
#include <torch/library.h>

#include <atomic>

#include "bounds_check.h"

namespace deepfm_fast {
namespace {
std::atomic<int> g_cuda_bounds_check{kBoundsError};
thread_local bool t_cuda_checks_deferred = false;
}  // namespace

bool cuda_checks_deferred() { return t_cuda_checks_deferred; }

bool set_cuda_checks_deferred(bool deferred) {
  const bool previous = t_cuda_checks_deferred;
  t_cuda_checks_deferred = deferred;
  return previous;
}

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
#ifndef DEEPFM_FAST_NO_PYTHON
PYBIND11_MODULE(_C, m) {
  m.def("set_cuda_bounds_check", &deepfm_fast::set_cuda_bounds_check, pybind11::arg("mode"),
        "Bounds-check mode of the CUDA kernels: 0 error, 1 clamp, 2 off (see deepfm_fast.ops.set_cuda_bounds_check).");
  m.def("get_cuda_bounds_check", &deepfm_fast::cuda_bounds_check, "The current bounds-check mode code.");
  m.def("set_cuda_checks_deferred", &deepfm_fast::set_cuda_checks_deferred, pybind11::arg("deferred"),
        "This thread's CUDA checks deferred to the next backward (see deepfm_fast.ops.deferred_cuda_checks); "
        "returns the previous setting.");
}
#endif

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
  // (the field vectors e_f) when return_pooled, else an empty tensor. sparse_grad: the gradients of
  // weight and linear_weight are coalesced sparse COO tensors (sparse_rows) instead of dense ones.
  m.def("embedding_fm(Tensor weight, Tensor indices, Tensor offsets, Tensor? per_sample_weights, "
        "Tensor? linear_weight, int num_fields, int mode, int[] pooling, bool return_pooled, bool sparse_grad=False) "
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
  // ([N] or [N, D_t] tables with the same rows, e.g. the embedding table and the first-order
  // weights: one call updates both), with the summed row gradients row_grads[t] ([U] or [U, D_t]):
  // what the fused-optimizer backward of EmbeddingFM calls after embedding_fm_backward. `step` is
  // the step counter, a CPU int64 scalar the op increments first (its new value t is the step for
  // the bias corrections). optimizer: the kCode of a rule of fused_row_update.h (deepfm_fast.optim
  // has its class), which says its states per table (kStates, shaped like the table but for the
  // kRowState one, [N]); Adam (torch.optim.Adam, kCatchesUp) catches the rows that no step touched
  // up in closed form when next touched, with last_step [N] int64, the step each row is up to date
  // with, and catchup [P + 1, 11] float64, the coefficients of gaps 0..P; each step also catches up
  // a 1/P slice of the rows. `state` lists the states table by table; they are float32 (float64 for
  // float64 tables). weight_decay is L2 added to the gradient of the touched rows only.
  // check_ids=False skips the check of the ids (and, on CUDA, its sync) for callers that guarantee
  // them, like EmbeddingFM with the output of embedding_fm_backward.
  m.def("fused_row_update(Tensor(a!)[] tables, Tensor(b!)[] state, Tensor ids, Tensor[] row_grads, Tensor(c!) step, "
        "int optimizer, float lr, float eps, float beta1, float beta2, float weight_decay, Tensor(d!)? last_step=None, "
        "Tensor(e!)? catchup=None, bool check_ids=True) -> ()", pt2);
  // Adam (optimizer 4, above): brings the rows [row_begin, row_end) (row_end -1: to the last row) up
  // to step `step` (CPU int64 scalar, not changed), as dense Adam would have moved them over the steps
  // since last_step[row]: every row before evaluation or export (a flush).
  m.def("adam_catch_up(Tensor(a!)[] tables, Tensor(b!)[] state, Tensor(c!) last_step, Tensor catchup, Tensor step, "
        "int row_begin=0, int row_end=-1) -> ()", pt2);
  // Adam: copies of the rows `rows` ([U] int64) of every table as dense Adam has them after step
  // `step`, nothing changed: what a training forward reads (so it needs no in-place catch-up, which
  // keeps the forward functional for torch.compile).
  m.def("adam_rows(Tensor[] tables, Tensor[] state, Tensor last_step, Tensor catchup, Tensor step, Tensor rows) "
        "-> Tensor[]", pt2);
  // embedding_fm whose backward applies a fused optimizer to the touched rows of weight and
  // linear_weight (with fused_row_update; the optimizer arguments are those of fused_row_update):
  // the training forward of EmbeddingFM with a fused optimizer. The forward is embedding_fm; its
  // autograd (registered from Python) updates the tables in place and gives them no gradient.
  // With `rows`, the forward reads row_weight and row_linear_weight, copies of those rows of the
  // tables (adam_rows), and `indices` index them; the backward updates the tables' rows.
  // The states come one by one (those the optimizer has, of weight then of linear_weight), not as
  // a Tensor[]: torch 2.13's registered autograd miscounts the gradients of list inputs. `sync`
  // names a process group of deepfm_fast.distributed that merges the rows of every rank before the
  // update (0: none).
  m.def("embedding_fm_step(Tensor weight, Tensor linear_weight, Tensor indices, Tensor offsets, "
        "Tensor? per_sample_weights, int num_fields, int mode, int[] pooling, bool return_pooled, "
        "Tensor? weight_state0, Tensor? weight_state1, Tensor? linear_state0, Tensor? linear_state1, Tensor step, "
        "Tensor? last_step, Tensor? catchup, int optimizer, float lr, float eps, float beta1, float beta2, "
        "float weight_decay, int sync=0, Tensor? rows=None, Tensor? row_weight=None, Tensor? row_linear_weight=None) "
        "-> (Tensor fm, Tensor linear, Tensor pooled)", pt2);
  // The backward of embedding_fm_step with its update: the fused_row_update of weight and
  // linear_weight (its arguments) with the row gradients embedding_fm_backward would give
  // (grad_fm, grad_linear, grad_pooled, pooled as there; no per-sample weights; `rows`, row_weight,
  // row_linear_weight as in embedding_fm_step; fm_mode is `mode`, a name auto_functionalized keeps for
  // itself). With one id per bag and the forward's pooled it
  // needs no second pass over the occurrences (csrc/cpu/fused_step_cpu.cpp).
  m.def("embedding_fm_step_update(Tensor grad_fm, Tensor grad_linear, Tensor? grad_pooled, Tensor? pooled, "
        "Tensor(a!) weight, Tensor(b!) linear_weight, Tensor indices, Tensor offsets, int num_fields, int fm_mode, "
        "int[] pooling, Tensor? rows, Tensor? row_weight, Tensor? row_linear_weight, Tensor(c!)[] state, "
        "Tensor(d!) step, Tensor(e!)? last_step, Tensor(f!)? catchup, int optimizer, float lr, float eps, "
        "float beta1, float beta2, float weight_decay) -> ()", pt2);
  // param[rows] ([U, ...], rows [U] int64 sorted and unique, e.g. the rows an L2 penalty covers),
  // whose gradient is dense or, with sparse_grad, a coalesced sparse COO tensor (sparse_rows).
  m.def("gather_rows(Tensor param, Tensor rows, bool sparse_grad=False) -> Tensor", pt2);
  // The coalesced sparse COO tensor of `size` whose rows `ids` ([U] int64, sorted and unique) hold
  // `values` [U, ...]: the sparse gradient of a table (what nn.Embedding(sparse=True) gives).
  m.def("sparse_rows(Tensor ids, Tensor values, SymInt[] size) -> Tensor", pt2);
}
