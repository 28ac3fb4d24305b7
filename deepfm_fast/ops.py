"""Typed wrappers over the `torch.ops.deepfm_fast` custom ops, with their fake kernels and autograd.

Fake (meta) kernels and autograd are registered here, in Python, as PyTorch recommends for custom
ops: that is what lets `torch.compile(fullgraph=True)` and `torch.export` trace through them.
Without the compiled extension the wrappers with a `deepfm_fast.reference` counterpart
(`fm_interaction`, `embedding_fm`, `gather_rows`, `fused_row_update`, `adam_catch_up`, `adam_rows`)
run it; `embedding_fm_backward` and `embedding_fm_step` call their op and need the extension
(`EmbeddingFM` then trains through the reference instead of calling them).
"""
import contextlib
import warnings
from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

from . import _backend, export, reference
from ._args import EmbeddingFMOutput, as_csr, mode_code, pooling_codes
from ._row_merge import merge_rows, merges_across_ranks


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
    if not _backend.compiled() or export.onnx_exporting():  # ONNX: standard ops (deepfm_fast.export)
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



def embedding_fm(weight: Tensor, indices: Tensor, offsets: Optional[Tensor] = None,
                 per_sample_weights: Optional[Tensor] = None, linear_weight: Optional[Tensor] = None, *,
                 num_fields: Optional[int] = None, mode: str = "field",
                 pooling: Union[str, Sequence[str]] = "sum", return_pooled: bool = False,
                 sparse: bool = False) -> EmbeddingFMOutput:
    """Fused embedding gather + pooling + FM second order + first order, in one pass over the rows.

    For sample ``b``, field ``f`` and the ids ``j_i`` of its bag with values ``x_i``:

    - ``mode="field"`` (DeepCTR-Torch, pytorch-fm): ``e_f = sum_i x_i V[j_i]`` (divided by the bag
      size for ``"mean"``; an empty bag pools to 0), ``fm = 0.5 * sum_k((sum_f e_f)^2 - sum_f e_f^2)``.
    - ``mode="feature"`` (libFM, Rendle 2010): the same formula over every ``x_i V[j_i]`` of the
      sample; ``pooling`` then only shapes ``pooled``. With one id per field both modes agree.
    - ``linear = sum_i w[j_i] x_i`` (zeros without ``linear_weight``); the bias is the caller's.

    Args:
        weight: ``V [N, K]``, float32/float64 (float16/bfloat16 accumulate in float32).
        indices: ``[B, F]`` int32/int64 global row ids, one per field (``offsets=None``), or CSR
            ``[nnz]`` with ``offsets``.
        offsets: ``[B*F + 1]`` sample-major bag boundaries (bag ``b*F + f``), ``offsets[-1] == nnz``,
            like ``nn.EmbeddingBag(include_last_offset=True)``.
        per_sample_weights: feature values ``x_i``, ``[nnz]`` (or ``[B, F]`` with ``[B, F]`` ids).
        linear_weight: first-order weights ``w [N]``.
        num_fields: ``F``; required with CSR input.
        mode: ``"field"`` or ``"feature"``.
        pooling: ``"sum"``, ``"mean"``, or one of them per field (e.g. a mean-pooled genre list
            beside sum-pooled single-id fields).
        return_pooled: also return the field vectors ``pooled [B, F, K]`` (the DNN input of DeepFM).
            The backward reuses them instead of reading the table again, so do not modify them in
            place (autograd raises an error if you do; take a copy to change them).
        sparse: gradients of ``weight`` and ``linear_weight`` as coalesced ``torch.sparse_coo``
            tensors (what ``nn.Embedding(sparse=True)`` gives; for ``torch.optim.SGD``, ``Adagrad``,
            ``SparseAdam``); else dense. Both trace with ``torch.compile(fullgraph=True)``.

    Returns:
        ``EmbeddingFMOutput(fm [B], linear [B], pooled [B, F, K] or an empty tensor)``.

    Bounds checks: on the CPU every id and offset is checked before any row is read (an error names
    the argument, the offending value and its position; the check costs no synchronisation). On
    CUDA, `set_cuda_bounds_check` chooses, FBGEMM-style: ``"error"`` (default) checks the same things
    on the GPU and raises the same errors, at the cost of ONE device->host synchronisation per
    forward call (the backward folds its check into the one sync it needs anyway to size its
    output); ``"clamp"`` and ``"off"`` skip the check and the sync. No mode ever reads out of bounds.

    Determinism: the backward on CPU and CUDA is deterministic by default and by construction (no
    floating-point atomics: the ids are sorted stably; the CPU sums each row's gradient in position
    order, CUDA in two levels, chunks of 64 positions and then the chunks in order), so
    ``torch.use_deterministic_algorithms(True)`` changes nothing and raises nothing; the two devices
    sum in different orders, so their gradients agree to round-off, not bit for bit. The CUDA
    backward makes one device->host synchronisation (the number of unique rows).

    Example:
        >>> V, w = torch.randn(1000, 16, requires_grad=True), torch.zeros(1000, requires_grad=True)
        >>> ids = torch.randint(0, 1000, (4096, 26))
        >>> out = embedding_fm(V, ids, linear_weight=w)
        >>> (out.fm + out.linear).sum().backward()
    """
    if not _backend.compiled():
        return reference.embedding_fm(weight, indices, offsets, per_sample_weights, linear_weight,
                                      num_fields=num_fields, mode=mode, pooling=pooling,
                                      return_pooled=return_pooled, sparse=sparse)
    mode = mode_code(mode)
    indices, offsets, per_sample_weights, num_fields = as_csr(indices, offsets, per_sample_weights, num_fields)
    pooling = pooling_codes(pooling, num_fields)
    # A traced graph (torch.jit.trace) must not depend on the grad mode its checker reruns it in.
    needs_grad = torch.jit.is_tracing() or (torch.is_grad_enabled() and (
        weight.requires_grad or (linear_weight is not None and linear_weight.requires_grad)))
    want_pooled = return_pooled or (needs_grad and backward_reuses_pooled(weight, mode))
    fm, linear, pooled = torch.ops.deepfm_fast.embedding_fm.default(
        weight, indices, offsets, per_sample_weights, linear_weight, num_fields, mode, pooling, want_pooled, sparse)
    return EmbeddingFMOutput(fm, linear, pooled if return_pooled else pooled.new_empty(0))


