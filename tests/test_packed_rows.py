"""The packed row layout of a fused-optimizer EmbeddingFM: the same model as separate tensors (values,
gradients, optimizer steps, checkpoints both ways), kept through casts, moves and copies."""
import copy
import io
import pickle

import pytest
import torch

from deepfm_fast import EmbeddingFM, _packing, ops, optim, reference
from testing import assert_close, device_params, random_csr

OPTIMIZERS = {
    "sgd": lambda: optim.SGD(0.1, weight_decay=0.01),
    "rowwise_adagrad": lambda: optim.RowWiseAdagrad(0.1),
    "adagrad": lambda: optim.Adagrad(0.1),
    "lazy_adam": lambda: optim.LazyAdam(0.01),
    "rowwise_adam": lambda: optim.RowWiseAdam(0.01, weight_decay=0.01),
    "adam": lambda: optim.Adam(0.01, catch_up_window=4),
}
FIELD_DIMS = [50, 30, 7]


def _pair(name, dim=6, dtype=torch.float32, device="cpu", **kwargs):
    """A packed and a separate module with the same parameters."""
    torch.manual_seed(0)
    packed = EmbeddingFM(FIELD_DIMS, dim, optimizer=OPTIMIZERS[name](), **kwargs).to(device, dtype)
    separate = EmbeddingFM(FIELD_DIMS, dim, optimizer=OPTIMIZERS[name](), pack_rows=False, **kwargs).to(device, dtype)
    separate.load_state_dict(packed.state_dict())
    return packed, separate


def _train(module, steps, seed=1, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        ids = torch.stack([torch.randint(0, d, (16,), generator=generator) for d in FIELD_DIMS], 1).to(device)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            module(ids), torch.randint(0, 2, (16,), generator=generator).to(device, module.weight.dtype))
        loss.backward()
        losses.append(loss.detach())
    return torch.stack(losses)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("use_reference", [False, True])
def test_packed_rows_train_the_model_separate_tensors_train(device, name, dtype, use_reference):
    packed, separate = _pair(name, dtype=dtype, device=device, use_reference=use_reference)
    assert packed.rows_packed and not separate.rows_packed
    assert packed.weight.stride(0) > packed.weight.shape[1]  # views of wider records
    # Bitwise: the same kernels read the same values, only at other addresses.
    assert torch.equal(_train(packed, 12, device=device), _train(separate, 12, device=device))
    packed_state, separate_state = packed.state_dict(), separate.state_dict()
    assert list(packed_state) == list(separate_state)
    for key in packed_state:
        assert packed_state[key].shape == separate_state[key].shape, key
        assert torch.equal(packed_state[key], separate_state[key]), key


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_checkpoints_load_both_ways_and_training_continues_alike(name):
    packed, separate = _pair(name)
    _train(packed, 5)
    _train(separate, 5)
    buffer = io.BytesIO()
    torch.save(packed.state_dict(), buffer)
    from_packed = EmbeddingFM(FIELD_DIMS, 6, optimizer=OPTIMIZERS[name](), pack_rows=False)
    from_packed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    into_packed = EmbeddingFM(FIELD_DIMS, 6, optimizer=OPTIMIZERS[name]())
    into_packed.load_state_dict(separate.state_dict())
    assert into_packed.rows_packed  # loading copies into the records
    reference = _train(packed, 4, seed=2)
    for module in (from_packed, into_packed, separate):
        assert torch.equal(_train(module, 4, seed=2), reference)


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_casts_keep_the_state_dtypes_and_repack(name):
    module = EmbeddingFM(FIELD_DIMS, 6, optimizer=OPTIMIZERS[name]())
    _train(module, 3)
    catchup = module.optimizer_catchup.clone() if name == "adam" else None
    module.half()
    assert module.weight.dtype == torch.float16 and not module.rows_packed  # two element sizes: kept apart
    assert all(s.dtype == torch.float32 for s in module.optimizer_state_list())
    _train(module, 2)  # trains in float16 with float32 state
    module.double()
    assert module.rows_packed and all(s.dtype == torch.float64 for s in module.optimizer_state_list())
    module.float()
    assert module.rows_packed and all(s.dtype == torch.float32 for s in module.optimizer_state_list())
    if name == "adam":  # the catch-up table stays float64 through every cast, the step count on the CPU
        assert module.optimizer_catchup.dtype == torch.float64 and module.optimizer_step.device.type == "cpu"
        assert module.optimizer_catchup.shape == catchup.shape
    _train(module, 2)


def test_a_float_cast_of_an_adam_model_does_not_round_its_catch_up_table():
    module = EmbeddingFM(FIELD_DIMS, 6, optimizer=OPTIMIZERS["adam"]()).double()
    _train(module, 3)
    catchup = module.optimizer_catchup.clone()
    module.float()
    assert torch.equal(module.optimizer_catchup, catchup)


def _torch_save_load(module):
    buffer = io.BytesIO()
    torch.save(module, buffer)
    return torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)


@pytest.mark.parametrize("copier", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m)), _torch_save_load])
def test_copies_hold_their_own_packed_rows(copier):
    module = EmbeddingFM(FIELD_DIMS, 6, optimizer=OPTIMIZERS["adam"]())
    _train(module, 3)
    clone = copier(module)
    assert clone.rows_packed
    assert clone.weight.untyped_storage().data_ptr() != module.weight.untyped_storage().data_ptr()
    assert torch.equal(_train(clone, 3, seed=5), _train(module, 3, seed=5))
    assert torch.equal(clone.weight, module.weight)


def test_a_csr_forward_reads_packed_rows_like_separate_ones():
    packed, separate = _pair("rowwise_adagrad", pooling="mean")
    indices, offsets = random_csr(8, len(FIELD_DIMS), FIELD_DIMS, 3, seed=3)
    psw = torch.rand(indices.numel())
    packed.eval()
    separate.eval()
    assert_close(packed(indices, offsets, psw), separate(indices, offsets, psw))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dim", [1, 6, 16, 33])
