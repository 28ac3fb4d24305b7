"""The one-pass backward-and-update of embedding_fm_step on the CPU (embedding_fm_step_update):
bitwise equal to the general path (embedding_fm_backward, then fused_row_update) for every fused
optimizer, with one id per field (both modes, the pooled output's gradient, Adam's `rows`), the
same for any number of threads, the general path for multi-id bags, opcheck, and bad input."""
import pytest
import torch

import deepfm_fast
from deepfm_fast import ops
from deepfm_fast._args import as_csr
from test_packed_rows import OPTIMIZERS

pytestmark = pytest.mark.skipif(not deepfm_fast._backend.compiled(), reason="deepfm_fast._C is not built")

ROWS, DIM, FIELDS, BATCH = 300, 16, 5, 64


class Tables:
    """A table, its first-order weights and the optimizer's state, advanced a few steps."""

    def __init__(self, opt, dtype, generator):
        self.opt = opt
        self.weight = torch.randn(ROWS, DIM, dtype=dtype, generator=generator)
        self.linear = torch.randn(ROWS, dtype=dtype, generator=generator)
        self.state = opt.new_state(self.weight) + opt.new_state(self.linear)
        self.row_state = opt.new_row_state(ROWS, "cpu")
        self.step = torch.tensor(0, dtype=torch.int64)

    def clone(self):
        other = Tables.__new__(Tables)
        other.opt = self.opt
        other.weight, other.linear = self.weight.clone(), self.linear.clone()
        other.state = [s.clone() for s in self.state]
        other.row_state = {k: v.clone() for k, v in self.row_state.items()}
        other.step = self.step.clone()
        return other

    def tensors(self):
        return [self.weight, self.linear, *self.state, self.step, *self.row_state.values()]


def batch(generator, dtype, mode, with_grad_pooled, rows=None, csr=False):
    ids = torch.randint(0, ROWS if rows is None else rows.numel(), (BATCH, FIELDS), generator=generator)
    ids[:, 0] = ids[0, 0]  # a row every sample touches
    indices, offsets, _, _ = as_csr(ids, None, None, None)
    if csr:  # the same bags as CSR, int32
        indices, offsets = indices.int(), offsets.int()
    grads = (torch.randn(BATCH, dtype=dtype, generator=generator), torch.randn(BATCH, dtype=dtype, generator=generator),
             torch.randn(BATCH, FIELDS, DIM, dtype=dtype, generator=generator) if with_grad_pooled else None)
    return indices, offsets, mode, grads


def step_both_ways(t, indices, offsets, mode, grads, rows=None, one_pass=True):
    """One backward-and-update: the new op (one_pass) or embedding_fm_backward + fused_row_update."""
    opt = t.opt
    read, read_linear = t.weight, t.linear
    if rows is not None:
        read, read_linear = ops.adam_rows([t.weight, t.linear], t.state, t.row_state["last_step"],
                                          t.row_state["catchup"], t.step, rows)
    pooled = torch.ops.deepfm_fast.embedding_fm.default(read, indices, offsets, None, read_linear, FIELDS, mode, [0],
                                                        True)[2]
    grad_fm, grad_linear, grad_pooled = grads
    if one_pass:
        torch.ops.deepfm_fast.embedding_fm_step_update.default(
            grad_fm, grad_linear, grad_pooled, pooled, t.weight, t.linear, indices, offsets, FIELDS, mode, [0], rows,
            read if rows is not None else None, read_linear if rows is not None else None, t.state, t.step,
            t.row_state.get("last_step"), t.row_state.get("catchup"), opt.code, opt.lr, opt.eps, *opt.betas,
            opt.weight_decay)
        return
    ids, row_grads, linear_grads, _ = ops.embedding_fm_backward(grad_fm, grad_linear, grad_pooled, read, indices,
                                                               offsets, None, read_linear, FIELDS, mode, [0], pooled)
    if rows is not None:
        ids = rows[ids]
    ops.fused_row_update([t.weight, t.linear], t.state, ids, [row_grads, linear_grads], t.step, opt.code, opt.lr,
                         opt.eps, *opt.betas, opt.weight_decay, t.row_state.get("last_step"),
                         t.row_state.get("catchup"), check_ids=False)


