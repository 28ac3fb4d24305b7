// The process-wide bounds-check mode of the CUDA kernels (FBGEMM-style), set from Python through
// deepfm_fast._C.set_cuda_bounds_check and read by every CUDA launch. The CPU kernels always check.
#pragma once

namespace deepfm_fast {

enum BoundsCheck : int { kBoundsError = 0, kBoundsClamp = 1, kBoundsOff = 2 };

int cuda_bounds_check();
void set_cuda_bounds_check(int mode);

// Inside a fused training step on CUDA (EmbeddingFM with a fused optimizer), "error" mode defers
// the checks of the step's forward ops (embedding_fm, adam_rows) to the one device->host copy the
// step's backward makes anyway: they record what they find in the device error word, and the
// backward raises it before any row is updated. Per thread (the forward runs on the caller's);
// set by deepfm_fast.ops.deferred_cuda_checks. Returns the previous setting.
bool cuda_checks_deferred();
bool set_cuda_checks_deferred(bool deferred);

}  // namespace deepfm_fast
