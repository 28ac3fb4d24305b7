"""Fused sparse optimizers: the update op against the plain-PyTorch update, the module against the
reference module and against torch.optim (SparseAdam, SGD, Adagrad on sparse gradients; Adam on the
dense gradient), state_dict round trips, and bad input."""
import copy

import pytest
import torch
import torch.nn.functional as F

import deepfm_fast
from deepfm_fast import EmbeddingFM, _packing, ops, optim, reference
from testing import assert_close, device_params, product, random_csr

pytestmark = pytest.mark.skipif(not deepfm_fast._backend.compiled(), reason="deepfm_fast._C is not built")

OPTIMIZERS = {
    "sgd": lambda wd=0.0: optim.SGD(0.1, weight_decay=wd),
    "rowwise_adagrad": lambda wd=0.0: optim.RowWiseAdagrad(0.1, weight_decay=wd),
    "adagrad": lambda wd=0.0: optim.Adagrad(0.1, weight_decay=wd),
    "lazy_adam": lambda wd=0.0: optim.LazyAdam(0.01, weight_decay=wd),
    "rowwise_adam": lambda wd=0.0: optim.RowWiseAdam(0.01, weight_decay=wd),
    "adam": lambda wd=0.0: optim.Adam(0.01, weight_decay=wd, catch_up_window=8),
}
FIELD_DIMS = [40, 25, 7, 3]


def counter(value=0):
    """A step counter as the ops take it: a CPU int64 scalar."""
    return torch.tensor(value, dtype=torch.int64)


def random_unique_ids(num_rows, count, device, generator=None):
    return torch.randperm(num_rows, generator=generator).to(device)[:count].sort().values


def update(opt, tables, states, ids, grads, step, row_state, impl=ops):
    """One step of ``opt`` on the rows ``ids`` of ``tables`` (a table or a list of tables with the same
    rows; ``states`` and ``grads`` follow them) through ``impl.fused_row_update``."""
    if isinstance(tables, torch.Tensor):
        tables, states, grads = [tables], [states], [grads]
    impl.fused_row_update(list(tables), [s for st in states for s in st], ids, list(grads), step, **opt.op_args(),
                          last_step=row_state.get("last_step"), catchup=row_state.get("catchup"))


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("name,dtype,weight_decay", product(OPTIMIZERS, [torch.float64, torch.float32], [0.0, 0.01]))
def test_update_op_matches_reference_update(device, name, dtype, weight_decay):
    opt = OPTIMIZERS[name](weight_decay)
    for shape in ((60,), (60, 5), (60, 16), (60, 33)):
        table = torch.randn(shape, dtype=dtype, device=device)
        state, row_state = opt.new_state(table), opt.new_row_state(60, device)
        table_ref, state_ref = table.clone(), [s.clone() for s in state]
        row_state_ref = {k: v.clone() for k, v in row_state.items()}
        step, step_ref = counter(), counter()
        for _ in range(12):  # more steps than Adam's window: rows are caught up by the sweep too
            ids = random_unique_ids(60, 17, device)
            grads = torch.randn((17,) + shape[1:], dtype=dtype, device=device)
            update(opt, table, state, ids, grads, step, row_state)
            update(opt, table_ref, state_ref, ids, grads, step_ref, row_state_ref, impl=reference)
        assert int(step) == int(step_ref) == 12
        assert_close(table, table_ref)
        for s, s_ref in zip(state, state_ref):
            assert_close(s, s_ref)
        for key in row_state:
            assert_close(row_state[key].double(), row_state_ref[key].double(), torch.float64 if key == "catchup"
                         else dtype)


