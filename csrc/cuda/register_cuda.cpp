#include <torch/library.h>

#include "checks.h"
#include "cuda/kernels.h"
#include "fused_row_update_checks.h"

namespace deepfm_fast {

TORCH_LIBRARY_IMPL(deepfm_fast, CUDA, m) {
  m.impl("fm_interaction", &fm_interaction_cuda);
  m.impl("fm_interaction_backward", &fm_interaction_backward_cuda);
  m.impl("fused_row_update", &fused_row_update_op<fused_row_update_cuda>);
  m.impl("adam_catch_up", &adam_catch_up_op<adam_catch_up_cuda>);
  m.impl("adam_rows", &adam_rows_op<adam_rows_cuda>);
  m.impl("embedding_fm", &embedding_fm_cuda);
  m.impl("embedding_fm_backward", &embedding_fm_backward_op<embedding_fm_backward_cuda>);
}

}  // namespace deepfm_fast
