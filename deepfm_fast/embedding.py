"""EmbeddingFM: the embedding table, first-order weights and bias of an FM / DeepFM, on one fused op."""
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from . import ops, reference
from ._args import as_csr, field_offsets, mode_code, pooling_codes
from .optim import FusedOptimizer


class EmbeddingFM(nn.Module):
    r"""Embedding lookup + FM logit (first and second order) in one kernel pass over the table rows.

    A factorization machine (Rendle 2010) as used by DeepFM (Guo et al. 2017,
    https://arxiv.org/abs/1703.04247), over fields that share one table with per-field row blocks::

        local ids [B, F] --(+ field offsets)--> rows of V [N, K], w [N]
             |
             +--> pool each field: e_f = sum_i x_i V[j_i]  (or the mean)    --> pooled [B, F, K] (DNN)
             +--> fm     = 0.5 * sum_k((sum_f e_f)^2 - sum_f e_f^2)
             +--> linear = sum_i w[j_i] x_i
             logit [B] = bias + linear + fm

    Field ``f`` owns rows ``[off_f, off_f + field_dims[f])`` of ``weight`` with
    ``off_f = sum(field_dims[:f])``; callers pass LOCAL ids ``0 <= id < field_dims[f]``.

    Args:
        field_dims: rows (vocabulary size) of each field; ``N = sum(field_dims)``.
        embedding_dim: ``K``.
        mode: ``"field"`` (FM over pooled field vectors; DeepCTR-Torch, pytorch-fm) or
            ``"feature"`` (FM over every non-zero feature; libFM). Equal for one id per field.
        pooling: ``"sum"``, ``"mean"``, or one per field (e.g. ``["sum", "sum", "mean"]`` for two
            single-id fields and a genre list). An empty bag pools to zero.
        sparse: give ``weight`` and ``linear_weight`` coalesced sparse gradients (like
            ``nn.Embedding(sparse=True)``) for ``torch.optim.SGD``, ``Adagrad``, ``SparseAdam``.
        init_std: ``weight ~ Normal(0, init_std)``; ``linear_weight`` and ``bias`` start at 0.
        use_reference: run on the pure-PyTorch reference ops (same parameters, same results; the
            table gradient of the reference is sparse for ``sparse=True``, the first-order one dense).
        optimizer: a fused optimizer from ``deepfm_fast.optim`` (``SGD``, ``RowWiseAdagrad``,
            ``Adagrad``, ``Adam``). The backward then updates the touched rows of ``weight`` and
            ``linear_weight`` in place, with no dense gradient and no ``O(N)`` work per step;
            those two tensors get no ``.grad`` (``requires_grad=False``) and must not be given to
            a torch optimizer; ``bias`` still is. The optimizer state is in the module's buffers
            (and ``state_dict``). Each backward is one step of the tables.

    Shape:
        - ``forward(indices)``: ``indices [B, F]`` int32/int64 local ids, one per field;
          ``per_sample_weights [B, F]`` optional feature values.
        - ``forward(indices, offsets, per_sample_weights)``: CSR bags, ``indices [nnz]``,
          ``offsets [B*F + 1]`` (bag ``b*F + f``), ``per_sample_weights [nnz]``; local ids unless
          ``global_ids=True`` (e.g. the output of ``deepfm_fast.data.to_csr``).
        - Output: logit ``[B]``, or ``(logit [B], pooled [B, F, K])`` with ``return_pooled=True``.

    Example:
        >>> fm = EmbeddingFM([1000, 20, 7], 16, pooling=["sum", "mean", "sum"], sparse=True)
        >>> ids = torch.tensor([[3, 0, 6], [999, 19, 0]])
        >>> logit = fm(ids)                       # [2]
        >>> logit, pooled = fm(ids, return_pooled=True)
        >>> pooled.shape
        torch.Size([2, 3, 16])
        >>> torch.nn.functional.binary_cross_entropy_with_logits(logit, torch.ones(2)).backward()
        >>> torch.optim.SGD(fm.parameters(), lr=0.1).step()   # sparse rows of weight updated

    With a fused optimizer the table update happens inside ``backward()``::

        >>> fm = EmbeddingFM([1000, 20, 7], 16, optimizer=deepfm_fast.optim.RowWiseAdagrad(lr=0.05))
        >>> bias_opt = torch.optim.Adam([fm.bias], lr=1e-3)   # everything but the tables
        >>> torch.nn.functional.binary_cross_entropy_with_logits(fm(ids), torch.ones(2)).backward()
        >>> bias_opt.step()
    """

    def __init__(self, field_dims: Sequence[int], embedding_dim: int, *, mode: str = "field",
                 pooling: Union[str, Sequence[str]] = "sum", sparse: bool = False, init_std: float = 0.01,
                 use_reference: bool = False, optimizer: Optional[FusedOptimizer] = None):
        super().__init__()
        field_dims = [int(d) for d in field_dims]
        if not field_dims or any(d < 1 for d in field_dims):
            raise ValueError(f"EmbeddingFM: field_dims must be a non-empty list of sizes >= 1, got {field_dims}")
        mode_code(mode)
        pooling_codes(pooling, len(field_dims))
        self.field_dims = field_dims
        self.num_fields = len(field_dims)
        self.embedding_dim = embedding_dim
        self.mode = mode
        self.pooling = pooling if isinstance(pooling, str) else list(pooling)
        self.sparse = sparse
        self.use_reference = use_reference
        num_rows = sum(field_dims)
        self.weight = nn.Parameter(torch.empty(num_rows, embedding_dim))
        self.linear_weight = nn.Parameter(torch.zeros(num_rows))
        self.bias = nn.Parameter(torch.zeros(()))
        self.register_buffer("field_offsets", field_offsets(field_dims), persistent=False)
        self.register_buffer("_field_dims", torch.tensor(field_dims), persistent=False)
        self.reset_parameters(init_std)
        self.optimizer = optimizer
        if optimizer is not None:
            if not isinstance(optimizer, FusedOptimizer):
                raise TypeError(f"EmbeddingFM: optimizer must be one of deepfm_fast.optim.SGD, RowWiseAdagrad, "
                                f"Adagrad, Adam, got {type(optimizer).__name__}")
            if sparse:
                raise ValueError("EmbeddingFM: sparse=True and a fused optimizer exclude each other: the fused "
                                 "optimizer updates the tables itself, with no gradient")
            self.weight.requires_grad_(False)
            self.linear_weight.requires_grad_(False)
            for i, state in enumerate(optimizer.new_state(self.weight)):
                self.register_buffer(f"weight_optimizer_state{i}", state)
            for i, state in enumerate(optimizer.new_state(self.linear_weight.view(-1, 1))):
                self.register_buffer(f"linear_optimizer_state{i}", state)
            self.register_buffer("optimizer_step", torch.zeros((), dtype=torch.int64))

    def reset_parameters(self, init_std: float = 0.01) -> None:
        nn.init.normal_(self.weight, 0.0, init_std)
        nn.init.zeros_(self.linear_weight)
        nn.init.zeros_(self.bias)

    def _check_local(self, ids: Tensor, field_of: Tensor) -> None:
        bad = (ids < 0) | (ids >= self._field_dims[field_of])
        if bool(bad.any()):
            pos = ", ".join(str(i) for i in bad.nonzero()[0].tolist())
            flat = int(bad.reshape(-1).nonzero()[0, 0])
            f = int(field_of.reshape(-1)[flat])
            raise IndexError(f"EmbeddingFM: id {int(ids.reshape(-1)[flat])} at indices[{pos}] is out of range for "
                             f"field {f}, which has field_dims[{f}] = {self.field_dims[f]} ids (0..{self.field_dims[f] - 1})")

    def to_global(self, indices: Tensor, offsets: Optional[Tensor] = None) -> Tensor:
        """Local per-field ids -> global rows of ``weight`` (checked in eager mode)."""
        if indices.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"EmbeddingFM: indices must be an int32 or int64 tensor, got {indices.dtype}")
        if offsets is None:
            if indices.dim() != 2 or indices.shape[1] != self.num_fields:
                raise ValueError(f"EmbeddingFM: indices must be [batch, {self.num_fields}] (one id per field), "
                                 f"got shape {tuple(indices.shape)}")
            field_of = torch.arange(self.num_fields, device=indices.device).expand_as(indices)
        else:
            counts = (offsets[1:] - offsets[:-1]).long()
            if not torch.compiler.is_compiling() and (bool((counts < 0).any()) or int(counts.sum()) != indices.numel()):
                return indices  # malformed offsets: let the op raise its precise error
            bags = torch.arange(counts.numel(), device=indices.device)
            field_of = torch.repeat_interleave(bags % self.num_fields, counts, output_size=indices.numel())
        if not torch.compiler.is_compiling():
            self._check_local(indices, field_of)
        return indices + self.field_offsets[field_of].to(indices.dtype)

    def forward(self, indices: Tensor, offsets: Optional[Tensor] = None, per_sample_weights: Optional[Tensor] = None,
                *, return_pooled: bool = False, global_ids: bool = False):
        ids = indices if global_ids else self.to_global(indices, offsets)
        if self.optimizer is not None and torch.is_grad_enabled():
            ids, offsets, per_sample_weights, _ = as_csr(ids, offsets, per_sample_weights, self.num_fields)
            # The trigger makes autograd call the backward, which updates the tables in place.
            trigger = torch.empty(0, device=self.weight.device, requires_grad=True)
            fm, linear, pooled = _FusedStep.apply(trigger, self, ids, offsets, per_sample_weights, return_pooled)
            logit = self.bias + linear + fm
            return (logit, pooled) if return_pooled else logit
        fn = reference.embedding_fm if self.use_reference else ops.embedding_fm
        out = fn(self.weight, ids, offsets, per_sample_weights, self.linear_weight, num_fields=self.num_fields,
                 mode=self.mode, pooling=self.pooling, return_pooled=return_pooled, sparse=self.sparse)
        logit = self.bias + out.linear + out.fm
        return (logit, out.pooled) if return_pooled else logit

    def optimizer_states(self):
        """(table states, first-order states) of the fused optimizer, as registered buffers."""
        n = self.optimizer.num_states
        return ([getattr(self, f"weight_optimizer_state{i}") for i in range(n)],
                [getattr(self, f"linear_optimizer_state{i}") for i in range(n)])

    @torch.no_grad()
    def apply_fused_step(self, unique_ids: Tensor, row_grads: Tensor, linear_row_grads: Tensor) -> None:
        """One fused-optimizer step on the rows `unique_ids` (sorted, unique) with their summed grads."""
        self.optimizer_step += 1
        step = int(self.optimizer_step)
        # Both tables in one pass over the rows: each row costs cache misses, not arithmetic.
        self.optimizer.update([self.weight, self.linear_weight.view(-1, 1)], self.optimizer_states(), unique_ids,
                              [row_grads, linear_row_grads.view(-1, 1)], step)

    def extra_repr(self) -> str:
        return (f"field_dims={self.field_dims}, embedding_dim={self.embedding_dim}, mode={self.mode!r}, "
                f"pooling={self.pooling!r}, sparse={self.sparse}, use_reference={self.use_reference}"
                + (f", optimizer={self.optimizer}" if self.optimizer is not None else ""))