@pytest.mark.parametrize("device", device_params())
def test_update_op_reduced_precision_tables_keep_float32_state(device):
    for dtype in (torch.float16, torch.bfloat16):
        for opt in (optim.LazyAdam(0.01), optim.Adam(0.01)):
            table = torch.randn(30, 8, device=device).to(dtype)
            state, row_state = opt.new_state(table), opt.new_row_state(30, device)
            assert all(s.dtype == torch.float32 for s in state)
            table_ref, state_ref = table.clone(), [s.clone() for s in state]
            row_state_ref = {k: v.clone() for k, v in row_state.items()}
            ids, grads = random_unique_ids(30, 9, device), torch.randn(9, 8, device=device).to(dtype)
            update(opt, table, state, ids, grads, counter(), row_state)
            update(opt, table_ref, state_ref, ids, grads, counter(), row_state_ref, impl=reference)
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
        ids, offsets = random_csr(batch, len(FIELD_DIMS), FIELD_DIMS, 3, generator=generator)
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
    fused.eval()
    ref.eval()
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
        (lambda: optim.LazyAdam(0.01), lambda params: torch.optim.SparseAdam(params, lr=0.01)),
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


def gap_schedule(steps, seed=0):
    """Batches of two fields (ids [B, 2], local) where some rows are used at every step, some every
    10 or 100 steps, some at step 1 and next after about 1,000 steps, some never; duplicates in
    every batch."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for t in range(1, steps + 1):
        first = [0, 1, 0]  # 0 twice: a duplicate
        first += [2 + t % 4] if t % 10 == 0 else []
        first += [6 + (t // 100) % 4] if t % 100 == 7 else []
        first += [10, 11] if t in (1, 1003) else []
        first += torch.randint(12, 30, (1,), generator=generator).tolist()
        second = torch.randint(0, 8, (len(first),), generator=generator).tolist()
        labels = torch.randint(0, 2, (len(first),), generator=generator).double()
        batches.append((torch.tensor([first, second]).T, labels))
    return batches


def train_against_torch_adam(device, steps, window, logit_scale=1.0, weight_decay=0.01):
    """The fused Adam and torch.optim.Adam on the dense gradient of the same loss (BCE + the L2
    penalty on the rows each batch uses, whose gradient is the fused weight_decay), with the
    learning rate lowered halfway; returns both modules after the fused one's flush."""
    torch.manual_seed(0)
    dims = [40, 8]
    fused = EmbeddingFM(dims, 6, init_std=0.3,
                        optimizer=optim.Adam(0.01, weight_decay=weight_decay, catch_up_window=window))
    fused = fused.double().to(device)
    dense = EmbeddingFM(dims, 6, init_std=0.3).double().to(device)
    dense.load_state_dict(fused.state_dict(), strict=False)
    torch_adam = torch.optim.Adam([dense.weight, dense.linear_weight], lr=0.01)
    for t, (ids, labels) in enumerate(gap_schedule(steps), 1):
        ids, labels = ids.to(device), labels.to(device)
        if t == steps // 2:
            fused.optimizer.lr = 0.002
            torch_adam.param_groups[0]["lr"] = 0.002
        F.binary_cross_entropy_with_logits(logit_scale * fused(ids), labels).backward()
        loss = F.binary_cross_entropy_with_logits(logit_scale * dense(ids), labels)
        loss = loss + weight_decay * dense.l2_penalty(ids)
        torch_adam.zero_grad()
        loss.backward()
        torch_adam.step()
    fused.eval()  # the flush: every row up to date
    return fused, dense


def relative_error(actual, expected, start):
    """The largest error over the largest movement from `start` (so that rows near 0 do not inflate it)."""
    return float(((actual - expected).abs().max() / (expected - start).abs().max()).detach())


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("window", [64, 2048])
def test_fused_adam_equals_torch_adam_on_the_dense_gradient(device, window):
    # Gaps of 1 to 1,000 steps, a learning-rate change, duplicates, L2 on the used rows; window 64
    # catches rows up through the sweep, 2048 through their next touch.
    torch.manual_seed(0)
    start = EmbeddingFM([40, 8], 6, init_std=0.3).double()
    fused, dense = train_against_torch_adam(device, 1050, window)
    assert int(fused.optimizer_step) == 1050
    assert bool((fused.optimizer_last_step == 1050).all())
    for name in ("weight", "linear_weight"):
        actual, expected = getattr(fused, name), getattr(dense, name)
        # Measured 5e-15: float64 round-off (the optim docs state 1e-12).
        assert relative_error(actual.cpu(), expected.cpu(), getattr(start, name)) < 1e-12, name
    assert not torch.equal(fused.weight[40].cpu(), start.weight[40])  # rows moved


