"""What every test module shares: the devices and dtypes to test on, and tolerances per dtype.

CUDA is tested only where the extension has a CUDA kernel AND a GPU is visible; the reason a case
is skipped is reported by pytest (-ra).
"""
import itertools
from pathlib import Path

import pytest
import torch

import deepfm_fast

HAS_CUDA_KERNELS = deepfm_fast.cuda_kernels()
HAS_GPU = torch.cuda.is_available()

devices = ["cpu", "cuda"]
float_dtypes = [torch.float32, torch.float64]
# Reduced precision: float32 accumulation in the kernels, compared with a float32 reference.
reduced_dtypes = [torch.float16, torch.bfloat16]
all_dtypes = float_dtypes + reduced_dtypes
index_dtypes = [torch.int32, torch.int64]

# Absolute and relative tolerances against the reference computed in float64 (reduced precision:
# about 2x the error of PyTorch's own ops in that dtype, as flash-attention does).
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=2e-2, rtol=2e-2),
    torch.bfloat16: dict(atol=1e-1, rtol=5e-2),
}


def device_param(device):
    """A pytest param for `device`, skipped with the reason where it cannot run."""
    marks = []
    if device == "cuda":
        if not HAS_CUDA_KERNELS:
            marks.append(pytest.mark.skip(reason="deepfm_fast was built without CUDA kernels"))
        elif not HAS_GPU:
            marks.append(pytest.mark.skip(reason="no CUDA GPU visible"))
    return pytest.param(device, marks=marks, id=device)


def device_params(devices_=devices):
    return [device_param(d) for d in devices_]


def product(*lists):
    """Cartesian product for @pytest.mark.parametrize over several lists."""
    return list(itertools.product(*lists))


def assert_close(actual, expected, dtype=None):
    """Compares with the tolerance of `dtype` (default: actual's), casting expected to actual's dtype."""
    dtype = dtype or actual.dtype
    torch.testing.assert_close(actual, expected.to(actual.dtype), **TOLERANCES[dtype])


# The real CTR data of ../shared/data (never copied into the repository).
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_data_file(relative: str) -> Path:
    """A file of ../shared/data, or a skip with the reason where it is absent."""
    path = SHARED_DATA / relative
    if not path.is_file():
        pytest.skip(f"real data {relative} not found under {SHARED_DATA} (needs ../shared/data beside the repo)")
    return path
