"""Pure-PyTorch versions of every deepfm_fast op: the oracle the tests compare the kernels with.

They are written for clarity, from the formulas in the DeepFM and FM papers, and differentiate
through ordinary autograd. The library falls back to them when the compiled kernels are missing.
"""
import torch
from torch import Tensor


def fm_interaction(emb: Tensor, reduce_sum: bool = True) -> Tensor:
    """FM second-order term over pre-gathered field embeddings (Rendle 2010, square-of-sum trick).

    Args:
        emb: ``[B, F, K]`` field embeddings.
        reduce_sum: sum over the embedding dimension.

    Returns:
        ``[B]`` ``0.5 * sum_k((sum_f e)^2 - sum_f e^2)``, or ``[B, K]`` without the sum over ``k``.
    """
    if emb.dim() != 3:
        raise ValueError(f"fm_interaction: emb must be a 3-D tensor [batch, fields, embedding_dim], got shape {tuple(emb.shape)}")
    square_of_sum = emb.sum(dim=1).pow(2)
    sum_of_square = emb.pow(2).sum(dim=1)
    interaction = 0.5 * (square_of_sum - sum_of_square)
    return interaction.sum(dim=1) if reduce_sum else interaction
