"""Builds and loads the SIMT emulator's op library (tests/emu), cached under build/emu."""

from __future__ import annotations

import functools
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMU_DIR = os.path.join(ROOT, "tests", "emu")
KERNEL_HEADERS = ("compat.cuh", "warp.cuh", "attention.cuh", "flash_attention.cuh", "flash_attention_bwd.cuh",
                  "ffma_attention.cuh", "channel_attention.cuh", "host.h")


@functools.lru_cache(maxsize=None)
def load():
    """The compiled emulator module (torch.utils.cpp_extension.load; rebuilt when a source changes)."""
    from torch.utils.cpp_extension import load as load_extension

    build_dir = os.path.join(ROOT, "build", "emu")
    os.makedirs(build_dir, exist_ok=True)
    return load_extension(
        name="attnseg_simt_emu",
        sources=[os.path.join(EMU_DIR, "emu_ops.cpp")],
        extra_include_paths=[EMU_DIR],
        extra_cflags=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        build_directory=build_dir,
        verbose=os.environ.get("ATTNSEG_EMU_VERBOSE") == "1",
    )
