"""The W2/W3 workloads of benchmarks/README.md, shared by the benchmarks and peak_rss.py.

Criteo-shaped: 26 single-id fields of ROWS rows each ("large": 26 x 400,000 = 10.4 M rows),
ids uniform or Zipf(1.05) per field. Every variant is one training step: forward, BCE with
logits, backward, optimizer update. Fused variants use deepfm_fast; baselines are what users
run today: plain PyTorch (nn.Embedding, dense or sparse gradients) and FBGEMM's TBE.
"""
import torch
import torch.nn.functional as F
from torch import nn

from deepfm_fast import EmbeddingFM, optim

FIELDS = 26
TABLE_ROWS = {"small": 10_000, "large": 400_000}
LR = 0.01


def sample_ids(rows, dist, n, generator):
    """n ids of one field: uniform, or Zipf(1.05) ranks scattered over the field's rows."""
    if dist == "uniform":
        return torch.randint(0, rows, (n,), generator=generator)
    rank = torch.arange(1, rows + 1, dtype=torch.float64)
    ranks = torch.multinomial(rank.pow(-1.05), n, replacement=True, generator=generator)
    return (ranks * 2654435761) % rows


def make_batches(rows, dist, batch, count=4, seed=1):
    """`count` batches of LOCAL ids [B, 26] and labels, cycled through by the timed steps."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.stack([sample_ids(rows, dist, batch, generator) for _ in range(FIELDS)], 1)
        batches.append((ids, torch.randint(0, 2, (batch,), generator=generator).float()))
    return batches


def fm_logit(emb, linear, bias):
    """The FM-only logit in plain PyTorch: bias + first order + the square-of-sum second order."""
    return bias + linear + 0.5 * (emb.sum(1).pow(2) - emb.pow(2).sum(1)).sum(1)


def dnn(in_features, hidden=(400, 400, 400)):
    layers = []
    for width in hidden:
        layers += [nn.Linear(in_features, width), nn.BatchNorm1d(width), nn.ReLU()]
        in_features = width
    return nn.Sequential(*layers, nn.Linear(in_features, 1))


class Variant:
    """One model + optimizers; `step(ids, labels)` runs one training step and returns the logits
    (None for a `limit`: the memory traffic of a step, with no model)."""

    def __init__(self, name, model, step_fn, optimizers=(), limit=False):
        self.name, self.model, self._step, self.optimizers = name, model, step_fn, list(optimizers)
        self.limit = limit

    def state_bytes(self):
        """Bytes of the tables, parameters, buffers and optimizer states (not gradients)."""
        seen, total = set(), 0
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        for opt in self.optimizers:
            tensors += [t for state in opt.state.values() for t in state.values() if torch.is_tensor(t)]
        for t in tensors:
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
        return total

    def step(self, ids, labels):
        return self._step(ids, labels)


def bce_step(forward, optimizers):
    """A training step: the logits ``forward(ids)``, BCE backward, then each optimizer's step."""
    def step(ids, labels):
        logit = forward(ids)
        F.binary_cross_entropy_with_logits(logit, labels).backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return logit

    return step


def fused_fm(rows, dim, optimizer, pack_rows=True):
    model = EmbeddingFM([rows] * FIELDS, dim, optimizer=optimizer, init_std=0.01, pack_rows=pack_rows)
    bias_opt = torch.optim.SGD([model.bias], lr=LR)

    return Variant(f"fused_{type(optimizer).__name__}" + ("" if pack_rows else SEPARATE), model,
                   bce_step(model, [bias_opt]), [bias_opt])


SEPARATE = "_separate_rows"  # the name suffix of a fused variant with pack_rows=False (the layout before packing)


def record_update_limit(rows, record_floats):
    """The machine's limit for a fused step's table traffic: a read-modify-write of each row the
    step touches (sorted, unique, as the fused update visits them), in records of `record_floats`
    float32 values, by plain C with software prefetch (benchmarks/row_access.c)."""
    import numpy as np

    import row_access

    lib = row_access.library()
    table = np.zeros((rows * FIELDS, record_floats), dtype=np.float32)
    table[:, 0] = 1.0  # touch every page once, so the first timed calls do not fault
    offsets = torch.arange(FIELDS) * rows
    unique_rows = {}

    def step(ids, labels):
        key = ids.data_ptr()  # the batches cycle: their unique rows are computed once, untimed
        if key not in unique_rows:
            unique = torch.unique(ids + offsets).numpy()
            unique_rows[key] = (unique, np.zeros((len(unique), record_floats), dtype=np.float32))
        unique, grads = unique_rows[key]
        lib.update_rows(row_access.ptr(table), row_access.ptr(unique), row_access.ptr(grads), len(unique),
                        record_floats, 0.0)

    return Variant(f"limit_update_{record_floats * 4}B_records", table, step, limit=True)