def gather_rows(param: Tensor, rows: Tensor, sparse_grad: bool = False) -> Tensor:
    """``param[rows]`` (``rows`` sorted and unique) whose gradient is a coalesced sparse COO tensor
    with ``sparse_grad`` (the rows an L2 penalty covers, for ``torch.optim.SparseAdam``), else dense.
    (``F.embedding(sparse=True)`` cannot serve the 1-D first-order weights.)"""
    if not _backend.compiled():
        return reference.gather_rows(param, rows, sparse_grad)
    return torch.ops.deepfm_fast.gather_rows.default(param, rows, sparse_grad)


def backward_reuses_pooled(weight: Tensor, mode: int) -> bool:
    """Whether the backward of `embedding_fm` reads the forward's field vectors instead of gathering
    the table rows again (the CPU kernel in field mode: a cache miss per row saved on a large table;
    on the GPU the second gather mostly hits L2, so the forward need not write ``[B, F, K]``)."""
    return mode == 0 and weight.device.type == "cpu"


_CUDA_BOUNDS_CHECK_MODES = ("error", "clamp", "off")  # the codes 0, 1, 2 of csrc/bounds_check.h
_cuda_bounds_check = "error"  # without the compiled kernels only; else the extension holds it


def set_cuda_bounds_check(mode: str) -> None:
    """How the CUDA kernels of `embedding_fm` (and its backward) and `fused_row_update` treat bad ids.

    - ``"error"`` (default): ids in ``[0, N)``, ``offsets[0] == 0``, ``offsets[-1] == nnz`` and
      non-decreasing offsets are checked on the GPU; then one device->host synchronisation per
      forward call raises the CPU's error, naming the argument, the value and its position.
    - ``"clamp"``: no check, no sync. An out-of-range id reads (and gets the gradient of) the nearest
      valid row, 0 or N-1; a bag with negative, decreasing or past-nnz offsets pools to zero. The
      results for the samples concerned are wrong and nothing says so: a warning is issued when this
      mode is set.
    - ``"off"``: no check, no sync. An out-of-range id reads as a zero row and gets no gradient;
      malformed bags are read as empty.

    In every mode the kernels never read or write out of bounds; with malformed offsets in the
    ``"clamp"`` and ``"off"`` modes the results are unspecified. During CUDA graph capture, where no
    sync is allowed, ``"error"`` behaves as ``"off"``. The setting is process-wide and read at each
    call (it is not part of a traced graph). The CPU kernels always check: there it costs no sync.

    `fused_row_update` checks its ids (in range, sorted and unique) in ``"error"`` mode, with one
    sync, before it writes any row; in ``"clamp"`` and ``"off"`` an out-of-range id is skipped and
    repeated ids race (lost updates), but nothing is written outside the tables.
    """
    global _cuda_bounds_check
    if mode not in _CUDA_BOUNDS_CHECK_MODES:
        raise ValueError(f"set_cuda_bounds_check: mode must be one of {_CUDA_BOUNDS_CHECK_MODES}, got {mode!r}")
    if _backend.compiled():
        _backend._C.set_cuda_bounds_check(_CUDA_BOUNDS_CHECK_MODES.index(mode))
    else:
        _cuda_bounds_check = mode
    if mode == "clamp":
        warnings.warn("deepfm_fast: CUDA bounds check 'clamp': out-of-range ids read the nearest valid row and "
                      "malformed bags pool to zero, without an error; the results for those rows are wrong",
                      RuntimeWarning, stacklevel=2)


