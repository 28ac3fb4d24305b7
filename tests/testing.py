"""What every test module shares: the devices and dtypes to test on, and tolerances per dtype.

CUDA is tested only where the extension has a CUDA kernel AND a GPU is visible; the reason a case
is skipped is reported by pytest (-ra).
"""
import datetime
import itertools
import socket
import tempfile
import time
import traceback
from pathlib import Path

import pytest
import torch

import deepfm_fast

HAS_CUDA_KERNELS = deepfm_fast.cuda_kernels()
HAS_GPU = torch.cuda.is_available()

devices = ["cpu", "cuda"]
float_dtypes = [torch.float32, torch.float64]
# Reduced precision: float32 accumulation in the kernels, compared with a float32 reference.
reduced_dtypes = [torch.float16, torch.bfloat16]
all_dtypes = float_dtypes + reduced_dtypes
index_dtypes = [torch.int32, torch.int64]

# Absolute and relative tolerances against the reference computed in float64 (reduced precision:
# about 2x the error of PyTorch's own ops in that dtype, as flash-attention does).
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=2e-2, rtol=2e-2),
    torch.bfloat16: dict(atol=1e-1, rtol=5e-2),
}


def device_param(device):
    """A pytest param for `device`, skipped with the reason where it cannot run."""
    marks = []
    if device == "cuda":
        if not HAS_CUDA_KERNELS:
            marks.append(pytest.mark.skip(reason="deepfm_fast was built without CUDA kernels"))
        elif not HAS_GPU:
            marks.append(pytest.mark.skip(reason="no CUDA GPU visible"))
    return pytest.param(device, marks=marks, id=device)


def device_params(devices_=devices):
    return [device_param(d) for d in devices_]


def product(*lists):
    """Cartesian product for @pytest.mark.parametrize over several lists."""
    return list(itertools.product(*lists))


def rounded_once_tolerance(dtype, scale=1.0):
    """The tolerance between a kernel that accumulates in float32 and rounds its result once to the
    reduced-precision ``dtype``, and the float32 reference rounded to ``dtype``: one unit in the last
    place (``rtol = eps``: the two float32 values may straddle a rounding boundary), plus float32's own
    round-off, ``1e-5`` of ``scale`` (the magnitude the sums pass through). A kernel that sums in
    ``dtype`` is off by several units in the last place and fails it."""
    return dict(rtol=torch.finfo(dtype).eps, atol=1e-5 * scale)


def assert_rounded_once(actual, expected_float32, scale=1.0):
    """``actual`` (float16/bfloat16) equals the float32 oracle rounded to its dtype, within `rounded_once_tolerance`."""
    torch.testing.assert_close(actual.double(), expected_float32.to(actual.dtype).double(),
                               **rounded_once_tolerance(actual.dtype, scale))


# Op tests compare the compiled kernels with the reference: without the build every op runs the
# reference, and such a test would compare it with itself.
requires_compiled = pytest.mark.skipif(not deepfm_fast._backend.compiled(), reason="deepfm_fast._C is not built")


def assert_close(actual, expected, dtype=None):
    """Compares with the tolerance of `dtype` (default: actual's), casting expected to actual's dtype."""
    dtype = dtype or actual.dtype
    torch.testing.assert_close(actual, expected.to(actual.dtype), **TOLERANCES[dtype])


def random_csr(batch, fields, rows, max_bag, index_dtype=torch.int64, device="cpu", seed=0, empty=True,
               generator=None):
    """Random CSR bags (sample-major, bag b*F + f) of 0..max_bag ids (1..max_bag without empty bags).

    ``rows``: one table of that many rows (duplicates within bags and across the batch are certain
    for small tables), or one size per field for local ids (field f's ids in ``0..rows[f]-1``).
    Returns ``(indices, offsets)``; ``generator`` (else one seeded with ``seed``) draws both.
    """
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    counts = torch.randint(0 if empty else 1, max_bag + 1, (batch * fields,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    nnz = int(offsets[-1])
    if isinstance(rows, int):
        indices = torch.randint(0, rows, (nnz,), generator=g)
    else:
        field_of = torch.repeat_interleave(torch.arange(batch * fields) % fields, counts)
        indices = (torch.rand(nnz, generator=g) * torch.tensor(rows)[field_of]).long()
    return indices.to(device, index_dtype), offsets.to(device, index_dtype)


def leaf(t):
    """A copy of ``t`` that requires grad: a fresh leaf per call."""
    return t.detach().clone().requires_grad_(True)


def outputs_and_grads(fn, weight, indices, offsets, psw, lw, fields, mode, pooling, seed=1, coeff_dtype=None):
    """Forward with return_pooled, then grads of a random linear combination of all three outputs (its
    coefficients rounded to `coeff_dtype` first, default the outputs' dtype)."""
    w, x, lin = leaf(weight), (leaf(psw) if psw is not None else None), (leaf(lw) if lw is not None else None)
    out = fn(w, indices, offsets, x, lin, num_fields=fields, mode=mode, pooling=pooling, return_pooled=True)
    g = torch.Generator().manual_seed(seed)
    coeffs = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(coeff_dtype or o.dtype).to(o) for o in out]
    loss = sum((o * c).sum() for o, c in zip(out, coeffs))
    inputs = [t for t in (w, x, lin) if t is not None]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True) if loss.requires_grad else [None] * len(inputs)
    grads = [torch.zeros_like(t) if gr is None else gr for t, gr in zip(inputs, grads)]
    return list(out), grads


# The real CTR data of ../shared/data (never copied into the repository).
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_data_file(relative: str) -> Path:
    """A file of ../shared/data, or a skip with the reason where it is absent."""
    path = SHARED_DATA / relative
    if not path.is_file():
        pytest.skip(f"real data {relative} not found under {SHARED_DATA} (needs ../shared/data beside the repo)")
    return path


# ---- several processes -----------------------------------------------------------------------------

def free_port() -> int:
    """A TCP port of the loopback interface that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(rank: int, world_size: int, port: int, timeout_s: float = 30.0) -> None:
    """gloo on loopback, with a timeout on every collective: a bug fails instead of hanging."""
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))


def _run_rank(rank, fn, world_size, port, out_dir, args):
    torch.set_num_threads(1)
    init_process_group(rank, world_size, port)
    try:
        result = fn(rank, world_size, *args)
    except Exception as error:  # reported to the parent with its message, as a result
        result = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
    finally:
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
        # Every rank done before any tears its group down: a rank destroying gloo while the other
        # still exchanges the last collective's messages aborted now and then ("terminate called
        # without an active exception").
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def run_ranks(fn, world_size=2, args=(), timeout_s=120.0):
    """``fn(rank, world_size, *args)`` in ``world_size`` spawned processes joined by a gloo process
    group; returns each rank's return value (an exception becomes ``{"error": message}``). Fails
    with the ranks' state after ``timeout_s`` instead of hanging. ``fn`` must be importable (a
    module-level function of a test module)."""
    with tempfile.TemporaryDirectory() as out_dir:
        context = torch.multiprocessing.start_processes(
            _run_rank, args=(fn, world_size, free_port(), out_dir, args), nprocs=world_size, join=False,
            start_method="spawn")
        deadline = time.monotonic() + timeout_s
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                pytest.fail(f"{world_size} ranks did not finish within {timeout_s} s (a hang)")
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
