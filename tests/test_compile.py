"""torch.compile(fullgraph=True) over a DeepFM training step in the fused and sparse table modes:
the forward, the backward and the fused update trace without a graph break, and several compiled
steps equal the eager ones."""
import copy

import pytest
import torch
import torch.nn.functional as F

import deepfm_fast
from deepfm_fast.data import iterate_batches, make_synthetic
from deepfm_fast.models import DeepFM

pytestmark = pytest.mark.skipif(not deepfm_fast._backend.compiled(), reason="deepfm_fast._C is not built")


def _optimizers(model, mode):
    opts = [torch.optim.Adam(model.dense_parameters(), lr=0.01)]
    if mode == "sparse_adam":
        opts.append(torch.optim.SparseAdam(model.sparse_parameters(), lr=0.01))
    return opts


# adam: the default (catch-up copies in the forward, update in the backward); lazy_adam and
# rowwise_adagrad: the other update paths; sparse_adam: sparse gradients from a compiled backward.
@pytest.mark.parametrize("mode", ["adam", "lazy_adam", "rowwise_adagrad", "sparse_adam"])
def test_training_step_compiles_fullgraph_and_equals_eager(mode):
    torch._dynamo.reset()
    data = make_synthetic(2000, seed=0)
    torch.manual_seed(0)
    l2 = 0.0 if mode == "sparse_adam" else 0.01  # sparse + L2 does not compile (see CTRModel.forward)
    eager = DeepFM(data.fields, 4, hidden_units=(16,), batch_norm=True, table_optimizer=mode,
                   l2_embedding=l2).double()
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: any graph break is an error
    pairs = [(eager, _optimizers(eager, mode)), (compiled, _optimizers(model, mode))]
    for _, batch in zip(range(4), iterate_batches(data.train, 64)):
        for call, optimizers in pairs:
            logits, penalty = call(batch, return_penalty=True)
            loss = F.binary_cross_entropy_with_logits(logits, batch.labels.double()) + penalty
            for opt in optimizers:
                opt.zero_grad()
            loss.backward()
            for opt in optimizers:
                opt.step()
    eager.eval()
    model.eval()
    if model.fused:
        assert int(model.embedding.optimizer_step) == 4
    compiled_state = model.state_dict()
    for key, value in eager.state_dict().items():
        if not value.is_floating_point():
            assert torch.equal(value, compiled_state[key]), key
            continue
        # The tables to float64 round-off; the DNN less tightly: the gradient of a bias before batch
        # norm is float noise (~1e-17), which Adam scales up, and inductor sums in its own order.
        tolerance = dict(atol=1e-12, rtol=1e-10) if key.startswith("embedding.") else dict(atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(compiled_state[key], value, **tolerance, msg=lambda m, key=key: f"{key}: {m}")


def test_sparse_gradients_with_l2_name_why_they_do_not_compile():
    torch._dynamo.reset()
    data = make_synthetic(500, seed=0)
    model = DeepFM(data.fields, 4, hidden_units=(8,), table_optimizer="sparse_adam", l2_embedding=0.01)
    with pytest.raises(Exception, match="table_optimizer='sparse_adam' with l2_embedding > 0 does not compile"):
        torch.compile(model, fullgraph=True)(next(iterate_batches(data.train, 16)), return_penalty=True)