@contextlib.contextmanager
def deferred_cuda_checks(weight: Tensor):
    """Inside the block (a fused training step's forward, on this thread), the "error" bounds check
    of the CUDA ops waits for the step's backward: the forward ops record what they find on the GPU
    and the backward, whose one device->host copy (the number of unique rows) happens anyway, raises
    the same errors before any row is updated, so the step syncs once (a forward whose backward
    never runs leaves what it found for the next op that syncs). Nothing changes on the CPU, under
    torch.compile, or without the compiled kernels."""
    if not (weight.is_cuda and _backend.compiled()) or torch.compiler.is_compiling():
        yield
        return
    previous = _backend._C.set_cuda_checks_deferred(True)
    try:
        yield
    finally:
        _backend._C.set_cuda_checks_deferred(previous)


def get_cuda_bounds_check() -> str:
    """The current CUDA bounds-check mode: ``"error"``, ``"clamp"`` or ``"off"``."""
    if _backend.compiled():
        return _CUDA_BOUNDS_CHECK_MODES[_backend._C.get_cuda_bounds_check()]
    return _cuda_bounds_check


def embedding_fm_backward(grad_fm, grad_linear, grad_pooled, weight, indices, offsets, per_sample_weights,
                          linear_weight, num_fields, mode, pooling, pooled=None, per_sample_weights_grad=True):
    """The coalesced gradient of `embedding_fm` (int mode and pooling codes, CSR input).

    Returns ``(unique_ids [U] int64 sorted, row_grads [U, K], linear_row_grads [U] or empty,
    grad_per_sample_weights [nnz] or empty)``: the touched rows and their summed gradients, the
    input of the dense and sparse table gradients and of fused optimizers. ``pooled``, the
    forward's field vectors if it returned them, spares the backward a second gather of the rows;
    so does ``per_sample_weights_grad=False`` where that gradient is not needed.
    """
    if grad_pooled is not None and grad_pooled.numel() == 0:
        grad_pooled = None
    if pooled is not None and pooled.numel() == 0:
        pooled = None
    return torch.ops.deepfm_fast.embedding_fm_backward.default(
        grad_fm, grad_linear, grad_pooled, weight, indices, offsets, per_sample_weights, linear_weight,
        num_fields, mode, pooling, pooled, per_sample_weights_grad)


