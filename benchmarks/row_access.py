"""benchmarks/row_access.c built and loaded through ctypes: the machine's random-row access limit,
for bench_memory_limit.py and for the same-run limits of the fused-step benchmarks."""
import ctypes
import functools
import os
import subprocess
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


@functools.lru_cache(maxsize=None)
def library() -> ctypes.CDLL:
    build_dir = tempfile.mkdtemp(prefix="deepfm_fast_row_access_")
    path = os.path.join(build_dir, "row_access.so")
    subprocess.run(["gcc", "-O3", "-shared", "-fPIC", "-o", path, os.path.join(HERE, "row_access.c")], check=True)
    lib = ctypes.CDLL(path)
    pointer, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.gather_rows.argtypes = [pointer, pointer, i64, i64, pointer]
    lib.update_rows.argtypes = [pointer, pointer, pointer, i64, i64, ctypes.c_float]
    return lib


def ptr(array: np.ndarray) -> ctypes.c_void_p:
    return array.ctypes.data_as(ctypes.c_void_p)
