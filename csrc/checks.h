// Argument checks shared by every backend. Each error names the op and the argument, so that a
// user never needs a debugger to find which input was wrong.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <tuple>
#include <utility>

namespace deepfm_fast {

inline void check_floating(const char* op, const char* arg, const at::Tensor& t) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", arg,
              " must be a floating-point tensor (float32, float64, float16 or bfloat16), got ",
              t.scalar_type());
}

inline void check_dim(const char* op, const char* arg, const at::Tensor& t, int64_t dim,
                      const char* layout) {
  TORCH_CHECK(t.dim() == dim, op, ": ", arg, " must be a ", dim, "-D tensor ", layout, ", got a ",
              t.dim(), "-D tensor of shape ", t.sizes());
}

inline void check_same_device(const char* op, const char* arg, const at::Tensor& t,
                              const char* ref_arg, const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", arg, " is on ", t.device(), " but ", ref_arg,
              " is on ", ref.device(), "; move them to the same device");
}

inline void check_same_dtype(const char* op, const char* arg, const at::Tensor& t,
                             const char* ref_arg, const at::Tensor& ref) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", arg, " has dtype ", t.scalar_type(),
              " but ", ref_arg, " has dtype ", ref.scalar_type());
}

// Tables may be strided views of a wider row-major record (EmbeddingFM's interleaved layout: V, w
// and the optimizer state of a row side by side): each row's elements contiguous, rows any number
// of elements apart as long as they do not overlap. Row r of `t` starts at r * t.stride(0).
inline bool rows_are_strided_records(const at::Tensor& t) {
  if (t.dim() == 1) return t.size(0) <= 1 || t.stride(0) >= 1;
  if (t.dim() != 2) return false;
  const bool elements_contiguous = t.size(1) <= 1 || t.stride(1) == 1;
  return elements_contiguous && (t.size(0) <= 1 || t.stride(0) >= t.size(1));
}

inline void check_strided_records(const char* op, const char* arg, const at::Tensor& t) {
  TORCH_CHECK(rows_are_strided_records(t), op, ": ", arg, " (updated in place) must have contiguous, ",
              "non-overlapping rows (row stride >= row width, element stride 1), got strides ", t.strides(),
              " for shape ", t.sizes());
}

// emb: [B, F, K], floating point.
inline void check_fm_interaction_args(const at::Tensor& emb) {
  check_dim("fm_interaction", "emb", emb, 3, "[batch, fields, embedding_dim]");
  check_floating("fm_interaction", "emb", emb);
}

// grad_out: [B] (reduced forward) or [B, K] (per-dimension forward), same device and dtype as emb.
inline void check_fm_interaction_backward_args(const at::Tensor& grad_out, const at::Tensor& emb) {
  constexpr const char* op = "fm_interaction_backward";
  check_dim(op, "emb", emb, 3, "[batch, fields, embedding_dim]");
  check_floating(op, "emb", emb);
  check_same_device(op, "grad_out", grad_out, "emb", emb);
  check_same_dtype(op, "grad_out", grad_out, "emb", emb);
  const bool reduced = grad_out.dim() == 1 && grad_out.size(0) == emb.size(0);
  const bool per_dim = grad_out.dim() == 2 && grad_out.size(0) == emb.size(0) &&
                       grad_out.size(1) == emb.size(2);
  TORCH_CHECK(reduced || per_dim, op, ": grad_out must have shape [B] or [B, K] = [", emb.size(0),
              "] or [", emb.size(0), ", ", emb.size(2), "] for emb of shape ", emb.sizes(),
              ", got ", grad_out.sizes());
}

// ---- embedding_fm -------------------------------------------------------------------------------

// The `pooling` codes of embedding_fm, one per field (deepfm_fast._args.Pooling mirrors them).
enum Pooling : int64_t {
  kPoolSum = 0,
  kPoolMean = 1,
};

inline void check_index_dtype(const char* op, const char* arg, const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, op, ": ", arg,
              " must be an int32 or int64 tensor, got ", t.scalar_type());
}