def _table_grad(shape, ids: Tensor, row_grads: Tensor, sparse: bool) -> Tensor:
    """The gradient of a table of ``shape`` from its touched rows: coalesced sparse COO, or dense."""
    if sparse:
        return torch.ops.deepfm_fast.sparse_rows.default(ids, row_grads, shape)
    return row_grads.new_zeros(shape).index_add_(0, ids, row_grads)


def _embedding_fm_grads(ctx, grad_fm, grad_linear, grad_pooled):
    weight, indices, offsets, per_sample_weights, linear_weight, pooled = ctx.saved_tensors
    num_fields, mode, pooling, sparse = ctx.int_args
    batch = (offsets.shape[0] - 1) // num_fields
    if grad_fm is None:
        grad_fm = weight.new_zeros(batch)
    if grad_linear is None:
        grad_linear = weight.new_zeros(batch)
    unique_ids, row_grads, linear_row_grads, grad_psw = embedding_fm_backward(
        grad_fm, grad_linear, grad_pooled, weight, indices, offsets, per_sample_weights, linear_weight,
        num_fields, mode, pooling, pooled, per_sample_weights is not None and ctx.needs_input_grad[3])
    grad_weight = _table_grad(weight.shape, unique_ids, row_grads, sparse) if ctx.needs_input_grad[0] else None
    grad_linear_weight = None
    if linear_weight is not None and ctx.needs_input_grad[4]:
        grad_linear_weight = _table_grad(linear_weight.shape, unique_ids, linear_row_grads, sparse)
    if per_sample_weights is None or not ctx.needs_input_grad[3]:
        grad_psw = None
    return grad_weight, None, None, grad_psw, grad_linear_weight, None, None, None, None, None


def _embedding_fm_setup_context(ctx, inputs, output):
    (weight, indices, offsets, per_sample_weights, linear_weight, num_fields, mode, pooling, return_pooled,
     sparse_grad) = inputs
    pooled = output[2] if return_pooled else None
    ctx.set_materialize_grads(False)  # an unused output (pooled) gets None, not zeros
    ctx.save_for_backward(weight, indices, offsets, per_sample_weights, linear_weight, pooled)
    ctx.int_args = (num_fields, mode, pooling, sparse_grad)


