"""DeepFM with its tables in a TorchRec ``EmbeddingBagCollection``, sharded beyond one host.

DeepFM (Guo et al., IJCAI 2017, `arXiv:1703.04247 <https://arxiv.org/abs/1703.04247>`_) is
``sigmoid(y_FM + y_DNN)`` over one set of field embeddings. When the tables outgrow one host,
TorchRec (https://pytorch.org/torchrec) shards them over processes with
``DistributedModelParallel`` (DMP) and trains them with FBGEMM's fused optimizers (the update of
the touched rows happens inside the backward, as in :mod:`deepfm_fast.optim`). This module builds
the DeepFM on those pieces and keeps our FM kernel for the second-order term::

    Batch ──batch_to_kjt──> KeyedJaggedTensor (one key per field, F keys)
                                │
                                ▼
        EmbeddingBagCollection: one table per field, [vocab_f, D] with D = round_up(K + 1, 4)
           columns of a row j:  V_j (K) │ w_j (1) │ zero padding (D - K - 1)
                                │  sharded by DMP: table-wise or row-wise, FBGEMM fused optimizer
                                ▼
        KeyedTensor ──to_dict(), stacked in field order──> [B, F, D]
             │                                 │
             ▼ e = [..., :K]  [B, F, K]        ▼ [..., K]  [B, F]
        fm_interaction(e) [B]   MLP(flatten e) [B]   sum_f w [B]
             └────────────────────┴──────────────┴──> logit = bias + first order + FM + DNN

Why the first-order weights are extra columns and not a second dimension-1 collection: FBGEMM's
table-batched kernels (TorchRec's ``fused`` compute kernel, on CPU as well) need every table
dimension to be a multiple of 4; a dimension-1 table fails to shard with ``AssertionError: table
... has local_cols=1 not divisible by 4``. A first-order collection would thus need 4 floats per
weight and a second lookup and all-to-all per field. As extra columns, ``w_j`` rides with ``V_j``:
one lookup, one all-to-all, the same shard, and at most 3 padding floats per row (1 for K = 10).
The padding columns get zero gradients and stay zero. One consequence: FBGEMM's row-wise Adagrad
keeps ONE accumulator per row, so ``V_j`` and ``w_j`` share it (``G_j += (|g_V|^2 + g_w^2) / D``),
where :class:`deepfm_fast.optim.RowWiseAdagrad` keeps a separate one for ``w``.

Fields (:mod:`deepfm_fast.features`):

* :class:`~deepfm_fast.features.SparseField`: one id per sample;
* :class:`~deepfm_fast.features.MultiHotField`: a bag, pooled by ``sum`` or ``mean`` (the mean
  applies to the first-order weight too, as in :class:`deepfm_fast.models.DeepFM`; an empty bag
  pools to zero);
* :class:`~deepfm_fast.features.NumericField`: a one-row table whose row is scaled by the value,
  which makes the model *weighted*: the KeyedJaggedTensor then carries per-id weights (1 for plain
  ids). ``nn.EmbeddingBag``, which the unsharded collection uses, takes weights only with sum
  pooling, so in a weighted model a mean-pooled bag is a sum-pooled table whose ids carry
  ``x_i / L`` (:func:`batch_to_kjt` does that).

Installation (torchrec's own requirement is the CUDA ``fbgemm-gpu`` wheel, which does not run
here; ``fbgemm-gpu-cpu`` provides the same ``fbgemm_gpu`` package, so torchrec itself is installed
without its dependencies, after the ``torchrec`` extra has installed everything else)::

    pip install torch==2.13.0 setuptools wheel ninja pybind11
    pip install --no-build-isolation -e ".[torchrec]" torch==2.13.0
    pip install --no-deps torchrec==1.8.0

The versions are pinned together: fbgemm-gpu-cpu 1.8.0 is built for torch 2.13 and torchrec 1.8.0
for that fbgemm. FBGEMM's CPU kernels have no Adam; the fused optimizers here are SGD, Adagrad and
row-wise Adagrad. Row-wise sharding is TorchRec's for CUDA only; :class:`RowWiseOnCPUSharder`
allows it on CPU, where it runs on TorchRec's own row-wise sharding code.

Example (one process per rank, e.g. ``torchrun --nproc-per-node 2 train.py``)::

    import torch, torch.distributed as dist
    import torch.nn.functional as F
    from deepfm_fast.data import iterate_batches, make_synthetic
    from deepfm_fast.integrations.torchrec import TorchRecDeepFM, batch_to_kjt, shard

    dist.init_process_group("gloo")                 # "nccl" with device=torch.device("cuda", local_rank)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)                            # the same DNN on every rank
    data = make_synthetic(20_000, seed=0)
    mine = data.train.subset(torch.arange(rank, len(data.train), world))   # this rank's rows
    model = TorchRecDeepFM(data.fields, embedding_dim=8, hidden_units=(64, 64), device=torch.device("meta"))
    dmp = shard(model, optimizer="rowwise_adagrad", lr=0.05, sharding="row_wise")
    dense_opt = torch.optim.Adam(dmp.module.dense_parameters(), lr=1e-3)   # the DNN and the bias
    for batch in iterate_batches(mine, 512, shuffle=True, seed=0, drop_last=True):
        loss = F.binary_cross_entropy_with_logits(dmp(batch_to_kjt(batch, model.fields)), batch.labels)
        dense_opt.zero_grad(); loss.backward(); dense_opt.step()   # the tables: updated in backward()

Every rank must run the same number of steps (each one is a collective). The module runs as such
a script: ``torchrun --nproc-per-node 2 -m deepfm_fast.integrations.torchrec --sharding row_wise``
trains on synthetic data and prints the test AUC next to the best achievable one.

Gradients: like DDP, TorchRec averages the embedding gradients over the ranks, so ``world`` ranks
that each take the mean loss of their share train like one process on the mean loss of the whole
batch (``tests/test_torchrec.py`` checks this for both shardings and all three optimizers).
"""

