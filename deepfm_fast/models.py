"""CTR models built on the fused embedding + FM op: DeepFM, FM and LR, from feature specs.

DeepFM (Guo et al., IJCAI 2017, arXiv:1703.04247) adds a DNN to a factorization machine; both
read the SAME field embeddings::

    fields ──> EmbeddingFM (one table V [N, K], w [N], b; one fused kernel) ──> y_FM = b + Σ w x + FM(e)
                 │ pooled field embeddings e [B, F, K]
                 └──> flatten [B, F*K] ──> MLP 400-400-400 (BN, ReLU, dropout) ──> y_DNN
    logit = y_FM + y_DNN,   p = sigmoid(logit)

Fields come from :mod:`deepfm_fast.features`: a :class:`SparseField` is one id, a
:class:`MultiHotField` a bag pooled by sum or mean (the mean divides by the bag length, so an
empty bag pools to zero), a :class:`NumericField` one table row times its value ``x`` (so it
enters the FM as a weighted id and the DNN as ``x * v_f``, as FuxiCTR does).

All three models take a :class:`deepfm_fast.data.Batch` and return logits ``[B]``;
``forward(batch, return_penalty=True)`` also returns the L2 penalty on the embedding rows used
by the batch (see :meth:`CTRModel.forward`). ``use_reference=True`` builds the same model on the
pure-PyTorch reference ops; the parameters have the same names, so a ``state_dict`` moves
between the two and gives the same logits and gradients.

How the table (``V`` and the first-order ``w``) is trained is one :class:`TableMode`, parsed once
from the ``table_optimizer`` string (the names of ``deepfm-fast train --table-optimizer``):

* ``None`` / ``"dense"``: dense gradients, for any torch optimizer (the slow baseline: Adam then
  touches every row each step);
* ``"sparse_adam"``: coalesced sparse gradients, for ``torch.optim.SparseAdam`` on
  :meth:`CTRModel.sparse_parameters`;
* a name of :data:`deepfm_fast.optim.NAMES` (``"adam"``, ``"rowwise_adagrad"``, ...): that fused
  optimizer, applied to the touched rows inside the backward (``"adam"`` has the semantics of
  ``torch.optim.Adam`` on the dense gradient). ``V`` and ``w`` then get no gradient; the bias and
  the DNN still need a torch optimizer. ``l2_embedding`` becomes the fused optimizer's
  ``weight_decay`` (the same gradient as the penalty: ``lambda * V_j`` on each row used in the
  batch, once), so ``return_penalty`` gives 0. The optimizer state and step count are buffers of
  ``model.embedding``, so ``state_dict`` carries them.

:meth:`CTRModel.optimizers` builds what trains a model in its table mode (:class:`Optimizers`:
the torch optimizers and the fused one behind one learning-rate interface), which is all
:class:`~deepfm_fast.train.Trainer` uses.

Example::

    >>> from deepfm_fast.features import SparseField, MultiHotField, NumericField
    >>> from deepfm_fast.data import make_synthetic, iterate_batches
    >>> data = make_synthetic(2000)
    >>> model = DeepFM(data.fields, embedding_dim=10, hidden_units=(64, 64), batch_norm=True)
    >>> logits = model(next(iterate_batches(data.train, 256)))   # [256]

Training with the fused table optimizer (what ``deepfm-fast train`` does by default)::

    >>> model = DeepFM(data.fields, 10, hidden_units=(64, 64), table_optimizer="adam", table_lr=1e-3,
    ...                l2_embedding=0.01)
    >>> opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)  # DNN, bias
    >>> batch = next(iterate_batches(data.train, 256))
    >>> loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch), batch.labels)
    >>> opt.zero_grad(); loss.backward(); opt.step()   # the table rows were updated in backward()
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from . import optim
from .data.dataset import Batch, to_csr
from .embedding import EmbeddingFM
from .features import FieldSpec, MultiHotField, NumericField, SparseField, fields_from_dicts, fields_to_dicts

__all__ = ["CTRModel", "DeepFM", "FM", "LR", "MLP", "build_model", "MODELS", "TableMode", "Optimizers",
           "TABLE_OPTIMIZERS"]

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU,
                "prelu": nn.PReLU, "leaky_relu": nn.LeakyReLU, "silu": nn.SiLU}


@dataclass(frozen=True)
class TableMode:
    """How the table (``V`` and ``w``) is trained, decided once from its name.

    ``kind`` is ``"dense"`` (dense gradients, trained with the rest by a torch optimizer),
    ``"sparse"`` (coalesced sparse gradients for ``torch.optim.SparseAdam``) or ``"fused"`` (the
    fused optimizer ``optimizer``, a name of :data:`deepfm_fast.optim.NAMES`, updates the touched
    rows inside the backward). ``name`` is the ``--table-optimizer`` spelling.
    """

    kind: str
    optimizer: Optional[str] = None

    DENSE: ClassVar[str] = "dense"
    SPARSE: ClassVar[str] = "sparse_adam"

    @staticmethod
    def names() -> Tuple[str, ...]:
        """Every table mode by name: the fused optimizers (``deepfm_fast.optim``), then the plain-PyTorch ways."""
        return TableMode.fused_names() + (TableMode.SPARSE, TableMode.DENSE)

    @staticmethod
    def fused_names() -> Tuple[str, ...]:
        return tuple(optim.NAMES)

    @classmethod
    def parse(cls, name: Optional[str], owner: str = "table_optimizer") -> "TableMode":
        """The mode called ``name`` (None: dense); a ValueError naming ``owner`` and the choices otherwise."""
        if name is None or name == cls.DENSE:
            return cls("dense")
        if name == cls.SPARSE:
            return cls("sparse")
        if name in cls.fused_names():
            return cls("fused", name)
        raise ValueError(f"{owner} must be one of {list(cls.names())} or None, got {name!r}")

    @property
    def name(self) -> str:
        return {"dense": self.DENSE, "sparse": self.SPARSE}.get(self.kind, self.optimizer)

    @property
    def sparse(self) -> bool:
        return self.kind == "sparse"

    @property
    def fused(self) -> bool:
        return self.kind == "fused"

    def fused_optimizer(self, lr: float, weight_decay: float) -> Optional[optim.FusedOptimizer]:
        """A new fused optimizer of this mode (None unless fused); ``weight_decay`` is the L2 on the used rows."""
        return optim.by_name(self.optimizer, lr, weight_decay) if self.fused else None


# Every table mode's name, for callers that list them (a snapshot of TableMode.names() at import).
TABLE_OPTIMIZERS = TableMode.names()
# Which rows the L2 penalty covers: those a batch uses (any table optimizer), or the whole table
# (FuxiCTR's embedding_regularizer; dense gradients only, since it touches every row).
L2_SCOPES = ("used", "table")
# The DNN's Linear init: PyTorch's default (Kaiming uniform) or FuxiCTR's Xavier normal (zero biases).
DNN_INITS = ("default", "xavier_normal")


class Optimizers:
    """The optimizers of a training run (:meth:`CTRModel.optimizers`): one learning-rate interface over
    the torch optimizers and a fused table optimizer, so that a trainer never asks which mode it runs.

    Args:
        dense: the torch optimizer of the DNN, batch norm and bias (and of the table in dense mode).
        table: the torch optimizer of a sparse table (``SparseAdam``), if any.
        fused: the fused table optimizer, if any. Its learning rate is in no ``state_dict``: a
            checkpoint saves :attr:`table_lr` beside the states of :attr:`torch_optimizers`.
    """

    def __init__(self, dense: Optional[torch.optim.Optimizer] = None, table: Optional[torch.optim.Optimizer] = None,
                 fused: Optional[optim.FusedOptimizer] = None):
        self._dense, self._table, self._fused = dense, table, fused

    @property
    def torch_optimizers(self) -> List[torch.optim.Optimizer]:
        """The torch optimizers, the table's first: what ``zero_grad``, ``step`` and a checkpoint need."""
        return [o for o in (self._table, self._dense) if o is not None]

    @property
    def lr(self) -> float:
        """The learning rate of the DNN and bias (the table's when nothing else is trained)."""
        return self._dense.param_groups[0]["lr"] if self._dense is not None else self.table_lr

    @property
    def table_lr(self) -> float:
        """The learning rate the table is trained with now."""
        if self._fused is not None:
            return self._fused.lr
        table = self._table or self._dense
        return table.param_groups[0]["lr"] if table is not None else float("nan")

    def set_table_lr(self, lr: float) -> None:
        """Sets the table's own learning rate (fused or sparse); a dense table follows :attr:`lr`."""
        if self._fused is not None:
            self._fused.lr = float(lr)
        elif self._table is not None:
            for group in self._table.param_groups:
                group["lr"] = float(lr)

    def decay(self, factor: float, floor: float) -> float:
        """Multiplies every learning rate by ``factor``, none below ``floor``; returns the new :attr:`lr`."""
        for opt in self.torch_optimizers:
            for group in opt.param_groups:
                group["lr"] = max(group["lr"] * factor, floor)
        if self._fused is not None:
            self._fused.lr = max(self._fused.lr * factor, floor)
        return self.lr


