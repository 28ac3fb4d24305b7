// Host entry points of the CUDA kernels, defined in the .cu files and registered for the CUDA
// dispatch key in register_cuda.cpp (which keeps the torch/library.h include out of nvcc's way).
#pragma once

#include <ATen/core/Tensor.h>

namespace deepfm_fast {

at::Tensor fm_interaction_cuda(const at::Tensor& emb, bool reduce_sum);
at::Tensor fm_interaction_backward_cuda(const at::Tensor& grad_out, const at::Tensor& emb);

void fused_row_update_cuda(const at::Tensor& weight, at::TensorList state, const at::Tensor& ids,
                           const at::Tensor& row_grads, int64_t optimizer, double lr, double eps, double beta1,
                           double beta2, double weight_decay, int64_t step);

}  // namespace deepfm_fast
