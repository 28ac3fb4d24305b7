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

struct RowUpdateArgs;  // fused_row_update_checks.h, whose fused_row_update_op<> registers the kernel
void fused_row_update_cuda(const RowUpdateArgs& call);
struct CatchUpArgs;  // the same, with adam_catch_up_op<> and adam_rows_op<>
void adam_catch_up_cuda(const CatchUpArgs& args);
std::vector<at::Tensor> adam_rows_cuda(const CatchUpArgs& args);

// embedding_fm_cuda.cu: the fused embedding gather + FM forward and its coalesced backward.
std::tuple<at::Tensor, at::Tensor, at::Tensor> embedding_fm_cuda(
    const at::Tensor& weight, const at::Tensor& indices, const at::Tensor& offsets,
    const c10::optional<at::Tensor>& per_sample_weights, const c10::optional<at::Tensor>& linear_weight,
    int64_t num_fields, int64_t mode, at::IntArrayRef pooling, bool return_pooled, bool sparse_grad);
struct EmbeddingFMBackwardCall;  // checks.h, whose embedding_fm_backward_op<> registers the kernel
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> embedding_fm_backward_cuda(
    const EmbeddingFMBackwardCall& call);

}  // namespace deepfm_fast
