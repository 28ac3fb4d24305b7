"""Typed wrappers over the `torch.ops.deepfm_fast` custom ops, with their fake kernels and autograd.

Fake (meta) kernels and autograd are registered here, in Python, as PyTorch recommends for custom
ops: that is what lets `torch.compile(fullgraph=True)` and `torch.export` trace through them.
Without the compiled extension every wrapper runs the `deepfm_fast.reference` implementation.
"""
import torch
from torch import Tensor

from . import _backend, reference


def fm_interaction(emb: Tensor, reduce_sum: bool = True) -> Tensor:
    """FM second-order interaction of pre-gathered field embeddings, fused forward and backward.

    ``out[b] = 0.5 * sum_k((sum_f emb[b, f, k])^2 - sum_f emb[b, f, k]^2)``.

    Args:
        emb: ``[B, F, K]`` float32/float64 (float16/bfloat16 accumulate in float32). Any strides.
        reduce_sum: sum over ``k`` (``[B]``); otherwise ``[B, K]``.

    Example:
        >>> emb = torch.randn(4096, 39, 16, requires_grad=True)
        >>> fm_interaction(emb).sum().backward()
    """
    if not _backend.compiled():
        return reference.fm_interaction(emb, reduce_sum)
    return torch.ops.deepfm_fast.fm_interaction.default(emb, reduce_sum)


def _register_fm_interaction():
    lib = "deepfm_fast::"

    @torch.library.register_fake(lib + "fm_interaction")
    def _(emb, reduce_sum=True):
        torch._check(emb.dim() == 3, lambda: f"fm_interaction: emb must be a 3-D tensor, got {emb.dim()}-D")
        torch._check(emb.is_floating_point(), lambda: f"fm_interaction: emb must be floating point, got {emb.dtype}")
        shape = (emb.shape[0],) if reduce_sum else (emb.shape[0], emb.shape[2])
        return emb.new_empty(shape)

    @torch.library.register_fake(lib + "fm_interaction_backward")
    def _(grad_out, emb):
        torch._check(emb.dim() == 3, lambda: f"fm_interaction_backward: emb must be a 3-D tensor, got {emb.dim()}-D")
        torch._check(
            grad_out.device == emb.device,
            lambda: f"fm_interaction_backward: grad_out is on {grad_out.device} but emb is on {emb.device}",
        )
        return emb.new_empty(emb.shape)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    def backward(ctx, grad_out):
        (emb,) = ctx.saved_tensors
        return torch.ops.deepfm_fast.fm_interaction_backward.default(grad_out, emb), None

    torch.library.register_autograd(lib + "fm_interaction", backward, setup_context=setup_context)

    # Double backward. The backward is g * (S - e) with S = sum_f e, so for an incoming gradient gg:
    # d/d g = sum_f gg * (S - e) (summed over k as well when the forward reduced over k), and
    # d/d e = g * (sum_f gg - gg), which is the backward op itself applied to gg.
    def setup_backward_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def double_backward(ctx, grad_grad_emb):
        grad_out, emb = ctx.saved_tensors
        grad_grad_out = grad_emb = None
        if ctx.needs_input_grad[0]:
            per_dim = grad_grad_emb.sum(1) * emb.sum(1) - (grad_grad_emb * emb).sum(1)
            grad_grad_out = per_dim if grad_out.dim() == 2 else per_dim.sum(1)
        if ctx.needs_input_grad[1]:
            grad_emb = torch.ops.deepfm_fast.fm_interaction_backward.default(grad_out, grad_grad_emb)
        return grad_grad_out, grad_emb

    torch.library.register_autograd(
        lib + "fm_interaction_backward", double_backward, setup_context=setup_backward_context
    )


if _backend.compiled():
    _register_fm_interaction()
