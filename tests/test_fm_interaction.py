"""fm_interaction: the fused op against the reference, in values and gradients, on every device."""
import pytest
import torch

import deepfm_fast
from deepfm_fast import FMInteraction, ops, reference
from testing import (
    TOLERANCES,
    all_dtypes,
    assert_close,
    assert_rounded_once,
    device_params,
    float_dtypes,
    product,
    reduced_dtypes,
    requires_compiled,
)

pytestmark = requires_compiled

# B=0, B=1, F=1, K=1, odd K (3, 100), the specialised K (8, 10, 16, 32, 64) and a large batch.
SHAPES = [(0, 4, 8), (1, 1, 1), (1, 5, 3), (7, 1, 16), (5, 3, 100), (9, 26, 10), (6, 39, 16), (4, 7, 32),
          (3, 13, 64), (11, 4, 17), (20000, 3, 8)]


def random_emb(shape, dtype, device, requires_grad=True):
    return torch.randn(shape, dtype=torch.float64, device=device).to(dtype).requires_grad_(requires_grad)


def reference_value_and_grad(emb, reduce_sum, grad_out, dtype=torch.float64):
    """The reference in `dtype` (float64: the oracle of float32/float64) with its gradient for `grad_out`."""
    emb_ = emb.detach().to(dtype).requires_grad_()
    out = reference.fm_interaction(emb_, reduce_sum)
    out.backward(grad_out.to(dtype))
    return out, emb_.grad


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype,shape,reduce_sum", product(all_dtypes, SHAPES, [True, False]))
def test_values_and_gradients_match_reference(device, dtype, shape, reduce_sum):
    emb = random_emb(shape, dtype, device)
    out = ops.fm_interaction(emb, reduce_sum)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    reduced = dtype in reduced_dtypes
    # float16/bfloat16 accumulate in float32 and round once: the oracle is the reference in float32 on
    # the same rounded inputs, rounded to the dtype (see testing.rounded_once_tolerance).
    expected_out, expected_grad = reference_value_and_grad(emb, reduce_sum, grad_out,
                                                           torch.float32 if reduced else torch.float64)
    assert out.shape == expected_out.shape and out.dtype == dtype and out.device == emb.device
    # The sum over F*K products grows with F and K: scale the tolerance with the magnitude the sums
    # pass through, 0.5 * sum_k (sum_f |e_fk|)^2 per sample.
    magnitude = reference.fm_interaction(emb.detach().double().abs(), True).abs()
    scale = max(1.0, float(magnitude.max())) if magnitude.numel() else 1.0
    if reduced:
        assert_rounded_once(out, expected_out.detach(), scale)
        grad_scale = max(1.0, float(grad_out.abs().max()) * float(emb.detach().double().abs().sum(1).max())) \
            if emb.numel() else 1.0
        assert_rounded_once(emb.grad, expected_grad, grad_scale)
        return
    torch.testing.assert_close(out.double(), expected_out, atol=TOLERANCES[dtype]["atol"] * scale,
                               rtol=TOLERANCES[dtype]["rtol"])
    assert_close(emb.grad, expected_grad)


def test_reduced_precision_check_catches_sums_in_half_precision():
    """The check above fails a kernel that sums the fields in float16/bfloat16 instead of float32."""
    for dtype in reduced_dtypes:
        emb = random_emb((9, 26, 10), dtype, "cpu", requires_grad=False)
        s, q = torch.zeros(9, 10, dtype=dtype), torch.zeros(9, 10, dtype=dtype)
        for f in range(26):  # the running sums kept in the reduced dtype
            s, q = s + emb[:, f], q + emb[:, f] * emb[:, f]
        half_sums = (0.5 * (s * s - q)).float().sum(1).to(dtype)
        expected, _ = reference_value_and_grad(emb, True, torch.ones(9), torch.float32)
        scale = float(reference.fm_interaction(emb.double().abs(), True).max())
        assert_rounded_once(ops.fm_interaction(emb), expected.detach(), scale)
        with pytest.raises(AssertionError, match="Mismatched elements"):
            assert_rounded_once(half_sums, expected.detach(), scale)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("reduce_sum", [True, False])
def test_gradcheck_float64(device, reduce_sum):
    emb = random_emb((4, 5, 7), torch.float64, device)
    fn = lambda e: ops.fm_interaction(e, reduce_sum)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (emb,))
    assert torch.autograd.gradgradcheck(fn, (emb,))


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("reduce_sum", [True, False])
def test_opcheck(device, reduce_sum):
    emb = random_emb((3, 4, 5), torch.float32, device)
    torch.library.opcheck(torch.ops.deepfm_fast.fm_interaction.default, (emb, reduce_sum))
    grad_shape = (3,) if reduce_sum else (3, 5)
    grad_out = torch.randn(grad_shape, device=device)
    torch.library.opcheck(torch.ops.deepfm_fast.fm_interaction_backward.default, (grad_out, emb.detach()))


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", float_dtypes)
def test_non_contiguous_and_expanded_inputs(device, dtype):
    base = random_emb((6, 16, 5), dtype, device, requires_grad=False)
    transposed = base.transpose(1, 2).requires_grad_()  # [6, 5, 16], not contiguous
    expanded = random_emb((1, 5, 16), dtype, device).expand(6, 5, 16)  # stride 0 over the batch
    sliced = random_emb((6, 5, 32), dtype, device, requires_grad=False)[:, :, ::2].requires_grad_()
    for emb in (transposed, expanded, sliced):
        assert not emb.is_contiguous()
        out = ops.fm_interaction(emb)
        grad_out = torch.randn_like(out)
        (grad,) = torch.autograd.grad(out, emb, grad_out, retain_graph=True)
        expected_out, expected_grad = reference_value_and_grad(emb, True, grad_out)
        assert_close(out, expected_out)
        assert grad.shape == emb.shape
        assert_close(grad, expected_grad)  # every sample's gradient, not only their sum
        if not emb.is_leaf:  # the expanded case: the [1, F, K] base accumulates the samples' gradients
            base = emb._base
            out.backward(grad_out)
            assert base.grad.shape == (1, 5, 16)
            assert_close(base.grad, expected_grad.sum(0, keepdim=True))


