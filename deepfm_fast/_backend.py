"""Loads the compiled kernels once and says which backend the ops run on.

`import deepfm_fast` must work without a build (a source checkout, a failed compile): then the ops
fall back to `deepfm_fast.reference` and one warning says how to build. Setting the environment
variable DEEPFM_FAST_BACKEND=reference forces the reference ops, e.g. to compare or debug.
"""
import importlib
import os
import warnings

import torch

BUILD_HINT = "pip install --no-build-isolation -e .  (see README.md, 'Build')"

_C = None
_load_error = None
if os.environ.get("DEEPFM_FAST_BACKEND", "").strip().lower() != "reference":
    try:
        # Loading the shared object registers the ops in torch.ops.deepfm_fast.
        _C = importlib.import_module("deepfm_fast._C")
    except ImportError as error:  # no build, or built against another torch
        _load_error = error
        warnings.warn(
            f"deepfm_fast: compiled kernels not available ({error}); using the pure-PyTorch "
            f"reference ops, which are much slower. Build them with: {BUILD_HINT}",
            RuntimeWarning,
            stacklevel=2,
        )


def compiled() -> bool:
    """True when the ops run on the compiled kernels of deepfm_fast._C."""
    return _C is not None


def backend() -> str:
    """'compiled' when the fused C++/CUDA kernels are in use, else 'reference' (pure PyTorch)."""
    return "compiled" if compiled() else "reference"


def has_kernel(op_name: str, device_type: str) -> bool:
    """True when the compiled op `deepfm_fast::<op_name>` has a kernel for `device_type` ('cpu', 'cuda')."""
    if not compiled():
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"deepfm_fast::{op_name}", device_type.upper())


def cuda_kernels() -> bool:
    """True when the extension was built with CUDA kernels (a GPU may still be absent)."""
    return has_kernel("fm_interaction", "cuda")