@pytest.mark.parametrize("device", device_params())
def test_fused_adam_where_eps_dominates_stays_within_the_stated_bound(device):
    # Gradients ~1e-9, so sqrt(v) ~ eps: the catch-up rule is exact at sqrt(v) = 0 and sqrt(v) >> eps,
    # approximate in between. The error stays below the bound the optim docs state.
    torch.manual_seed(0)
    start = EmbeddingFM([40, 8], 6, init_std=0.3).double()
    fused, dense = train_against_torch_adam(device, 1050, 2048, logit_scale=1e-8, weight_decay=0.0)
    for name in ("weight", "linear_weight"):
        error = relative_error(getattr(fused, name).cpu(), getattr(dense, name).cpu(), getattr(start, name))
        assert error < 1e-4, (name, error)  # measured 5e-6


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_dict_round_trip_continues_exactly(device, name):
    module = EmbeddingFM(FIELD_DIMS, 8, optimizer=OPTIMIZERS[name](0.01)).double().to(device)
    batches = make_batches(device, steps=4)
    train(module, batches[:2])
    saved = copy.deepcopy(module.state_dict())
    assert "optimizer_step" in saved and (name == "sgd" or "weight_optimizer_state0" in saved)
    assert (name == "adam") == ("optimizer_last_step" in saved and "optimizer_catchup" in saved)
    train(module, batches[2:])
    reloaded = EmbeddingFM(FIELD_DIMS, 8, optimizer=OPTIMIZERS[name](0.01)).double().to(device)
    reloaded.load_state_dict(saved)
    train(reloaded, batches[2:])
    for m in (module, reloaded):
        m.flush()
    assert torch.equal(module.weight, reloaded.weight)
    assert torch.equal(module.linear_weight, reloaded.linear_weight)
    for a, b in zip(*[sum(m.optimizer_states(), []) for m in (module, reloaded)]):
        assert torch.equal(a, b)


def test_checkpoints_with_first_order_state_of_shape_n_by_1_load():
    module = EmbeddingFM([10, 5], 4, optimizer=optim.LazyAdam(0.01))
    old = module.state_dict()
    old = {k: (v.view(-1, 1) if k.startswith("linear_optimizer_state") else v) for k, v in old.items()}
    reloaded = EmbeddingFM([10, 5], 4, optimizer=optim.LazyAdam(0.01))
    reloaded.load_state_dict(old)
    assert reloaded.linear_optimizer_state0.shape == (15,)


def test_lazy_adam_state_loads_into_adam_and_continues_as_torch_adam():
    # A LazyAdam state (also what the first, lazy Adam saved) has no catch-up state: Adam takes every
    # row as up to date and continues as torch.optim.Adam from the same parameters and moments.
    torch.manual_seed(0)
    batches = gap_schedule(60)
    lazy = EmbeddingFM([40, 8], 6, init_std=0.3, optimizer=optim.LazyAdam(0.01)).double()
    for ids, labels in batches[:30]:
        F.binary_cross_entropy_with_logits(lazy(ids), labels).backward()
    saved = lazy.state_dict()
    fused = EmbeddingFM([40, 8], 6, optimizer=optim.Adam(0.01, catch_up_window=16)).double()
    fused.load_state_dict(saved)
    assert bool((fused.optimizer_last_step == 30).all())
    dense = EmbeddingFM([40, 8], 6).double()
    dense.load_state_dict(saved, strict=False)
    torch_adam = torch.optim.Adam([dense.weight, dense.linear_weight], lr=0.01)
    for p, prefix in ((dense.weight, "weight"), (dense.linear_weight, "linear")):
        torch_adam.state[p] = {"step": torch.tensor(30.0, dtype=torch.float64),
                               "exp_avg": saved[f"{prefix}_optimizer_state0"].clone(),
                               "exp_avg_sq": saved[f"{prefix}_optimizer_state1"].clone()}
    for ids, labels in batches[30:]:
        F.binary_cross_entropy_with_logits(fused(ids), labels).backward()
        torch_adam.zero_grad()
        F.binary_cross_entropy_with_logits(dense(ids), labels).backward()
        torch_adam.step()
    fused.eval()
    for name in ("weight", "linear_weight"):
        error = relative_error(getattr(fused, name), getattr(dense, name), saved[name])
        assert error < 1e-12, (name, error)