class _FusedStep(torch.autograd.Function):
    """embedding_fm whose backward applies the module's fused optimizer to the touched rows.

    The tables are read from the module, not saved, so that the in-place update is not an autograd
    version-counter error; the backward computes every gradient before it updates anything.
    """

    @staticmethod
    def forward(ctx, trigger, module, ids, offsets, per_sample_weights, return_pooled):
        # Field mode keeps the field vectors for the backward, which then needs no second gather.
        keep_pooled = return_pooled or (module.mode == "field" and not module.use_reference)
        args = dict(num_fields=module.num_fields, mode=module.mode, pooling=module.pooling,
                    return_pooled=keep_pooled)
        if module.use_reference:
            out = reference.embedding_fm(module.weight, ids, offsets, per_sample_weights, module.linear_weight, **args)
        else:
            out = ops.embedding_fm(module.weight, ids, offsets, per_sample_weights, module.linear_weight, **args)
        ctx.module = module
        ctx.save_for_backward(ids, offsets, per_sample_weights, out.pooled)
        pooled = out.pooled if return_pooled else out.pooled.new_empty(0)
        if not return_pooled:
            ctx.mark_non_differentiable(pooled)
        return out.fm, out.linear, pooled

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_fm, grad_linear, grad_pooled):
        module = ctx.module
        ids, offsets, per_sample_weights, pooled = ctx.saved_tensors
        if module.use_reference:
            unique_ids, row_grads, linear_row_grads, grad_psw = _reference_coalesced_grads(
                module, ids, offsets, per_sample_weights, grad_fm, grad_linear, grad_pooled)
        else:
            mode = mode_code(module.mode)
            pooling = pooling_codes(module.pooling, module.num_fields)
            unique_ids, row_grads, linear_row_grads, grad_psw = ops.embedding_fm_backward(
                grad_fm, grad_linear, grad_pooled, module.weight, ids, offsets, per_sample_weights,
                module.linear_weight, module.num_fields, mode, pooling, pooled,
                per_sample_weights is not None and ctx.needs_input_grad[4])
        module.apply_fused_step(unique_ids, row_grads, linear_row_grads)
        grad_psw = grad_psw if per_sample_weights is not None and ctx.needs_input_grad[4] else None
        return None, None, None, None, grad_psw, None


def _reference_coalesced_grads(module, ids, offsets, per_sample_weights, grad_fm, grad_linear, grad_pooled):
    """The coalesced gradient, from autograd through the reference op (dense, so O(N): tests only)."""
    with torch.enable_grad():
        weight = module.weight.detach().requires_grad_()
        linear_weight = module.linear_weight.detach().requires_grad_()
        psw = per_sample_weights.detach().requires_grad_() if per_sample_weights is not None else None
        out = reference.embedding_fm(weight, ids, offsets, psw, linear_weight, num_fields=module.num_fields,
                                     mode=module.mode, pooling=module.pooling, return_pooled=grad_pooled is not None
                                     and grad_pooled.numel() > 0)
        outputs, grads = [out.fm, out.linear], [grad_fm, grad_linear]
        if out.pooled.numel() > 0:
            outputs.append(out.pooled)
            grads.append(grad_pooled)
        inputs = [weight, linear_weight] + ([psw] if psw is not None else [])
        result = torch.autograd.grad(outputs, inputs, grads, allow_unused=True)
    unique_ids = torch.unique(ids.long())
    grad_psw = result[2] if psw is not None else None
    return unique_ids, result[0][unique_ids], result[1][unique_ids], grad_psw
