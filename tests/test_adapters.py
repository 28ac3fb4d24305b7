"""Swapping FMInteraction into the CTR models users already have: same weights, same outputs."""
import pytest
import torch

from deepfm_fast import FMInteraction


def test_swap_into_pytorch_fm_deepfm():
    dfm = pytest.importorskip("torchfm.model.dfm", reason="torchfm (pytorch-fm) not installed")
    torch.manual_seed(0)
    model = dfm.DeepFactorizationMachineModel(field_dims=[10, 20, 30], embed_dim=8, mlp_dims=(16,), dropout=0.0).eval()
    x = torch.stack([torch.randint(0, d, (64,)) for d in (10, 20, 30)], 1)
    before = model(x)
    model.fm = FMInteraction(reduce_sum=True)
    torch.testing.assert_close(model(x), before)


def test_swap_into_deepctr_torch_deepfm():
    models = pytest.importorskip("deepctr_torch.models", reason="deepctr-torch not installed")
    inputs = pytest.importorskip("deepctr_torch.inputs")
    torch.manual_seed(0)
    features = [inputs.SparseFeat(f"C{i}", 10, embedding_dim=4) for i in range(3)]
    model = models.DeepFM(features, features, task="binary", device="cpu", dnn_hidden_units=(8,)).eval()
    x = torch.randint(0, 10, (64, 3)).float()
    before = model(x)
    model.fm = FMInteraction()
    torch.testing.assert_close(model(x), before)
