// Argument checks shared by every backend. Each error names the op and the argument, so that a
// user never needs a debugger to find which input was wrong.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

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

}  // namespace deepfm_fast
