"""embedding_fm and its backward against the pure-PyTorch reference: values, every gradient, reduced
precision, gradcheck, opcheck, torch.compile, determinism, and the reuse of the forward's pooled output."""
import pytest
import torch

from deepfm_fast import EmbeddingFM, ops, reference
from deepfm_fast._args import mode_code, pooling_codes
from testing import (
    assert_close,
    assert_rounded_once,
    device_params,
    float_dtypes,
    index_dtypes,
    leaf,
    outputs_and_grads,
    product,
    random_csr,
    reduced_dtypes,
    requires_compiled,
)

pytestmark = requires_compiled

MODES = ["field", "feature"]
POOLINGS = ["sum", "mean", "mixed"]


def pooling_for(name, fields):
    return ["sum" if f % 2 else "mean" for f in range(fields)] if name == "mixed" else name


def check_against_reference(device, dtype, batch, fields, rows, dim, max_bag, index_dtype, mode, pooling,
                            weighted, linear, seed=0):
    g = torch.Generator().manual_seed(seed)
    indices, offsets = random_csr(batch, fields, rows, max_bag, index_dtype, device, seed)
    weight = torch.randn(rows, dim, generator=g, dtype=torch.float64).to(device)
    psw = torch.randn(indices.numel(), generator=g, dtype=torch.float64).to(device) if weighted else None
    lw = torch.randn(rows, generator=g, dtype=torch.float64).to(device) if linear else None
    def cast(t):
        return None if t is None else t.to(dtype)

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
    """float16/bfloat16 tables: the kernels gather, pool and sum in float32 and round each result once,
    so they equal the float32 reference on the same rounded inputs, rounded to the dtype, within one unit
    in the last place (testing.rounded_once_tolerance); a kernel that summed in the dtype would not."""
    indices, offsets = random_csr(16, 4, 40, 3, torch.int64, device)
    weight = torch.randn(40, 16, dtype=torch.float64, device=device) * 0.5
    lw = torch.randn(40, dtype=torch.float64, device=device)
    out, grads = outputs_and_grads(ops.embedding_fm, weight.to(dtype), indices, offsets, None, lw.to(dtype), 4,
                                   "field", "mean")
    # The reference runs on the same rounded inputs and output coefficients, in float32.
    ref_out, ref_grads = outputs_and_grads(reference.embedding_fm, weight.to(dtype).float(), indices, offsets, None,
                                           lw.to(dtype).float(), 4, "field", "mean", coeff_dtype=dtype)
    for a, e in zip(out + grads, ref_out + ref_grads):
        assert a.dtype == dtype
        assert_rounded_once(a, e.detach(), scale=max(1.0, float(e.detach().abs().max())))


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


@pytest.mark.parametrize("device", device_params())
def test_all_ids_equal_accumulate(device):
    # Every occurrence hits row 3: the whole gradient lands in one row, summed in a fixed order
    # (on CUDA: 384 occurrences, 6 chunks of 64 and their sum).
    weight = torch.randn(5, 16, dtype=torch.float64, device=device, requires_grad=True)
    ids = torch.full((64, 6), 3, device=device)
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


@pytest.mark.parametrize("device", device_params())
def test_non_contiguous_inputs(device):
    weight = torch.randn(16, 20, dtype=torch.float64, device=device).T  # [20, 16], column-major
    ids = torch.randint(0, 20, (6, 8), device=device).T                  # [8, 6], column-major
    psw = torch.rand(6, 8, dtype=torch.float64, device=device).T
    lw = torch.randn(40, dtype=torch.float64, device=device)[::2]
    assert not weight.is_contiguous() and not ids.is_contiguous() and not lw.is_contiguous()
    out = ops.embedding_fm(weight, ids, per_sample_weights=psw, linear_weight=lw, return_pooled=True)
    expected = reference.embedding_fm(weight, ids, per_sample_weights=psw, linear_weight=lw, return_pooled=True)
    for a, e in zip(out, expected):
        assert_close(a, e)


@pytest.mark.parametrize("device", device_params())
def test_gradcheck_float64(device):
    indices, offsets = random_csr(3, 3, 7, 3, torch.int64, device)
    weight = torch.randn(7, 5, dtype=torch.float64, device=device, requires_grad=True)
    psw = torch.randn(indices.numel(), dtype=torch.float64, device=device, requires_grad=True)
    lw = torch.randn(7, dtype=torch.float64, device=device, requires_grad=True)
    for mode, pooling in [("field", ["mean", "sum", "mean"]), ("feature", "mean")]:
        def fn(w, x, lin, mode=mode, pooling=pooling):
            out = ops.embedding_fm(w, indices, offsets, x, lin, num_fields=3, mode=mode, pooling=pooling,
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
    indices, offsets = random_csr(4, 3, 12, 3, torch.int64, "cpu")
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


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("mode", MODES)
def test_backward_is_bitwise_deterministic_under_deterministic_algorithms(device, mode):
    # 512 samples x 6 fields, bags of 0..6 ids from a 7-row table: every row has ~1500 occurrences.
    # K = 70: two chunks of 64 dimensions on CUDA (grad_x accumulates over chunks).
    indices, offsets = random_csr(512, 6, 7, 6, torch.int64, device, seed=3)
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
                                               mode_code(mode), pooling_codes(pooling, 6))
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
    indices, offsets = random_csr(5, fields, rows, 3, torch.int64, device, seed=5)
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


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype,with_weights", product([torch.float32, torch.float64], [False, True]))
def test_backward_with_forward_pooled_equals_recomputation(device, dtype, with_weights):
    # The forward's field vectors spare the backward a second gather; the result must not change.
    torch.manual_seed(0)
    weight = torch.randn(50, 12, dtype=dtype, device=device)
    linear_weight = torch.randn(50, dtype=dtype, device=device)
    indices, offsets = random_csr(6, 3, 50, 3, device=device)
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
