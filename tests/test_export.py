"""Serving routes (deepfm_fast.export): ONNX with both exporters, run by onnxruntime; TorchScript;
an AOTInductor package loaded in Python (and from C++ where the example is built)."""
import importlib.util
import io
import os
import subprocess

import pytest
import torch

import deepfm_fast
from deepfm_fast import EmbeddingFM, FMInteraction
from deepfm_fast.data import Batch, to_csr
from deepfm_fast.export import ServingModel
from deepfm_fast.features import MultiHotField, NumericField, SparseField
from deepfm_fast.models import DeepFM
from deepfm_fast.optim import Adam
from testing import random_csr

ONNX_MODULES = ("onnx", "onnxscript", "onnxruntime")
needs_onnx = pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ONNX_MODULES),
                                reason="the onnx extra is not installed: pip install -e '.[onnx]'")
exporters = pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript_exporter", "dynamo_exporter"])
EXACT = dict(atol=1e-5, rtol=1e-5)  # float32


def onnx_session(model, args, names, dynamo):
    """Exports ``model`` with dim 0 of every input dynamic (``names``: ``"input:dim"``, None for a None
    argument); returns an onnxruntime session, after checking that every node is a standard ONNX op."""
    import onnx
    import onnxruntime

    if dynamo:
        dims = {}
        dynamic = tuple(None if name is None else {0: dims.setdefault(name.split(":")[1],
                                                                      torch.export.Dim(name.split(":")[1], min=2))}
                        for name in names)
        proto = torch.onnx.export(model, args, dynamo=True, dynamic_shapes=dynamic, verbose=False).model_proto
    else:
        f = io.BytesIO()
        names = [name for name in names if name is not None]
        torch.onnx.export(model, args, f, dynamo=False, input_names=names,
                          dynamic_axes={name: {0: name.split(":")[1]} for name in names})
        proto = onnx.load_from_string(f.getvalue())
    custom = {(n.domain, n.op_type) for n in proto.graph.node if n.domain not in ("", "ai.onnx")}
    assert not custom, f"non-standard ONNX ops in the graph: {custom}"
    return onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def run_onnx(session, *inputs):
    feeds = {arg.name: t.numpy() for arg, t in zip(session.get_inputs(), inputs)}
    return torch.from_numpy(session.run(None, feeds)[0])


class FieldsModel(torch.nn.Module):
    """A user's model holding an EmbeddingFM: ids [B, F] (and values), or global CSR bags."""

    def __init__(self, embedding):
        super().__init__()
        self.embedding = embedding

    def forward(self, indices, offsets=None, per_sample_weights=None):
        if offsets is None:
            return self.embedding(indices, per_sample_weights=per_sample_weights)
        return self.embedding(indices, offsets, per_sample_weights, global_ids=True)


def trained_embedding(**kwargs):
    torch.manual_seed(0)
    emb = EmbeddingFM([13, 7, 5, 9], 4, init_std=0.3, **kwargs)
    with torch.no_grad():
        emb.linear_weight.normal_(0, 0.3)
        emb.bias.fill_(0.1)
    return emb.eval()


def local_ids(batch, dims, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, d, (batch,), generator=g) for d in dims], 1)


# -- ONNX ----------------------------------------------------------------------------------------

@needs_onnx
@exporters
@pytest.mark.parametrize("reduce_sum", [True, False])
def test_fm_interaction_onnx_equals_eager(dynamo, reduce_sum):
    fm = FMInteraction(reduce_sum)
    session = onnx_session(fm, (torch.randn(8, 5, 4),), ["emb:batch"], dynamo)
    emb = torch.randn(3, 5, 4)  # another batch size: the batch is dynamic
    torch.testing.assert_close(run_onnx(session, emb), fm(emb), **EXACT)


@needs_onnx
@exporters
@pytest.mark.parametrize("weighted", [False, True])
def test_embedding_fm_single_ids_onnx_equals_eager(dynamo, weighted):
    model = FieldsModel(trained_embedding(pooling=["sum", "mean", "sum", "sum"]))
    ids = local_ids(6, model.embedding.field_dims, seed=1)
    values = torch.rand(6, 4) if weighted else None
    names = ["ids:batch"] + ([None, "values:batch"] if weighted else [])
    session = onnx_session(model, (ids, None, values) if weighted else (ids,), names, dynamo)
    ids2 = local_ids(11, model.embedding.field_dims, seed=2)
    values2 = torch.rand(11, 4) if weighted else None
    with torch.no_grad():
        expected = model(ids2, None, values2)
    actual = run_onnx(session, ids2, values2) if weighted else run_onnx(session, ids2)
    torch.testing.assert_close(actual, expected, **EXACT)