def test_adam_state_loads_into_lazy_adam():
    module = EmbeddingFM([10, 5], 4, optimizer=optim.Adam(0.01))
    module(torch.tensor([[1, 2], [3, 4]])).sum().backward()
    reloaded = EmbeddingFM([10, 5], 4, optimizer=optim.LazyAdam(0.01))
    reloaded.load_state_dict(module.state_dict())  # strict: the catch-up state is dropped, the rows were flushed
    assert torch.equal(reloaded.weight, module.weight)


@pytest.mark.parametrize("device", device_params())
def test_step_count_stays_on_the_host(device):
    module = EmbeddingFM([10, 5], 4, optimizer=optim.Adam(0.01)).to(device).double()
    assert module.optimizer_step.device.type == "cpu"
    assert module.weight.device.type == module.optimizer_last_step.device.type == torch.device(device).type


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


def test_update_ops_opcheck():
    ids = torch.tensor([1, 5, 7])
    for opt in (optim.SGD(0.1), optim.RowWiseAdagrad(0.1), optim.LazyAdam(0.1), optim.RowWiseAdam(0.1),
                optim.Adam(0.1, catch_up_window=4)):
        tables, grads = [torch.randn(20, 4), torch.randn(20)], [torch.randn(3, 4), torch.randn(3)]
        state = [s for t in tables for s in opt.new_state(t)]
        row_state = opt.new_row_state(20, "cpu")
        torch.library.opcheck(torch.ops.deepfm_fast.fused_row_update.default,
                              (tables, state, ids, grads, counter(3), *opt.op_args().values(),
                               row_state.get("last_step"), row_state.get("catchup")))
        if row_state:
            for rows in (dict(row_begin=0, row_end=-1), dict(row_begin=2, row_end=9)):
                args = (tables, state, row_state["last_step"], row_state["catchup"], counter(2),
                        rows["row_begin"], rows["row_end"])
                torch.library.opcheck(torch.ops.deepfm_fast.adam_catch_up.default, args)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(ids=torch.tensor([5, 1, 7])), r"ids must be sorted and unique.*ids\[1\] = 1 follows 5"),
        (dict(ids=torch.tensor([1, 1, 7])), r"ids must be sorted and unique"),
        (dict(ids=torch.tensor([1, 5, 20])), r"ids\[2\] = 20 is out of range for tables with 20 rows"),
        (dict(ids=torch.tensor([-1, 5, 7])), r"ids\[0\] = -1 is out of range"),
        (dict(ids=torch.tensor([1.0, 5.0, 7.0])), r"ids must be an int64 tensor, got Float"),
        (dict(row_grads=[torch.randn(2, 4), torch.randn(3)]),
         r"row_grads\[0\] must have the shape of tables\[0\].*\[3, 4\]"),
        (dict(row_grads=[torch.randn(3, 4)]), r"row_grads must hold one tensor per table \(2\), got 1"),
        (dict(state=[torch.zeros(20)]), r"takes 1 state tensors per table, so 2 for 2 tables, got 1"),
        (dict(state=[torch.zeros(20, dtype=torch.float64), torch.zeros(20)]), r"state\[0\] must have dtype Float"),
        (dict(state=[torch.zeros(20), torch.zeros(20, 1)]), r"state\[1\] \(of tables\[1\]\) must have shape \[20\]"),
        (dict(tables=[torch.randn(20, 4), torch.randn(19)]), r"tables\[1\] has 19"),
        (dict(tables=[torch.randn(20, 4), torch.randn(20, dtype=torch.float64)]),
         r"tables\[1\] has dtype Double but tables\[0\] has dtype Float"),
        (dict(tables=[torch.randn(20, 4, 2)]), r"tables\[0\] must be a 1-D \[num_rows\] or 2-D"),
        (dict(optimizer=7), r"optimizer must be 0 \(SGD\)"),
        (dict(step=torch.zeros(2, dtype=torch.int64)), r"step must be a CPU int64 tensor with one element"),
        (dict(step=torch.zeros((), dtype=torch.int32)), r"step must be a CPU int64 tensor"),
        (dict(optimizer=4, state=[torch.zeros(20, 4)] * 2 + [torch.zeros(20)] * 2),
         r"Adam \(optimizer 4\) needs last_step and catchup"),
        (dict(optimizer=4, state=[torch.zeros(20, 4)] * 2 + [torch.zeros(20)] * 2, last_step=torch.zeros(20),
              catchup=torch.zeros(5, 11, dtype=torch.float64)), r"last_step must be an int64 tensor"),
        (dict(optimizer=4, state=[torch.zeros(20, 4)] * 2 + [torch.zeros(20)] * 2,
              last_step=torch.zeros(19, dtype=torch.int64),
              catchup=torch.zeros(5, 11, dtype=torch.float64)), r"last_step must be an int64 tensor of shape \[20\]"),
        (dict(step=torch.tensor(-3)), r"step must be >= 0 \(the number of steps taken\), got -3"),
        (dict(tables=[torch.randn(1, 4).expand(20, 4), torch.randn(20)]),
         r"tables\[0\] \(updated in place\) must have contiguous, non-overlapping rows"),
        (dict(tables=[torch.randn(4, 20).t(), torch.randn(20)]),
         r"tables\[0\] \(updated in place\) must have contiguous, non-overlapping rows"),
        (dict(optimizer=4, state=[torch.zeros(20, 4)] * 2 + [torch.zeros(20)] * 2,
              last_step=torch.zeros(20, dtype=torch.int64), catchup=torch.zeros(5, 10, dtype=torch.float64)),
         r"catchup must be a contiguous float64 tensor of shape \[window \+ 1, 11\]"),
    ],
)
def test_update_op_bad_inputs_name_the_argument(change, match):
    args = dict(tables=[torch.randn(20, 4), torch.randn(20)], state=[torch.zeros(20), torch.zeros(20)],
                ids=torch.tensor([1, 5, 7]), row_grads=[torch.randn(3, 4), torch.randn(3)], optimizer=1,
                step=counter(), last_step=None, catchup=None)
    args.update(change)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.deepfm_fast.fused_row_update(args["tables"], args["state"], args["ids"], args["row_grads"],
                                               args["step"], args["optimizer"], 0.1, 1e-8, 0.9, 0.999, 0.0,
                                               args["last_step"], args["catchup"])
    assert int(args["step"].reshape(-1)[0]) == (-3 if "step must be >= 0" in match else 0)  # nothing was done


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_two_tables_in_one_pass_equal_two_separate_updates(device, name):
    opt = OPTIMIZERS[name](0.01)
    tables = [torch.randn(40, 6, dtype=torch.float64, device=device), torch.randn(40, dtype=torch.float64,
                                                                                 device=device)]
    states = [opt.new_state(t) for t in tables]
    row_state = opt.new_row_state(40, device)
    separate = [t.clone() for t in tables]
    separate_states = [[s.clone() for s in st] for st in states]
    separate_row_states = [{k: v.clone() for k, v in row_state.items()} for _ in tables]
    step, separate_steps = counter(), [counter(), counter()]
    for _ in range(12):
        ids = random_unique_ids(40, 11, device)
        grads = [torch.randn((11,) + t.shape[1:], dtype=torch.float64, device=device) for t in tables]
        update(opt, tables, states, ids, grads, step, row_state)
        for t, st, g, rs, sc in zip(separate, separate_states, grads, separate_row_states, separate_steps):
            update(opt, t, st, ids, g, sc, rs)
    for a, b in zip(tables, separate):
        assert torch.equal(a, b)
    for st, separate_st in zip(states, separate_states):  # the optimizer state too
        for a, b in zip(st, separate_st):
            assert torch.equal(a, b)
    for key in row_state:  # Adam's last steps (the catch-up table depends on the step only)
        for separate_rs in separate_row_states:
            assert torch.equal(row_state[key], separate_rs[key]), key