from __future__ import annotations

import math
from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .._args import Pooling
from ..data.dataset import Batch
from ..features import FieldSpec, MultiHotField, NumericField, SparseField
from ..models import MLP
from ..ops import fm_interaction

_INSTALL = ('pip install --no-build-isolation -e ".[torchrec]" torch==2.13.0 && '
            "pip install --no-deps torchrec==1.8.0")

try:
    import torchrec  # noqa: F401
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType
    from torchrec.distributed.comm import get_local_size
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.types import ShardingType
except Exception as exc:  # ImportError, or OSError/RuntimeError from an fbgemm_gpu built for another torch
    raise ImportError(
        f"deepfm_fast.integrations.torchrec needs torchrec 1.8.0 and fbgemm-gpu-cpu 1.8.0 (for torch "
        f"2.13), which could not be imported ({type(exc).__name__}: {exc}). Install them with: {_INSTALL}"
    ) from exc

__all__ = ["TorchRecDeepFM", "TorchRecDeepFMOutput", "RowWiseOnCPUSharder", "batch_to_kjt", "shard",
           "gather_state_dict", "OPTIMIZERS", "SHARDING_TYPES"]

OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad")
SHARDING_TYPES = ("table_wise", "row_wise")


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


def _table_name(field: FieldSpec) -> str:
    return f"t_{field.name}"


@torch.no_grad()
def _init_rows(weight: Tensor, embedding_dim: int, init_std: float) -> None:
    """``V ~ Normal(0, init_std)``, ``w = 0`` and zero padding: our DeepFM's init, on whole rows.

    A sharded collection calls it on each local shard (rows of the table, all columns), and on an
    empty 1-D placeholder where a rank holds none of the table.
    """
    if weight.dim() != 2:
        return
    weight[:, :embedding_dim].normal_(0.0, init_std)
    weight[:, embedding_dim:].zero_()


class _InitRows:
    """``init_fn`` of the tables: a class, not a lambda, so that the configs can be deep-copied."""

    def __init__(self, embedding_dim: int, init_std: float):
        self.embedding_dim, self.init_std = embedding_dim, init_std

    def __call__(self, weight: Tensor) -> None:
        _init_rows(weight, self.embedding_dim, self.init_std)