@needs_onnx
@exporters
@pytest.mark.parametrize("mode,pool_first_order", [("field", False), ("field", True), ("feature", False)])
def test_embedding_fm_weighted_bags_onnx_equals_eager(dynamo, mode, pool_first_order):
    model = FieldsModel(trained_embedding(mode=mode, pooling=["sum", "mean", "sum", "mean"],
                                          pool_first_order=pool_first_order))
    rows = model.embedding.weight.shape[0]
    indices, offsets = random_csr(5, 4, rows, max_bag=3, seed=3)  # with empty bags and repeated ids
    values = torch.rand(indices.shape[0])
    session = onnx_session(model, (indices, offsets, values), ["indices:nnz", "offsets:bags", "values:nnz"], dynamo)
    indices2, offsets2 = random_csr(9, 4, rows, max_bag=4, seed=4)
    values2 = torch.rand(indices2.shape[0])
    with torch.no_grad():
        expected = model(indices2, offsets2, values2)
    torch.testing.assert_close(run_onnx(session, indices2, offsets2, values2), expected, **EXACT)


def mixed_fields():
    return [SparseField("user", 11), SparseField("item", 17), MultiHotField("genres", 6, pooling="mean"),
            NumericField("price")]


def mixed_batch(batch, seed):
    g = torch.Generator().manual_seed(seed)
    genres = torch.randint(-1, 6, (batch, 3), generator=g)  # -1: padding
    return Batch(sparse=torch.stack([torch.randint(0, 11, (batch,), generator=g),
                                     torch.randint(0, 17, (batch,), generator=g)], 1),
                 multi_hot=(genres,), numeric=torch.rand(batch, 1, generator=g), labels=torch.zeros(batch))


@needs_onnx
@exporters
def test_deepfm_onnx_equals_eager(dynamo):
    torch.manual_seed(0)
    fields = mixed_fields()
    model = DeepFM(fields, 4, hidden_units=(8, 8), batch_norm=True, init_std=0.3).eval()
    serving = ServingModel(model)
    inputs = to_csr(mixed_batch(6, seed=5), fields)
    session = onnx_session(serving, inputs, ["indices:nnz", "offsets:bags", "values:nnz"], dynamo)
    batch = mixed_batch(10, seed=6)
    with torch.no_grad():
        expected = torch.sigmoid(model(batch))
    torch.testing.assert_close(run_onnx(session, *to_csr(batch, fields)), expected, **EXACT)


@needs_onnx
@exporters
def test_fused_optimizer_module_exports_its_inference_path(dynamo):
    model = FieldsModel(trained_embedding(optimizer=Adam(lr=0.1)).train())
    ids = local_ids(8, model.embedding.field_dims, seed=7)
    for _ in range(2):  # fused Adam steps: rows that later steps skip fall behind until eval() flushes
        model(ids[:4]).sum().backward()
    if dynamo:  # the TorchScript exporter switches to eval mode itself
        with pytest.raises(Exception, match=r"call model.eval\(\) before torch.onnx.export"):
            onnx_session(model, (ids,), ["ids:batch"], dynamo)
    model.eval()
    session = onnx_session(model, (ids,), ["ids:batch"], dynamo)
    with torch.no_grad():
        expected = model(ids)
    torch.testing.assert_close(run_onnx(session, ids), expected, **EXACT)


# -- TorchScript ---------------------------------------------------------------------------------

class UserModel(torch.nn.Module):
    """A scriptable model as a user writes it, with our layer in place of theirs."""

    def __init__(self):
        super().__init__()
        self.fm = FMInteraction()
        self.fm_per_dim = FMInteraction(reduce_sum=False)
        self.linear = torch.nn.Linear(4, 1)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.fm(emb) + self.linear(self.fm_per_dim(emb)) + emb.sum(1).sum(1, keepdim=True)


