"""Taking a trained model to serving: ONNX (both exporters), TorchScript and AOTInductor.

* ONNX: ``torch.onnx.export(model, args, dynamo=False or True)`` needs nothing more. While an ONNX
  export runs (``torch.onnx.is_in_onnx_export()``), `FMInteraction` and `EmbeddingFM` compute
  with standard PyTorch ops (`fm_interaction`, `embedding_fm` below) instead of the fused
  kernels, so the graph holds standard ONNX ops only (Gather, CumSum, ReduceSum...) and
  any ONNX runtime runs it. An `EmbeddingFM` with a fused optimizer exports its inference path
  and must be in eval mode (``eval()`` also brings Adam's rows up to date). Pass the module: an
  ``ExportedProgram`` made beforehand by ``torch.export`` holds the fused ops, which ONNX lacks.
* TorchScript: ``torch.jit.script`` compiles `FMInteraction` (on the fused op); `EmbeddingFM`
  (and the models holding it) refuse with an error that names ``torch.jit.trace``,
  ``torch.export`` and ``torch.compile``, which work.
* AOTInductor: `ServingModel` gives a model plain tensor inputs (ids, or CSR bags) and returns
  probabilities; ``torch.export`` keeps the fused ops, so the ``.pt2`` package needs the op library
  loaded where it runs (``import deepfm_fast`` in Python; from C++ see examples/aoti_serve).
"""
from typing import Optional

import torch
from torch import Tensor, nn

from . import reference
from ._args import MODES, EmbeddingFMOutput, as_csr, mode_code, pooling_codes

try:
    from torch.onnx._internal.exporter import _flags as _onnx_flags
    from torch.onnx._internal.torchscript_exporter import _globals as _onnx_globals
except ImportError:  # another torch: the public is_in_onnx_export() alone
    _onnx_flags = _onnx_globals = None


def onnx_exporting() -> bool:
    """True while ``torch.onnx.export`` traces a model, with either exporter.

    The two flags behind ``torch.onnx.is_in_onnx_export()``, read directly: that function imports
    them at each call (about 30 us, on every forward), and torch.compile's tracer folds it to False,
    also in the strict ``torch.export`` that the dynamo exporter falls back to."""
    if _onnx_flags is None or _onnx_globals is None:
        return torch.onnx.is_in_onnx_export()
    # The attribute, not the property in_onnx_export: torch.compile refuses to trace into torch.onnx.
    return bool(getattr(_onnx_globals.GLOBALS, "_in_onnx_export", False) or _onnx_flags._is_onnx_exporting)


def fm_interaction(emb: Tensor, reduce_sum: bool = True) -> Tensor:
    """`deepfm_fast.ops.fm_interaction` in standard ops (the reference math), for an export."""
    return reference.fm_interaction(emb, reduce_sum)


def embedding_fm(weight: Tensor, indices: Tensor, offsets: Optional[Tensor], per_sample_weights: Optional[Tensor],
                 linear_weight: Tensor, *, num_fields: int, mode: str, pooling, return_pooled: bool,
                 pool_first_order: bool = False) -> EmbeddingFMOutput:
    """`deepfm_fast.ops.embedding_fm` (inference) in standard ops, for an export; with
    ``pool_first_order`` the first-order term is pooled like the embeddings (`EmbeddingFM`).

    One id per field (``[B, F]``): plain gathers (every pooling and both modes agree on bags of
    one id). CSR bags: each bag's sum is the difference of two prefix sums at its offsets (in
    float64), which needs only Gather and CumSum, where a scatter-add over the bags would give
    wrong sums with the TorchScript exporter (its ScatterElements drops repeated indices)."""
    if offsets is None:
        as_csr(indices, offsets, per_sample_weights, num_fields)  # the op's shape checks
        ids = indices.long()
        vectors = weight[ids]                                                   # [B, F, K]
        first = linear_weight[ids]                                              # [B, F]
        if per_sample_weights is not None:
            x = per_sample_weights.reshape(ids.shape)
            vectors = vectors * x.unsqueeze(2)
            first = first * x
        fm = reference.fm_interaction(vectors)
        return EmbeddingFMOutput(fm, first.sum(1), vectors if return_pooled else weight.new_empty(0))
    offsets = offsets.long()
    ids = indices.long()
    vectors = weight[ids]                                                       # [nnz, K]
    first = linear_weight[ids]                                                  # [nnz]
    if per_sample_weights is not None:
        vectors = vectors * per_sample_weights.unsqueeze(1)
        first = first * per_sample_weights
    batch = (offsets.shape[0] - 1) // num_fields

    def segment_sums(values: Tensor, bounds: Tensor) -> Tensor:
        prefix = torch.cat([values.new_zeros((1,) + values.shape[1:], dtype=torch.float64),
                            torch.cumsum(values.double(), 0)])
        return (prefix[bounds[1:]] - prefix[bounds[:-1]]).to(values.dtype)

    pooled = segment_sums(vectors, offsets).view(batch, num_fields, -1)        # bag sums [B, F, K]
    linear = segment_sums(first, offsets).view(batch, num_fields)
    codes = pooling_codes(pooling, num_fields)
    if any(codes):
        mean = torch.tensor(codes, dtype=torch.bool, device=weight.device).expand(num_fields)
        counts = (offsets[1:] - offsets[:-1]).clamp(min=1).to(weight.dtype).view(batch, num_fields)
        divisor = torch.where(mean, counts, torch.ones_like(counts))
        pooled = pooled / divisor.unsqueeze(2)
        if pool_first_order:
            linear = linear / divisor
    if mode_code(mode) == MODES["field"]:
        fm = reference.fm_interaction(pooled)
    else:
        sample_ends = offsets[::num_fields]                                     # [B + 1]
        fm = 0.5 * (segment_sums(vectors, sample_ends).pow(2) - segment_sums(vectors.pow(2), sample_ends)).sum(1)
    return EmbeddingFMOutput(fm, linear.sum(1), pooled if return_pooled else weight.new_empty(0))


class ServingModel(nn.Module):
    """A CTR model of `deepfm_fast.models` (DeepFM, FM, LR) with plain tensor inputs, for export.

    ``forward(indices)`` takes ``[B, F]`` local ids (models of SparseFields only);
    ``forward(indices, offsets, per_sample_weights)`` global CSR bags, what
    ``deepfm_fast.data.to_csr(batch, model.fields)`` returns. It returns click probabilities ``[B]``
    (``probabilities=False``: logits). It puts the model in eval mode (a serving model stays there:
    an exporter that restores the mode it found restores this one's).

    Example::

        serving = ServingModel(model)
        ep = torch.export.export(serving, (ids,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    """

    def __init__(self, model: nn.Module, probabilities: bool = True):
        super().__init__()
        self.model = model
        self.probabilities = probabilities
        self.eval()

    def forward(self, indices: Tensor, offsets: Optional[Tensor] = None,
                per_sample_weights: Optional[Tensor] = None) -> Tensor:
        logit = self.model.logit_of_ids(indices, offsets, per_sample_weights)
        return torch.sigmoid(logit) if self.probabilities else logit