def _register_embedding_fm():
    lib = "deepfm_fast::"

    def check(op, weight, indices, offsets, per_sample_weights, linear_weight, num_fields, mode, pooling):
        torch._check(weight.dim() == 2, lambda: f"{op}: weight must be a 2-D tensor [num_embeddings, embedding_dim], got {weight.dim()}-D")
        torch._check(weight.is_floating_point(), lambda: f"{op}: weight must be floating point, got {weight.dtype}")
        for name, t in (("indices", indices), ("offsets", offsets)):
            torch._check(t.dtype in (torch.int32, torch.int64), lambda: f"{op}: {name} must be an int32 or int64 tensor, got {t.dtype}")
            torch._check(t.dim() == 1, lambda: f"{op}: {name} must be a 1-D tensor, got {t.dim()}-D")
        tensors = [("indices", indices), ("offsets", offsets), ("per_sample_weights", per_sample_weights),
                   ("linear_weight", linear_weight)]
        for name, t in tensors:
            if t is not None:
                torch._check(t.device == weight.device, lambda: f"{op}: {name} is on {t.device} but weight is on {weight.device}; move them to the same device")
        torch._check(num_fields >= 1, lambda: f"{op}: num_fields must be >= 1, got {num_fields}")
        torch._check((offsets.shape[0] - 1) % num_fields == 0, lambda: f"{op}: offsets must have batch * num_fields + 1 entries (num_fields = {num_fields}), got {offsets.shape[0]}")
        torch._check(mode in (0, 1), lambda: f"{op}: mode must be 0 (field) or 1 (feature), got {mode}")
        torch._check(len(pooling) in (1, num_fields), lambda: f"{op}: pooling must have 1 or num_fields entries, got {len(pooling)}")
        if per_sample_weights is not None:
            torch._check(per_sample_weights.shape == indices.shape, lambda: f"{op}: per_sample_weights must have one value per index: expected {indices.shape[0]}, got {per_sample_weights.shape[0]}")
            torch._check(per_sample_weights.dtype == weight.dtype, lambda: f"{op}: per_sample_weights has dtype {per_sample_weights.dtype} but weight has dtype {weight.dtype}")
        if linear_weight is not None:
            torch._check(linear_weight.shape == weight.shape[:1], lambda: f"{op}: linear_weight must have shape [{weight.shape[0]}], got {list(linear_weight.shape)}")
            torch._check(linear_weight.dtype == weight.dtype, lambda: f"{op}: linear_weight has dtype {linear_weight.dtype} but weight has dtype {weight.dtype}")
        return (offsets.shape[0] - 1) // num_fields

    @torch.library.register_fake(lib + "embedding_fm")
    def _(weight, indices, offsets, per_sample_weights, linear_weight, num_fields, mode, pooling, return_pooled,
          sparse_grad=False):
        batch = check("embedding_fm", weight, indices, offsets, per_sample_weights, linear_weight, num_fields, mode,
                      pooling)
        pooled_shape = (batch, num_fields, weight.shape[1]) if return_pooled else (0,)
        return weight.new_empty(batch), weight.new_empty(batch), weight.new_empty(pooled_shape)

    @torch.library.register_fake(lib + "embedding_fm_backward")
    def _(grad_fm, grad_linear, grad_pooled, weight, indices, offsets, per_sample_weights, linear_weight,
          num_fields, mode, pooling, pooled=None, per_sample_weights_grad=True):
        check("embedding_fm_backward", weight, indices, offsets, per_sample_weights, linear_weight, num_fields,
              mode, pooling)
        num_unique = torch.library.get_ctx().new_dynamic_size()  # U <= nnz, known only at run time
        return (indices.new_empty(num_unique, dtype=torch.int64), weight.new_empty(num_unique, weight.shape[1]),
                weight.new_empty(num_unique if linear_weight is not None else 0),
                weight.new_empty(indices.shape[0] if per_sample_weights is not None and per_sample_weights_grad else 0))

    torch.library.register_autograd(lib + "embedding_fm", _embedding_fm_grads, setup_context=_embedding_fm_setup_context)

    def sparse_rows(ids, values, size):
        # Copies: an op's output must not alias its inputs (sparse_coo_tensor would keep `values`).
        return torch.sparse_coo_tensor(ids.unsqueeze(0).clone(), values.clone(), tuple(size), is_coalesced=True,
                                       check_invariants=False)

    torch.library.register_kernel(lib + "sparse_rows", "CompositeExplicitAutograd", sparse_rows)
    torch.library.register_fake(lib + "sparse_rows", sparse_rows)

    def gather_rows(param, rows, sparse_grad=False):
        return param.index_select(0, rows)

    torch.library.register_kernel(lib + "gather_rows", "CompositeExplicitAutograd", gather_rows)
    torch.library.register_fake(lib + "gather_rows", gather_rows)

    def gather_rows_setup_context(ctx, inputs, output):
        param, rows, sparse_grad = inputs
        ctx.save_for_backward(rows)
        ctx.shape, ctx.sparse_grad = param.shape, sparse_grad

    def gather_rows_backward(ctx, grad):
        (rows,) = ctx.saved_tensors
        return _table_grad(ctx.shape, rows, grad, ctx.sparse_grad), None, None

    torch.library.register_autograd(lib + "gather_rows", gather_rows_backward, setup_context=gather_rows_setup_context)

    def no_double_backward(ctx, *grads):
        raise RuntimeError("embedding_fm: double backward (differentiating the gradient, create_graph=True) is "
                           "not supported")

    torch.library.register_autograd(lib + "embedding_fm_backward", no_double_backward,
                                    setup_context=lambda ctx, inputs, output: None)