class TorchRecDeepFMOutput(NamedTuple):
    """The terms of :meth:`TorchRecDeepFM.forward_terms`; ``logit = bias + first_order + fm + dnn``."""

    logit: Tensor          # [B]
    first_order: Tensor    # [B]: sum over fields of the pooled w
    fm: Tensor             # [B]: fm_interaction(embeddings)
    dnn: Tensor            # [B]
    embeddings: Tensor     # [B, F, K]: the pooled field embeddings, in field order


class TorchRecDeepFM(nn.Module):
    """DeepFM whose tables are a TorchRec ``EmbeddingBagCollection`` (shardable with :func:`shard`).

    Same model as :class:`deepfm_fast.models.DeepFM` (bias + first order + per-field FM + DNN over
    the same pooled embeddings, DNN layer order of FuxiCTR: Linear, BatchNorm, activation, Dropout),
    with one table per field whose rows hold ``V_j`` and the first-order ``w_j`` side by side (see
    the module docs for the layout and why). The FM term is :func:`deepfm_fast.ops.fm_interaction`
    on the pooled ``[B, F, K]``.

    Args:
        fields: :class:`~deepfm_fast.features.SparseField`, :class:`MultiHotField` (sum or mean)
            and :class:`NumericField` specs, in data order; the names become the KJT keys and, as
            ``t_<name>``, the table names (so they cannot contain ``"."``).
        embedding_dim: ``K``; any value >= 1 (the table rows are padded to a multiple of 4).
        hidden_units, activation, dropout, batch_norm: the DNN (:class:`deepfm_fast.models.MLP`).
            Under DMP the DNN is data parallel (DDP), so batch norm normalises each rank's share
            of the batch.
        init_std: ``V ~ Normal(0, init_std)``; ``w``, the padding and the bias start at 0.
        weighted: the input carries per-id weights. Default: True iff a field is numeric. Set it
            for libFM-style ``id:value`` data (``Batch.sparse_weights``).
        device: device of the tables. ``torch.device("meta")`` allocates nothing: for tables that
            do not fit on one host, :func:`shard` then initialises each rank's shard only.

    Shape:
        ``forward(features)``: a :class:`torchrec.KeyedJaggedTensor` with the field names as keys
        and ``B`` samples -> logits ``[B]``.

    Example::

        >>> from deepfm_fast.features import SparseField, MultiHotField
        >>> fields = [SparseField("user", 1000), SparseField("item", 500), MultiHotField("tags", 50, "mean")]
        >>> model = TorchRecDeepFM(fields, embedding_dim=8, hidden_units=(32,))
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(
        ...     keys=["user", "item", "tags"], values=torch.tensor([3, 999, 7, 1, 4, 5, 6]),
        ...     lengths=torch.tensor([1, 1, 1, 1, 2, 1]))   # key-major: user x2, item x2, tags x2
        >>> model(kjt).shape
        torch.Size([2])
    """

    def __init__(self, fields: Sequence[FieldSpec], embedding_dim: int = 10,
                 hidden_units: Sequence[int] = (400, 400, 400), activation: str = "relu",
                 dropout: float = 0.0, batch_norm: bool = False, init_std: float = 1e-2,
                 weighted: Optional[bool] = None, device: Optional[torch.device] = None):
        super().__init__()
        fields = list(fields)
        if not fields:
            raise ValueError("TorchRecDeepFM: needs at least one field")
        for f in fields:
            if not isinstance(f, (SparseField, MultiHotField, NumericField)):
                raise TypeError(f"TorchRecDeepFM: fields must be SparseField, MultiHotField or NumericField "
                                f"specs, got {f!r}")
        names = [f.name for f in fields]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"TorchRecDeepFM: field names must be unique, repeated: {dup}")
        for name in names:  # the table's name is a key of nn.ModuleDict, which takes no "."
            if "." in name:
                raise ValueError(f"TorchRecDeepFM: field name {name!r} contains '.', which a table name cannot "
                                 f"(TorchRec keeps the tables in an nn.ModuleDict); rename the field")
        if embedding_dim < 1:
            raise ValueError(f"TorchRecDeepFM: embedding_dim must be >= 1, got {embedding_dim}")
        has_numeric = any(isinstance(f, NumericField) for f in fields)
        if weighted is None:
            weighted = has_numeric
        elif not weighted and has_numeric:
            raise ValueError("TorchRecDeepFM: a NumericField enters as a weighted id, so weighted=False "
                             f"is impossible with fields {[f.name for f in fields if isinstance(f, NumericField)]}")
        self.fields = fields
        self.feature_names = names
        self.embedding_dim = int(embedding_dim)
        self.table_dim = _round_up(self.embedding_dim + 1, 4)
        self.init_std = float(init_std)
        self.weighted = bool(weighted)
        init_fn = _InitRows(self.embedding_dim, self.init_std)
        tables = [
            EmbeddingBagConfig(
                name=_table_name(f), num_embeddings=f.vocab_size, embedding_dim=self.table_dim,
                feature_names=[f.name], init_fn=init_fn,
                # Weighted: nn.EmbeddingBag takes weights only with sum; batch_to_kjt divides by L.
                pooling=(PoolingType.MEAN if isinstance(f, MultiHotField) and Pooling.parse(f.pooling) is Pooling.MEAN
                         and not self.weighted else PoolingType.SUM))
            for f in fields
        ]
        self.embedding_bag_collection = EmbeddingBagCollection(tables=tables, is_weighted=self.weighted,
                                                               device=device)
        self.bias = nn.Parameter(torch.zeros(1))
        self.dnn = MLP(len(fields) * self.embedding_dim, hidden_units, activation, dropout, batch_norm)

    def dense_parameters(self) -> List[nn.Parameter]:
        """The DNN and the bias: what a torch optimizer trains (the tables have a fused one)."""
        return [p for n, p in self.named_parameters() if not n.startswith("embedding_bag_collection.")]

    def field_rows(self, features: KeyedJaggedTensor) -> Tensor:
        """The pooled table rows ``[B, F, D]`` (``V | w | padding``), fields in model order.

        A sharded collection returns its keys in sharding order, so the fields are picked by name
        from ``to_dict()``, never by position in ``values()``.
        """
        has_weights = features.weights_or_none() is not None
        if has_weights != self.weighted:
            raise ValueError(
                f"TorchRecDeepFM: the model is {'' if self.weighted else 'un'}weighted but the "
                f"KeyedJaggedTensor has {'weights' if has_weights else 'no weights'}; build it with "
                f"batch_to_kjt(batch, fields, weighted={self.weighted})")
        pooled = self.embedding_bag_collection(features).to_dict()
        missing = [n for n in self.feature_names if n not in pooled]
        if missing:
            raise KeyError(f"TorchRecDeepFM: the KeyedJaggedTensor lacks the fields {missing}")
        return torch.stack([pooled[n] for n in self.feature_names], dim=1)

    def forward_terms(self, features: KeyedJaggedTensor) -> TorchRecDeepFMOutput:
        """Logits and their terms (see :class:`TorchRecDeepFMOutput`)."""
        rows = self.field_rows(features)
        k = self.embedding_dim
        emb = rows[..., :k]                       # [B, F, K]; fm_interaction takes any strides
        first_order = rows[..., k].sum(1)
        fm = fm_interaction(emb)
        dnn = self.dnn(emb.reshape(emb.shape[0], -1))
        logit = self.bias + first_order + fm + dnn
        return TorchRecDeepFMOutput(logit, first_order, fm, dnn, emb)

    def forward(self, features: KeyedJaggedTensor) -> Tensor:
        """Logits ``[B]`` of a KeyedJaggedTensor with one key per field (see :func:`batch_to_kjt`)."""
        return self.forward_terms(features).logit

    def extra_repr(self) -> str:
        return (f"fields={len(self.fields)}, rows={sum(f.vocab_size for f in self.fields)}, "
                f"embedding_dim={self.embedding_dim}, table_dim={self.table_dim}, weighted={self.weighted}")


