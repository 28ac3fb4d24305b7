"""Fused sparse optimizers: the update op against the plain-PyTorch update, the module against the
reference module and against torch.optim on sparse gradients, and state_dict round trips."""
import copy

import pytest
import torch
import torch.nn.functional as F

import deepfm_fast
from deepfm_fast import EmbeddingFM, optim, reference
from testing import assert_close, device_params, product

pytestmark = pytest.mark.skipif(not deepfm_fast._backend.compiled(), reason="deepfm_fast._C is not built")

OPTIMIZERS = {
    "sgd": lambda wd=0.0: optim.SGD(0.1, weight_decay=wd),
    "rowwise_adagrad": lambda wd=0.0: optim.RowWiseAdagrad(0.1, weight_decay=wd),
    "adagrad": lambda wd=0.0: optim.Adagrad(0.1, weight_decay=wd),
    "adam": lambda wd=0.0: optim.Adam(0.01, weight_decay=wd),
}
FIELD_DIMS = [40, 25, 7, 3]


def reference_update(opt, table, state, ids, grads, step):
    reference.fused_row_update([table], state, ids, [grads], opt.code, opt.lr, opt.eps, *opt.betas, opt.weight_decay,
                               step)


def random_unique_ids(num_rows, count, device):
    return torch.randperm(num_rows, device=device)[:count].sort().values


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("name,dtype,weight_decay", product(OPTIMIZERS, [torch.float64, torch.float32], [0.0, 0.01]))
def test_update_op_matches_reference_update(device, name, dtype, weight_decay):
    opt = OPTIMIZERS[name](weight_decay)
    for dim in (1, 5, 16, 33):
        table = torch.randn(60, dim, dtype=dtype, device=device)
        state = opt.new_state(table)
        table_ref, state_ref = table.clone(), [s.clone() for s in state]
        for step in range(1, 5):
            ids = random_unique_ids(60, 17, device)
            grads = torch.randn(17, dim, dtype=dtype, device=device)
            opt.update(table, state, ids, grads, step)
            reference_update(opt, table_ref, state_ref, ids, grads, step)
        assert_close(table, table_ref)
        for s, s_ref in zip(state, state_ref):
            assert_close(s, s_ref)


@pytest.mark.parametrize("device", device_params())
def test_update_op_reduced_precision_tables_keep_float32_state(device):
    for dtype in (torch.float16, torch.bfloat16):
        opt = optim.Adam(0.01)
        table = torch.randn(30, 8, device=device).to(dtype)
        state = opt.new_state(table)
        assert all(s.dtype == torch.float32 for s in state)
        table_ref, state_ref = table.clone(), [s.clone() for s in state]
        ids, grads = random_unique_ids(30, 9, device), torch.randn(9, 8, device=device).to(dtype)
        opt.update(table, state, ids, grads, 1)
        reference_update(opt, table_ref, state_ref, ids, grads, 1)
        assert_close(table, table_ref)