def fused_row_update(tables: List[Tensor], state: List[Tensor], ids: Tensor, row_grads: List[Tensor], step: Tensor,
                     optimizer: int, lr: float, eps: float = 0.0, beta1: float = 0.0, beta2: float = 0.0,
                     weight_decay: float = 0.0, last_step: Optional[Tensor] = None, catchup: Optional[Tensor] = None,
                     check_ids: bool = True) -> None:
    """One optimizer step, in place, on the rows ``ids`` of every table in ``tables``.

    The update of the fused optimizers (`deepfm_fast.optim`, which call it from the backward of
    `EmbeddingFM`); `deepfm_fast.reference.fused_row_update` writes the math out per optimizer.

    Args:
        tables: tables with the same rows, ``[N]`` or ``[N, D_t]``, e.g. ``[V, w]``: one call updates both.
        state: the optimizer state of each table in turn (float32, float64 for float64 tables).
        ids: ``[U]`` int64 rows, sorted and unique (what `embedding_fm_backward` returns).
        row_grads: per table, the summed gradient of each row, shaped like the table with ``U`` rows.
        step: the step counter, a CPU int64 scalar; incremented first (its new value is the step of
            the bias corrections). Kept on the host so that reading it never syncs with a GPU.
        optimizer, lr, eps, beta1, beta2, weight_decay: what ``op_args()`` of a `deepfm_fast.optim`
            optimizer gives (its ``code`` and hyper-parameters; weight decay is L2 added to the
            gradient of the touched rows only). Adam needs ``last_step`` and ``catchup``.
        last_step, catchup: Adam's catch-up state (`deepfm_fast.optim.Adam.new_row_state`).
        check_ids: check that ``ids`` are sorted, unique and in range (skip only for ids that are so
            by construction; on CUDA the check costs a sync in the "error" bounds-check mode).
    """
    if not _backend.compiled():
        return reference.fused_row_update(tables, state, ids, row_grads, step, optimizer, lr, eps, beta1, beta2,
                                          weight_decay, last_step, catchup, check_ids)
    torch.ops.deepfm_fast.fused_row_update.default(tables, state, ids, row_grads, step, optimizer, lr, eps, beta1,
                                                   beta2, weight_decay, last_step, catchup, check_ids)


def adam_catch_up(tables: List[Tensor], state: List[Tensor], last_step: Tensor, catchup: Tensor, step: Tensor,
                  row_begin: int = 0, row_end: int = -1) -> None:
    """Adam (optimizer 4 of `fused_row_update`): the rows ``[row_begin, row_end)`` brought up to step
    ``step`` as dense Adam would have moved them over the steps no batch touched them, in place: on
    every row before evaluation or export (a flush)."""
    if not _backend.compiled():
        return reference.adam_catch_up(tables, state, last_step, catchup, step, row_begin, row_end)
    torch.ops.deepfm_fast.adam_catch_up.default(tables, state, last_step, catchup, step, row_begin, row_end)


def adam_rows(tables: List[Tensor], state: List[Tensor], last_step: Tensor, catchup: Tensor, step: Tensor,
              rows: Tensor) -> List[Tensor]:
    """Adam: copies of the rows ``rows`` ([U] int64) of every table as dense Adam has them after step
    ``step`` (what a training forward must read), without changing anything."""
    if not _backend.compiled():
        return reference.adam_rows(tables, state, last_step, catchup, step, rows)
    return torch.ops.deepfm_fast.adam_rows.default(tables, state, last_step, catchup, step, rows)