def batch_to_kjt(batch: Batch, fields: Sequence[FieldSpec], weighted: Optional[bool] = None) -> KeyedJaggedTensor:
    """A :class:`deepfm_fast.data.Batch` as the KeyedJaggedTensor :class:`TorchRecDeepFM` takes.

    One key per field (its name). A KJT is key-major: ``values`` holds all ids of the first field
    (sample by sample), then of the second, and ``lengths`` ``[F * B]`` the bag sizes in the same
    order. A SparseField gives one id per sample, a MultiHotField its bag without the ``-1``
    padding, a NumericField id 0 with the value as its weight.

    Args:
        batch: a batch whose tensors match ``fields`` (e.g. from :func:`deepfm_fast.data.iterate_batches`).
        fields: the specs, in model order (``model.fields``).
        weighted: give per-id weights: 1, the value of a numeric field, ``Batch.sparse_weights`` /
            ``multi_hot_weights``, divided by the bag length for a mean-pooled bag. Default: iff
            a field is numeric; pass ``model.weighted``.

    Example::

        >>> kjt = batch_to_kjt(batch, model.fields, weighted=model.weighted)
        >>> logits = model(kjt)
    """
    fields = list(fields)
    has_numeric = any(isinstance(f, NumericField) for f in fields)
    has_value_weights = batch.sparse_weights is not None or any(w is not None for w in batch.multi_hot_weights)
    if weighted is None:
        weighted = has_numeric
    if not weighted and (has_numeric or has_value_weights):
        raise ValueError("batch_to_kjt: weighted=False drops the values of numeric fields and of "
                         "Batch.sparse_weights / multi_hot_weights; use a weighted model")
    b = batch.labels.shape[0]
    values, lengths, weights = [], [], []
    i_sp = i_mh = i_num = 0
    for f in fields:
        if isinstance(f, SparseField):
            ids = batch.sparse[:, i_sp]
            w = None if batch.sparse_weights is None else batch.sparse_weights[:, i_sp]
            n = torch.ones(b, dtype=torch.int64)
            i_sp += 1
        elif isinstance(f, MultiHotField):
            bag = batch.multi_hot[i_mh]
            mask = bag >= 0                       # -1 pads; row-major order keeps samples in order
            ids, n = bag[mask], mask.sum(1)
            bag_w = batch.multi_hot_weights[i_mh] if batch.multi_hot_weights else None
            w = None
            if weighted:
                w = torch.ones(bag.shape, dtype=torch.float32) if bag_w is None else bag_w.to(torch.float32)
                if Pooling.parse(f.pooling) is Pooling.MEAN:  # the table sums: the weights carry the 1 / L
                    w = w / n.clamp_min(1).unsqueeze(1).to(torch.float32)
                w = w[mask]
            i_mh += 1
        else:
            ids = torch.zeros(b, dtype=torch.int64)
            w = batch.numeric[:, i_num]
            n = torch.ones(b, dtype=torch.int64)
            i_num += 1
        values.append(ids.to(torch.int64))
        lengths.append(n.to(torch.int64))
        if weighted:
            weights.append(torch.ones(ids.shape[0], dtype=torch.float32) if w is None else w.to(torch.float32))
    return KeyedJaggedTensor(
        keys=[f.name for f in fields], values=torch.cat(values), lengths=torch.cat(lengths),
        weights=torch.cat(weights) if weighted else None)