@pytest.mark.parametrize("make", [lambda: FMInteraction(), lambda: FMInteraction(False), UserModel],
                         ids=["fm", "fm_per_dim", "user_model"])
def test_script_equals_eager_in_values_and_gradients(make):
    torch.manual_seed(0)
    model = make()
    scripted = torch.jit.script(model)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    emb = torch.randn(7, 5, 4, dtype=torch.float64)
    model, loaded = model.double(), loaded.double()
    for candidate in (scripted, loaded):
        x, y = emb.clone().requires_grad_(), emb.clone().requires_grad_()
        out, expected = candidate(x), model(y)
        torch.testing.assert_close(out, expected)
        weight = torch.randn_like(out)
        (grad,), (expected_grad,) = torch.autograd.grad(out, x, weight), torch.autograd.grad(expected, y, weight)
        torch.testing.assert_close(grad, expected_grad)
    if deepfm_fast.backend() == "compiled":  # the scripted graph calls the fused op
        assert "deepfm_fast::fm_interaction" in str(torch.jit.script(FMInteraction()).inlined_graph)


@pytest.mark.parametrize("make", [lambda: EmbeddingFM([3, 4], 2), lambda: FieldsModel(EmbeddingFM([3, 4], 2)),
                                  lambda: DeepFM(mixed_fields(), 2, hidden_units=(4,))],
                         ids=["embedding_fm", "holder", "deepfm"])
def test_script_refuses_embedding_fm_naming_the_alternatives(make):
    with pytest.raises(RuntimeError, match="EmbeddingFM cannot be compiled by torch.jit.script.*torch.jit.trace, "
                                           "torch.export or torch.compile"):
        torch.jit.script(make())


def test_trace_of_embedding_fm_equals_eager():
    model = FieldsModel(trained_embedding())
    traced = torch.jit.trace(model, (local_ids(4, model.embedding.field_dims, seed=8),))
    ids = local_ids(9, model.embedding.field_dims, seed=9)
    torch.testing.assert_close(traced(ids), model(ids))


# -- AOTInductor ---------------------------------------------------------------------------------

AOTI_SERVE = os.environ.get("DEEPFM_FAST_AOTI_SERVE")  # examples/aoti_serve, built (benchmarks/serving_cpu.py)


@pytest.fixture(scope="module")
def aoti_package(tmp_path_factory):
    """A small DeepFM, exported and compiled to an AOTInductor package (about a minute: Inductor
    compiles its C++), with the model and its fields."""
    torch.manual_seed(0)
    fields = [SparseField(f"f{i}", 20 + i) for i in range(5)]
    serving = ServingModel(DeepFM(fields, 4, hidden_units=(8,), init_std=0.3))
    ids = local_ids(8, [f.vocab_size for f in fields], seed=10)
    program = torch.export.export(serving, (ids,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    path = str(tmp_path_factory.mktemp("aoti") / "deepfm.pt2")
    return torch._inductor.aoti_compile_and_package(program, package_path=path), serving, fields


def test_aoti_package_in_python_equals_eager(aoti_package):
    package, serving, fields = aoti_package
    runner = torch._inductor.aoti_load_package(package)
    ids = local_ids(13, [f.vocab_size for f in fields], seed=11)  # another batch size
    with torch.no_grad():
        torch.testing.assert_close(runner(ids), serving(ids), **EXACT)


@pytest.mark.skipif(AOTI_SERVE is None, reason="set DEEPFM_FAST_AOTI_SERVE to a built examples/aoti_serve "
                                               "(benchmarks/serving_cpu.py builds it and runs the same check)")
def test_aoti_package_served_from_cpp_equals_python(aoti_package, tmp_path):
    package, serving, fields = aoti_package
    ids = local_ids(13, [f.vocab_size for f in fields], seed=12)
    with torch.no_grad():
        serving(ids).numpy().tofile(tmp_path / "expected.bin")
    ids.numpy().tofile(tmp_path / "ids.bin")
    done = subprocess.run([AOTI_SERVE, package, str(tmp_path / "ids.bin"), str(len(fields)),
                           str(tmp_path / "expected.bin")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr  # it fails when C++ and Python differ by > 1e-5
    assert "max |C++ - Python|" in done.stdout
