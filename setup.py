"""Build of attnseg's compiled ops (attnseg._C).

Environment:
  MAX_JOBS                parallel compile jobs (default: from cores and memory)
  ATTNSEG_SKIP_CUDA=1     never build CUDA sources (there are none yet: the CPU build only)
  ATTNSEG_DEBUG=1         -O0 -g
Nothing is downloaded during the build.
"""

import glob
import os

from setuptools import setup

from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def default_max_jobs() -> str:
    cores = os.cpu_count() or 1
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = 8
    # a C++ TU including ATen takes ~1.5 GiB to compile
    return str(max(1, min(cores, int(mem_gib // 2))))


os.environ.setdefault("MAX_JOBS", default_max_jobs())

debug = os.environ.get("ATTNSEG_DEBUG") == "1"
cxx_flags = ["-O0", "-g"] if debug else ["-O3"]
# -fopenmp: at::parallel_for is a header template whose `omp parallel` compiles into this
# library; without the flag it runs serially.
cxx_flags += ["-fopenmp", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math", "-Wall", "-Wextra", "-Wno-unused-parameter"]

sources = [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))]
sources += [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))]

setup(
    ext_modules=[
        CppExtension(
            name="attnseg._C",
            sources=sources,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