class MLP(nn.Module):
    """``Linear -> [BatchNorm] -> activation -> [Dropout]`` per hidden layer, then ``Linear(., 1)``.

    The layer order is FuxiCTR's ``DNN_Layer`` (the BARS DeepFM): batch norm before the activation.
    """

    def __init__(self, in_dim: int, hidden_units: Sequence[int], activation: str = "relu",
                 dropout: float = 0.0, batch_norm: bool = False, init: str = "default"):
        super().__init__()
        if init not in DNN_INITS:
            raise ValueError(f"MLP: init must be one of {list(DNN_INITS)}, got {init!r}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"MLP: activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"MLP: dropout must be in [0, 1), got {dropout!r}")
        layers = []
        for units in hidden_units:
            if units < 1:
                raise ValueError(f"MLP: hidden units must be >= 1, got {list(hidden_units)}")
            layers.append(nn.Linear(in_dim, units))
            if batch_norm:
                layers.append(nn.BatchNorm1d(units))
            layers.append(_ACTIVATIONS[activation]())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            in_dim = units
        layers.append(nn.Linear(in_dim, 1))
        self.net = nn.Sequential(*layers)
        if init == "xavier_normal":
            for layer in self.net:
                if isinstance(layer, nn.Linear):
                    nn.init.xavier_normal_(layer.weight)
                    nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(1)


