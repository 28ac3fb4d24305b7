"""The CUDA review's findings (issue 17), each checked on every device of tests/testing.py: what a
kernel cannot raise is raised by the next host copy, adam_rows names the position and clamps like
embedding_fm, the radix sort over the key bits only, pooling flags of many fields, graph capture,
and the host syncs of a fused training step (CUDA only: the CPU kernels never sync)."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import deepfm_fast
from deepfm_fast import EmbeddingFM, ops, optim, reference
from test_bad_input import cuda_bounds_check
from test_embedding_fm import check_against_reference, pooling_for
from test_optim import update
from testing import assert_close, device_params, outputs_and_grads, random_csr

pytestmark = pytest.mark.skipif(not deepfm_fast._backend.compiled(), reason="deepfm_fast._C is not built")


def counter(value=0):
    return torch.tensor(value, dtype=torch.int64)


def adam_tables(device, rows=10, step=6, window=4):
    opt = optim.Adam(0.05, catch_up_window=window)
    tables = [torch.randn(rows, 3, device=device), torch.randn(rows, device=device)]
    flat = [s for t in tables for s in opt.new_state(t)]
    return opt, tables, flat, opt.new_row_state(rows, device, step=step), counter(step)


@pytest.mark.parametrize("device", device_params())
def test_a_row_beyond_the_catch_up_window_raises_the_cpu_error_once(device):
    # Finding 1. On CUDA a kernel cannot raise: it clamps the gap, records the row, and the next
    # device->host copy that an op makes anyway raises the CPU's error (here adam_rows' check of an
    # up-to-date row: the probe). On the CPU the call itself raised. Either way it is raised once.
    opt, tables, flat, row_state, step = adam_tables(device)
    ids = torch.tensor([2], device=device)

    def adam_rows(rows):
        return torch.ops.deepfm_fast.adam_rows(tables, flat, row_state["last_step"], row_state["catchup"], step, rows)

    calls = {
        "adam_rows": lambda: adam_rows(ids),
        "adam_catch_up": lambda: torch.ops.deepfm_fast.adam_catch_up(tables, flat, row_state["last_step"],
                                                                     row_state["catchup"], step),
        "fused_row_update": lambda: update(opt, tables, [flat[:2], flat[2:]], ids,
                                           [torch.randn(1, 3, device=device), torch.randn(1, device=device)], step,
                                           row_state),
    }
    probe = torch.tensor([0], device=device)  # row 0 is up to date
    for op, call in calls.items():
        row_state["last_step"][2] = 0  # 6 steps behind a window of 4: a replaced last_step
        target = int(step)  # the reads' target; the update's is its new step - 1, the same
        with pytest.raises(RuntimeError, match=rf"{op}: row 2 was last updated at step 0, more than the catch-up "
                                               rf"window \(4\) before step {target}"):
            call()
            adam_rows(probe)
        adam_rows(probe)  # raised once: the record was cleared


@pytest.mark.parametrize("device", device_params())
def test_adam_rows_names_the_position_and_clamps_like_embedding_fm(device):
    # Finding 2: the CPU's message with the position; "clamp" reads the nearest row as embedding_fm
    # does, "off" a zero row (CUDA); the CPU always checks.
    _, tables, flat, row_state, step = adam_tables(device)

    def adam_rows(rows):
        return torch.ops.deepfm_fast.adam_rows(tables, flat, row_state["last_step"], row_state["catchup"], step,
                                               torch.tensor(rows, device=device))

    with pytest.raises(RuntimeError, match=r"adam_rows: rows\[2\] = 12 is out of range for tables with 10 rows"):
        adam_rows([0, 3, 12, -1])
    if device == "cpu":
        with cuda_bounds_check("clamp"), pytest.raises(RuntimeError, match=r"rows\[0\] = -1 is out of range"):
            adam_rows([-1])
        return
    with cuda_bounds_check("clamp"):
        clamped = adam_rows([0, -3, 12, 9])
    for got, expected in zip(clamped, adam_rows([0, 0, 9, 9])):
        assert torch.equal(got, expected)
    with cuda_bounds_check("off"):
        off = adam_rows([0, -3, 12, 9])
    for got, expected in zip(off, adam_rows([0, 0, 9, 9])):
        assert torch.equal(got[[0, 3]], expected[[0, 3]]) and not got[[1, 2]].any()


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("rows", [1, 2, 3, 255, 256, 257])
def test_backward_sorts_over_the_bits_of_the_row_count(device, rows):
    # Finding 3: the radix sort looks at the bits up to the row count only (the sentinel `rows` of
    # ids read as zero rows included): row counts at the bit boundaries.
    check_against_reference(device, torch.float64, 33, 3, rows, 5, 4, torch.int64, "field", pooling_for("mixed", 3),
                            True, True, seed=rows)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("fields", [65, 130, 1100])
def test_mixed_pooling_of_many_fields(device, fields):
    # Finding 4: the flags travel by value up to 1,024 fields (words 0, 1, 2 here), beyond that as a
    # device array.
    pooling = ["mean" if f % 3 == 0 else "sum" for f in range(fields)]
    g = torch.Generator().manual_seed(fields)
    indices, offsets = random_csr(3, fields, 40, 3, device=device, seed=fields)
    weight = torch.randn(40, 6, generator=g, dtype=torch.float64).to(device)
    lw = torch.randn(40, generator=g, dtype=torch.float64).to(device)
    out, grads = outputs_and_grads(ops.embedding_fm, weight, indices, offsets, None, lw, fields, "field", pooling)
    ref_out, ref_grads = outputs_and_grads(reference.embedding_fm, weight, indices, offsets, None, lw, fields, "field",
                                           pooling)
    for a, e in zip(out + grads, ref_out + ref_grads):
        assert_close(a, e)


@pytest.mark.parametrize("device", device_params(["cuda"]))
def test_forward_with_mixed_pooling_is_captured_in_a_cuda_graph(device):
    # Finding 4: nothing is copied from the host (the flags are kernel arguments), so the forward
    # can be captured; "error" mode behaves as "off" during capture (no sync allowed).
    fields = 70
    pooling = ["mean" if f % 2 else "sum" for f in range(fields)]
    indices, offsets = random_csr(64, fields, 100, 3, device=device, seed=3)
    weight = torch.randn(100, 16, device=device)
    expected = ops.embedding_fm(weight, indices, offsets, num_fields=fields, pooling=pooling).fm
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as torch.cuda.graphs asks
        ops.embedding_fm(weight, indices, offsets, num_fields=fields, pooling=pooling)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ops.embedding_fm(weight, indices, offsets, num_fields=fields, pooling=pooling).fm
    weight.mul_(2.0)  # the replay reads the table as it is then
    graph.replay()
    torch.testing.assert_close(captured, 4.0 * expected)  # second order: quadratic in V


def _fused_step(model, ids, labels):
    logit = model(ids)
    F.binary_cross_entropy_with_logits(logit, labels).backward()


@pytest.mark.parametrize("device", device_params(["cuda"]))
@pytest.mark.parametrize("name", ["SGD", "RowWiseAdagrad", "LazyAdam", "Adam"])
def test_a_fused_training_step_syncs_with_the_host_at_most_once(device, name):
    # Finding 7: the default "error" bounds mode checks the ids with one device->host copy; the rest
    # of the step (the library's own ids: global ids, unique rows, the update) needs none.
    model = EmbeddingFM([50, 30, 20], 8, optimizer=getattr(optim, name)(0.01)).to(device)
    ids = torch.randint(0, 20, (64, 3), device=device)
    labels = torch.randint(0, 2, (64,), device=device).float()
    _fused_step(model, ids, labels)  # lazy initialisation is not the step's
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            _fused_step(model, ids, labels)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 1, syncs
    torch.cuda.set_sync_debug_mode("error")  # the forward and the loss: no sync at all
    try:
        loss = F.binary_cross_entropy_with_logits(model(ids), labels)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    loss.backward()  # the step's one sync


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("numel", [0, 1, 7, 500])
def test_unique_rows_without_a_sync_equal_torch_unique(device, numel):
    # Finding 7: Adam's unique rows of a CUDA step, padded instead of counted on the host.
    from deepfm_fast.embedding import _unique_rows_padded

    ids = torch.randint(0, 40, (numel,), generator=torch.Generator().manual_seed(numel)).to(device).view(-1, 1)
    rows, inverse = _unique_rows_padded(ids)
    unique, expected_inverse = torch.unique(ids.long(), sorted=True, return_inverse=True)
    assert rows.shape == (numel,) and torch.equal(inverse, expected_inverse)
    assert torch.equal(rows[:unique.numel()], unique) and torch.equal(rows[inverse], ids.long())
    assert bool(((rows >= 0) & (rows < 40)).all())  # the padding is rows of the batch too


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("csr", [False, True])
def test_deferred_global_ids_mark_bad_local_ids(device, csr):
    # Finding 7: a CUDA training step maps local ids without a sync; a bad one becomes -1.
    model = EmbeddingFM([5, 3, 4], 2).to(device)
    ids = torch.tensor([[0, 2, 3], [4, 3, 0], [1, -1, 2]], device=device)
    offsets = torch.arange(10, device=device) if csr else None
    flat = ids.reshape(-1) if csr else ids
    deferred = model.to_global(flat, offsets, _deferred=True)
    expected = (ids + torch.tensor([0, 5, 8], device=device)).reshape(deferred.shape).clone()
    expected.view(-1)[[4, 7]] = -1  # field 1 has 3 ids: 3 and -1 are out of range
    assert torch.equal(deferred, expected)
    good = torch.tensor([[0, 2, 3], [4, 1, 0]], device=device)
    good_offsets = torch.arange(7, device=device) if csr else None
    good = good.reshape(-1) if csr else good
    assert torch.equal(model.to_global(good, good_offsets, _deferred=True), model.to_global(good, good_offsets))


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_a_bad_local_id_in_a_training_step_raises_before_any_row_changes(device, name):
    # Finding 7: on CUDA the step's checks wait for its backward's one sync; the error still comes
    # before the update (on the CPU the forward raises, naming the field).
    model = EmbeddingFM([5, 3], 4, optimizer=getattr(optim, name)(0.1)).to(device)
    before = [t.clone() for t in (model.weight, model.linear_weight)]
    ids = torch.tensor([[0, 2], [4, 3]], device=device)  # field 1 has 3 ids
    with pytest.raises((IndexError, RuntimeError), match=r"out of range"):
        model(ids).sum().backward()
    assert all(torch.equal(a, b) for a, b in zip(before, (model.weight, model.linear_weight)))
    model(torch.tensor([[0, 2], [4, 1]], device=device)).sum().backward()  # the next step runs
    assert not torch.equal(before[0], model.weight)