// Everything about the arguments of embedding_fm and embedding_fm_backward that does not need to
// read tensor data: ranks, dtypes, devices, lengths and the int arguments. (The values of offsets
// and indices are checked by each backend before any row is read.)
inline void check_embedding_fm_args(const char* op, const at::Tensor& weight, const at::Tensor& indices,
                                    const at::Tensor& offsets,
                                    const c10::optional<at::Tensor>& per_sample_weights,
                                    const c10::optional<at::Tensor>& linear_weight, int64_t num_fields,
                                    int64_t mode, at::IntArrayRef pooling) {
  check_dim(op, "weight", weight, 2, "[num_embeddings, embedding_dim]");
  check_floating(op, "weight", weight);
  check_index_dtype(op, "indices", indices);
  check_index_dtype(op, "offsets", offsets);
  check_dim(op, "indices", indices, 1, "[nnz]");
  check_dim(op, "offsets", offsets, 1, "[batch * num_fields + 1]");
  check_same_device(op, "indices", indices, "weight", weight);
  check_same_device(op, "offsets", offsets, "weight", weight);
  TORCH_CHECK(num_fields >= 1, op, ": num_fields must be >= 1, got ", num_fields);
  TORCH_CHECK(offsets.numel() >= 1 && (offsets.numel() - 1) % num_fields == 0, op,
              ": offsets must have batch * num_fields + 1 entries (num_fields = ", num_fields,
              "), got ", offsets.numel(), " entries; expected ", num_fields, " * batch + 1 for some batch >= 0, e.g. ",
              ((std::max<int64_t>(offsets.numel() - 1, 0)) / num_fields) * num_fields + 1);
  TORCH_CHECK(mode == 0 || mode == 1, op, ": mode must be 0 (field) or 1 (feature), got ", mode);
  TORCH_CHECK(pooling.size() == 1 || static_cast<int64_t>(pooling.size()) == num_fields, op,
              ": pooling must have 1 or num_fields = ", num_fields, " entries, got ", pooling.size());
  for (size_t f = 0; f < pooling.size(); ++f)
    TORCH_CHECK(pooling[f] == kPoolSum || pooling[f] == kPoolMean, op, ": pooling[", f, "] must be ", int(kPoolSum),
                " (sum) or ", int(kPoolMean), " (mean), got ", pooling[f]);
  if (per_sample_weights.has_value()) {
    const at::Tensor& psw = *per_sample_weights;
    check_dim(op, "per_sample_weights", psw, 1, "[nnz]");
    check_same_device(op, "per_sample_weights", psw, "weight", weight);
    check_same_dtype(op, "per_sample_weights", psw, "weight", weight);
    TORCH_CHECK(psw.numel() == indices.numel(), op, ": per_sample_weights must have one value per index: expected ",
                indices.numel(), " (= indices.numel()), got ", psw.numel());
  }
  if (linear_weight.has_value()) {
    const at::Tensor& lw = *linear_weight;
    check_same_device(op, "linear_weight", lw, "weight", weight);
    check_same_dtype(op, "linear_weight", lw, "weight", weight);
    TORCH_CHECK(lw.dim() == 1 && lw.size(0) == weight.size(0), op, ": linear_weight must have shape [",
                weight.size(0), "] (one value per row of weight), got ", lw.sizes());
  }
}

// The inputs of embedding_fm and its backward after every check that needs no tensor data:
// contiguous, with indices and offsets of one dtype (the wider of the two). Each backend adds its
// own view of the pooling and checks the values of indices and offsets before reading a row.
struct EmbeddingFMArgs {
  at::Tensor weight, indices, offsets;
  c10::optional<at::Tensor> psw, lw;
  int64_t batch = 0;
};

inline EmbeddingFMArgs prepare_embedding_fm_args(const char* op, const at::Tensor& weight, const at::Tensor& indices,
                                                 const at::Tensor& offsets,
                                                 const c10::optional<at::Tensor>& psw,
                                                 const c10::optional<at::Tensor>& lw, int64_t num_fields,
                                                 int64_t mode, at::IntArrayRef pooling) {
  check_embedding_fm_args(op, weight, indices, offsets, psw, lw, num_fields, mode, pooling);
  EmbeddingFMArgs p;
  p.weight = rows_are_strided_records(weight) ? weight : weight.contiguous();  // no copy of a packed table
  const bool wide = indices.scalar_type() == at::kLong || offsets.scalar_type() == at::kLong;
  const auto index_type = wide ? at::kLong : at::kInt;
  p.indices = indices.to(index_type).contiguous();
  p.offsets = offsets.to(index_type).contiguous();
  if (psw.has_value()) p.psw = psw->contiguous();
  if (lw.has_value()) p.lw = *lw;  // read at row * stride(0)
  p.batch = (offsets.numel() - 1) / num_fields;
  return p;
}

