"""``python -m attnseg``: print the environment attnseg runs in (for bug reports). Exits 0.

Shows the attnseg version and install path, torch (and the CUDA it was built with), Python,
CPU threads, whether the native extension loaded (and why not), each backend's availability
per device, the GPU architectures compiled into attnseg's CUDA kernels (SASS and PTX,
read from the library) beside torch's, and the triton version if it can be imported.
"""

from __future__ import annotations

import os
import platform
import sys


def _line(label: str, value) -> None:
    print(f"{label + ':':<28} {value}")


def _triton_version() -> str:
    try:
        import triton  # noqa: PLC0415
    except Exception as exc:  # missing or broken
        return f"not importable ({type(exc).__name__}: {exc})"
    return getattr(triton, "__version__", "unknown version")


def main() -> int:
    os.environ.setdefault("ATTNSEG_QUIET", "1")  # the reason is printed below instead of warned
    import torch

    import attnseg

    print("attnseg environment")
    _line("attnseg", attnseg.__version__)
    _line("attnseg path", os.path.dirname(os.path.abspath(attnseg.__file__)))
    _line("torch", torch.__version__)
    _line("torch built with CUDA", torch.version.cuda or "no (CPU-only build)")
    _line("python", f"{platform.python_version()} ({sys.executable})")
    _line("platform", platform.platform())
    _line("CPU threads (torch)", f"{torch.get_num_threads()} (os.cpu_count() = {os.cpu_count()})")
    if attnseg.native_available():
        _line("native extension", "loaded")
    else:
        _line("native extension", f"NOT loaded: {attnseg.native_unavailable_reason()}")

    cuda_ok = torch.cuda.is_available()
    _line("CUDA available", f"yes ({torch.cuda.device_count()} device(s): {torch.cuda.get_device_name(0)})"
          if cuda_ok else "no")
    from attnseg import _ops  # noqa: PLC0415

    archs = _ops.native_cuda_architectures()
    if not _ops.native_cuda_built():
        _line("attnseg CUDA kernels", "not built (CPU kernels only)")
    elif archs is None:
        _line("attnseg CUDA kernels", "built in (architectures unknown: no readable .nv_fatbin section)")
    else:
        _line("attnseg CUDA kernels", "built in")
        _line("attnseg CUDA SASS", ", ".join(archs["sass"]) or "none")
        _line("attnseg CUDA PTX", ", ".join(archs["ptx"]) or "none (no JIT for newer GPUs)")
    _line("torch CUDA arch list", ", ".join(torch.cuda.get_arch_list()) or "none")
    _line("triton", _triton_version())

    devices = ["cpu"] + (["cuda"] if cuda_ok else [])
    for device in devices:
        print(f"backends on {device}:")
        try:
            avail = attnseg.available_backends(device)
        except Exception as exc:
            print(f"  (could not query: {type(exc).__name__}: {exc})")
            continue
        for name, reason in avail.items():
            if name != "auto":
                print(f"  {name:<10} {'available' if reason is None else 'unavailable: ' + str(reason)}")
        print(f"  {'auto':<10} -> {avail.get('auto')} for a large map without a measured row "
              "(per call: attnseg.explain)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