def test_module_rejects_bad_optimizer_settings():
    with pytest.raises(ValueError, match="sparse=True and a fused optimizer"):
        EmbeddingFM([10], 4, sparse=True, optimizer=optim.SGD(0.1))
    with pytest.raises(TypeError, match="optimizer must be one of"):
        EmbeddingFM([10], 4, optimizer=torch.optim.SGD)
    with pytest.raises(ValueError, match="lr must be"):
        optim.SGD(-1.0)
    with pytest.raises(ValueError, match="betas must be"):
        optim.Adam(betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="catch_up_window must be >= 1"):
        optim.Adam(catch_up_window=0)
    with pytest.raises(ValueError, match="too small for catch_up_window"):
        optim.Adam(betas=(0.9, 0.3), catch_up_window=4096)
    with pytest.raises(ValueError, match="unknown fused table optimizer 'lamb'"):
        optim.by_name("lamb", 0.1)


@pytest.mark.parametrize("device", device_params())
def test_adam_rows_are_the_caught_up_rows_and_change_nothing(device):
    opt = optim.Adam(0.05, catch_up_window=8)
    tables = [torch.randn(30, 5, dtype=torch.float64, device=device), torch.randn(30, dtype=torch.float64,
                                                                                 device=device)]
    states = [opt.new_state(t) for t in tables]
    row_state, step = opt.new_row_state(30, device), counter()
    generator = torch.Generator().manual_seed(0)
    for _ in range(6):  # rows fall behind by different numbers of steps
        ids = random_unique_ids(30, 7, device, generator)
        update(opt, tables, states, ids, [torch.randn((7,) + t.shape[1:], dtype=torch.float64, device=device)
                                          for t in tables], step, row_state)
    flat = [s for st in states for s in st]
    before = [t.clone() for t in tables + flat + list(row_state.values())]
    rows = torch.tensor([0, 3, 11, 29], device=device)
    copies = torch.ops.deepfm_fast.adam_rows(tables, flat, row_state["last_step"], row_state["catchup"], step, rows)
    after = tables + flat + list(row_state.values())
    assert all(torch.equal(a, b) for a, b in zip(after, before))  # nothing changed
    expected = reference.adam_rows([t.cpu() for t in tables], [s.cpu() for s in flat],
                                   row_state["last_step"].cpu(), row_state["catchup"].cpu(), step, rows.cpu())
    for copy_, e in zip(copies, expected):
        assert_close(copy_.cpu(), e)
    # ... and what a flush leaves in those rows.
    ops.adam_catch_up(tables, flat, row_state["last_step"], row_state["catchup"], step)  # the flush
    for copy_, table in zip(copies, tables):
        assert_close(copy_, table[rows])
    torch.library.opcheck(torch.ops.deepfm_fast.adam_rows.default,
                          (tables, flat, row_state["last_step"], row_state["catchup"], step, rows))


