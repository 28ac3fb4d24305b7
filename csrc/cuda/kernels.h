// Host entry points of the CUDA kernels, defined in the .cu files and registered for the CUDA
// dispatch key in register_cuda.cpp (which keeps the torch/library.h include out of nvcc's way).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>
#include <vector>

namespace deepfm_fast {

at::Tensor fm_interaction_cuda(const at::Tensor& emb, bool reduce_sum);
at::Tensor fm_interaction_backward_cuda(const at::Tensor& grad_out, const at::Tensor& emb);

void fused_row_update_cuda(at::TensorList tables, at::TensorList state, const at::Tensor& ids,
                           at::TensorList row_grads, const at::Tensor& step, int64_t optimizer, double lr, double eps,
                           double beta1, double beta2, double weight_decay, const c10::optional<at::Tensor>& last_step,
                           const c10::optional<at::Tensor>& catchup, bool check_ids);
void adam_catch_up_cuda(at::TensorList tables, at::TensorList state, const at::Tensor& last_step,
                        const at::Tensor& catchup, const at::Tensor& step, int64_t row_begin, int64_t row_end);
std::vector<at::Tensor> adam_rows_cuda(at::TensorList tables, at::TensorList state, const at::Tensor& last_step,
                                       const at::Tensor& catchup, const at::Tensor& step, const at::Tensor& rows);

// embedding_fm_cuda.cu: the fused embedding gather + FM forward and its coalesced backward.
std::tuple<at::Tensor, at::Tensor, at::Tensor> embedding_fm_cuda(
    const at::Tensor& weight, const at::Tensor& indices, const at::Tensor& offsets,
    const c10::optional<at::Tensor>& per_sample_weights, const c10::optional<at::Tensor>& linear_weight,
    int64_t num_fields, int64_t mode, at::IntArrayRef pooling, bool return_pooled, bool sparse_grad);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> embedding_fm_backward_cuda(
    const at::Tensor& grad_fm, const at::Tensor& grad_linear, const c10::optional<at::Tensor>& grad_pooled,
    const at::Tensor& weight, const at::Tensor& indices, const at::Tensor& offsets,
    const c10::optional<at::Tensor>& per_sample_weights, const c10::optional<at::Tensor>& linear_weight,
    int64_t num_fields, int64_t mode, at::IntArrayRef pooling, const c10::optional<at::Tensor>& pooled,
    bool per_sample_weights_grad);

}  // namespace deepfm_fast
