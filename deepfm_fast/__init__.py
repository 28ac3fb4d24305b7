"""deepfm_fast: fused CPU and CUDA kernels for DeepFM-style CTR models in PyTorch.

`deepfm_fast.ops` holds the fused ops, `deepfm_fast.reference` their pure-PyTorch oracles, and the
modules below wrap them. `backend()` says whether the compiled kernels are in use.
"""
from . import ops, reference
from ._args import EmbeddingFMOutput
from ._backend import backend, cuda_kernels
from .embedding import EmbeddingFM
from .layers import FMInteraction

__version__ = "0.1.0"

__all__ = ["EmbeddingFM", "EmbeddingFMOutput", "FMInteraction", "backend", "cuda_kernels", "ops", "reference",
           "__version__"]