def test_rows_further_behind_than_the_window_raise_instead_of_reading_past_the_table():
    opt = optim.Adam(0.05, catch_up_window=4)
    tables = [torch.randn(10, 3), torch.randn(10)]
    flat = [s for t in tables for s in opt.new_state(t)]
    row_state, step = opt.new_row_state(10, "cpu", step=6), counter(6)
    row_state["last_step"][2] = 0  # 6 steps behind a window of 4: a replaced last_step
    match = r"row 2 was last updated at step 0, more than the catch-up window \(4\)"
    ids = torch.tensor([2])
    with pytest.raises(RuntimeError, match=match):
        torch.ops.deepfm_fast.adam_rows(tables, flat, row_state["last_step"], row_state["catchup"], step, ids)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.deepfm_fast.adam_catch_up(tables, flat, row_state["last_step"], row_state["catchup"], step)
    with pytest.raises(RuntimeError, match=match):
        update(opt, tables, [flat[:2], flat[2:]], ids, [torch.randn(1, 3), torch.randn(1)], step, row_state)


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_embedding_fm_step_opcheck(name):
    opt = OPTIMIZERS[name]()
    weight, linear_weight = torch.randn(20, 4, requires_grad=True), torch.randn(20, requires_grad=True)
    weight_state, linear_state = opt.new_state(weight), opt.new_state(linear_weight)
    row_state = opt.new_row_state(20, "cpu")
    states = weight_state + [None] * (2 - len(weight_state)) + linear_state + [None] * (2 - len(linear_state))
    indices, offsets = torch.tensor([1, 5, 5, 7, 19, 0]), torch.tensor([0, 2, 3, 4, 6])
    args = (weight, linear_weight, indices, offsets, None, 2, 0, [0], True, *states, counter(),
            row_state.get("last_step"), row_state.get("catchup"), *opt.op_args().values())
    torch.library.opcheck(torch.ops.deepfm_fast.embedding_fm_step.default, args)