def assert_bitwise_equal(a, b):
    for x, y in zip(a.tensors(), b.tensors()):
        assert torch.equal(x, y)


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", [0, 1])
@pytest.mark.parametrize("with_grad_pooled", [False, True])
def test_one_pass_equals_general_path_bitwise(name, dtype, mode, with_grad_pooled):
    generator = torch.Generator().manual_seed(7)
    ours = Tables(OPTIMIZERS[name](), dtype, generator)
    general = ours.clone()
    for step in range(6):  # beyond Adam's window: caught-up rows too
        rows = None
        if name == "adam" and step % 2:  # the forward reads a subset of rows (EmbeddingFM with Adam)
            rows = torch.randperm(ROWS, generator=generator)[:120].sort().values
        data = batch(generator, dtype, mode, with_grad_pooled, rows, csr=step % 3 == 2)
        step_both_ways(ours, *data, rows=rows, one_pass=True)
        step_both_ways(general, *data, rows=rows, one_pass=False)
        assert_bitwise_equal(ours, general)
    assert int(ours.step) == 6


def test_same_result_for_any_number_of_threads():
    threads = torch.get_num_threads()
    results = []
    for n in (1, 2, 3):
        torch.set_num_threads(n)
        try:
            generator = torch.Generator().manual_seed(3)
            t = Tables(OPTIMIZERS["rowwise_adagrad"](), torch.float32, generator)
            for _ in range(3):
                step_both_ways(t, *batch(generator, torch.float32, 0, True))
            results.append(t)
        finally:
            torch.set_num_threads(threads)
    for other in results[1:]:
        assert_bitwise_equal(results[0], other)


def test_multi_id_bags_take_the_general_path():
    generator = torch.Generator().manual_seed(5)
    ours = Tables(OPTIMIZERS["sgd"](), torch.float64, generator)
    general = ours.clone()
    lengths = torch.randint(0, 3, (BATCH * FIELDS,), generator=generator)  # empty and 2-id bags
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    indices = torch.randint(0, ROWS, (int(offsets[-1]),), generator=generator)
    grads = (torch.randn(BATCH, dtype=torch.float64, generator=generator),
             torch.randn(BATCH, dtype=torch.float64, generator=generator), None)
    step_both_ways(ours, indices, offsets, 0, grads, one_pass=True)
    step_both_ways(general, indices, offsets, 0, grads, one_pass=False)
    assert_bitwise_equal(ours, general)
    assert not torch.equal(ours.weight, Tables(OPTIMIZERS["sgd"](), torch.float64,
                                               torch.Generator().manual_seed(5)).weight)


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_opcheck(name):
    generator = torch.Generator().manual_seed(11)
    t = Tables(OPTIMIZERS[name](), torch.float32, generator)
    indices, offsets, mode, (grad_fm, grad_linear, grad_pooled) = batch(generator, torch.float32, 0, True)
    pooled = torch.ops.deepfm_fast.embedding_fm.default(t.weight, indices, offsets, None, t.linear, FIELDS, mode, [0],
                                                        True)[2]
    opt = t.opt
    args = (grad_fm, grad_linear, grad_pooled, pooled, t.weight, t.linear, indices, offsets, FIELDS, mode, [0], None,
            None, None, t.state, t.step, t.row_state.get("last_step"), t.row_state.get("catchup"), opt.code, opt.lr,
            opt.eps, *opt.betas, opt.weight_decay)
    torch.library.opcheck(torch.ops.deepfm_fast.embedding_fm_step_update.default, args)


def test_bad_ids_raise_before_any_update():
    generator = torch.Generator().manual_seed(13)
    t = Tables(OPTIMIZERS["sgd"](), torch.float32, generator)
    before = t.clone()
    indices, offsets, mode, grads = batch(generator, torch.float32, 0, False)
    pooled = torch.zeros(BATCH, FIELDS, DIM)
    indices[17] = ROWS
    with pytest.raises(RuntimeError, match=r"indices\[17\] = 300 is out of range"):
        torch.ops.deepfm_fast.embedding_fm_step_update.default(
            *grads, pooled, t.weight, t.linear, indices, offsets, FIELDS, mode, [0], None, None, None, t.state, t.step,
            None, None, t.opt.code, t.opt.lr, t.opt.eps, *t.opt.betas, t.opt.weight_decay)
    assert_bitwise_equal(t, before)