class PlainFM(nn.Module):
    """Plain PyTorch FM over one table with field offsets (nn.Embedding for V and for w)."""

    def __init__(self, rows, dim, sparse):
        super().__init__()
        self.register_buffer("field_offsets", torch.arange(FIELDS) * rows)
        self.emb = nn.Embedding(rows * FIELDS, dim, sparse=sparse)
        self.lin = nn.Embedding(rows * FIELDS, 1, sparse=sparse)
        nn.init.normal_(self.emb.weight, 0, 0.01)
        nn.init.zeros_(self.lin.weight)
        self.bias = nn.Parameter(torch.zeros(()))

    def embed(self, ids):
        rows = ids + self.field_offsets
        return self.emb(rows), self.lin(rows).sum((1, 2))

    def forward(self, ids):
        emb, linear = self.embed(ids)
        return fm_logit(emb, linear, self.bias)


def plain_fm_sparse_sgd(rows, dim):
    model = PlainFM(rows, dim, sparse=True)
    opt = torch.optim.SGD(model.parameters(), lr=LR)

    return Variant("embedding_sparse_SGD", model, bce_step(model, [opt]), [opt])


def plain_fm_twin(rows, dim, optimizer_name, first_order):
    """Check-only semantic twin of a W2 variant: plain PyTorch FM (sparse gradients) with the update
    written out: "EXACT_SGD" (v -= lr g) or "EXACT_ROWWISE_ADAGRAD" (G_r += mean_k g^2, v -= lr g /
    (sqrt(G_r) + 1e-8)). first_order: "separate" (w its own table with its own accumulator, as
    EmbeddingFM keeps it), "shared" (TBE with first order: w is one of dim + 4 columns of the row,
    which share one accumulator), or None (no first order, as TBE without it)."""
    model = PlainFM(rows, dim, sparse=True)
    accumulator = torch.zeros(rows * FIELDS)
    lin_accumulator = torch.zeros(rows * FIELDS)
    bias_opt = torch.optim.SGD([model.bias], lr=LR)

    def update(param, grad, acc):
        grad = grad.coalesce()
        idx, g = grad.indices()[0], grad.values()
        if optimizer_name == "EXACT_SGD":
            param.index_add_(0, idx, -LR * g)
            return
        acc.index_add_(0, idx, g.pow(2).mean(1))
        param.index_add_(0, idx, -LR * g / (acc[idx].sqrt() + 1e-8).unsqueeze(1))

    def step(ids, labels):
        emb, linear = model.embed(ids)
        logit = fm_logit(emb, linear if first_order else 0.0, model.bias)
        F.binary_cross_entropy_with_logits(logit, labels).backward()
        with torch.no_grad():
            if first_order == "shared" and optimizer_name != "EXACT_SGD":
                g_emb, g_lin = model.emb.weight.grad.coalesce(), model.lin.weight.grad.coalesce()
                idx = g_emb.indices()[0]
                squares = g_emb.values().pow(2).sum(1) + g_lin.values().pow(2).sum(1)
                accumulator.index_add_(0, idx, squares / (dim + 4))
                scale = (-LR / (accumulator[idx].sqrt() + 1e-8)).unsqueeze(1)
                model.emb.weight.index_add_(0, idx, scale * g_emb.values())
                model.lin.weight.index_add_(0, idx, scale * g_lin.values())
            else:
                update(model.emb.weight, model.emb.weight.grad, accumulator)
                if first_order:
                    update(model.lin.weight, model.lin.weight.grad, lin_accumulator)
        model.emb.weight.grad = model.lin.weight.grad = None
        bias_opt.step()
        bias_opt.zero_grad(set_to_none=True)
        return logit

    return Variant(f"twin_plain_{optimizer_name}_first_order_{first_order}", model, step, [bias_opt])


def table_tensors(variant):
    """(V [N, K], w [N] or None) of a variant's model, as the FM reads them (fused Adam: caught up)."""
    model = variant.model
    if isinstance(model, nn.ModuleList):
        model = model[0]
    if isinstance(model, EmbeddingFM):
        if model.optimizer is not None and hasattr(model, "flush"):
            model.flush()
        return model.weight.detach(), model.linear_weight.detach()
    if isinstance(model, PlainFM):
        return model.emb.weight.detach(), model.lin.weight.detach().view(-1)
    dim = variant.dim
    table = model.weights_host.view(-1, dim + 4 if model.first_order else dim)
    return table[:, :dim], table[:, dim] if model.first_order else None