def test_record_layout_aligns_columns(dtype, dim):
    rows = 5
    columns = [("v", torch.randn(rows, dim, dtype=dtype)), ("m", torch.randn(rows, dim, dtype=dtype)),
               ("w", torch.randn(rows, dtype=dtype)), ("g", torch.randn(rows, dtype=dtype)),
               ("last", torch.arange(rows, dtype=torch.int64))]
    width, offsets = _packing.record_layout(columns)
    itemsize = torch.empty((), dtype=dtype).element_size()
    assert width * itemsize % _packing.ALIGN_BYTES == 0
    assert offsets["v"] == 0 and offsets["m"] * itemsize % _packing.ALIGN_BYTES == 0
    assert offsets["last"] * itemsize % 8 == 0
    spans = sorted((offsets[n], offsets[n] + (t.shape[1] if t.dim() == 2 else 8 // itemsize if n == "last" else 1))
                   for n, t in columns)
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))  # no overlap
    assert spans[-1][1] <= width
    views = _packing.pack(columns)
    assert _packing.is_packed(list(views.items()))
    for name, t in columns:
        assert torch.equal(views[name], t)


def test_half_tables_are_not_packed():
    columns = [("v", torch.zeros(3, 4, dtype=torch.float16)), ("s", torch.zeros(3, 4))]
    assert _packing.record_layout(columns) is None
    assert _packing.pack(columns)["v"] is columns[0][1]


def _strided_table(rows, dim, dtype=torch.float64, width=None):
    """V [rows, dim] and w [rows] as views of wider records, like packed rows."""
    records = torch.randn(rows, width or dim + 3, dtype=dtype)
    return records, records[:, :dim], records[:, dim]


def test_ops_read_strided_records_in_values_and_gradients():
    indices, offsets = random_csr(4, 3, 9, 3, seed=7)
    psw = torch.rand(indices.numel(), dtype=torch.float64)
    _, weight, lw = _strided_table(9, 5)
    assert weight.stride(0) == 8 and lw.stride(0) == 8
    kwargs = dict(num_fields=3, mode="field", pooling=["mean", "sum", "mean"], return_pooled=True)
    # Against the reference on contiguous copies.
    out = ops.embedding_fm(weight, indices, offsets, psw, lw, **kwargs)
    expected = reference.embedding_fm(weight.contiguous(), indices, offsets, psw, lw.contiguous(), **kwargs)
    for a, e in zip(out, expected):
        assert_close(a, e)
    w, x, lin = (t.detach().requires_grad_() for t in (weight, psw, lw))

    def fused(w, x, lin):
        return tuple(ops.embedding_fm(w, indices, offsets, x, lin, **kwargs))

    grads = torch.autograd.grad([o.sum() for o in fused(w, x, lin)], [w, x, lin])
    wc, xc, linc = (t.detach().contiguous().requires_grad_() for t in (weight, psw, lw))
    expected_grads = torch.autograd.grad(
        [o.sum() for o in reference.embedding_fm(wc, indices, offsets, xc, linc, **kwargs)], [wc, xc, linc])
    for a, e in zip(grads, expected_grads):
        assert_close(a, e)
    # Views of one record table as leaves: gradcheck perturbs them in place, through the records.
    records = torch.randn(9, 8, dtype=torch.float64)
    w_view, lin_view = records[:, :5].requires_grad_(), records[:, 5].requires_grad_()
    assert torch.autograd.gradcheck(fused, (w_view, x.detach().requires_grad_(), lin_view))
    torch.library.opcheck(torch.ops.deepfm_fast.embedding_fm.default,
                          (weight, indices, offsets, psw, lw, 3, 0, [1, 0, 1], True))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_update_ops_on_strided_records_equal_the_reference_on_contiguous_tables(name):
    opt = OPTIMIZERS[name]()
    module = EmbeddingFM([30], 4, optimizer=opt)  # packed: its tables and states are strided views
    tables = [module.weight, module.linear_weight]
    states = module.optimizer_state_list()
    row_state = module.optimizer_row_state()
    assert all(t.stride(0) > (t.shape[1] if t.dim() == 2 else 1) for t in tables + states)
    copies = [t.detach().clone() for t in tables], [s.clone() for s in states], \
        {k: v.clone() for k, v in row_state.items()}
    ids = torch.tensor([1, 4, 9, 29])
    grads = [torch.randn(4, 4), torch.randn(4)]
    step, step_copy = torch.zeros((), dtype=torch.int64), torch.zeros((), dtype=torch.int64)
    args = tuple(opt.op_args().values())
    with torch.no_grad():
        for _ in range(3):
            ops.fused_row_update(tables, states, ids, grads, step, *args, row_state.get("last_step"),
                                 row_state.get("catchup"), True)
            reference.fused_row_update(copies[0], copies[1], ids, grads, step_copy, *args,
                                       copies[2].get("last_step"), copies[2].get("catchup"), True)
    for a, e in zip(tables + states, copies[0] + copies[1]):
        assert_close(a, e)
    assert int(step) == int(step_copy) == 3
    for key, value in row_state.items():  # Adam's last steps (strided in the records) and catch-up table
        assert value.stride(0) > 1 if key == "last_step" else value.is_contiguous()
        if key == "last_step":
            assert torch.equal(value, copies[2][key])
        else:
            assert_close(value, copies[2][key])
    torch.library.opcheck(torch.ops.deepfm_fast.fused_row_update.default,
                          (tables, states, ids, grads, step, *args, row_state.get("last_step"),
                           row_state.get("catchup"), True))