// embedding_fm's outputs, filled by the device's kernel: fm [B], linear [B] (zeros without
// linear_weight), and pooled [B, F, K] when asked for, else empty. `launch(scalar, index, fm, linear,
// pooled)` runs the kernel for the table's and the ids' types (a value of each stands for its type),
// linear and pooled null where it must not write them; nothing runs for an empty batch.
template <class Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor> embedding_fm_outputs(const EmbeddingFMArgs& p, int64_t num_fields,
                                                                    bool return_pooled, Launch&& launch) {
  const auto options = p.weight.options();
  const int64_t batch = p.batch, dim = p.weight.size(1);
  at::Tensor fm = at::empty({batch}, options);
  at::Tensor linear = p.lw ? at::empty({batch}, options) : at::zeros({batch}, options);
  at::Tensor pooled = return_pooled ? at::empty({batch, num_fields, dim}, options) : at::empty({0}, options);
  if (batch > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.weight.scalar_type(), "embedding_fm", [&] {
      using scalar = scalar_t;
      AT_DISPATCH_INDEX_TYPES(p.indices.scalar_type(), "embedding_fm", [&] {
        launch(scalar{}, index_t{}, fm.mutable_data_ptr<scalar>(), p.lw ? linear.mutable_data_ptr<scalar>() : nullptr,
               return_pooled ? pooled.mutable_data_ptr<scalar>() : nullptr);
      });
    });
  }
  return {fm, linear, pooled};
}

// embedding_fm_backward's arguments as its schema (csrc/ops.cpp) passes them.
struct EmbeddingFMBackwardCall {
  const at::Tensor& grad_fm;
  const at::Tensor& grad_linear;
  const c10::optional<at::Tensor>& grad_pooled;
  const at::Tensor& weight;
  const at::Tensor& indices;
  const at::Tensor& offsets;
  const c10::optional<at::Tensor>& psw;
  const c10::optional<at::Tensor>& lw;
  int64_t num_fields, mode;
  at::IntArrayRef pooling;
  const c10::optional<at::Tensor>& pooled;
  bool per_sample_weights_grad;
};

using EmbeddingFMGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// embedding_fm_backward with its schema's signature, written once for every device: the CPU and
// CUDA files register embedding_fm_backward_op<their kernel>.
template <EmbeddingFMGrads (*Run)(const EmbeddingFMBackwardCall&)>
EmbeddingFMGrads embedding_fm_backward_op(const at::Tensor& grad_fm, const at::Tensor& grad_linear,
                                          const c10::optional<at::Tensor>& grad_pooled, const at::Tensor& weight,
                                          const at::Tensor& indices, const at::Tensor& offsets,
                                          const c10::optional<at::Tensor>& psw, const c10::optional<at::Tensor>& lw,
                                          int64_t num_fields, int64_t mode, at::IntArrayRef pooling,
                                          const c10::optional<at::Tensor>& pooled, bool per_sample_weights_grad) {
  return Run(EmbeddingFMBackwardCall{grad_fm, grad_linear, grad_pooled, weight, indices, offsets, psw, lw, num_fields,
                                     mode, pooling, pooled, per_sample_weights_grad});
}

inline void check_embedding_fm_backward_args(const at::Tensor& grad_fm, const at::Tensor& grad_linear,
                                             const c10::optional<at::Tensor>& grad_pooled,
                                             const c10::optional<at::Tensor>& pooled, const at::Tensor& weight,
                                             int64_t batch, int64_t num_fields) {
  constexpr const char* op = "embedding_fm_backward";
  for (const auto& [name, g] : {std::pair<const char*, const at::Tensor*>{"grad_fm", &grad_fm},
                               std::pair<const char*, const at::Tensor*>{"grad_linear", &grad_linear}}) {
    check_same_device(op, name, *g, "weight", weight);
    check_same_dtype(op, name, *g, "weight", weight);
    TORCH_CHECK(g->dim() == 1 && g->size(0) == batch, op, ": ", name, " must have shape [", batch, "], got ",
                g->sizes());
  }
  // grad_pooled and pooled (the forward's field vectors) are both [B, F, K] or absent/empty.
  for (const auto& [name, t] : {std::pair<const char*, const c10::optional<at::Tensor>*>{"grad_pooled", &grad_pooled},
                               std::pair<const char*, const c10::optional<at::Tensor>*>{"pooled", &pooled}}) {
    if (!t->has_value() || (*t)->numel() == 0) continue;
    const at::Tensor& v = **t;
    check_same_device(op, name, v, "weight", weight);
    check_same_dtype(op, name, v, "weight", weight);
    TORCH_CHECK(v.dim() == 3 && v.size(0) == batch && v.size(1) == num_fields && v.size(2) == weight.size(1), op,
                ": ", name, " must have shape [", batch, ", ", num_fields, ", ", weight.size(1), "], got ",
                v.sizes());
  }
}

}  // namespace deepfm_fast
