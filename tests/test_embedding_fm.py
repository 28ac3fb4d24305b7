"""embedding_fm and EmbeddingFM against the pure-PyTorch reference: values, every gradient (dense and
sparse), optimizer steps, opcheck, torch.compile, and the errors bad input gets."""
import contextlib
import warnings

import pytest
import torch

import deepfm_fast
from deepfm_fast import EmbeddingFM, ops, reference
from testing import assert_close, device_params, float_dtypes, index_dtypes, product, reduced_dtypes

MODES = ["field", "feature"]
POOLINGS = ["sum", "mean", "mixed"]


def pooling_for(name, fields):
    return ["sum" if f % 2 else "mean" for f in range(fields)] if name == "mixed" else name


def make_csr(batch, fields, rows, max_bag, index_dtype, device, seed=0, empty=True):
    """Random bags of 0..max_bag ids (1..max_bag without empty bags) from a small table: duplicates
    within bags and across the batch are certain."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0 if empty else 1, max_bag + 1, (batch * fields,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    indices = torch.randint(0, rows, (int(offsets[-1]),), generator=g)
    return indices.to(device, index_dtype), offsets.to(device, index_dtype)


def leaf(t):
    return t.detach().clone().requires_grad_(True)


def outputs_and_grads(fn, weight, indices, offsets, psw, lw, fields, mode, pooling, seed=1):
    """Forward with return_pooled, then grads of a random linear combination of all three outputs."""
    w, x, l = leaf(weight), (leaf(psw) if psw is not None else None), (leaf(lw) if lw is not None else None)
    out = fn(w, indices, offsets, x, l, num_fields=fields, mode=mode, pooling=pooling, return_pooled=True)
    g = torch.Generator().manual_seed(seed)
    coeffs = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o) for o in out]
    loss = sum((o * c).sum() for o, c in zip(out, coeffs))
    inputs = [t for t in (w, x, l) if t is not None]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True) if loss.requires_grad else [None] * len(inputs)
    grads = [torch.zeros_like(t) if gr is None else gr for t, gr in zip(inputs, grads)]
    return list(out), grads


def check_against_reference(device, dtype, batch, fields, rows, dim, max_bag, index_dtype, mode, pooling,
                            weighted, linear, seed=0):
    g = torch.Generator().manual_seed(seed)
    indices, offsets = make_csr(batch, fields, rows, max_bag, index_dtype, device, seed)
    weight = torch.randn(rows, dim, generator=g, dtype=torch.float64).to(device)
    psw = torch.randn(indices.numel(), generator=g, dtype=torch.float64).to(device) if weighted else None
    lw = torch.randn(rows, generator=g, dtype=torch.float64).to(device) if linear else None
    cast = (lambda t: None if t is None else t.to(dtype))
    out, grads = outputs_and_grads(ops.embedding_fm, cast(weight), indices, offsets, cast(psw), cast(lw), fields,
                                   mode, pooling)
    ref_out, ref_grads = outputs_and_grads(reference.embedding_fm, weight, indices, offsets, psw, lw, fields, mode,
                                           pooling)
    for a, e in zip(out + grads, ref_out + ref_grads):
        assert a.dtype == dtype
        assert_close(a, e)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype,mode,pooling,weighted,linear,index_dtype",
                         product(float_dtypes, MODES, POOLINGS, [False, True], [False, True],
                                 index_dtypes))
def test_values_and_grads_match_reference(device, dtype, mode, pooling, weighted, linear, index_dtype):
    # Bags of 0..4 ids from a 30-row table: empty bags and duplicates within and across bags.
    check_against_reference(device, dtype, batch=9, fields=5, rows=30, dim=16, max_bag=4, index_dtype=index_dtype,
                            mode=mode, pooling=pooling_for(pooling, 5), weighted=weighted, linear=linear)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("batch,dim,mode", product([0, 1, 3], [1, 7, 10, 33, 64], MODES))
def test_batch_and_dim_edge_cases(device, batch, dim, mode):
    # B=0 and B=1; odd K (generic path and scalar tails) and the compile-time K of 10 and 64.
    check_against_reference(device, torch.float32, batch=batch, fields=3, rows=11, dim=dim, max_bag=3,
                            index_dtype=torch.int64, mode=mode, pooling="mean", weighted=True, linear=True)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", reduced_dtypes)
def test_reduced_precision_accumulates_in_float32(device, dtype):
    indices, offsets = make_csr(16, 4, 40, 3, torch.int64, device)
    weight = torch.randn(40, 16, dtype=torch.float64, device=device) * 0.5
    lw = torch.randn(40, dtype=torch.float64, device=device)
    out, grads = outputs_and_grads(ops.embedding_fm, weight.to(dtype), indices, offsets, None, lw.to(dtype), 4,
                                   "field", "mean")
    # The reference runs on the same rounded inputs, in float32.
    ref_out, ref_grads = outputs_and_grads(reference.embedding_fm, weight.to(dtype).float(), indices, offsets, None,
                                           lw.to(dtype).float(), 4, "field", "mean")
    for a, e in zip(out + grads, ref_out + ref_grads):
        assert_close(a, e)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("index_dtype", index_dtypes)
def test_one_id_per_field_input_and_modes_agree(device, index_dtype):
    weight = torch.randn(50, 8, dtype=torch.float64, device=device)
    lw = torch.randn(50, dtype=torch.float64, device=device)
    ids = torch.randint(0, 50, (6, 4), device=device, dtype=index_dtype)
    values = torch.rand(6, 4, dtype=torch.float64, device=device)  # [B, F] weights with [B, F] ids
    field = ops.embedding_fm(weight, ids, per_sample_weights=values, linear_weight=lw, mode="field")
    feature = ops.embedding_fm(weight, ids, per_sample_weights=values, linear_weight=lw, mode="feature")
    expected = reference.embedding_fm(weight, ids, per_sample_weights=values, linear_weight=lw)
    for a, b, e in zip(field, feature, expected):
        assert_close(a, e)
        assert_close(b, e)
    assert field.pooled.numel() == 0


def test_all_ids_equal_accumulate():
    # Every occurrence hits row 3: the whole gradient lands in one row, summed in a fixed order.
    weight = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    ids = torch.full((64, 6), 3)
    out = ops.embedding_fm(weight, ids)
    out.fm.sum().backward()
    ref_weight = leaf(weight)
    reference.embedding_fm(ref_weight, ids).fm.sum().backward()
    assert_close(weight.grad, ref_weight.grad)
    assert weight.grad[[0, 1, 2, 4]].abs().sum() == 0
    first = weight.grad.clone()
    weight.grad = None
    ops.embedding_fm(weight, ids).fm.sum().backward()
    assert torch.equal(weight.grad, first)  # deterministic


def test_non_contiguous_inputs():
    weight = torch.randn(16, 20, dtype=torch.float64).T  # [20, 16], column-major
    ids = torch.randint(0, 20, (6, 8)).T                  # [8, 6], column-major
    psw = torch.rand(6, 8, dtype=torch.float64).T
    lw = torch.randn(40, dtype=torch.float64)[::2]
    assert not weight.is_contiguous() and not ids.is_contiguous() and not lw.is_contiguous()
    out = ops.embedding_fm(weight, ids, per_sample_weights=psw, linear_weight=lw, return_pooled=True)
    expected = reference.embedding_fm(weight, ids, per_sample_weights=psw, linear_weight=lw, return_pooled=True)
    for a, e in zip(out, expected):
        assert_close(a, e)


def test_gradcheck_float64():
    indices, offsets = make_csr(3, 3, 7, 3, torch.int64, "cpu")
    weight = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    psw = torch.randn(indices.numel(), dtype=torch.float64, requires_grad=True)
    lw = torch.randn(7, dtype=torch.float64, requires_grad=True)
    for mode, pooling in [("field", ["mean", "sum", "mean"]), ("feature", "mean")]:
        def fn(w, x, l):
            out = ops.embedding_fm(w, indices, offsets, x, l, num_fields=3, mode=mode, pooling=pooling,
                                   return_pooled=True)
            return out.fm, out.linear, out.pooled
        assert torch.autograd.gradcheck(fn, (weight, psw, lw))


def test_double_backward_is_rejected():
    weight = torch.randn(10, 4, dtype=torch.float64, requires_grad=True)
    out = ops.embedding_fm(weight, torch.randint(0, 10, (3, 2)))
    (grad,) = torch.autograd.grad(out.fm.sum(), weight, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad.sum().backward()


def test_opcheck_both_ops():
    indices, offsets = make_csr(4, 3, 12, 3, torch.int64, "cpu")
    weight = torch.randn(12, 8, dtype=torch.float64, requires_grad=True)
    psw = torch.randn(indices.numel(), dtype=torch.float64, requires_grad=True)
    lw = torch.randn(12, dtype=torch.float64, requires_grad=True)
    for return_pooled in (False, True):
        torch.library.opcheck(torch.ops.deepfm_fast.embedding_fm.default,
                              (weight, indices, offsets, psw, lw, 3, 0, [1, 0, 1], return_pooled))
    torch.library.opcheck(torch.ops.deepfm_fast.embedding_fm.default,
                          (weight, indices.int(), offsets.int(), None, None, 3, 1, [0], True))
    grads = (torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64),
             torch.randn(4, 3, 8, dtype=torch.float64))
    d = lambda t: t.detach()  # noqa: E731
    torch.library.opcheck(torch.ops.deepfm_fast.embedding_fm_backward.default,
                          (*grads, d(weight), indices, offsets, d(psw), d(lw), 3, 0, [1, 0, 1]))
    torch.library.opcheck(torch.ops.deepfm_fast.embedding_fm_backward.default,
                          (grads[0], grads[1], None, d(weight), indices, offsets, None, None, 3, 1, [0]))


def test_torch_compile_fullgraph_dense_grads():
    torch._dynamo.reset()
    model = EmbeddingFM([30, 20, 10], 16, pooling=["sum", "mean", "sum"], init_std=0.1)
    ref = EmbeddingFM([30, 20, 10], 16, pooling=["sum", "mean", "sum"], use_reference=True)
    ref.load_state_dict(model.state_dict())
    ids = torch.stack([torch.randint(0, d, (32,)) for d in (30, 20, 10)], 1)
    global_ids = model.to_global(ids)

    @torch.compile(fullgraph=True)
    def step(ids):
        logit, pooled = model(ids, return_pooled=True, global_ids=True)
        return logit.sum() + pooled.square().sum()

    step(global_ids).backward()
    logit, pooled = ref(ids, return_pooled=True)
    (logit.sum() + pooled.square().sum()).backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert_close(p.grad, q.grad)


@pytest.mark.parametrize("mode,linear", product(MODES, [False, True]))
def test_sparse_grad_equals_dense(mode, linear):
    indices, offsets = make_csr(8, 4, 25, 3, torch.int64, "cpu")
    weight = torch.randn(25, 16)
    lw = torch.randn(25) if linear else None
    grads = {}
    for sparse in (False, True):
        w, l = leaf(weight), (leaf(lw) if linear else None)
        out = ops.embedding_fm(w, indices, offsets, None, l, num_fields=4, mode=mode, pooling="mean", sparse=sparse)
        grads[sparse] = torch.autograd.grad(out.fm.sum() + out.linear.sum(), [w, l] if linear else [w])
    sw, sl = grads[True] if linear else (grads[True][0], None)
    # (Assigning to a leaf's .grad rebuilds the tensor and drops the coalesced flag; the data stays sorted.)
    assert sw.is_sparse and sw.is_coalesced() and sw.sparse_dim() == 1 and sw.dense_dim() == 1
    assert torch.equal(sw._indices()[0], torch.unique(indices))
    torch.testing.assert_close(sw.to_dense(), grads[False][0])
    if linear:
        assert sl.is_sparse and sl.is_coalesced()
        torch.testing.assert_close(sl.to_dense(), grads[False][1])


def train_step(model, ids, labels, optimizer):
    optimizer.zero_grad()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(ids), labels)
    loss.backward()
    optimizer.step()


def paired_models(sparse, **kwargs):
    torch.manual_seed(0)
    model = EmbeddingFM([40, 30, 20], 16, sparse=sparse, init_std=0.1, pooling=["sum", "mean", "sum"], **kwargs)
    ref = EmbeddingFM([40, 30, 20], 16, init_std=0.1, pooling=["sum", "mean", "sum"], use_reference=True,
                      sparse=kwargs.get("ref_sparse", False))
    ref.load_state_dict(model.state_dict())
    ids = torch.stack([torch.randint(0, d, (64,)) for d in (40, 30, 20)], 1)
    labels = torch.randint(0, 2, (64,)).float()
    return model, ref, ids, labels


@pytest.mark.parametrize("sparse,optimizer", product([False, True], ["SGD", "Adagrad"]))
def test_optimizer_step_matches_reference(sparse, optimizer):
    model, ref, ids, labels = paired_models(sparse)
    make = {"SGD": lambda p: torch.optim.SGD(p, lr=0.5), "Adagrad": lambda p: torch.optim.Adagrad(p, lr=0.5)}
    opt, ref_opt = make[optimizer](model.parameters()), make[optimizer](ref.parameters())
    for _ in range(2):
        train_step(model, ids, labels, opt)
        train_step(ref, ids, labels, ref_opt)
    if sparse:
        assert model.weight.grad.is_sparse
    for p, q in zip(model.parameters(), ref.parameters()):
        assert_close(p.detach(), q.detach())
    assert not torch.equal(model.weight, paired_models(sparse)[0].weight)  # the step did something


def test_sparse_adam_matches_reference_sparse_embedding():
    torch.manual_seed(0)
    model = EmbeddingFM([40, 30], 8, sparse=True, init_std=0.1)
    ref = EmbeddingFM([40, 30], 8, sparse=True, init_std=0.1, use_reference=True)  # F.embedding(sparse=True)
    ref.load_state_dict(model.state_dict())
    ids = torch.stack([torch.randint(0, d, (32,)) for d in (40, 30)], 1)
    labels = torch.randint(0, 2, (32,)).float()
    opt, ref_opt = torch.optim.SparseAdam([model.weight], lr=0.05), torch.optim.SparseAdam([ref.weight], lr=0.05)
    for _ in range(3):
        train_step(model, ids, labels, opt)
        train_step(ref, ids, labels, ref_opt)
    assert ref.weight.grad.is_sparse
    assert_close(model.weight.detach(), ref.weight.detach())


def test_module_csr_input_and_int32():
    torch.manual_seed(0)
    model = EmbeddingFM([10, 6, 8], 16, mode="feature", pooling="mean", init_std=0.3)
    torch.nn.init.normal_(model.linear_weight)
    ref = EmbeddingFM([10, 6, 8], 16, mode="feature", pooling="mean", use_reference=True)
    ref.load_state_dict(model.state_dict())
    offsets = torch.tensor([0, 2, 2, 5, 6, 7, 9], dtype=torch.int32)  # B=2, F=3
    local = torch.tensor([9, 1, 0, 5, 5, 7, 3, 0, 1], dtype=torch.int32)
    x = torch.rand(9)
    logit, pooled = model(local, offsets, x, return_pooled=True)
    ref_logit, ref_pooled = ref(local, offsets, x, return_pooled=True)
    assert_close(logit, ref_logit)
    assert_close(pooled, ref_pooled)
    global_ids = model.to_global(local, offsets)
    assert global_ids.dtype == torch.int32
    # bags: (s0 f0) [9, 1], (s0 f1) [], (s0 f2) [0, 5, 5], (s1 f0) [7], (s1 f1) [3], (s1 f2) [0, 1]
    assert global_ids.tolist() == [9, 1, 16 + 0, 16 + 5, 16 + 5, 7, 10 + 3, 16 + 0, 16 + 1]
    assert_close(model(global_ids, offsets, x, global_ids=True), logit)


# ---- bad input ------------------------------------------------------------------------------------


def call(weight=None, indices=None, offsets=None, psw=None, lw=None, num_fields=2):
    weight = torch.randn(10, 4) if weight is None else weight
    indices = torch.tensor([1, 2, 3, 4]) if indices is None else indices
    offsets = torch.tensor([0, 1, 2, 3, 4]) if offsets is None else offsets
    return ops.embedding_fm(weight, indices, offsets, psw, lw, num_fields=num_fields)


@pytest.mark.parametrize("kwargs,message", [
    (dict(indices=torch.tensor([1, 2, 10, 4])), r"indices\[2\] = 10 is out of range for weight with 10 rows"),
    (dict(indices=torch.tensor([1, -3, 2, 4], dtype=torch.int32)), r"indices\[1\] = -3 is out of range"),
    (dict(indices=torch.tensor([1.0, 2.0, 3.0, 4.0])), "indices must be an int32 or int64 tensor, got Float"),
    (dict(offsets=torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])), "offsets must be an int32 or int64 tensor"),
    (dict(offsets=torch.tensor([0, 2, 1, 3, 4])), r"non-decreasing, but offsets\[1\] = 2 > offsets\[2\] = 1"),
    (dict(offsets=torch.tensor([0, 1, 2, 3, 3])), r"offsets\[-1\] must equal the number of indices \(nnz = 4\)"),
    (dict(offsets=torch.tensor([1, 1, 2, 3, 4])), r"offsets\[0\] must be 0, got 1"),
    (dict(offsets=torch.tensor([0, 1, 2, 4])), r"batch \* num_fields \+ 1 entries \(num_fields = 2\), got 4"),
    (dict(psw=torch.ones(3)), r"per_sample_weights must have one value per index: expected 4.*, got 3"),
    (dict(psw=torch.ones(4, dtype=torch.float64)), "per_sample_weights has dtype"),
    (dict(lw=torch.ones(9)), r"linear_weight must have shape \[10\]"),
    (dict(weight=torch.randn(10)), "weight must be a 2-D tensor"),
    (dict(weight=torch.randint(0, 3, (10, 4))), "weight must be .*floating"),
    (dict(weight=torch.randn(10, 4, device="meta")), "is on cpu but weight is on meta"),
    (dict(lw=torch.ones(10, device="meta")), "linear_weight is on meta but weight is on cpu"),
])
def test_bad_input_is_named(kwargs, message):
    with pytest.raises((RuntimeError, ValueError), match=message):
        call(**kwargs)


def test_bad_input_in_backward_op_is_named():
    with pytest.raises(RuntimeError, match=r"grad_fm must have shape \[2\]"):
        torch.ops.deepfm_fast.embedding_fm_backward.default(
            torch.ones(3), torch.ones(2), None, torch.randn(10, 4), torch.tensor([1, 2, 3, 4]),
            torch.tensor([0, 1, 2, 3, 4]), None, None, 2, 0, [0])


def test_module_local_id_out_of_range():
    model = EmbeddingFM([5, 3], 4)
    with pytest.raises(IndexError, match=r"id 3 at indices\[1, 1\] is out of range for field 1, .*field_dims\[1\] = 3"):
        model(torch.tensor([[0, 0], [4, 3]]))
    with pytest.raises(IndexError, match=r"id -1 at indices\[0, 0\]"):
        model(torch.tensor([[-1, 0]]))
    assert model(torch.tensor([[4, 2]])).shape == (1,)


# ---- determinism, wide rows, and the CUDA bounds-check modes ---------------------------------------


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("mode", MODES)
def test_backward_is_bitwise_deterministic_under_deterministic_algorithms(device, mode):
    # 512 samples x 6 fields, bags of 0..6 ids from a 7-row table: every row has ~1500 occurrences.
    # K = 70: two chunks of 64 dimensions on CUDA (grad_x accumulates over chunks).
    indices, offsets = make_csr(512, 6, 7, 6, torch.int64, device, seed=3)
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(7, 70, generator=g).to(device)
    psw = torch.rand(indices.numel(), generator=g).to(device)
    lw = torch.randn(7, generator=g).to(device)
    pooling = ["mean", "sum", "mean", "sum", "mean", "sum"]
    grads = [torch.randn(512, generator=g).to(device) for _ in range(2)] + [
        torch.randn(512, 6, 70, generator=g).to(device)]
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [outputs_and_grads(ops.embedding_fm, weight, indices, offsets, psw, lw, 6, mode, pooling)
                for _ in range(2)]
        coalesced = [ops.embedding_fm_backward(*grads, weight, indices, offsets, psw, lw, 6,
                                               reference.mode_code(mode), reference.pooling_codes(pooling, 6))
                     for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(previous)
    (out0, grads0), (out1, grads1) = runs
    for a, b in zip(out0 + grads0 + list(coalesced[0]), out1 + grads1 + list(coalesced[1])):
        assert torch.equal(a, b)
    assert torch.equal(coalesced[0][0].cpu(), torch.unique(indices.cpu()))
    ref_out, ref_grads = outputs_and_grads(reference.embedding_fm, weight.double(), indices, offsets, psw.double(),
                                           lw.double(), 6, mode, pooling)
    for a, e in zip(out0 + grads0, ref_out + ref_grads):
        assert_close(a, e)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("mode", MODES)
def test_many_fields_wide_rows_mixed_index_dtypes(device, mode):
    # 70 fields with per-field pooling (more than a 64-bit mask holds), K = 130 (three chunks of 64 on
    # CUDA), int32 indices with int64 offsets, weighted, with first order and pooled output.
    fields, rows, dim = 70, 50, 130
    indices, offsets = make_csr(5, fields, rows, 3, torch.int64, device, seed=5)
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(rows, dim, generator=g, dtype=torch.float64).to(device)
    psw = torch.randn(indices.numel(), generator=g, dtype=torch.float64).to(device)
    lw = torch.randn(rows, generator=g, dtype=torch.float64).to(device)
    pooling = pooling_for("mixed", fields)
    out, grads = outputs_and_grads(ops.embedding_fm, weight, indices.int(), offsets, psw, lw, fields, mode, pooling)
    ref_out, ref_grads = outputs_and_grads(reference.embedding_fm, weight, indices, offsets, psw, lw, fields, mode,
                                           pooling)
    for a, e in zip(out + grads, ref_out + ref_grads):
        assert_close(a, e)


@contextlib.contextmanager
def cuda_bounds_check(mode):
    """Sets deepfm_fast.ops.set_cuda_bounds_check(mode) for the block, then restores the previous mode."""
    previous = ops.get_cuda_bounds_check()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the warning of "clamp" has its own test
        ops.set_cuda_bounds_check(mode)
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            ops.set_cuda_bounds_check(previous)


def test_set_cuda_bounds_check():
    with pytest.raises(ValueError, match="must be one of"):
        ops.set_cuda_bounds_check("warn")
    assert ops.get_cuda_bounds_check() == "error"
    with pytest.warns(RuntimeWarning, match="results for those rows are wrong"), cuda_bounds_check("error"):
        ops.set_cuda_bounds_check("clamp")
    for mode, code in [("off", 2), ("clamp", 1), ("error", 0)]:
        with cuda_bounds_check(mode):
            assert ops.get_cuda_bounds_check() == mode
            assert deepfm_fast._backend._C.get_cuda_bounds_check() == code  # the setting the kernels read
            # The CPU kernels check in every mode.
            with pytest.raises(RuntimeError, match=r"indices\[2\] = 10 is out of range"):
                call(indices=torch.tensor([1, 2, 10, 4]))
    assert ops.get_cuda_bounds_check() == "error"


CSR_VALUE_ERRORS = [
    (dict(indices=[1, 2, 10, 4]),
     r"indices\[2\] = 10 is out of range for weight with 10 rows \(valid ids are 0\.\.9\)"),
    (dict(indices=[1, -3, 2, 4]), r"indices\[1\] = -3 is out of range"),
    (dict(offsets=[0, 2, 1, 3, 4]), r"non-decreasing, but offsets\[1\] = 2 > offsets\[2\] = 1"),
    (dict(offsets=[0, 1, 2, 3, 3]), r"offsets\[-1\] must equal the number of indices \(nnz = 4\), got offsets\[-1\] = "
                                    r"offsets\[4\] = 3"),
    (dict(offsets=[1, 1, 2, 3, 4]), r"offsets\[0\] must be 0, got 1"),
]


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("index_dtype", index_dtypes)
@pytest.mark.parametrize("bad,message", CSR_VALUE_ERRORS)
def test_bounds_check_error_mode_names_the_culprit(device, index_dtype, bad, message):
    # "error" (the CUDA default, and the CPU's only behaviour): forward and backward raise the same error.
    args = dict(dict(indices=[1, 2, 3, 4], offsets=[0, 1, 2, 3, 4]), **bad)
    indices, offsets = (torch.tensor(args[k], dtype=index_dtype, device=device) for k in ("indices", "offsets"))
    weight = torch.randn(10, 4, device=device)
    with cuda_bounds_check("error"):
        with pytest.raises(RuntimeError, match=message):
            ops.embedding_fm(weight, indices, offsets, num_fields=2)
        with pytest.raises(RuntimeError, match=message):
            torch.ops.deepfm_fast.embedding_fm_backward.default(
                torch.ones(2, device=device), torch.ones(2, device=device), None, weight, indices, offsets, None,
                None, 2, 0, [0])


def bad_id_case(device):
    """B=2, F=2 bags of two ids from a 10-row table; ids -3, 12 and 10 are out of range."""
    g = torch.Generator().manual_seed(7)
    weight = torch.randn(10, 8, generator=g, dtype=torch.float64).to(device)
    lw = torch.randn(10, generator=g, dtype=torch.float64).to(device)
    psw = torch.rand(8, generator=g, dtype=torch.float64).to(device)
    indices = torch.tensor([1, -3, 12, 4, 9, 10, 0, 2], device=device)
    offsets = torch.tensor([0, 2, 4, 6, 8], device=device)
    return weight, indices, offsets, psw, lw


@pytest.mark.parametrize("device", device_params(["cuda"]))
@pytest.mark.parametrize("mode", MODES)
def test_cuda_bounds_check_clamp_reads_the_nearest_row(device, mode):
    weight, indices, offsets, psw, lw = bad_id_case(device)
    with cuda_bounds_check("clamp"):
        out, grads = outputs_and_grads(ops.embedding_fm, weight, indices, offsets, psw, lw, 2, mode, ["mean", "sum"])
    # Exactly the op on the clamped ids: values, and the gradients land on rows 0 and 9.
    ref_out, ref_grads = outputs_and_grads(reference.embedding_fm, weight, indices.clamp(0, 9), offsets, psw, lw, 2,
                                           mode, ["mean", "sum"])
    for a, e in zip(out + grads, ref_out + ref_grads):
        assert_close(a, e)


@pytest.mark.parametrize("device", device_params(["cuda"]))
@pytest.mark.parametrize("mode", MODES)
def test_cuda_bounds_check_off_reads_a_zero_row(device, mode):
    weight, indices, offsets, psw, lw = bad_id_case(device)
    with cuda_bounds_check("off"):
        out, grads = outputs_and_grads(ops.embedding_fm, weight, indices, offsets, psw, lw, 2, mode, ["mean", "sum"])
    # The reference on a table with an extra zero row (10) that every bad id reads; it gets no gradient.
    zero_row = torch.where((indices >= 0) & (indices < 10), indices, torch.full_like(indices, 10))
    weight_ext = torch.cat([weight, weight.new_zeros(1, 8)])
    ref_out, (ref_w, ref_x, ref_l) = outputs_and_grads(reference.embedding_fm, weight_ext, zero_row, offsets, psw,
                                                       torch.cat([lw, lw.new_zeros(1)]), 2, mode, ["mean", "sum"])
    for a, e in zip(out + grads, ref_out + [ref_w[:10], ref_x, ref_l[:10]]):
        assert_close(a, e)


@pytest.mark.parametrize("device", device_params(["cuda"]))
@pytest.mark.parametrize("bounds", ["clamp", "off"])
def test_cuda_bounds_check_malformed_bag_pools_to_zero(device, bounds):
    weight, indices, offsets, psw, lw = bad_id_case(device)
    indices = indices.clamp(0, 9)
    bad_offsets = torch.tensor([0, 2, 4, 6, 9], device=device)  # the last bag ends past nnz = 8
    with cuda_bounds_check(bounds):
        out, (grad_w, grad_x, grad_l) = outputs_and_grads(ops.embedding_fm, weight, indices, bad_offsets, psw, lw, 2,
                                                          "field", "sum")
    # As if the last bag were empty: its two ids are read by no bag and get no gradient.
    ref_out, (ref_w, ref_x, ref_l) = outputs_and_grads(reference.embedding_fm, weight, indices[:6],
                                                       torch.tensor([0, 2, 4, 6, 6], device=device), psw[:6], lw, 2,
                                                       "field", "sum")
    for a, e in zip(out + [grad_w, grad_x, grad_l], ref_out + [ref_w, torch.cat([ref_x, ref_x.new_zeros(2)]), ref_l]):
        assert_close(a, e)


@pytest.mark.parametrize("device", device_params(["cuda"]))
def test_cuda_table_on_another_device_is_named(device):
    ids, offsets = torch.tensor([1, 2], device=device), torch.tensor([0, 1, 2], device=device)
    with pytest.raises(RuntimeError, match=r"indices is on cuda.* but weight is on cpu"):
        ops.embedding_fm(torch.randn(10, 4), ids, offsets, num_fields=2)
    with pytest.raises(RuntimeError, match=r"linear_weight is on cpu but weight is on cuda"):
        ops.embedding_fm(torch.randn(10, 4, device=device), ids, offsets, linear_weight=torch.randn(10), num_fields=2)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype,with_weights", product([torch.float32, torch.float64], [False, True]))
def test_backward_with_forward_pooled_equals_recomputation(device, dtype, with_weights):
    # The forward's field vectors spare the backward a second gather; the result must not change.
    torch.manual_seed(0)
    weight = torch.randn(50, 12, dtype=dtype, device=device)
    linear_weight = torch.randn(50, dtype=dtype, device=device)
    counts = torch.randint(0, 4, (6 * 3,))
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).to(device)
    indices = torch.randint(0, 50, (int(counts.sum()),), device=device)
    psw = torch.rand(indices.numel(), dtype=dtype, device=device) if with_weights else None
    pooling = [0, 1, 0]
    fm, linear, pooled = torch.ops.deepfm_fast.embedding_fm(weight, indices, offsets, psw, linear_weight, 3, 0,
                                                            pooling, True)
    grads = (torch.randn_like(fm), torch.randn_like(linear), torch.randn_like(pooled))
    args = (weight, indices, offsets, psw, linear_weight, 3, 0, pooling)
    recomputed = torch.ops.deepfm_fast.embedding_fm_backward(*grads, *args)
    reused = torch.ops.deepfm_fast.embedding_fm_backward(*grads, *args, pooled)
    for a, b in zip(recomputed, reused):
        assert torch.equal(a, b)


def test_backward_rejects_pooled_of_the_wrong_shape():
    weight, indices, offsets = torch.randn(10, 4), torch.tensor([1, 2, 3, 4]), torch.tensor([0, 1, 2, 3, 4])
    g = torch.ones(2)
    with pytest.raises(RuntimeError, match=r"pooled must have shape \[2, 2, 4\], got \[2, 2, 3\]"):
        torch.ops.deepfm_fast.embedding_fm_backward(g, g, None, weight, indices, offsets, None, None, 2, 0, [0],
                                                    torch.zeros(2, 2, 3))


def test_backward_without_per_sample_weight_grad_skips_only_that_output():
    torch.manual_seed(1)
    weight, linear_weight = torch.randn(30, 8), torch.randn(30)
    offsets = torch.tensor([0, 2, 3, 3, 6])
    indices, psw = torch.tensor([1, 4, 4, 7, 2, 1]), torch.rand(6)
    fm, linear, pooled = torch.ops.deepfm_fast.embedding_fm(weight, indices, offsets, psw, linear_weight, 2, 0, [1],
                                                            True)
    args = (torch.randn(2), torch.randn(2), torch.randn(2, 2, 8), weight, indices, offsets, psw, linear_weight, 2, 0,
            [1], pooled)
    full = torch.ops.deepfm_fast.embedding_fm_backward(*args)
    skipped = torch.ops.deepfm_fast.embedding_fm_backward(*args, False)
    assert full[3].shape == (6,) and skipped[3].numel() == 0
    for a, b in zip(full[:3], skipped[:3]):
        assert torch.equal(a, b)