def dense_steps(module, batches, weight_decay, rule):
    """``module`` (no fused optimizer) trained by ``rule(step, rows, param, grad_rows)`` applied to the
    rows each batch touches, with the dense autograd gradient plus ``weight_decay * row``: an
    independent update to compare a fused optimizer with."""
    for t, (ids, offsets, weights, labels) in enumerate(batches, 1):
        module.zero_grad(set_to_none=True)
        logit, pooled = module(ids, offsets, weights, return_pooled=True)
        (F.binary_cross_entropy_with_logits(logit, labels) + 1e-2 * pooled.pow(2).sum()).backward()
        rows = torch.unique(module.to_global(ids, offsets))
        with torch.no_grad():
            for param in (module.weight, module.linear_weight):
                grad = param.grad[rows] + weight_decay * param[rows]
                param[rows] = rule(t, rows, param, grad)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("multi_hot", [False, True])
def test_rowwise_adam_equals_an_independent_partial_rowwise_adam(device, multi_hot):
    # FBGEMM's PARTIAL_ROWWISE_ADAM written out per row, in float64, over 4 steps of batches with
    # duplicate ids, a row-wise second moment for V and its own for w.
    lr, (beta1, beta2), eps, weight_decay = 0.02, (0.8, 0.95), 1e-8, 0.01
    fused = EmbeddingFM(FIELD_DIMS, 6, init_std=0.1, optimizer=optim.RowWiseAdam(
        lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay)).double().to(device)
    plain = EmbeddingFM(FIELD_DIMS, 6).double().to(device)
    plain.load_state_dict(fused.state_dict(), strict=False)
    moments = {}

    def rule(t, rows, param, grad):
        m, v = moments.setdefault(id(param), (torch.zeros_like(param), torch.zeros(param.shape[0], dtype=param.dtype,
                                                                                  device=param.device)))
        new_rows = param[rows].clone()
        for i, r in enumerate(rows.tolist()):
            g = grad[i]
            m[r] = beta1 * m[r] + (1 - beta1) * g
            v[r] = beta2 * v[r] + (1 - beta2) * float((g * g).mean())
            m_hat, v_hat = m[r] / (1 - beta1**t), float(v[r]) / (1 - beta2**t)
            new_rows[i] = param[r] - lr * m_hat / (v_hat**0.5 + eps)
        return new_rows

    batches = make_batches(device, steps=4, multi_hot=multi_hot)
    assert any(len(torch.unique(b[0])) < b[0].numel() for b in batches)  # duplicates
    train(fused, batches)
    dense_steps(plain, batches, weight_decay, rule)
    assert int(fused.optimizer_step) == 4
    assert_close(fused.weight, plain.weight)
    assert_close(fused.linear_weight, plain.linear_weight)
    (m_v, v_v), (m_w, v_w) = moments[id(plain.weight)], moments[id(plain.linear_weight)]
    for actual, expected in zip(fused.optimizer_state_list(), [m_v, v_v, m_w, v_w]):
        assert actual.shape == expected.shape
        assert_close(actual, expected)


