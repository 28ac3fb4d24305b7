"""EmbeddingFM: the embedding table, first-order weights and bias of an FM / DeepFM, on one fused op."""
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from . import _backend, _packing, export, ops, reference
from ._args import field_offsets, mode_code, pooling_codes
from ._row_merge import merges_across_ranks, union_rows
from .optim import NAMES, Adam, FusedOptimizer

# The tables of the fused optimizer: (the name of its states, the parameter).
_TABLES = (("weight", "weight"), ("linear", "linear_weight"))


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
        pool_first_order: apply each field's pooling to its first-order term too, so that a
            mean-pooled bag contributes the mean of its ``w_j x_j`` (DeepCTR-Torch and FuxiCTR pool
            the linear part like the embeddings); otherwise the first order sums over the bag.
            Field mode only.
        sparse: give ``weight`` and ``linear_weight`` coalesced sparse gradients (like
            ``nn.Embedding(sparse=True)``) for ``torch.optim.SGD``, ``Adagrad``, ``SparseAdam``.
        init_std: ``weight ~ Normal(0, init_std)``; ``linear_weight`` and ``bias`` start at 0.
        use_reference: run on the pure-PyTorch reference ops (same parameters, same results; the
            table gradient of the reference is sparse for ``sparse=True``, the first-order one dense).
        optimizer: a fused optimizer from ``deepfm_fast.optim`` (e.g. ``Adam``, ``SGD``,
            ``RowWiseAdagrad``; ``optim.NAMES`` lists them). The backward then updates the touched rows of
            ``weight`` and ``linear_weight`` in place, with no dense gradient and no ``O(N)`` work
            per step; those two tensors never get a ``.grad`` (a torch optimizer given them skips
            them), ``bias`` still does. The optimizer state and the step count are in the module's
            buffers (and ``state_dict``; the step count stays on the CPU so that reading it never
            waits for a GPU). Each backward is one step of the tables. With ``Adam``, ``eval()``
            and ``state_dict()`` first bring every row up to date (`flush`). The optimizer object
            says what its state is (``optim.FusedOptimizer``); the module only holds it.
        pack_rows: with a fused optimizer, store each row's ``weight``, ``linear_weight`` and
            optimizer state side by side in one record, so that the forward and the update visit
            one place per id instead of one per tensor (float32/float64 tables; a float16/bfloat16
            table keeps its float32 state apart). ``weight``, ``linear_weight`` and the state
            buffers stay what they were, as strided views of the records (same names, shapes and
            ``state_dict`` keys; checkpoints load both ways). ``False``: separate tensors.
        table_file: with a fused optimizer and packed rows, keep the records in this memory-mapped
            file instead of memory (tables larger than RAM; `deepfm_fast.table_file`): made and
            initialised (as in memory, same values) when missing, else reopened at its last
            checkpoint, which must match this module's rows, K, dtype and optimizer. `checkpoint`
            makes the current state the file's checkpoint; a crash leaves the last one whole.

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

        >>> fm = EmbeddingFM([1000, 20, 7], 16, optimizer=deepfm_fast.optim.Adam(lr=1e-3))
        >>> bias_opt = torch.optim.Adam([fm.bias], lr=1e-3)   # everything but the tables
        >>> torch.nn.functional.binary_cross_entropy_with_logits(fm(ids), torch.ones(2)).backward()
        >>> bias_opt.step()
    """

    def __init__(self, field_dims: Sequence[int], embedding_dim: int, *, mode: str = "field",
                 pooling: Union[str, Sequence[str]] = "sum", sparse: bool = False, init_std: float = 0.01,
                 use_reference: bool = False, optimizer: Optional[FusedOptimizer] = None,
                 pool_first_order: bool = False, pack_rows: bool = True, table_file=None):
        super().__init__()
        field_dims = [int(d) for d in field_dims]
        if not field_dims or any(d < 1 for d in field_dims):
            raise ValueError(f"EmbeddingFM: field_dims must be a non-empty list of sizes >= 1, got {field_dims}")
        mode_code(mode)
        codes = pooling_codes(pooling, len(field_dims))
        if pool_first_order and mode != "field":
            raise ValueError("EmbeddingFM: pool_first_order=True needs mode='field' (in feature mode the values x "
                             "are the features' own and pooling only shapes the pooled output)")
        self.field_dims = field_dims
        self.num_fields = len(field_dims)
        self.embedding_dim = embedding_dim
        self.mode = mode
        self.pooling = pooling if isinstance(pooling, str) else list(pooling)
        self.pool_first_order = pool_first_order
        self.sparse = sparse
        self.use_reference = use_reference
        num_rows = sum(field_dims)
        # Packed rows are built in their records (`_pack`): until then the columns are shapes only.
        self._build_device = torch.empty(0).device
        in_records = (isinstance(optimizer, FusedOptimizer) and pack_rows and not sparse
                      and torch.get_default_dtype() in (torch.float32, torch.float64))
        if table_file is not None and not (in_records and self._build_device.type == "cpu"):
            raise ValueError("EmbeddingFM: table_file needs a fused optimizer, pack_rows=True, sparse=False and a "
                             "float32/float64 table on the CPU")
        self.table_file = None  # the open deepfm_fast.table_file.TableFile
        build = "meta" if in_records else None
        self.weight = nn.Parameter(torch.empty(num_rows, embedding_dim, device=build))
        self.linear_weight = nn.Parameter(torch.zeros(num_rows, device=build))
        self.bias = nn.Parameter(torch.zeros(()))
        self.register_buffer("field_offsets", field_offsets(field_dims), persistent=False)
        self.register_buffer("_field_dims", torch.tensor(field_dims), persistent=False)
        mean = [bool(c) for c in (codes * self.num_fields if len(codes) == 1 else codes)]
        # With pool_first_order, mean fields are averaged through their values x (1 / bag size), which
        # averages w x and the embeddings alike; the op then sums every bag.
        self._scaled_fields = [f for f, m in enumerate(mean) if m] if pool_first_order else []
        self.reset_parameters(init_std)
        self.optimizer = optimizer
        self.pack_rows = pack_rows
        self._sync = 0  # a process group of deepfm_fast.distributed that merges the fused updates
        if optimizer is not None:
            if not isinstance(optimizer, FusedOptimizer):
                raise TypeError(f"EmbeddingFM: optimizer must be one of deepfm_fast.optim's fused optimizers ("
                                f"{', '.join(cls.__name__ for cls in NAMES.values())}), got {type(optimizer).__name__}")
            if sparse:
                raise ValueError("EmbeddingFM: sparse=True and a fused optimizer exclude each other: the fused "
                                 "optimizer updates the tables itself, with no gradient")
            for table, param in _TABLES:
                for name, state in zip(optimizer.state_names(table), optimizer.new_state(getattr(self, param))):
                    self.register_buffer(name, state)
            for name, state in optimizer.new_row_state(num_rows, self.weight.device).items():
                self.register_buffer(f"optimizer_{name}", state)
            self.register_buffer("optimizer_step", torch.zeros((), dtype=torch.int64))
            self._register_load_state_dict_pre_hook(_load_earlier_states, with_module=True)
            self.register_state_dict_pre_hook(_flush_before_saving)
            self._pack(table_file)

    def __prepare_scriptable__(self):
        raise RuntimeError("EmbeddingFM cannot be compiled by torch.jit.script (CSR bags, optional inputs, fused "
                           "optimizer state): use torch.jit.trace, torch.export or torch.compile on the model "
                           "instead (see deepfm_fast.export)")

    def reset_parameters(self, init_std: float = 0.01) -> None:
        if getattr(self, "table_file", None) is not None:
            self.table_file.journal_all()
        _packing.normal_(self.weight, 0.0, init_std)  # packed rows: in place, the values of a whole table
        self._init_std = init_std
        nn.init.zeros_(self.linear_weight)
        nn.init.zeros_(self.bias)

    def _apply(self, fn, *args, **kwargs):
        if self.optimizer is None:
            return super()._apply(fn, *args, **kwargs)
        if self.table_file is not None and fn(self.weight) is not self.weight:
            raise RuntimeError(f"EmbeddingFM: a file-backed table ({self.table_file.path}) stays on the CPU in its "
                               f"dtype; it cannot be moved or cast")
        # The optimizer's buffers follow the table to its device but keep their own dtypes: a cast
        # of the model (.half(), .float()) must not round the state or the float64 catch-up table.
        order = list(self._buffers)
        own = {name: self._buffers.pop(name) for name in self._optimizer_buffer_names()}
        super()._apply(fn, *args, **kwargs)
        device, state_dtype = self.weight.device, self.optimizer.state_dtype(self.weight.dtype)
        for name, t in own.items():
            if name == "optimizer_step":  # on the host: reading it never syncs
                own[name] = t.cpu()
            elif name in self.optimizer_state_names():
                own[name] = t.to(device, state_dtype)
            else:
                own[name] = t.to(device)
        for name in order:  # back in their order (state_dict's key order)
            self._buffers[name] = own.pop(name) if name in own else self._buffers.pop(name)
        self._pack()
        return self

    def _optimizer_buffer_names(self) -> List[str]:
        return (self.optimizer_state_names() + [f"optimizer_{name}" for name in self.optimizer.ROW_STATE]
                + ["optimizer_step"])

    def _packed_columns(self):
        """The tensors with one row per table row, in record order (see `deepfm_fast._packing`)."""
        columns = []
        for table, param in _TABLES:
            columns.append((param, getattr(self, param)))
            columns += [(name, getattr(self, name)) for name in self.optimizer.state_names(table)]
        columns += [(f"optimizer_{n}", getattr(self, f"optimizer_{n}")) for n in self.optimizer.RECORD_ROW_STATE]
        return columns

    def _pack(self, table_file=None) -> None:
        """Moves the fused optimizer's rows into one record per row (`pack_rows`), unless they are
        there; builds them in their records (in memory or ``table_file``) when the module is new."""
        if self.optimizer is None or not self.pack_rows:
            return
        columns = self._packed_columns()
        if self.weight.is_meta:
            views = self._build_records(columns, table_file)
        elif _packing.is_packed(columns):
            return
        else:
            views = _packing.pack(columns)
        for name, view in views.items():
            if name in self._parameters and self._parameters[name].is_meta:  # new: set_data cannot leave meta
                self._parameters[name] = nn.Parameter(view)
            elif name in self._parameters:
                self._parameters[name].data = view
            else:
                self._buffers[name] = view

    def _build_records(self, columns, table_file):
        """The new module's records, initialised in place: ``weight ~ Normal(0, init_std)`` drawn as
        for a separate table (same values for a seed), the rest zero; then the row state that is not
        in the records (Adam's catch-up table) on the device."""
        std = self._init_std

        def init(views):
            _packing.normal_chunk_(views["weight"], 0.0, std)

        fresh = self.optimizer.new_row_state(0, self._build_device)
        for name, state in fresh.items():
            if f"optimizer_{name}" not in dict(columns):
                self._buffers[f"optimizer_{name}"] = state
        if table_file is None:
            return _packing.build(columns, self._build_device, init)
        from .table_file import TableFile

        self.table_file = TableFile(table_file, columns, self.optimizer, init, fresh.get("catchup"))
        self.optimizer_step.fill_(self.table_file.step)
        if self.table_file.catchup is not None:
            self.optimizer_catchup.copy_(self.table_file.catchup)
        self._register_load_state_dict_pre_hook(_load_into_table_file, with_module=True)
        self._register_state_dict_hook(_table_file_state)
        return self.table_file.views

    def checkpoint(self, extra=None) -> None:
        """Makes the table file's current state its checkpoint (``table_file`` only): reopening gives
        it back, even after a crash; ``extra`` (e.g. the other parameters' ``state_dict``) is saved
        with it and read back as ``table_file.extra``. Costs the rows changed since the last one."""
        if self.table_file is None:
            raise RuntimeError("EmbeddingFM.checkpoint: this table is in memory (no table_file); use state_dict()")
        self.table_file.checkpoint(self.optimizer_step, self.optimizer_row_state().get("catchup"), extra)

    def _before_table_file_step(self, ids: Tensor) -> None:
        """Journals the rows the step will change (reading those not yet journaled, in parallel: faults ahead)."""
        if self._sync != 0:
            raise NotImplementedError("EmbeddingFM: a file-backed table trains in one process (no distributed merge)")
        if self.optimizer.catches_up:  # Adam also catches up the step's slice of the rows
            begin, end = Adam.swept_rows(self.weight.shape[0], self.optimizer.catch_up_window,
                                         int(self.optimizer_step) + 1)
            ids = torch.cat([ids.reshape(-1).long(), torch.arange(begin, end)])
        self.table_file.journal(ids)

    @property
    def rows_packed(self) -> bool:
        """Whether the rows are stored as packed records (`pack_rows` and a float32/float64 table)."""
        return self.optimizer is not None and _packing.is_packed(self._packed_columns())

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        key = prefix + "optimizer_last_step"
        if key in destination and self.rows_packed and self.table_file is None:
            # torch.save refuses int64 and float views of one storage: the last steps leave as a copy.
            destination[key] = destination[key].clone()

    def __getstate__(self):
        state = self.__dict__.copy()
        if "optimizer_last_step" in self._buffers and self.rows_packed:  # torch.save(module): as above
            state["_buffers"] = {**self._buffers, "optimizer_last_step": self._buffers["optimizer_last_step"].clone()}
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        if "pack_rows" not in self.__dict__:  # pickled before packed rows existed
            self.pack_rows = False
        self.__dict__.setdefault("table_file", None)
        self._pack()  # a copy (copy.deepcopy, pickle) packs its own rows

    def _check_local(self, ids: Tensor, field_dims: Tensor, field_of: Optional[Tensor] = None) -> None:
        """`field_dims`: each id's field size, broadcast over a [B, F] input; `field_of`: each id's
        field for CSR input (None: column f is field f)."""
        bad = (ids < 0) | (ids >= field_dims)
        if bool(bad.any()):
            pos = ", ".join(str(i) for i in bad.nonzero()[0].tolist())
            flat = int(bad.reshape(-1).nonzero()[0, 0])
            f = int(field_of.reshape(-1)[flat]) if field_of is not None else flat % self.num_fields
            raise IndexError(f"EmbeddingFM: id {int(ids.reshape(-1)[flat])} at indices[{pos}] is out of range for "
                             f"field {f}, which has field_dims[{f}] = {self.field_dims[f]} ids "
                             f"(0..{self.field_dims[f] - 1})")

    def to_global(self, indices: Tensor, offsets: Optional[Tensor] = None, *, _deferred: bool = False) -> Tensor:
        """Local per-field ids -> global rows of ``weight`` (checked in eager mode). ``_deferred`` (a CUDA
        training step): no check here, which would sync; a bad local id becomes -1, which the step's
        backward raises on (named by its position) before any row is updated."""
        if indices.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"EmbeddingFM: indices must be an int32 or int64 tensor, got {indices.dtype}")
        if offsets is None:
            if indices.dim() != 2 or indices.shape[1] != self.num_fields:
                raise ValueError(f"EmbeddingFM: indices must be [batch, {self.num_fields}] (one id per field), "
                                 f"got shape {tuple(indices.shape)}")
            # Column f is field f: the per-field constants broadcast, no [B, F] gather of them.
            if _deferred:
                bad = (indices < 0) | (indices >= self._field_dims)
                return torch.where(bad, -1, indices + self.field_offsets.to(indices.dtype))
            if not torch.compiler.is_compiling():
                self._check_local(indices, self._field_dims)
            return indices + self.field_offsets.to(indices.dtype)
        if _deferred:  # each id's bag by binary search: in range whatever the offsets, no sync
            positions = torch.arange(indices.numel(), device=indices.device, dtype=offsets.dtype)
            bags = (torch.searchsorted(offsets, positions, right=True) - 1).clamp(0, max(offsets.numel() - 2, 0))
            field_of = bags % self.num_fields
            bad = (indices < 0) | (indices >= self._field_dims[field_of])
            return torch.where(bad, -1, indices + self.field_offsets[field_of].to(indices.dtype))
        counts = (offsets[1:] - offsets[:-1]).long()
        if not torch.compiler.is_compiling() and (bool((counts < 0).any()) or int(counts.sum()) != indices.numel()):
            return indices  # malformed offsets: let the op raise its precise error
        bags = torch.arange(counts.numel(), device=indices.device)
        field_of = torch.repeat_interleave(bags % self.num_fields, counts, output_size=indices.numel())
        if not torch.compiler.is_compiling():
            self._check_local(indices, self._field_dims[field_of], field_of)
        return indices + self.field_offsets[field_of].to(indices.dtype)

    def _scale_mean_bags(self, ids: Tensor, offsets: Optional[Tensor], per_sample_weights: Optional[Tensor]):
        """pool_first_order: x / bag size for the ids of mean-pooled bags (CSR input only: a [B, F]
        input has bags of one id, where mean and sum agree)."""
        counts = offsets[1:] - offsets[:-1]
        mean_bag = torch.zeros(self.num_fields, dtype=torch.bool, device=ids.device)
        mean_bag[self._scaled_fields] = True
        scale = torch.where(mean_bag.repeat(counts.numel() // self.num_fields),
                            1.0 / counts.clamp(min=1).to(self.weight.dtype), torch.ones((), dtype=self.weight.dtype,
                                                                                        device=ids.device))
        per_id = torch.repeat_interleave(scale, counts.long(), output_size=ids.numel())
        return per_id if per_sample_weights is None else per_sample_weights * per_id

    def forward(self, indices: Tensor, offsets: Optional[Tensor] = None, per_sample_weights: Optional[Tensor] = None,
                *, return_pooled: bool = False, global_ids: bool = False):
        training = self.optimizer is not None and torch.is_grad_enabled()
        deferred = training and indices.is_cuda and _backend.compiled() and not self.use_reference and \
            not torch.compiler.is_compiling()
        ids = indices if global_ids else self.to_global(indices, offsets, _deferred=deferred)
        if export.onnx_exporting():
            return self._export_forward(ids, offsets, per_sample_weights, return_pooled)
        pooling = self.pooling
        if self._scaled_fields and offsets is not None:
            per_sample_weights = self._scale_mean_bags(ids, offsets, per_sample_weights)
            pooling = "sum"
        if self._sync == 0 and (self.optimizer is not None or self.sparse) and torch.is_grad_enabled():
            _refuse_unsynchronised(self)
        if training:
            out = self._fused_step(ids, offsets, per_sample_weights, pooling, return_pooled)
        else:
            fn = reference.embedding_fm if self.use_reference else ops.embedding_fm
            out = fn(self.weight, ids, offsets, per_sample_weights, self.linear_weight, num_fields=self.num_fields,
                     mode=self.mode, pooling=pooling, return_pooled=return_pooled, sparse=self.sparse)
        logit = self.bias + out.linear + out.fm
        return (logit, out.pooled) if return_pooled else logit

    def _export_forward(self, ids, offsets, per_sample_weights, return_pooled):
        """The inference forward in standard ops, while torch.onnx.export traces (deepfm_fast.export)."""
        if self.optimizer is not None and self.training:
            raise RuntimeError("EmbeddingFM: a module with a fused optimizer exports its inference path: call "
                               "model.eval() before torch.onnx.export (which also brings Adam's rows up to date)")
        out = export.embedding_fm(self.weight, ids, offsets, per_sample_weights, self.linear_weight,
                                  num_fields=self.num_fields, mode=self.mode, pooling=self.pooling,
                                  return_pooled=return_pooled, pool_first_order=self.pool_first_order)
        logit = self.bias + out.linear + out.fm
        return (logit, out.pooled) if return_pooled else logit

    def _fused_step(self, ids, offsets, per_sample_weights, pooling, return_pooled):
        """The training forward with a fused optimizer: its backward updates the touched rows."""
        row_state = self.optimizer_row_state()
        if self.table_file is not None:
            self._before_table_file_step(ids)
        weight_state, linear_state = self.optimizer_states()
        args = dict(num_fields=self.num_fields, mode=self.mode, pooling=pooling, return_pooled=return_pooled,
                    weight_state=weight_state, linear_state=linear_state, step=self.optimizer_step,
                    last_step=row_state.get("last_step"), catchup=row_state.get("catchup"), sync=self._sync,
                    **self.optimizer.op_args())
        if self.use_reference or not _backend.compiled():
            return reference.embedding_fm_step(self.weight, self.linear_weight, ids, offsets, per_sample_weights,
                                               **args)
        if self.weight.is_cuda and not torch.compiler.is_compiling():
            with ops.deferred_cuda_checks(self.weight):  # the step's one sync is its backward's
                return self._compiled_fused_step(ids, offsets, per_sample_weights, row_state, args)
        return self._compiled_fused_step(ids, offsets, per_sample_weights, row_state, args)

    def _compiled_fused_step(self, ids, offsets, per_sample_weights, row_state, args):
        rows = row_weight = row_linear_weight = None
        if self.optimizer.catches_up:
            # Adam: the forward reads copies of the batch's rows as dense Adam has them now; the
            # backward catches the tables' rows up and steps them (no in-place change in the forward,
            # which torch.compile needs).
            if ids.is_cuda and not torch.compiler.is_compiling():
                rows, ids = _unique_rows_padded(ids)
            else:
                rows, ids = torch.unique(ids.long(), sorted=True, return_inverse=True)
            with torch.no_grad():  # copies to read; the tables' gradient is the step's business
                row_weight, row_linear_weight = ops.adam_rows(
                    [self.weight, self.linear_weight], self.optimizer_state_list(), row_state["last_step"],
                    row_state["catchup"], self.optimizer_step, rows)
        return ops.embedding_fm_step(self.weight, self.linear_weight, ids, offsets, per_sample_weights, **args,
                                     rows=rows, row_weight=row_weight, row_linear_weight=row_linear_weight)

    # -- the fused optimizer's state ------------------------------------------------------------
    def optimizer_state_names(self) -> List[str]:
        """The buffer names of the states of ``weight`` then of ``linear_weight``."""
        return [name for table, _ in _TABLES for name in self.optimizer.state_names(table)]

    def optimizer_states(self):
        """(table states, first-order states) of the fused optimizer, as registered buffers."""
        return tuple([getattr(self, name) for name in self.optimizer.state_names(table)] for table, _ in _TABLES)

    def optimizer_state_list(self) -> List[Tensor]:
        """The states of ``weight`` then of ``linear_weight``, in the order of `ops.fused_row_update`."""
        return [getattr(self, name) for name in self.optimizer_state_names()]

    def optimizer_row_state(self) -> Dict[str, Tensor]:
        """The state shared by both tables' rows (Adam's last step per row and catch-up table)."""
        return {name: getattr(self, f"optimizer_{name}") for name in self.optimizer.ROW_STATE}

    @torch.no_grad()
    def flush(self) -> None:
        """Brings every row up to the last step of the fused optimizer (``Adam`` moves rows that no
        batch touched only when they are next touched, or in this flush). ``eval()`` and
        ``state_dict()`` call it; call it yourself before reading ``weight`` directly. Under
        ``torch.distributed``, flush on every rank (``eval()`` does) so that the replicas stay equal."""
        if self.optimizer is None or not self.optimizer.catches_up:
            return
        row_state = self.optimizer_row_state()
        impl = reference if self.use_reference or not _backend.compiled() else ops
        if self.table_file is not None:  # the rows behind change
            last_step, step = row_state["last_step"], int(self.optimizer_step)
            self.table_file.journal_all(lambda start, end: last_step[start:end] != step)
        impl.adam_catch_up([self.weight, self.linear_weight], self.optimizer_state_list(), row_state["last_step"],
                           row_state["catchup"], self.optimizer_step)

    def train(self, mode: bool = True):
        if not mode:
            self.flush()
        return super().train(mode)

    # -- L2 on the rows a batch uses ----------------------------------------------------------------
    def used_rows(self, indices: Tensor, offsets: Optional[Tensor] = None, *, global_ids: bool = False) -> Tensor:
        """The rows of ``weight`` a batch reads, each once (sorted)."""
        if not global_ids and offsets is None:
            indices = indices + self.field_offsets.to(indices.dtype).unsqueeze(0)
        elif not global_ids:
            indices = self.to_global(indices, offsets)
        return torch.unique(indices.flatten())

    def l2_penalty(self, indices: Tensor, offsets: Optional[Tensor] = None, *, global_ids: bool = False) -> Tensor:
        """``1/2 * sum`` over the rows the batch uses, each once, of ``||V_j||^2 + w_j^2`` (0-dim).

        Multiplied by a coefficient and added to the loss, its gradient is that coefficient times
        ``V_j`` (and ``w_j``) on exactly those rows: the fused optimizers' ``weight_decay``. With
        ``sparse=True`` the gradients are sparse like those of the op. Under `deepfm_fast.distributed`
        the rows are those of every rank's batch, each once."""
        rows = self.used_rows(indices, offsets, global_ids=global_ids)
        if merges_across_ranks(self._sync):  # the rows of every rank's batch
            rows = union_rows(self._sync, rows)
        gather = reference.gather_rows if self.use_reference else ops.gather_rows
        v = gather(self.weight, rows, self.sparse)
        w = gather(self.linear_weight, rows, self.sparse and not self.use_reference)
        return 0.5 * (v.pow(2).sum() + w.pow(2).sum())

    def sparse_parameters(self) -> List[nn.Parameter]:
        """The parameters with sparse gradients (for ``torch.optim.SparseAdam``): ``weight`` with
        ``sparse=True``, and ``linear_weight`` too on the fused op (the reference gives it a dense one)."""
        if not self.sparse:
            return []
        return [self.weight] + ([self.linear_weight] if not self.use_reference else [])

    def extra_repr(self) -> str:
        return (f"field_dims={self.field_dims}, embedding_dim={self.embedding_dim}, mode={self.mode!r}, "
                f"pooling={self.pooling!r}, sparse={self.sparse}, use_reference={self.use_reference}"
                + (", pool_first_order=True" if self.pool_first_order else "")
                + (f", optimizer={self.optimizer}" if self.optimizer is not None else "")
                + (", rows_packed=True" if self.rows_packed else ""))


def _unique_rows_padded(ids: Tensor):
    """``torch.unique(ids, sorted=True, return_inverse=True)`` without its device->host sync (the
    number U of unique ids): ``rows`` keeps ``ids.numel()`` entries, the U unique ids first and in
    order, then other ids of the batch (valid rows that are read but never indexed); ``inverse``,
    shaped like ``ids``, indexes the first U. Deterministic (sorts only)."""
    flat = ids.reshape(-1).long()
    sorted_ids, order = torch.sort(flat, stable=True)
    head = torch.ones_like(sorted_ids, dtype=torch.bool)
    head[1:] = sorted_ids[1:] != sorted_ids[:-1]
    slot = head.cumsum(0) - 1  # each sorted position's unique row
    inverse = slot[torch.argsort(order)]
    rows = sorted_ids[torch.argsort((~head).to(torch.uint8), stable=True)]  # the U heads first, in order
    return rows, inverse.view(ids.shape)


def _refuse_unsynchronised(module: "EmbeddingFM") -> None:
    """Fused updates or sparse gradients on several ranks must be merged (deepfm_fast.distributed.wrap),
    or the replicas' tables drift apart silently: that is an error, not a training run."""
    if torch.compiler.is_compiling() or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    world = torch.distributed.get_world_size()
    if world > 1:
        raise RuntimeError(f"EmbeddingFM: a fused optimizer or sparse table gradients in a process group of {world} "
                           f"ranks would let the replicas' tables drift apart: wrap the model with "
                           f"deepfm_fast.distributed.wrap(model) instead of DistributedDataParallel, or call "
                           f"deepfm_fast.distributed.independent(model) if each rank trains its own model")


def _flush_before_saving(module, prefix, keep_vars):
    module.flush()  # a module-level function, not a lambda: the module stays picklable (torch.save)


TABLE_FILE_GENERATION = "table_file_generation"


def _table_file_state(module, destination, prefix, local_metadata):
    """A file-backed table's ``state_dict`` checkpoints the file and holds its generation instead of
    the records (a 30 GB table is not copied into every checkpoint)."""
    module.checkpoint()
    for name, _ in module._packed_columns():
        destination.pop(prefix + name, None)
    destination[prefix + TABLE_FILE_GENERATION] = torch.tensor(module.table_file.generation)


def _load_into_table_file(module, state_dict, prefix, *args):
    """Loads a file-backed module's ``state_dict`` (its generation: the file must be at it), or the
    records of any other (copied into the file, every row journaled first)."""
    generation = state_dict.pop(prefix + TABLE_FILE_GENERATION, None)
    if generation is None:
        module.table_file.journal_all()  # every row of the file changes
        return
    if int(generation) != module.table_file.generation:
        raise RuntimeError(f"EmbeddingFM: this checkpoint goes with generation {int(generation)} of the table file "
                           f"{module.table_file.path}, which is at generation {module.table_file.generation}: a "
                           f"table file keeps only its last checkpoint (load the last one)")
    for name, tensor in module._packed_columns():  # the file's own records: copying them onto themselves is no-op
        state_dict.setdefault(prefix + name, tensor)


def _load_earlier_states(module, state_dict, prefix, *args):
    """Loads what earlier versions and the other fused optimizers saved:
    * a first-order state of shape [N, 1] (now [N]);
    * no catch-up state into ``Adam`` (saved by another optimizer of two element-wise states, or by
      the first ``Adam``, which had SparseAdam's semantics): every row is taken as up to date at the
      saved step, and training continues with dense-Adam semantics from there;
    * ``Adam``'s catch-up state into another optimizer: dropped (``state_dict()`` flushed the rows)."""
    for name in [k for k in state_dict if k.startswith(prefix + "linear_optimizer_state")]:
        if state_dict[name].dim() == 2 and state_dict[name].shape[1] == 1:
            state_dict[name] = state_dict[name].reshape(-1)
    step_key = prefix + "optimizer_step"
    own = set(module.optimizer_row_state())
    if own and step_key in state_dict and not any(prefix + f"optimizer_{n}" in state_dict for n in own):
        fresh = module.optimizer.new_row_state(module.weight.shape[0], module.weight.device, step=state_dict[step_key])
        state_dict.update({prefix + f"optimizer_{n}": t for n, t in fresh.items()})
    for name in Adam.ROW_STATE:
        if name not in own:
            state_dict.pop(prefix + f"optimizer_{name}", None)
