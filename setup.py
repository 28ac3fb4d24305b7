"""Build deepfm_fast._C: CPU kernels always, CUDA kernels when a CUDA toolkit and a CUDA torch exist.

Environment variables:
  USE_CUDA=0            build CPU kernels only, even where CUDA is available.
  FORCE_CUDA=1          build CUDA kernels even if torch or the toolkit look CPU-only (fails loudly then).
  CUDA_HOME             the CUDA toolkit (set it to /usr/local/cuda: /usr/local/bin/nvcc may be a wrapper).
  TORCH_CUDA_ARCH_LIST  GPU architectures, e.g. "9.0"; defaults to DEFAULT_CUDA_ARCH_LIST with no GPU visible.
  MAX_JOBS              parallel compile jobs for ninja.
  DEEPFM_FAST_DEBUG=1   -O0 -g and device-side line info.
  DEEPFM_FAST_SANITIZE=1  CPU kernels with AddressSanitizer and UndefinedBehaviorSanitizer (-g, frame
                        pointers; undefined behaviour aborts like an ASan error). CPU only: with CUDA
                        kernels to build it fails, set USE_CUDA=0. Python is not instrumented, so the
                        module needs gcc's libasan preloaded: benchmarks/sanitize.sh builds and tests it.
"""
import glob
import os

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
# Ampere to Hopper as SASS plus PTX for newer GPUs; used only when no GPU is visible at build time,
# where cpp_extension would otherwise fail to guess the architecture (IndexError).
DEFAULT_CUDA_ARCH_LIST = "8.0;8.6;8.9;9.0+PTX"


def env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def want_cuda():
    if os.environ.get("USE_CUDA", "").strip() == "0":
        return False
    if env_flag("FORCE_CUDA"):
        return True
    import torch

    return cpp_extension.CUDA_HOME is not None and torch.version.cuda is not None


def cuda_wheel_include_dirs():
    """Headers that pip's CUDA 13 torch wheels keep in site-packages/nvidia/cu13/include (CCCL, cuBLAS...),
    only where the toolkit lacks them (a compiler-only toolkit): with a full toolkit they would come
    first on the include path and shadow its own CCCL and runtime headers with another version's.
    DEEPFM_FAST_CUDA_WHEEL_HEADERS=1 or 0 forces them in or out."""
    forced = os.environ.get("DEEPFM_FAST_CUDA_WHEEL_HEADERS", "").strip()
    if forced == "0":
        return []
    toolkit = cpp_extension.CUDA_HOME or ""
    if forced != "1" and os.path.isfile(os.path.join(toolkit, "include", "cublas_v2.h")):
        return []
    try:
        import nvidia
    except ImportError:
        return []
    dirs = []
    for base in nvidia.__path__:
        dirs += glob.glob(os.path.join(base, "cu[0-9]*", "include"))
    return sorted(d for d in set(dirs) if os.path.isdir(d))


def make_extension():
    debug = env_flag("DEEPFM_FAST_DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # -fopenmp at compile AND link time: without it at::parallel_for silently runs on one thread.
    # No -std: cpp_extension picks the C++ standard the installed torch headers need (C++20 for 2.14).
    # Sanitizers at compile AND link time (the link pulls in libasan and libubsan). A UB report aborts
    # instead of printing and going on: a test that passes after one would otherwise hide it.
    sanitize = env_flag("DEEPFM_FAST_SANITIZE")
    sanitizers = (["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer", "-g"]
                  if sanitize else [])
    cxx_flags = opt + ["-fopenmp", "-fvisibility=hidden"] + sanitizers
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    kwargs = dict(
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=["-fopenmp"] + sanitizers,
    )
    if not want_cuda():
        return cpp_extension.CppExtension(
            "deepfm_fast._C", sources, extra_compile_args={"cxx": cxx_flags}, **kwargs
        )
    if sanitize:
        # nvcc's host code would go uninstrumented, and ASan's shadow memory needs other options
        # beside the CUDA driver: a sanitized build is a CPU build, asked for explicitly.
        raise SystemExit("DEEPFM_FAST_SANITIZE=1 instruments the CPU kernels only, but this build would "
                         "compile CUDA kernels too: set USE_CUDA=0")
    import torch

    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
    sources += sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu"))
    nvcc_flags = opt + ["--expt-relaxed-constexpr"] + (["-lineinfo"] if debug else [])
    kwargs["include_dirs"] += cuda_wheel_include_dirs()
    return cpp_extension.CUDAExtension(
        "deepfm_fast._C", sources, extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, **kwargs
    )


setup(
    ext_modules=[make_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