@pytest.mark.parametrize("device", device_params())
def test_rowwise_adagrad_equals_torchrec_rowwise_adagrad(device):
    # torchrec.optim.RowWiseAdagrad on the dense gradient (untouched rows: zero gradient, no move)
    # is the fused optimizer's rule; w as an [N, 1] table of its own.
    rowwise_adagrad = pytest.importorskip("torchrec.optim.rowwise_adagrad")
    fused = EmbeddingFM(FIELD_DIMS, 6, init_std=0.1,
                        optimizer=optim.RowWiseAdagrad(0.1, eps=1e-8)).double().to(device)
    plain = EmbeddingFM(FIELD_DIMS, 6).double().to(device)
    plain.load_state_dict(fused.state_dict(), strict=False)
    tables = [torch.nn.Parameter(plain.weight.detach().clone()),
              torch.nn.Parameter(plain.linear_weight.detach().clone().unsqueeze(1))]
    torchrec_opt = rowwise_adagrad.RowWiseAdagrad(tables, lr=0.1, eps=1e-8)
    batches = make_batches(device, steps=4, multi_hot=True)
    train(fused, batches)
    for ids, offsets, weights, labels in batches:
        with torch.no_grad():
            plain.weight.copy_(tables[0])
            plain.linear_weight.copy_(tables[1].squeeze(1))
        plain.zero_grad(set_to_none=True)
        logit, pooled = plain(ids, offsets, weights, return_pooled=True)
        (F.binary_cross_entropy_with_logits(logit, labels) + 1e-2 * pooled.pow(2).sum()).backward()
        tables[0].grad, tables[1].grad = plain.weight.grad, plain.linear_weight.grad.unsqueeze(1)
        torchrec_opt.step()
    assert_close(fused.weight, tables[0].detach())
    assert_close(fused.linear_weight, tables[1].detach().squeeze(1))
    assert_close(fused.weight_optimizer_state0, torchrec_opt.state[tables[0]]["sum"].squeeze(1))
    assert_close(fused.linear_optimizer_state0, torchrec_opt.state[tables[1]]["sum"].squeeze(1))


def test_rowwise_adam_record_is_smaller_than_adams():
    # K = 16, float32: Adam's record holds V and its two moments (3 x 16), w and its two, and the
    # last step; row-wise Adam's V, its first moment (2 x 16) and four scalars.
    widths = {}
    for name in ("adam", "rowwise_adam"):
        module = EmbeddingFM([100], 16, optimizer=OPTIMIZERS[name]())
        assert module.rows_packed
        widths[name] = _packing.record_layout(module._packed_columns())[0] * 4  # bytes
    assert widths == {"adam": 224, "rowwise_adam": 144}  # 80 bytes (36%) less per row


def test_rowwise_adam_is_a_command_line_choice(capsys):
    assert optim.by_name("rowwise_adam", 0.01).__class__ is optim.RowWiseAdam
    from deepfm_fast.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "rowwise_adam" in capsys.readouterr().out