def make_batches(device, steps=3, batch=32, multi_hot=False, seed=0):
    """Batches with duplicate ids within and across samples (small vocabularies)."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(steps):
        labels = torch.randint(0, 2, (batch,), generator=generator).double()
        if not multi_hot:
            ids = torch.stack([torch.randint(0, d, (batch,), generator=generator) for d in FIELD_DIMS], 1)
            batches.append((ids.to(device), None, None, labels.to(device)))
            continue
        lengths = torch.randint(0, 4, (batch * len(FIELD_DIMS),), generator=generator)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        field = torch.arange(batch * len(FIELD_DIMS)) % len(FIELD_DIMS)
        field_of = torch.repeat_interleave(field, lengths)
        dims = torch.tensor(FIELD_DIMS)[field_of]
        ids = (torch.rand(int(lengths.sum()), generator=generator) * dims).long()
        weights = torch.rand(ids.numel(), generator=generator, dtype=torch.float64)
        batches.append((ids.to(device), offsets.to(device), weights.to(device), labels.to(device)))
    return batches


def train(module, batches, torch_optimizers=(), pooled_penalty=1e-2):
    for ids, offsets, weights, labels in batches:
        logit, pooled = module(ids, offsets, weights, return_pooled=True)
        loss = F.binary_cross_entropy_with_logits(logit, labels) + pooled_penalty * pooled.pow(2).sum()
        loss.backward()
        for opt in torch_optimizers:
            opt.step()
            opt.zero_grad()


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("name,mode,multi_hot", product(OPTIMIZERS, ["field", "feature"], [False, True]))
def test_fused_module_matches_reference_module(device, name, mode, multi_hot):
    opt = OPTIMIZERS[name](0.01)
    pooling = ["sum", "mean", "sum", "mean"]
    fused = EmbeddingFM(FIELD_DIMS, 6, mode=mode, pooling=pooling, optimizer=opt, init_std=0.1).double().to(device)
    ref = EmbeddingFM(FIELD_DIMS, 6, mode=mode, pooling=pooling, optimizer=opt, init_std=0.1,
                      use_reference=True).double().to(device)
    ref.load_state_dict(fused.state_dict())
    batches = make_batches(device, multi_hot=multi_hot)
    train(fused, batches)
    train(ref, batches)
    assert int(fused.optimizer_step) == len(batches)
    assert_close(fused.weight, ref.weight)
    assert_close(fused.linear_weight, ref.linear_weight)
    for a, b in zip(*[sum(m.optimizer_states(), []) for m in (fused, ref)]):
        assert_close(a, b)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize(
    "fused_opt,torch_opt",
    [
        (lambda: optim.SGD(0.1), lambda params: torch.optim.SGD(params, lr=0.1)),
        (lambda: optim.Adagrad(0.1), lambda params: torch.optim.Adagrad(params, lr=0.1)),
        (lambda: optim.Adam(0.01), lambda params: torch.optim.SparseAdam(params, lr=0.01)),
    ],
    ids=["SGD", "Adagrad", "SparseAdam"],
)
def test_fused_optimizer_equals_torch_optimizer_on_sparse_gradients(device, fused_opt, torch_opt):
    fused = EmbeddingFM(FIELD_DIMS, 8, optimizer=fused_opt(), init_std=0.1).double().to(device)
    plain = EmbeddingFM(FIELD_DIMS, 8, sparse=True, init_std=0.1).double().to(device)
    plain.load_state_dict(fused.state_dict(), strict=False)
    batches = make_batches(device, steps=4, multi_hot=True)
    train(fused, batches, [torch.optim.SGD([fused.bias], lr=0.1)])
    train(plain, batches, [torch_opt([plain.weight, plain.linear_weight]), torch.optim.SGD([plain.bias], lr=0.1)])
    assert_close(fused.weight, plain.weight)
    assert_close(fused.linear_weight, plain.linear_weight)
    assert_close(fused.bias, plain.bias)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_dict_round_trip_continues_exactly(device, name):
    module = EmbeddingFM(FIELD_DIMS, 8, optimizer=OPTIMIZERS[name](0.01)).double().to(device)
    batches = make_batches(device, steps=4)
    train(module, batches[:2])
    saved = copy.deepcopy(module.state_dict())
    assert "optimizer_step" in saved and (name == "sgd" or "weight_optimizer_state0" in saved)
    train(module, batches[2:])
    reloaded = EmbeddingFM(FIELD_DIMS, 8, optimizer=OPTIMIZERS[name](0.01)).double().to(device)
    reloaded.load_state_dict(saved)
    train(reloaded, batches[2:])
    assert torch.equal(module.weight, reloaded.weight)
    assert torch.equal(module.linear_weight, reloaded.linear_weight)
    for a, b in zip(*[sum(m.optimizer_states(), []) for m in (module, reloaded)]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", device_params())
def test_weight_decay_touches_only_the_rows_in_the_batch(device):
    module = EmbeddingFM([100], 4, optimizer=optim.SGD(0.1, weight_decay=0.5)).double().to(device)
    before = module.weight.detach().clone()
    ids = torch.tensor([[3], [3], [50]], device=device)
    F.binary_cross_entropy_with_logits(module(ids), torch.ones(3, dtype=torch.float64, device=device)).backward()
    changed = (module.weight != before).any(1).nonzero().flatten().tolist()
    assert changed == [3, 50]
    assert module.weight.grad is None


def test_per_sample_weights_still_get_gradients():
    module = EmbeddingFM(FIELD_DIMS, 6, optimizer=optim.SGD(0.0)).double()
    reference_module = EmbeddingFM(FIELD_DIMS, 6).double()
    reference_module.load_state_dict(module.state_dict(), strict=False)
    ids, offsets, weights, labels = make_batches("cpu", steps=1, multi_hot=True)[0]
    grads = []
    for m in (module, reference_module):
        w = weights.clone().requires_grad_()
        F.binary_cross_entropy_with_logits(m(ids, offsets, w), labels).backward()
        grads.append(w.grad)
    assert_close(grads[0], grads[1])


def test_update_op_opcheck():
    tables, ids = [torch.randn(20, 4), torch.randn(20, 1)], torch.tensor([1, 5, 7])
    grads = [torch.randn(3, 4), torch.randn(3, 1)]
    for opt in (optim.SGD(0.1), optim.RowWiseAdagrad(0.1), optim.Adam(0.1)):
        state = [s for t in tables for s in opt.new_state(t)]
        torch.library.opcheck(torch.ops.deepfm_fast.fused_row_update.default,
                              (tables, state, ids, grads, opt.code, 0.1, opt.eps, *opt.betas, 0.0, 1))


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(ids=torch.tensor([5, 1, 7])), r"ids must be sorted and unique.*ids\[1\] = 1 follows 5"),
        (dict(ids=torch.tensor([1, 1, 7])), r"ids must be sorted and unique"),
        (dict(ids=torch.tensor([1, 5, 20])), r"ids\[2\] = 20 is out of range for tables with 20 rows"),
        (dict(ids=torch.tensor([-1, 5, 7])), r"ids\[0\] = -1 is out of range"),
        (dict(ids=torch.tensor([1.0, 5.0, 7.0])), r"ids must be an int64 tensor, got Float"),
        (dict(row_grads=[torch.randn(2, 4), torch.randn(3, 1)]), r"row_grads\[0\] must have shape \[3, 4\]"),
        (dict(row_grads=[torch.randn(3, 4)]), r"row_grads must hold one tensor per table \(2\), got 1"),
        (dict(state=[torch.zeros(20)]), r"takes 1 state tensors per table, so 2 for 2 tables, got 1"),
        (dict(state=[torch.zeros(20, dtype=torch.float64), torch.zeros(20)]), r"state\[0\] must have dtype Float"),
        (dict(state=[torch.zeros(20), torch.zeros(20, 1)]), r"state\[1\] \(of tables\[1\]\) must have shape \[20\]"),
        (dict(tables=[torch.randn(20, 4), torch.randn(19, 1)]), r"tables\[1\] has 19"),
        (dict(tables=[torch.randn(20, 4), torch.randn(20, 1, dtype=torch.float64)]),
         r"tables\[1\] has dtype Double but tables\[0\] has dtype Float"),
        (dict(optimizer=7), r"optimizer must be 0 \(SGD\)"),
    ],
)
def test_update_op_bad_inputs_name_the_argument(change, match):
    args = dict(tables=[torch.randn(20, 4), torch.randn(20, 1)], state=[torch.zeros(20), torch.zeros(20)],
                ids=torch.tensor([1, 5, 7]), row_grads=[torch.randn(3, 4), torch.randn(3, 1)], optimizer=1)
    args.update(change)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.deepfm_fast.fused_row_update(args["tables"], args["state"], args["ids"], args["row_grads"],
                                               args["optimizer"], 0.1, 1e-8, 0.9, 0.999, 0.0, 1)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_two_tables_in_one_pass_equal_two_separate_updates(device, name):
    opt = OPTIMIZERS[name](0.01)
    tables = [torch.randn(40, 6, dtype=torch.float64, device=device), torch.randn(40, 1, dtype=torch.float64,
                                                                                 device=device)]
    states = [opt.new_state(t) for t in tables]
    separate = [t.clone() for t in tables]
    separate_states = [[s.clone() for s in st] for st in states]
    for step in range(1, 4):
        ids = random_unique_ids(40, 11, device)
        grads = [torch.randn(11, t.shape[1], dtype=torch.float64, device=device) for t in tables]
        opt.update(tables, states, ids, grads, step)
        for t, st, g in zip(separate, separate_states, grads):
            opt.update(t, st, ids, g, step)
    for a, b in zip(tables, separate):
        assert torch.equal(a, b)


def test_module_rejects_bad_optimizer_settings():
    with pytest.raises(ValueError, match="sparse=True and a fused optimizer"):
        EmbeddingFM([10], 4, sparse=True, optimizer=optim.SGD(0.1))
    with pytest.raises(TypeError, match="optimizer must be one of"):
        EmbeddingFM([10], 4, optimizer=torch.optim.SGD)
    with pytest.raises(ValueError, match="lr must be"):
        optim.SGD(-1.0)
    with pytest.raises(ValueError, match="betas must be"):
        optim.Adam(betas=(0.9, 1.0))
