"""The EmbeddingFM module and the table gradients of the op: sparse equals dense, torch optimizer steps
equal the reference module's, CSR and int32 input, local ids checked, and the row-gradient ops
(gather_rows, sparse_rows) against plain PyTorch."""
import pytest
import torch

from deepfm_fast import EmbeddingFM, ops
from testing import assert_close, leaf, product, random_csr, requires_compiled

pytestmark = requires_compiled

MODES = ["field", "feature"]


@pytest.mark.parametrize("mode,linear", product(MODES, [False, True]))
def test_sparse_grad_equals_dense(mode, linear):
    indices, offsets = random_csr(8, 4, 25, 3, torch.int64, "cpu")
    weight = torch.randn(25, 16)
    lw = torch.randn(25) if linear else None
    grads = {}
    for sparse in (False, True):
        w, lin = leaf(weight), (leaf(lw) if linear else None)
        out = ops.embedding_fm(w, indices, offsets, None, lin, num_fields=4, mode=mode, pooling="mean", sparse=sparse)
        grads[sparse] = torch.autograd.grad(out.fm.sum() + out.linear.sum(), [w, lin] if linear else [w])
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


def test_module_local_id_out_of_range():
    model = EmbeddingFM([5, 3], 4)
    with pytest.raises(IndexError, match=r"id 3 at indices\[1, 1\] is out of range for field 1, .*field_dims\[1\] = 3"):
        model(torch.tensor([[0, 0], [4, 3]]))
    with pytest.raises(IndexError, match=r"id -1 at indices\[0, 0\]"):
        model(torch.tensor([[-1, 0]]))
    assert model(torch.tensor([[4, 2]])).shape == (1,)


# ---- the row-gradient ops ----------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(30, 6), (30,)])
def test_gather_rows_gradient_dense_and_sparse(shape):
    param = torch.randn(shape, dtype=torch.float64)
    rows = torch.tensor([2, 5, 6, 29])
    dense_param, sparse_param = leaf(param), leaf(param)
    assert torch.equal(ops.gather_rows(dense_param, rows), param[rows])
    (ops.gather_rows(dense_param, rows) ** 3).sum().backward()
    (ops.gather_rows(sparse_param, rows, sparse_grad=True) ** 3).sum().backward()
    reference_param = leaf(param)
    (reference_param[rows] ** 3).sum().backward()
    assert torch.equal(dense_param.grad, reference_param.grad)
    assert sparse_param.grad.is_sparse and torch.equal(sparse_param.grad.to_dense(), reference_param.grad)
    assert torch.autograd.gradcheck(lambda p: ops.gather_rows(p, rows), (leaf(param),))


def test_row_gradient_ops_opcheck():
    rows = torch.tensor([1, 4, 7])
    for shape in ((9, 3), (9,)):
        param = torch.randn(shape, requires_grad=True)
        for sparse_grad in (False, True):
            torch.library.opcheck(torch.ops.deepfm_fast.gather_rows.default, (param, rows, sparse_grad))
        values = torch.randn((3,) + shape[1:])
        torch.library.opcheck(torch.ops.deepfm_fast.sparse_rows.default, (rows, values, list(shape)))
        dense = torch.ops.deepfm_fast.sparse_rows(rows, values, list(shape)).to_dense()
        expected = torch.zeros(shape)
        expected[rows] = values
        assert torch.equal(dense, expected)
