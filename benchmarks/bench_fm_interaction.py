"""W1: the FM layer on pre-gathered embeddings [B, F, K] (benchmarks/README.md).

Fused op vs the eager reference vs torch.compile(reference), forward and forward+backward, with
the same-run memory limit of forward+backward (`limit_copy`: read [B, F, K] once, write it once).
Run (CPU, one thread):
    OMP_WAIT_POLICY=PASSIVE python -m pytest benchmarks/bench_fm_interaction.py --benchmark-only \
        --benchmark-json benchmarks/results/fm_interaction_cpu.json
DEEPFM_FAST_BENCH_FULL=1 runs the whole W1 grid; DEEPFM_FAST_BENCH_DEVICE=cuda runs on the GPU.
"""
import itertools
import os

import pytest
import torch

from conftest import alternating_medians, synchronize
from deepfm_fast import ops, reference
from recording import alternating_info

DEVICE = os.environ.get("DEEPFM_FAST_BENCH_DEVICE", "cpu")
DTYPE = getattr(torch, os.environ.get("DEEPFM_FAST_BENCH_DTYPE", "float32"))
TARGET = (4096, 39, 16)  # the target: >= 5x eager and faster than torch.compile, fwd+bwd
if os.environ.get("DEEPFM_FAST_BENCH_FULL"):
    SHAPES = list(itertools.product([512, 4096, 16384], [10, 26, 39], [10, 16, 64]))
elif DEVICE == "cuda":
    SHAPES = [(4096, 39, 16), (65536, 39, 16), (65536, 26, 64)]
else:
    SHAPES = [(512, 26, 16), (4096, 26, 16), TARGET, (16384, 26, 10), (4096, 10, 64)]
# torch.compile costs ~10 s per shape here: compare with it on the target shape only (all with FULL).
COMPILED_SHAPES = SHAPES if os.environ.get("DEEPFM_FAST_BENCH_FULL") else [TARGET, SHAPES[-1]]


def make_impls(shape):
    impls = {"fused": ops.fm_interaction, "reference": reference.fm_interaction}
    if shape in COMPILED_SHAPES:
        torch._dynamo.reset()
        impls["compiled_reference"] = torch.compile(reference.fm_interaction, dynamic=False)
    return impls


def make_emb(shape):
    return torch.randn(shape, device=DEVICE, dtype=DTYPE, requires_grad=True)


def step_fn(fn, emb, backward):
    def step():
        if backward:
            out = fn(emb)
            out.backward(torch.ones_like(out))
            emb.grad = None
        else:
            with torch.no_grad():
                fn(emb)

    return step


def check_against_reference(fn, emb):
    expected = reference.fm_interaction(emb.detach().double())
    tolerance = 1e-3 if emb.dtype in (torch.float32, torch.float64) else 5e-2
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(fn(emb).detach().double(), expected, rtol=tolerance, atol=tolerance * scale)


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward_backward"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-F{}-K{}".format(*s))
def test_w1(benchmark, shape, backward):
    """Times the fused op (pytest-benchmark) and records the alternating medians of all impls."""
    emb = make_emb(shape)
    impls = make_impls(shape)
    for fn in impls.values():
        check_against_reference(fn, emb)
    steps = {name: step_fn(fn, emb, backward) for name, fn in impls.items()}
    if backward:  # the same-run memory limit of forward + backward: read the input, write a gradient
        gradient = torch.empty_like(emb)
        steps["limit_copy"] = lambda: gradient.copy_(emb.detach())
    medians = alternating_medians(steps, device=DEVICE)
    benchmark.group = f"W1 {'fwd+bwd' if backward else 'fwd'} {DEVICE} {DTYPE}".replace("torch.", "")
    benchmark.extra_info.update(shape=list(shape), device=DEVICE, dtype=str(DTYPE),
                                **alternating_info(medians, fused="fused", digits=4))
    fused = steps["fused"]
    benchmark.pedantic(lambda: (fused(), synchronize(DEVICE)), rounds=30, warmup_rounds=2)
