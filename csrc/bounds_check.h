// The process-wide bounds-check mode of the CUDA kernels (FBGEMM-style), set from Python through
// deepfm_fast._C.set_cuda_bounds_check and read by every CUDA launch. The CPU kernels always check.
#pragma once

namespace deepfm_fast {

enum BoundsCheck : int { kBoundsError = 0, kBoundsClamp = 1, kBoundsOff = 2 };

int cuda_bounds_check();
void set_cuda_bounds_check(int mode);

}  // namespace deepfm_fast