def embedding_fm_step(weight: Tensor, linear_weight: Tensor, indices: Tensor, offsets: Optional[Tensor],
                      per_sample_weights: Optional[Tensor], *, num_fields: int, mode: str, pooling, return_pooled: bool,
                      weight_state: List[Tensor], linear_state: List[Tensor], step: Tensor,
                      last_step: Optional[Tensor], catchup: Optional[Tensor], optimizer: int, lr: float, eps: float,
                      beta1: float, beta2: float, weight_decay: float, sync: int = 0,
                      rows: Optional[Tensor] = None, row_weight: Optional[Tensor] = None,
                      row_linear_weight: Optional[Tensor] = None) -> EmbeddingFMOutput:
    """`embedding_fm` whose backward applies a fused optimizer to the rows of ``weight`` and
    ``linear_weight`` the batch touched (`fused_row_update`, same optimizer arguments; at most two
    states per table), in place; the tables get no gradient. The training forward of `EmbeddingFM`
    with a fused optimizer. ``sync`` names a process group of `deepfm_fast.distributed` whose ranks
    merge their rows before the update. With ``rows`` (sorted, unique), the forward reads
    ``row_weight`` and ``row_linear_weight``, those rows of the tables (Adam: `adam_rows`), and
    ``indices`` index them."""
    mode = mode_code(mode)
    one_id_per_field = offsets is None
    indices, offsets, per_sample_weights, num_fields = as_csr(indices, offsets, per_sample_weights, num_fields)
    pooling = pooling_codes(pooling, num_fields)
    # The CPU's one-pass backward reads the rows from pooled (then they are the forward's rows).
    want_pooled = return_pooled or backward_reuses_pooled(weight, mode) or (
        one_id_per_field and per_sample_weights is None and weight.device.type == "cpu")
    states = list(weight_state) + [None] * (2 - len(weight_state)) + list(linear_state) + [None] * (2 - len(linear_state))
    fm, linear, pooled = torch.ops.deepfm_fast.embedding_fm_step.default(
        weight, linear_weight, indices, offsets, per_sample_weights, num_fields, mode, pooling, want_pooled, *states,
        step, last_step, catchup, optimizer, lr, eps, beta1, beta2, weight_decay, sync, rows, row_weight,
        row_linear_weight)
    return EmbeddingFMOutput(fm, linear, pooled if return_pooled else pooled.new_empty(0))


