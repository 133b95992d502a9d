"""Build of attnseg's compiled ops (attnseg._C): the CPU kernels always, the CUDA kernels when
they can be compiled. No GPU is needed to build, and nothing is downloaded.

Environment:
  MAX_JOBS                parallel compile jobs (default: from cores and memory)
  ATTNSEG_SKIP_CUDA=1     never build the CUDA sources
  ATTNSEG_FORCE_CUDA=1    build them, and fail if that is impossible (CI sets this)
  CUDA_HOME / CUDA_PATH   the CUDA toolkit (default: found from nvcc, else /usr/local/cuda)
  TORCH_CUDA_ARCH_LIST    GPU architectures (default "8.0;8.6;9.0+PTX": SASS for Ampere and Hopper,
                          and Hopper's PTX, which newer GPUs (Blackwell) JIT-compile at first use)
  ATTNSEG_DEBUG=1         -O0 -g
Without ATTNSEG_FORCE_CUDA/ATTNSEG_SKIP_CUDA, the CUDA sources are built when torch is a CUDA
build and a CUDA toolkit is found.
"""

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def default_max_jobs() -> str:
    cores = os.cpu_count() or 1
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = 8
    # a C++ TU including ATen takes ~1.5 GiB to compile
    return str(max(1, min(cores, int(mem_gib // 2))))


def is_cuda_toolkit(path: str | None) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h")
    )


def find_cuda_home() -> str | None:
    """The CUDA toolkit root. `nvcc` on PATH may be a wrapper script (e.g. /usr/local/bin/nvcc
    exec-ing /usr/local/cuda-13.0/bin/nvcc), so its folder's parent is only a candidate: every
    candidate must hold bin/nvcc and include/cuda_runtime.h."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        try:  # a wrapper script: look for the real nvcc it execs
            with open(nvcc, encoding="utf-8", errors="ignore") as f:
                for word in f.read(4096).split():
                    if word.endswith("/bin/nvcc"):
                        candidates.append(os.path.dirname(os.path.dirname(word)))
        except OSError:
            pass
    candidates.append("/usr/local/cuda")
    for c in candidates:
        if is_cuda_toolkit(c):
            return os.path.realpath(c)
    return None


os.environ.setdefault("MAX_JOBS", default_max_jobs())
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;8.6;9.0+PTX")
cuda_home = find_cuda_home()
if cuda_home:
    # must be set before torch.utils.cpp_extension is imported: it fixes CUDA_HOME at import
    os.environ["CUDA_HOME"] = cuda_home

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

force_cuda = os.environ.get("ATTNSEG_FORCE_CUDA") == "1"
skip_cuda = os.environ.get("ATTNSEG_SKIP_CUDA") == "1"
if force_cuda and skip_cuda:
    sys.exit("setup.py: ATTNSEG_FORCE_CUDA=1 and ATTNSEG_SKIP_CUDA=1 contradict each other")
if skip_cuda:
    with_cuda, why = False, "ATTNSEG_SKIP_CUDA=1"
elif torch.version.cuda is None:
    with_cuda, why = False, f"torch {torch.__version__} is not a CUDA build"
elif cuda_home is None:
    with_cuda, why = False, "no CUDA toolkit found (set CUDA_HOME)"
else:
    with_cuda, why = True, f"CUDA toolkit {cuda_home}, torch CUDA {torch.version.cuda}"
if force_cuda and not with_cuda:
    sys.exit(f"setup.py: ATTNSEG_FORCE_CUDA=1 but the CUDA sources cannot be built: {why}")
print(f"attnseg: CUDA kernels {'ON' if with_cuda else 'OFF'} ({why}); "
      f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}", flush=True)

debug = os.environ.get("ATTNSEG_DEBUG") == "1"
opt = ["-O0", "-g"] if debug else ["-O3"]
# -fopenmp: at::parallel_for is a header template whose `omp parallel` compiles into this
# library; without the flag it runs serially.
cxx_flags = opt + ["-fopenmp", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math", "-Wall", "-Wextra",
                   "-Wno-unused-parameter"]
# Our CUDA sources build warning-free: nvcc's warnings and the host compiler's -Wall warnings
# are errors (torch 2.14.1's headers pass under these flags too; they come in through -I).
nvcc_flags = opt + ["-std=c++20", "--Werror", "all-warnings", "-Xcompiler", "-Wall,-Werror", "--expt-relaxed-constexpr",
                    "-lineinfo"]


def rel(pattern: str) -> list[str]:
    return [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, pattern)))]


sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
if with_cuda:
    # one .cu per op so they compile in parallel
    extension = CUDAExtension(
        name="attnseg._C",
        sources=sources + rel("csrc/cuda/*.cu"),
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=["-fopenmp"],
    )
else:
    extension = CppExtension(
        name="attnseg._C",
        sources=sources,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )

setup(
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