class CTRModel(nn.Module):
    """Shared base: one :class:`~deepfm_fast.EmbeddingFM` over all fields, inputs from a Batch.

    Subclasses may add a DNN on the pooled field embeddings in :meth:`_head`.

    Args:
        fields: feature specs, in the order of the data's fields.
        embedding_dim: ``K``.
        l2_embedding: ``lambda`` of the penalty ``lambda / 2 * sum_{rows j used in the batch}
            (||V_j||^2 + w_j^2)``; each used row counts once, however often it occurs.
        l2_scope: ``"used"`` (the rows each batch uses, above; with a fused optimizer, its
            ``weight_decay``) or ``"table"``: every row at every step, FuxiCTR's
            ``embedding_regularizer`` (dense gradients: ``table_optimizer="dense"`` only).
        use_reference: build on the reference ops (the test oracle) instead of the fused kernels.
        init_std: standard deviation of the table's normal init (default 1e-2; FuxiCTR uses 1e-4,
            which with few steps per epoch leaves the FM term inactive for many epochs).
        table_optimizer: how the table is trained: a :class:`TableMode` or its name (see the module
            docs): ``None``/``"dense"``, ``"sparse_adam"``, or a fused optimizer's, e.g. ``"adam"``.
        table_lr: initial learning rate of a fused table optimizer (:meth:`optimizers` sets it anew).
        sparse: deprecated spelling of ``table_optimizer="sparse_adam"``.
    """

    name = "base"

    def __init__(self, fields: Sequence[FieldSpec], embedding_dim: int = 10, *, l2_embedding: float = 0.0,
                 use_reference: bool = False, init_std: float = 1e-2,
                 table_optimizer: Union[str, TableMode, None] = None, table_lr: float = 1e-3, sparse: bool = False,
                 l2_scope: str = "used", table_file=None):
        super().__init__()
        mode = table_optimizer if isinstance(table_optimizer, TableMode) else \
            TableMode.parse(table_optimizer, f"{type(self).__name__}: table_optimizer")
        if sparse:
            warnings.warn(f"{type(self).__name__}: sparse=True is deprecated; use table_optimizer='sparse_adam'",
                          FutureWarning, stacklevel=2)
            if table_optimizer is not None and not mode.sparse:
                raise ValueError(f"{type(self).__name__}: sparse=True and table_optimizer={mode.name!r} "
                                 f"exclude each other")
            mode = TableMode("sparse")
        fields = list(fields)
        if not fields:
            raise ValueError(f"{type(self).__name__}: needs at least one field")
        for f in fields:
            if not isinstance(f, (SparseField, MultiHotField, NumericField)):
                raise TypeError(f"{type(self).__name__}: fields must be SparseField, MultiHotField or "
                                f"NumericField specs, got {f!r}")
        if embedding_dim < 1:
            raise ValueError(f"{type(self).__name__}: embedding_dim must be >= 1, got {embedding_dim}")
        if l2_embedding < 0:
            raise ValueError(f"{type(self).__name__}: l2_embedding must be >= 0, got {l2_embedding}")
        if l2_scope not in L2_SCOPES:
            raise ValueError(f"{type(self).__name__}: l2_scope must be one of {list(L2_SCOPES)}, got {l2_scope!r}")
        if l2_scope == "table" and mode.kind != "dense":
            raise ValueError(f"{type(self).__name__}: l2_scope='table' decays every row at every step, which needs "
                             f"dense gradients (table_optimizer='dense'), not {mode.name!r}")
        self.fields = fields
        self.embedding_dim = embedding_dim
        self.l2_embedding = float(l2_embedding)
        self.l2_scope = l2_scope
        self.use_reference = use_reference
        self.init_std = init_std
        self.table_mode = mode
        self._initial_table_lr = float(table_lr)
        pooling = [f.pooling if isinstance(f, MultiHotField) else "sum" for f in fields]
        # A mean-pooled multi-hot field averages its first-order term too (as FuxiCTR's LR layer and
        # DeepCTR-Torch's linear part pool sequence fields like the embeddings).
        self.embedding = EmbeddingFM([f.vocab_size for f in fields], embedding_dim, mode="field", pooling=pooling,
                                     pool_first_order=True, sparse=self.sparse, init_std=init_std,
                                     use_reference=use_reference,
                                     optimizer=mode.fused_optimizer(table_lr, self.l2_embedding), table_file=table_file)
        self.table_file = None if table_file is None else str(table_file)
        self._plain = all(isinstance(f, SparseField) for f in fields)

    @property
    def table_optimizer(self) -> str:
        """The table mode's name (``"dense"``, ``"sparse_adam"`` or a fused optimizer's)."""
        return self.table_mode.name

    @property
    def sparse(self) -> bool:
        """The table emits sparse gradients (``table_optimizer="sparse_adam"``)."""
        return self.table_mode.sparse

    # -- inputs ----------------------------------------------------------------------------
    def _inputs(self, batch: Batch) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """``(ids [B, F] local, None, None)`` for all-sparse unweighted batches, else global CSR."""
        device = self.embedding.weight.device
        if self._plain and batch.sparse_weights is None:
            return batch.sparse.to(device), None, None
        indices, offsets, weights = to_csr(batch, self.fields)
        return (indices.to(device), offsets.to(device),
                None if weights is None else weights.to(device=device, dtype=self.embedding.weight.dtype))

    def penalty(self, ids: Tensor, offsets: Optional[Tensor] = None) -> Tensor:
        """``l2_embedding / 2 * sum`` over the used rows (or the whole table, ``l2_scope="table"``) of
        ``||V_j||^2 + w_j^2`` (0-dim tensor)."""
        emb = self.embedding
        if self.l2_scope == "table":
            return 0.5 * self.l2_embedding * (emb.weight.pow(2).sum() + emb.linear_weight.pow(2).sum())
        return self.l2_embedding * emb.l2_penalty(ids, offsets, global_ids=offsets is not None)

    # -- forward ---------------------------------------------------------------------------
    def _head(self, pooled: Optional[Tensor]) -> Optional[Tensor]:
        return None

    def logit_of_ids(self, ids: Tensor, offsets: Optional[Tensor] = None,
                     weights: Optional[Tensor] = None) -> Tensor:
        """Logits ``[B]`` of local ids ``[B, F]`` (``offsets`` None) or of CSR bags of global ids."""
        need_pooled = self._needs_pooled
        if offsets is None:
            out = self.embedding(ids, None, weights, return_pooled=need_pooled)
        else:
            out = self.embedding(ids, offsets, weights, return_pooled=need_pooled, global_ids=True)
        if not need_pooled:
            return out
        logit, pooled = out
        return logit + self._head(pooled)

    def forward(self, batch: Batch, return_penalty: bool = False) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        """Logits ``[B]`` of a :class:`~deepfm_fast.data.Batch`.

        Args:
            batch: a batch whose tensors match ``fields``.
            return_penalty: also return the L2 penalty of the rows this batch uses (a 0-dim
                tensor; zero when ``l2_embedding == 0``); add it to the loss.
        """
        ids, offsets, weights = self._inputs(batch)
        logit = self.logit_of_ids(ids, offsets, weights)
        if not return_penalty:
            return logit
        if self.l2_embedding > 0 and not self.fused:  # fused: the optimizer's weight_decay does it
            if self.sparse and torch.compiler.is_compiling():
                # torch 2.13 cannot add the sparse gradients of the op and of the penalty in a
                # compiled backward (an internal assert in its fake tensors).
                raise NotImplementedError(f"{type(self).__name__}: table_optimizer='sparse_adam' with l2_embedding > 0 "
                                          f"does not compile; use a fused table optimizer (e.g. 'adam', whose "
                                          f"weight_decay is this L2) or compile without the L2")
            pen = self.penalty(ids, offsets)
        else:
            pen = logit.new_zeros(())
        return logit, pen

    _needs_pooled = False

    # -- optimizers and config -------------------------------------------------------------
    @property
    def fused(self) -> bool:
        """The table is updated by a fused optimizer inside the backward."""
        return self.table_mode.fused

    @property
    def table_lr(self) -> float:
        """The table's learning rate: the fused optimizer's now, else the one given to the constructor."""
        return self.embedding.optimizer.lr if self.fused else self._initial_table_lr

    def optimizers(self, lr: float, table_lr: Optional[float] = None) -> "Optimizers":
        """What trains this model in its table mode: ``torch.optim.Adam`` (``lr``) on
        :meth:`dense_parameters` (the DNN, batch norm, bias; the table too in dense mode),
        ``SparseAdam`` (``table_lr``) on the table in sparse mode, and in fused mode the fused
        optimizer, whose learning rate becomes ``table_lr`` (default ``lr``)."""
        table_lr = lr if table_lr is None else table_lr
        sparse = [p for p in self.sparse_parameters() if p.requires_grad] if self.sparse else []
        dense = self.dense_parameters()
        out = Optimizers(dense=torch.optim.Adam(dense, lr=lr) if dense else None,
                         table=torch.optim.SparseAdam(sparse, lr=table_lr) if sparse else None,
                         fused=self.embedding.optimizer)
        out.set_table_lr(table_lr)
        return out

    def sparse_parameters(self):
        """The parameters with sparse gradients (``table_optimizer="sparse_adam"``), for
        ``torch.optim.SparseAdam``: ``V``, and ``w`` too on the fused op."""
        return self.embedding.sparse_parameters()

    def dense_parameters(self):
        """The parameters for a torch optimizer: all that require a gradient but the sparse ones
        (:meth:`sparse_parameters`) and the tables of a fused optimizer (updated in the backward)."""
        emb = self.embedding
        skip = {id(p) for p in self.sparse_parameters()}
        if self.fused:
            skip |= {id(emb.weight), id(emb.linear_weight)}
        return [p for p in self.parameters() if id(p) not in skip and p.requires_grad]

    def config(self) -> Dict[str, Any]:
        """JSON-ready constructor arguments; ``build_model(**cfg)`` rebuilds the model."""
        return {"name": self.name, "fields": fields_to_dicts(self.fields), "embedding_dim": self.embedding_dim,
                "l2_embedding": self.l2_embedding, "l2_scope": self.l2_scope, "init_std": self.init_std,
                "table_optimizer": self.table_optimizer, "table_lr": self.table_lr,
                **({"table_file": self.table_file} if self.table_file else {})}

    def extra_repr(self) -> str:
        return (f"fields={len(self.fields)}, rows={sum(f.vocab_size for f in self.fields)}, "
                f"embedding_dim={self.embedding_dim}, l2_embedding={self.l2_embedding}, "
                f"use_reference={self.use_reference}, table_optimizer={self.table_optimizer!r}")