def tbe_fm(rows, dim, optimizer_name, first_order=False):
    """FBGEMM TBE (26 tables, one per field) with the update fused in its backward, FM in PyTorch.

    TBE has no first-order weights of its own. Without `first_order` this baseline leaves them
    out (less work than ours); with it, each row carries 4 more columns and column `dim` is the
    first-order weight: the cheapest way to give TBE an FM's first order (one row read for both,
    where ours keeps `w` in its own array; row-wise Adagrad then shares one accumulator per row).
    """
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    width = dim + 4 if first_order else dim  # TBE rows are multiples of 4 floats
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(rows, width, EmbeddingLocation.HOST, ComputeDevice.CPU) for _ in range(FIELDS)],
        optimizer=getattr(EmbOptimType, optimizer_name), learning_rate=LR, eps=1e-8)
    tbe.first_order = first_order
    bias = nn.Parameter(torch.zeros(()))
    bias_opt = torch.optim.SGD([bias], lr=LR)

    def step(ids, labels):
        batch = ids.shape[0]
        indices = ids.t().reshape(-1)  # TBE is table-major: all of field 0, then field 1, ...
        offsets = torch.arange(FIELDS * batch + 1, dtype=torch.long, device=ids.device)
        rows_out = tbe(indices, offsets).view(batch, FIELDS, width)
        linear = rows_out[:, :, dim].sum(1) if first_order else 0.0
        logit = fm_logit(rows_out[:, :, :dim], linear, bias)
        F.binary_cross_entropy_with_logits(logit, labels).backward()
        bias_opt.step()
        bias_opt.zero_grad(set_to_none=True)
        return logit

    name = f"fbgemm_tbe_{optimizer_name}" + ("_with_first_order" if first_order else "")
    variant = Variant(name, nn.ModuleList([tbe, nn.ParameterList([bias])]), step, [bias_opt])
    variant.dim = dim
    return variant


def fused_deepfm(rows, dim, optimizer, hidden=(400, 400, 400), pack_rows=True):
    table = EmbeddingFM([rows] * FIELDS, dim, optimizer=optimizer, init_std=0.01, pack_rows=pack_rows)
    net = dnn(FIELDS * dim, hidden)
    opt = torch.optim.Adam(list(net.parameters()) + [table.bias], lr=1e-3)

    def step(ids, labels):
        fm, pooled = table(ids, return_pooled=True)
        logit = fm + net(pooled.flatten(1)).squeeze(1)
        F.binary_cross_entropy_with_logits(logit, labels).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return logit

    return Variant(f"fused_{type(optimizer).__name__}" + ("" if pack_rows else SEPARATE), nn.ModuleList([table, net]),
                   step, [opt])


def dnn_alone(rows, dim, hidden=(400, 400, 400)):
    """The W3 DNN's step by itself (Adam, on a fixed [B, F*K] input per batch): what a DeepFM step
    costs beyond its tables. A reference time (`limit`: no tables, no logits to compare)."""
    net = dnn(FIELDS * dim, hidden)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    inputs = {}

    def step(ids, labels):
        x = inputs.setdefault(ids.data_ptr(), torch.randn(ids.shape[0], FIELDS * dim, device=ids.device) * 0.01)
        logit = net(x).squeeze(1)
        F.binary_cross_entropy_with_logits(logit, labels).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return logit

    return Variant("dnn_alone", net, step, [opt], limit=True)


def plain_deepfm(rows, dim, sparse, hidden=(400, 400, 400)):
    """Minimal plain-PyTorch DeepFM: dense gradients + Adam, or sparse gradients + SparseAdam."""
    fm = PlainFM(rows, dim, sparse=sparse)
    net = dnn(FIELDS * dim, hidden)
    dense_params = list(net.parameters()) + [fm.bias]
    if sparse:
        opts = [torch.optim.SparseAdam([fm.emb.weight, fm.lin.weight], lr=1e-3),
                torch.optim.Adam(dense_params, lr=1e-3)]
    else:
        opts = [torch.optim.Adam(list(fm.parameters()) + list(net.parameters()), lr=1e-3)]

    def step(ids, labels):
        emb, linear = fm.embed(ids)
        logit = fm_logit(emb, linear, fm.bias) + net(emb.flatten(1)).squeeze(1)
        F.binary_cross_entropy_with_logits(logit, labels).backward()
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return logit

    return Variant("plain_sparse_SparseAdam" if sparse else "plain_dense_Adam", nn.ModuleList([fm, net]), step, opts)