@pytest.mark.parametrize("device", device_params())
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()

    def loss_fn(emb):
        return ops.fm_interaction(emb).square().sum() + ops.fm_interaction(emb, False).sum()

    compiled = torch.compile(loss_fn, fullgraph=True, dynamic=False)
    emb = random_emb((8, 6, 16), torch.float32, device)
    (grad,) = torch.autograd.grad(compiled(emb), emb)
    emb_ref = emb.detach().clone().requires_grad_()
    expected = reference.fm_interaction(emb_ref).square().sum() + reference.fm_interaction(emb_ref, False).sum()
    (expected_grad,) = torch.autograd.grad(expected, emb_ref)
    assert_close(grad, expected_grad)


def test_module_matches_deepctr_and_pytorch_fm_formulas():
    # Their layers, as published (DeepCTR-Torch FM.forward; pytorch-fm FactorizationMachine.forward).
    def deepctr_fm(x):
        square_of_sum = torch.pow(torch.sum(x, dim=1, keepdim=True), 2)
        sum_of_square = torch.sum(x * x, dim=1, keepdim=True)
        return 0.5 * torch.sum(square_of_sum - sum_of_square, dim=2, keepdim=False)

    def torchfm_fm(x, reduce_sum):
        ix = torch.sum(x, dim=1) ** 2 - torch.sum(x**2, dim=1)
        return 0.5 * (torch.sum(ix, dim=1, keepdim=True) if reduce_sum else ix)

    emb = torch.randn(64, 26, 16, dtype=torch.float64)
    assert FMInteraction()(emb).shape == (64, 1)
    assert FMInteraction(reduce_sum=False)(emb).shape == (64, 16)
    assert_close(FMInteraction()(emb), deepctr_fm(emb))
    assert_close(FMInteraction()(emb), torchfm_fm(emb, True))
    assert_close(FMInteraction(reduce_sum=False)(emb), torchfm_fm(emb, False))


def test_module_matches_installed_deepctr_torch_and_torchfm():
    deepctr_fm = pytest.importorskip("deepctr_torch.layers.interaction", reason="deepctr-torch not installed").FM
    torchfm_layer = pytest.importorskip("torchfm.layer", reason="torchfm not installed")
    emb = torch.randn(64, 26, 16, dtype=torch.float64)
    assert_close(FMInteraction()(emb), deepctr_fm()(emb))
    assert_close(FMInteraction()(emb), torchfm_layer.FactorizationMachine(reduce_sum=True)(emb))
    assert_close(FMInteraction(False)(emb), torchfm_layer.FactorizationMachine(reduce_sum=False)(emb))


@pytest.mark.parametrize(
    "emb,match",
    [
        (torch.randn(4, 5), r"emb must be a 3-D tensor"),
        (torch.randn(2, 3, 4, 5), r"emb must be a 3-D tensor"),
        (torch.ones(4, 5, 6, dtype=torch.int64), r"emb must be a floating-point tensor.*Long"),
    ],
)
def test_bad_inputs_name_the_argument(emb, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.deepfm_fast.fm_interaction(emb)


def test_backward_bad_inputs_name_the_argument():
    emb = torch.randn(4, 5, 6)
    with pytest.raises(RuntimeError, match=r"grad_out must have shape \[B\] or \[B, K\]"):
        torch.ops.deepfm_fast.fm_interaction_backward(torch.randn(3), emb)
    with pytest.raises(RuntimeError, match=r"grad_out has dtype Double but emb has dtype Float"):
        torch.ops.deepfm_fast.fm_interaction_backward(torch.randn(4, dtype=torch.float64), emb)
    # Tensors on different devices ('meta' stands in for a second device on CPU-only machines; it
    # dispatches to the fake kernel, which checks as the CPU and CUDA kernels do).
    with pytest.raises(RuntimeError, match=r"grad_out is on meta but emb is on cpu"):
        torch.ops.deepfm_fast.fm_interaction_backward.default(torch.randn(4, device="meta"), emb)


def test_backend_reports_compiled_kernels():
    assert deepfm_fast.backend() == "compiled"
    assert torch._C._dispatch_has_kernel_for_dispatch_key("deepfm_fast::fm_interaction", "CPU")