class FM(CTRModel):
    """Factorization machine (Rendle 2010) in field mode: bias + first order + pairwise field FM.

    Args: as :class:`CTRModel`.
    """

    name = "fm"


class LR(CTRModel):
    """Logistic regression: bias + first order, on the same fused op and the same inputs.

    The op always computes the FM term too; LR keeps a one-column table frozen at zero
    (``requires_grad=False``: no gradient, no penalty, no update), so the second-order term is
    exactly 0 at the cost of one multiply-add per id.

    Args: as :class:`CTRModel` (``embedding_dim`` is ignored; ``l2_embedding`` applies to ``w``).
    """

    name = "lr"

    def __init__(self, fields: Sequence[FieldSpec], embedding_dim: int = 1, **kwargs):
        super().__init__(fields, 1, **kwargs)
        with torch.no_grad():
            self.embedding.weight.zero_()
        self.embedding.weight.requires_grad_(False)


class DeepFM(CTRModel):
    """DeepFM: FM (bias, first order, field FM) plus a DNN over the same pooled field embeddings.

    Args:
        fields: feature specs (:mod:`deepfm_fast.features`), in data order.
        embedding_dim: ``K`` (BARS uses 10).
        hidden_units: DNN widths, e.g. ``(400, 400, 400)``.
        activation: ``"relu"`` (default), ``"tanh"``, ``"gelu"``, ...
        dropout: DNN dropout after each hidden activation.
        batch_norm: batch norm before each hidden activation.
        l2_embedding, l2_scope: L2 on the table rows used in the batch or on the whole table (see
            :class:`CTRModel`).
        use_reference: build on the reference ops.
        sparse: deprecated spelling of ``table_optimizer="sparse_adam"``.
        init_std: table init std.
        table_optimizer, table_lr: how the table is trained (see :class:`CTRModel`).
        dnn_init: ``"default"`` (PyTorch's) or ``"xavier_normal"`` (FuxiCTR's) init of the DNN.

    Shape:
        ``forward(batch)``: ``[B]`` logits; the DNN input is ``[B, F * K]``.

    Example::

        model = DeepFM(data.fields, 10, hidden_units=(400, 400, 400), dropout=0.2, batch_norm=True)
        logits, penalty = model(batch, return_penalty=True)
        loss = F.binary_cross_entropy_with_logits(logits, batch.labels) + penalty
    """

    name = "deepfm"
    _needs_pooled = True

    def __init__(self, fields: Sequence[FieldSpec], embedding_dim: int = 10,
                 hidden_units: Sequence[int] = (400, 400, 400), activation: str = "relu",
                 dropout: float = 0.0, batch_norm: bool = False, l2_embedding: float = 0.0,
                 use_reference: bool = False, sparse: bool = False, init_std: float = 1e-2,
                 table_optimizer: Union[str, TableMode, None] = None, table_lr: float = 1e-3, l2_scope: str = "used",
                 dnn_init: str = "default", table_file=None):
        super().__init__(fields, embedding_dim, l2_embedding=l2_embedding, use_reference=use_reference,
                         sparse=sparse, init_std=init_std, table_optimizer=table_optimizer, table_lr=table_lr,
                         l2_scope=l2_scope, table_file=table_file)
        self.hidden_units = tuple(int(u) for u in hidden_units)
        self.activation, self.dropout, self.batch_norm = activation, float(dropout), bool(batch_norm)
        self.dnn_init = dnn_init
        self.dnn = MLP(len(self.fields) * embedding_dim, self.hidden_units, activation, dropout, batch_norm, dnn_init)

    def _head(self, pooled: Tensor) -> Tensor:
        return self.dnn(pooled.flatten(1))  # [B, F * K], also for B = 0

    def config(self) -> Dict[str, Any]:
        cfg = super().config()
        cfg.update(hidden_units=list(self.hidden_units), activation=self.activation, dropout=self.dropout,
                   batch_norm=self.batch_norm, dnn_init=self.dnn_init)
        return cfg


MODELS = {"deepfm": DeepFM, "fm": FM, "lr": LR}

_MODEL_ONLY = {"deepfm": ("hidden_units", "activation", "dropout", "batch_norm", "dnn_init")}


def build_model(name: str, fields: Sequence[Union[FieldSpec, Dict[str, Any]]], **hparams) -> CTRModel:
    """Build ``"deepfm"``, ``"fm"`` or ``"lr"`` from specs (or their dicts) and hyper-parameters.

    Hyper-parameters a model does not use (e.g. ``hidden_units`` for ``fm``) are ignored, so one
    option set serves every model.

    Example::

        model = build_model("deepfm", data.fields, embedding_dim=10, dropout=0.2, batch_norm=True)
    """
    if name not in MODELS:
        raise ValueError(f"build_model: unknown model {name!r}; choose from {sorted(MODELS)}")
    fields = list(fields)
    if fields and isinstance(fields[0], dict):
        fields = fields_from_dicts(fields)
    hparams = {k: v for k, v in hparams.items() if k != "name"}
    for other, keys in _MODEL_ONLY.items():
        if other != name:
            for k in keys:
                hparams.pop(k, None)
    return MODELS[name](fields, **hparams)