def _register_fused_row_update():
    lib = "deepfm_fast::"

    @torch.library.register_fake(lib + "fused_row_update")
    def _(tables, state, ids, row_grads, step, optimizer, lr, eps, beta1, beta2, weight_decay, last_step=None,
          catchup=None, check_ids=True):
        torch._check(len(tables) >= 1, lambda: "fused_row_update: tables must hold at least one tensor")
        return None

    @torch.library.register_fake(lib + "embedding_fm_step_update")
    def _(grad_fm, grad_linear, grad_pooled, pooled, weight, linear_weight, indices, offsets, num_fields, fm_mode,
          pooling, rows, row_weight, row_linear_weight, state, step, last_step, catchup, optimizer, lr, eps, beta1, beta2,
          weight_decay):
        return None

    @torch.library.register_fake(lib + "adam_catch_up")
    def _(tables, state, last_step, catchup, step, row_begin=0, row_end=-1):
        torch._check(len(tables) >= 1, lambda: "adam_catch_up: tables must hold at least one tensor")
        return None

    @torch.library.register_fake(lib + "adam_rows")
    def _(tables, state, last_step, catchup, step, rows):
        torch._check(rows.dim() == 1, lambda: f"adam_rows: rows must be a 1-D tensor, got {rows.dim()}-D")
        return [t.new_empty((rows.shape[0],) + tuple(t.shape[1:])) for t in tables]

    def embedding_fm_step_forward(weight, linear_weight, indices, offsets, per_sample_weights, num_fields, mode, pooling,
                                  return_pooled, weight_state0, weight_state1, linear_state0, linear_state1, step,
                                  last_step, catchup, optimizer, lr, eps, beta1, beta2, weight_decay, sync=0, rows=None,
                                  row_weight=None, row_linear_weight=None):
        if rows is not None:
            weight, linear_weight = row_weight, row_linear_weight
        return torch.ops.deepfm_fast.embedding_fm.default(weight, indices, offsets, per_sample_weights, linear_weight,
                                                          num_fields, mode, pooling, return_pooled)

    torch.library.register_kernel(lib + "embedding_fm_step", "CompositeExplicitAutograd", embedding_fm_step_forward)
    torch.library.register_fake(lib + "embedding_fm_step", embedding_fm_step_forward)

    def setup_context(ctx, inputs, output):
        (weight, linear_weight, indices, offsets, psw, num_fields, mode, pooling, return_pooled, *states, step, last_step,
         catchup, optimizer, lr, eps, beta1, beta2, weight_decay, sync, rows, row_weight, row_linear_weight) = inputs
        pooled = output[2] if return_pooled else None
        # An output nobody used (pooled, in an FM-only model) gets None, not a [B, F, K] of zeros.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(weight, linear_weight, indices, offsets, psw, pooled, step, last_step, catchup, rows,
                              row_weight, row_linear_weight, *[s for s in states if s is not None])
        ctx.args = (num_fields, mode, pooling, optimizer, lr, eps, beta1, beta2, weight_decay, sync)

    def backward(ctx, grad_fm, grad_linear, grad_pooled):
        (weight, linear_weight, indices, offsets, psw, pooled, step, last_step, catchup, rows, row_weight,
         row_linear_weight, *state) = ctx.saved_tensors
        read, read_linear = (row_weight, row_linear_weight) if rows is not None else (weight, linear_weight)
        num_fields, mode, pooling, optimizer, lr, eps, beta1, beta2, weight_decay, sync = ctx.args
        batch = (offsets.shape[0] - 1) // num_fields
        grad_fm = weight.new_zeros(batch) if grad_fm is None else grad_fm
        grad_linear = weight.new_zeros(batch) if grad_linear is None else grad_linear
        want_grad_psw = psw is not None and ctx.needs_input_grad[4]
        if psw is None and not merges_across_ranks(sync):
            torch.ops.deepfm_fast.embedding_fm_step_update.default(
                grad_fm, grad_linear, grad_pooled, pooled, weight, linear_weight, indices, offsets, num_fields, mode,
                pooling, rows, row_weight, row_linear_weight, state, step, last_step, catchup, optimizer, lr, eps,
                beta1, beta2, weight_decay)
            return (None,) * 26
        unique_ids, grads, grad_psw = _step_row_grads(grad_fm, grad_linear, grad_pooled, pooled, read, read_linear,
                                                      indices, offsets, psw, num_fields, mode, pooling, rows,
                                                      want_grad_psw)
        if merges_across_ranks(sync):
            unique_ids, grads = merge_rows(sync, unique_ids, grads, batch)
        torch.ops.deepfm_fast.fused_row_update.default([weight, linear_weight], state, unique_ids, grads, step,
                                                       optimizer, lr, eps, beta1, beta2, weight_decay, last_step,
                                                       catchup, False)
        return (None,) * 4 + (grad_psw if want_grad_psw else None,) + (None,) * 21

    torch.library.register_autograd(lib + "embedding_fm_step", backward, setup_context=setup_context)

    def embedding_fm_step_update(grad_fm, grad_linear, grad_pooled, pooled, weight, linear_weight, indices, offsets,
                                 num_fields, fm_mode, pooling, rows, row_weight, row_linear_weight, state, step,
                                 last_step, catchup, optimizer, lr, eps, beta1, beta2, weight_decay):
        # Every device but the CPU (whose kernel needs no second pass where a bag holds one id): the
        # coalesced row gradients, then the update.
        read, read_linear = (row_weight, row_linear_weight) if rows is not None else (weight, linear_weight)
        unique_ids, grads, _ = _step_row_grads(grad_fm, grad_linear, grad_pooled, pooled, read, read_linear, indices,
                                               offsets, None, num_fields, fm_mode, pooling, rows, False)
        torch.ops.deepfm_fast.fused_row_update.default([weight, linear_weight], state, unique_ids, grads, step,
                                                       optimizer, lr, eps, beta1, beta2, weight_decay, last_step,
                                                       catchup, False)

    torch.library.register_kernel(lib + "embedding_fm_step_update", "CompositeExplicitAutograd",
                                  embedding_fm_step_update)


def _step_row_grads(grad_fm, grad_linear, grad_pooled, pooled, read, read_linear, indices, offsets, psw, num_fields,
                    mode, pooling, rows, want_grad_psw):
    """The fused step's coalesced row gradients: (table rows, [V's, w's], grad of psw), from the rows the
    forward read (``rows``' copies for Adam, whose positions map back to table rows)."""
    unique_ids, row_grads, linear_row_grads, grad_psw = embedding_fm_backward(
        grad_fm, grad_linear, grad_pooled, read, indices, offsets, psw, read_linear, num_fields, mode, pooling,
        pooled, want_grad_psw)
    if rows is not None:
        unique_ids = rows[unique_ids]  # sorted: rows are
    return unique_ids, [row_grads, linear_row_grads], grad_psw


if _backend.compiled():
    _register_fm_interaction()
    _register_embedding_fm()
    _register_fused_row_update()
