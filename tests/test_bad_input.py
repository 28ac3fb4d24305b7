"""Bad input gets an error naming the argument (and, for ids and offsets, the value and its position),
never a crash or an out-of-bounds read; the CUDA bounds-check modes (error, clamp, off)."""
import contextlib
import warnings

import pytest
import torch

import deepfm_fast
from deepfm_fast import ops, reference
from testing import assert_close, device_params, index_dtypes, outputs_and_grads, requires_compiled

pytestmark = requires_compiled

MODES = ["field", "feature"]


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


def _on_bad_ids(device, mode, bounds):
    """The op's outputs and gradients on bad_id_case in the given bounds-check mode, and the case."""
    weight, indices, offsets, psw, lw = bad_id_case(device)
    with cuda_bounds_check(bounds):
        out, grads = outputs_and_grads(ops.embedding_fm, weight, indices, offsets, psw, lw, 2, mode, ["mean", "sum"])
    return out + grads, (weight, indices, offsets, psw, lw)


@pytest.mark.parametrize("device", device_params(["cuda"]))
@pytest.mark.parametrize("mode", MODES)
def test_cuda_bounds_check_clamp_reads_the_nearest_row(device, mode):
    results, (weight, indices, offsets, psw, lw) = _on_bad_ids(device, mode, "clamp")
    # Exactly the op on the clamped ids: values, and the gradients land on rows 0 and 9.
    ref_out, ref_grads = outputs_and_grads(reference.embedding_fm, weight, indices.clamp(0, 9), offsets, psw, lw, 2,
                                           mode, ["mean", "sum"])
    for a, e in zip(results, ref_out + ref_grads):
        assert_close(a, e)


@pytest.mark.parametrize("device", device_params(["cuda"]))
@pytest.mark.parametrize("mode", MODES)
def test_cuda_bounds_check_off_reads_a_zero_row(device, mode):
    results, (weight, indices, offsets, psw, lw) = _on_bad_ids(device, mode, "off")
    # The reference on a table with an extra zero row (10) that every bad id reads; it gets no gradient.
    zero_row = torch.where((indices >= 0) & (indices < 10), indices, torch.full_like(indices, 10))
    weight_ext = torch.cat([weight, weight.new_zeros(1, 8)])
    ref_out, (ref_w, ref_x, ref_l) = outputs_and_grads(reference.embedding_fm, weight_ext, zero_row, offsets, psw,
                                                       torch.cat([lw, lw.new_zeros(1)]), 2, mode, ["mean", "sum"])
    for a, e in zip(results, ref_out + [ref_w[:10], ref_x, ref_l[:10]]):
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