def copy_tables(src_weight, src_linear, variant):
    """Gives a baseline the fused variant's starting tables, so their first logits can be compared."""
    with torch.no_grad():
        model = variant.model
        if isinstance(model, nn.ModuleList):
            model = model[0]
        if isinstance(model, PlainFM):
            model.emb.weight.copy_(src_weight)
            model.lin.weight.copy_(src_linear.view(-1, 1))
        elif isinstance(model, EmbeddingFM):
            model.weight.copy_(src_weight)
            model.linear_weight.copy_(src_linear)
        else:  # FBGEMM TBE: one table per field, in its flat weights buffer (table-major)
            dim = src_weight.shape[1]
            rows = model.weights_host.view(src_weight.shape[0], -1)
            rows[:, :dim] = src_weight
            if model.first_order:
                rows[:, dim:] = 0
                rows[:, dim] = src_linear


W2_VARIANTS = {
    "fused_RowWiseAdagrad": lambda rows, dim: fused_fm(rows, dim, optim.RowWiseAdagrad(LR)),
    "fused_SGD": lambda rows, dim: fused_fm(rows, dim, optim.SGD(LR)),
    "fused_RowWiseAdagrad" + SEPARATE: lambda rows, dim: fused_fm(rows, dim, optim.RowWiseAdagrad(LR), pack_rows=False),
    "fused_SGD" + SEPARATE: lambda rows, dim: fused_fm(rows, dim, optim.SGD(LR), pack_rows=False),
    "fbgemm_tbe_EXACT_ROWWISE_ADAGRAD": lambda rows, dim: tbe_fm(rows, dim, "EXACT_ROWWISE_ADAGRAD"),
    "fbgemm_tbe_EXACT_ROWWISE_ADAGRAD_with_first_order":
        lambda rows, dim: tbe_fm(rows, dim, "EXACT_ROWWISE_ADAGRAD", first_order=True),
    "fbgemm_tbe_EXACT_SGD": lambda rows, dim: tbe_fm(rows, dim, "EXACT_SGD"),
    "embedding_sparse_SGD": plain_fm_sparse_sgd,
}
# Each variant's semantic twin, which the benchmarks step beside it from the same tables before
# timing (a variant that disagrees is not timed). Twins missing from a run are built for the check.
TWINS = {
    "fused_SGD": "embedding_sparse_SGD",
    "fused_SGD" + SEPARATE: "embedding_sparse_SGD",
    "fbgemm_tbe_EXACT_SGD": "twin_plain_EXACT_SGD_first_order_None",
    "fused_RowWiseAdagrad": "twin_plain_EXACT_ROWWISE_ADAGRAD_first_order_separate",
    "fused_RowWiseAdagrad" + SEPARATE: "twin_plain_EXACT_ROWWISE_ADAGRAD_first_order_separate",
    "fbgemm_tbe_EXACT_ROWWISE_ADAGRAD": "twin_plain_EXACT_ROWWISE_ADAGRAD_first_order_None",
    "fbgemm_tbe_EXACT_ROWWISE_ADAGRAD_with_first_order": "twin_plain_EXACT_ROWWISE_ADAGRAD_first_order_shared",
    "fused_Adam": "plain_dense_Adam",
    "fused_Adam" + SEPARATE: "plain_dense_Adam",
    "fused_LazyAdam": "plain_sparse_SparseAdam",
}
CHECK_TWINS = {
    f"twin_plain_{opt}_first_order_{first}":
        (lambda rows, dim, opt=opt, first=first: plain_fm_twin(rows, dim, opt, first))
    for opt, first in [("EXACT_SGD", None), ("EXACT_ROWWISE_ADAGRAD", "separate"), ("EXACT_ROWWISE_ADAGRAD", None),
                       ("EXACT_ROWWISE_ADAGRAD", "shared")]
}

W3_VARIANTS = {
    # Adam: dense-Adam semantics (rows caught up); LazyAdam: SparseAdam semantics, as before.
    "fused_Adam": lambda rows, dim: fused_deepfm(rows, dim, optim.Adam(1e-3)),
    "fused_Adam" + SEPARATE: lambda rows, dim: fused_deepfm(rows, dim, optim.Adam(1e-3), pack_rows=False),
    "fused_LazyAdam": lambda rows, dim: fused_deepfm(rows, dim, optim.LazyAdam(1e-3)),
    "fused_RowWiseAdagrad_deepfm": lambda rows, dim: fused_deepfm(rows, dim, optim.RowWiseAdagrad(LR)),
    "dnn_alone": dnn_alone,
    "plain_sparse_SparseAdam": lambda rows, dim: plain_deepfm(rows, dim, sparse=True),
    "plain_dense_Adam": lambda rows, dim: plain_deepfm(rows, dim, sparse=False),
}
CHECK_TWINS.update(W2_VARIANTS)
CHECK_TWINS.update(W3_VARIANTS)


def has_fbgemm():
    try:
        import fbgemm_gpu  # noqa: F401
    except Exception:  # ImportError, or an fbgemm built for another torch
        return False
    return True

