"""nn.Modules built on the fused ops."""
import torch
from torch import Tensor, nn

from . import _backend, ops

if _backend.compiled():
    def _scripted_fm_interaction(emb: Tensor, reduce_sum: bool) -> Tensor:
        """What torch.jit.script compiles for `ops.fm_interaction`: the op itself (autograd included)."""
        return torch.ops.deepfm_fast.fm_interaction(emb, reduce_sum)
else:
    def _scripted_fm_interaction(emb: Tensor, reduce_sum: bool) -> Tensor:
        """Without the compiled kernels: the reference math, in scriptable form."""
        if emb.dim() != 3:
            raise ValueError("fm_interaction: emb must be a 3-D tensor [batch, fields, embedding_dim]")
        interaction = 0.5 * (emb.sum(dim=1).pow(2) - emb.pow(2).sum(dim=1))
        return interaction.sum(dim=1) if reduce_sum else interaction


class FMInteraction(nn.Module):
    r"""Drop-in FM layer over pre-gathered field embeddings, on the fused kernel.

    The second-order term of a factorization machine (Rendle 2010) with the square-of-sum trick,
    as in DeepFM (Guo et al. 2017, arXiv:1703.04247)::

        emb [B, F, K] --> 0.5 * sum_k( (sum_f emb)^2 - sum_f emb^2 ) --> [B, 1]

    It takes the same input and returns the same output as DeepCTR-Torch's
    ``deepctr_torch.layers.interaction.FM`` and pytorch-fm's
    ``torchfm.layer.FactorizationMachine(reduce_sum)``, so either can be swapped for it in an existing
    model without retraining (the layer has no parameters).

    Args:
        reduce_sum: sum over the embedding dimension (output ``[B, 1]``); else output ``[B, K]``.

    Shape:
        - Input: ``[B, F, K]`` float tensor (any strides).
        - Output: ``[B, 1]`` or ``[B, K]``.

    Example:
        >>> fm = FMInteraction()
        >>> fm(torch.randn(32, 26, 16)).shape
        torch.Size([32, 1])
    """

    def __init__(self, reduce_sum: bool = True):
        super().__init__()
        self.reduce_sum = reduce_sum

    def forward(self, emb: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles this branch only
            out = _scripted_fm_interaction(emb, self.reduce_sum)
        else:
            out = ops.fm_interaction(emb, self.reduce_sum)
        return out.unsqueeze(1) if self.reduce_sum else out

    def extra_repr(self) -> str:
        return f"reduce_sum={self.reduce_sum}"