def _fused_params(optimizer: str, lr: float, eps: float) -> Dict[str, object]:
    from fbgemm_gpu.split_embedding_configs import EmbOptimType

    types = {"sgd": EmbOptimType.EXACT_SGD, "adagrad": EmbOptimType.EXACT_ADAGRAD,
             "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD}
    if optimizer not in types:
        hint = " (FBGEMM's CPU kernels have no Adam)" if "adam" in str(optimizer).lower() else ""
        raise ValueError(f"shard: optimizer must be one of {list(OPTIMIZERS)}, got {optimizer!r}{hint}")
    if not (math.isfinite(lr) and lr >= 0):
        raise ValueError(f"shard: lr must be a finite number >= 0, got {lr}")
    params: Dict[str, object] = {"optimizer": types[optimizer], "learning_rate": float(lr)}
    if optimizer != "sgd":
        params["eps"] = float(eps)
    return params


class RowWiseOnCPUSharder(EmbeddingBagCollectionSharder):
    """TorchRec's ``EmbeddingBagCollectionSharder``, with row-wise sharding offered on CPU too.

    TorchRec lists ``row_wise`` only for CUDA devices, though its row-wise sharding (bucketise
    the ids by row block, all-to-all, reduce-scatter of the pooled rows) runs on CPU with gloo.
    This adds it to the CPU list; nothing else changes.
    """

    def sharding_types(self, compute_device_type: str) -> List[str]:
        types = super().sharding_types(compute_device_type)
        if compute_device_type == "cpu" and ShardingType.ROW_WISE.value not in types:
            types.append(ShardingType.ROW_WISE.value)
        return types


def _table_weights(dmp) -> Dict[str, object]:
    """``{state_dict key: ShardedTensor}`` of the sharded tables."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    tables = {}
    for key, value in dmp.state_dict().items():
        if key.startswith("embedding_bag_collection."):
            if not isinstance(value, ShardedTensor):
                raise TypeError(f"shard: expected a ShardedTensor for {key}, got {type(value).__name__}")
            tables[key] = value
    return tables


def _row_wise_leaves_a_rank_empty(rows: int, world: int) -> bool:
    """TorchRec's row-wise split gives ranks ``ceil(rows / world)`` rows each until none are left
    (5 rows on 4 ranks: 2, 2, 1, 0): is the last rank's share empty?"""
    return (world - 1) * math.ceil(rows / world) >= rows


def shard(model: TorchRecDeepFM, *, optimizer: str = "rowwise_adagrad", lr: float = 0.01, eps: float = 1e-8,
          sharding: Union[str, Mapping[str, str], None] = "table_wise", device: Optional[torch.device] = None,
          process_group=None, batch_size: Optional[int] = None):
    """Shard a :class:`TorchRecDeepFM` over the ranks with ``DistributedModelParallel``.

    Every rank calls it with the same model (built with the same seed) after
    ``torch.distributed.init_process_group``. TorchRec's planner (``EmbeddingShardingPlanner``,
    constrained per table to the requested sharding and to FBGEMM's ``fused`` kernel) places the
    tables; the DNN and the bias become data parallel (DDP, averaged gradients). The tables are
    trained by FBGEMM's fused optimizer inside the backward (``dmp.fused_optimizer`` holds its
    state and learning rate); train the rest with a torch optimizer on
    ``dmp.module.dense_parameters()``.

    DMP allocates the shards and initialises them with the tables' ``init_fn`` (``V ~ Normal(0,
    init_std)``, ``w = 0``); then each shard gets the rows of the model it was given, so sharded
    and unsharded start equal. A model built on the meta device keeps the fresh rows: each rank
    only ever allocates its own shards.

    Args:
        model: the unsharded model; its collection is replaced in place, use the returned module.
        optimizer: ``"sgd"`` (``EXACT_SGD``), ``"adagrad"`` (``EXACT_ADAGRAD``, per element) or
            ``"rowwise_adagrad"`` (``EXACT_ROWWISE_ADAGRAD``, one accumulator per row).
        lr: learning rate of the tables.
        eps: Adagrad's epsilon (FBGEMM's default 1e-8; torch's Adagrad uses 1e-10).
        sharding: ``"table_wise"`` (each table whole on one rank), ``"row_wise"`` (each table's rows
            split over all ranks: for tables larger than one host), a ``{field name: type}`` dict,
            or None to let the planner choose between them per table. A table with too few rows to
            give every rank one (a NumericField's single row) stays table-wise: FBGEMM's CPU
            backward mis-sizes a shard with no rows (it reads past the end of the row counts and
            fails at random with "doesn't support embedding tables with more than 2B rows").
        device: the compute device (default CPU; ``torch.device("cuda", local_rank)`` on GPUs).
        process_group: default: the world.
        batch_size: per-rank batch size, a hint for the planner's cost model.

    Returns:
        the ``torchrec.distributed.DistributedModelParallel`` module: ``dmp(kjt)`` gives the
        logits of this rank's samples.

    Example::

        dmp = shard(model, optimizer="adagrad", lr=0.05, sharding="row_wise")
        dense_opt = torch.optim.Adagrad(dmp.module.dense_parameters(), lr=0.05)
        loss = F.binary_cross_entropy_with_logits(dmp(batch_to_kjt(local_batch, model.fields)), labels)
        dense_opt.zero_grad(); loss.backward(); dense_opt.step()
    """
    import torch.distributed as dist
    from torchrec.distributed.embedding_types import EmbeddingComputeKernel
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
    from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig
    from torchrec.distributed.types import ShardingEnv

    if not isinstance(model, TorchRecDeepFM):
        raise TypeError(f"shard: model must be a TorchRecDeepFM, got {type(model).__name__}")
    if not isinstance(model.embedding_bag_collection, EmbeddingBagCollection):
        raise ValueError("shard: the model is already sharded")
    fused = _fused_params(optimizer, lr, eps)

    if sharding is None or isinstance(sharding, str):
        per_field = {f.name: sharding for f in model.fields}
    else:
        per_field = dict(sharding)
        unknown = sorted(set(per_field) - set(model.feature_names))
        if unknown:
            raise ValueError(f"shard: sharding names unknown fields {unknown}; fields are {model.feature_names}")
    for name, kind in per_field.items():
        if kind is not None and kind not in SHARDING_TYPES:
            raise ValueError(f"shard: sharding of {name!r} must be one of {list(SHARDING_TYPES)} or None, got {kind!r}")
    if not dist.is_initialized():
        raise RuntimeError("shard: call torch.distributed.init_process_group first (gloo on CPU, nccl on GPUs)")
    pg = process_group if process_group is not None else dist.group.WORLD
    device = torch.device("cpu") if device is None else torch.device(device)
    world = dist.get_world_size(pg)

    constraints = {}
    for f in model.fields:
        kinds = [per_field.get(f.name)] if per_field.get(f.name) is not None else list(SHARDING_TYPES)
        if _row_wise_leaves_a_rank_empty(f.vocab_size, world):
            kinds = ["table_wise"]
        constraints[_table_name(f)] = ParameterConstraints(
            sharding_types=kinds, compute_kernels=[EmbeddingComputeKernel.FUSED.value])

    topology = TopologyFactory.create_topology(
        TrainerConfig(world_size=world, local_world_size=get_local_size(world)),
        kernel_config=KernelConfig(compute_device=device.type))
    sharder = RowWiseOnCPUSharder(fused_params=fused)
    planner = EmbeddingShardingPlanner(topology=topology, batch_size=batch_size, constraints=constraints)
    plan = planner.collective_plan(model, [sharder], pg)

    # The unsharded tables by state_dict key, which the sharded tables keep (gather_state_dict relies on it).
    full = {key: value.detach().clone() for key, value in model.state_dict().items()
            if key.startswith("embedding_bag_collection.") and value.device.type != "meta"}
    dmp = DistributedModelParallel(model, env=ShardingEnv.from_process_group(pg), device=device, plan=plan,
                                   sharders=[sharder])
    # DMP re-initialises every shard (with the tables' init_fn, fresh random draws): give each
    # shard the rows the unsharded model had, so that sharded and unsharded start equal.
    with torch.no_grad():
        for key, weight in _table_weights(dmp).items():
            if key not in full:  # a model on the meta device: the fresh rows are its init
                continue
            for local in weight.local_shards():
                row0, col0 = local.metadata.shard_offsets
                rows, cols = local.metadata.shard_sizes
                local.tensor.copy_(full[key][row0:row0 + rows, col0:col0 + cols])
    return dmp


def gather_state_dict(dmp, dst: int = 0) -> Optional[Dict[str, Tensor]]:
    """The unsharded model's ``state_dict`` of a sharded one, on (global) rank ``dst``; None elsewhere.

    Every rank must call it (it gathers the table shards). ``TorchRecDeepFM(...).load_state_dict``
    takes the result: to evaluate or export on one host a model trained sharded.
    """
    import torch.distributed as dist

    tables = _table_weights(dmp)
    rank = dist.get_rank()
    out: Dict[str, Tensor] = {}
    for key, value in dmp.state_dict().items():
        if key in tables:
            full = torch.empty(tables[key].size(), dtype=tables[key].dtype) if rank == dst else None
            tables[key].gather(dst=dst, out=full)
            out[key] = full
        else:
            out[key] = value.detach().clone()
    return out if rank == dst else None


def _main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, float]]:
    """Train a sharded DeepFM on synthetic data with a planted truth; one process per rank.

    ``torchrun --nproc-per-node 2 -m deepfm_fast.integrations.torchrec --sharding row_wise``.
    Returns the per-epoch loss and test AUC on rank 0 (an empty list elsewhere).
    """
    import argparse
    import time
    from datetime import timedelta

    import torch.distributed as dist
    import torch.nn.functional as F
    from sklearn.metrics import roc_auc_score

    from ..data import iterate_batches, make_synthetic

    parser = argparse.ArgumentParser(prog="torchrun --nproc-per-node N -m deepfm_fast.integrations.torchrec",
                                     description=_main.__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=300_000, help="synthetic rows over all splits")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1024, help="per rank")
    parser.add_argument("--embedding-dim", type=int, default=10)
    parser.add_argument("--sharding", choices=SHARDING_TYPES, default="row_wise")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="rowwise_adagrad", help="of the tables")
    parser.add_argument("--lr", type=float, default=0.1, help="of the tables (the DNN: Adam, 1e-3)")
    args = parser.parse_args(argv)

    owns_group = not dist.is_initialized()          # the tests run it inside their own group
    if owns_group:
        dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    data = make_synthetic(args.rows, seed=0)                 # the same on every rank
    mine = data.train.subset(torch.arange(rank, len(data.train), world))
    test = data.test.subset(torch.arange(rank, len(data.test), world))
    model = TorchRecDeepFM(data.fields, args.embedding_dim, hidden_units=(256, 256), device=torch.device("meta"))
    dmp = shard(model, optimizer=args.optimizer, lr=args.lr, sharding=args.sharding, batch_size=args.batch_size)
    dense_opt = torch.optim.Adam(dmp.module.dense_parameters(), lr=1e-3)
    if rank == 0:
        plan = {n: o.sharding_type for n, o in dmp.plan.plan["embedding_bag_collection"].items()}
        print(f"{world} ranks; tables: {plan}; table optimizer {args.optimizer} (fused), lr {args.lr}", flush=True)
    # Every step is a collective: all ranks take as many steps as the smallest share allows.
    steps = torch.tensor(len(mine) // args.batch_size)
    dist.all_reduce(steps, op=dist.ReduceOp.MIN)
    history = []
    for epoch in range(1, args.epochs + 1):
        start, total = time.perf_counter(), 0.0
        dmp.train()
        batches = iterate_batches(mine, args.batch_size, shuffle=True, seed=epoch, drop_last=True)
        for _, batch in zip(range(int(steps)), batches):
            loss = F.binary_cross_entropy_with_logits(dmp(batch_to_kjt(batch, model.fields)), batch.labels)
            dense_opt.zero_grad()
            loss.backward()
            dense_opt.step()
            total += loss.item()
        dmp.eval()
        with torch.no_grad():
            probs = torch.sigmoid(dmp(batch_to_kjt(next(iterate_batches(test, len(test))), model.fields)))
        shares = [None] * world
        dist.all_gather_object(shares, (probs, test.labels))
        if rank == 0:
            p = torch.cat([s[0] for s in shares]).numpy()
            y = torch.cat([s[1] for s in shares]).numpy()
            history.append({"loss": total / max(int(steps), 1), "auc": float(roc_auc_score(y, p)),
                            "best_auc": data.best_auc})
            print(f"epoch {epoch}: train loss {history[-1]['loss']:.4f}, test AUC {history[-1]['auc']:.4f} "
                  f"(best possible {data.best_auc:.4f}), {time.perf_counter() - start:.1f} s", flush=True)
    if owns_group:
        dist.destroy_process_group()
    return history


if __name__ == "__main__":
    _main()
