"""Static kernel report: what nvcc and Triton produce for the GPU kernels, without a GPU.

    python benchmarks/kernel_report.py [--arch 80,90] [--quick] [--markdown FILE] [--check]

For every CUDA kernel of csrc/cuda (the table ``KERNELS`` below: one entry a kernel) and every
architecture (sm_80, sm_90), the script generates a small translation unit that includes only
the kernel's header and instantiates the kernel template for each dtype (by taking its
address: no torch headers, no signature to spell), compiles it with nvcc
(the flags of setup.py, ``-Xptxas -v``), disassembles it (``cuobjdump -sass``) and prints:

* resources: registers, stack frame, spill stores/loads, static + dynamic shared memory (dynamic:
  the launch geometry, read from the kernel header's own constants by a small host program), and
  the theoretical occupancy from the per-architecture limits of ``ARCHS``;
* the main loop's instruction mix: the natural loops of the SASS control-flow graph (backward
  branches to a dominating block); the main loop is the one holding the most tensor-core
  instructions (then FMA, then the smallest one): tensor-core / FMA / other fp / load-store /
  integer-address / control shares, whether ldmatrix (LDSM) and cp.async (LDGSTS) appear, the
  global load widths, and the densest loop nested in it;
* per op, the issued / useful FLOP ratio of an analytic model of each kernel at the DANet shape
  (printed as a formula) and a modelled time on an A100 and an H100 with its assumptions printed
  (``GPUS``, :func:`modelled_time`), beside an FA2-class reference estimate.

The Triton kernels' autotune configs are compiled offline for the same architectures at DANet
sizes (``attnseg.triton.offline``): registers, spills, shared memory, warps / stages, and whether
the kernel's prune filter keeps them.

``--check`` exits 1 when an ENFORCED row misses a threshold (``THRESHOLDS``); every
row prints PASS / FAIL regardless, and the output says which rows are enforced. Compiles are
cached by source hash under build/kernel_report/ and run in parallel (``--jobs``): a cold run
takes minutes on 2 cores (mostly the Triton configs, ~1.5 s each), a cached one seconds.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parent.parent
CUDA_DIR = REPO_ROOT / "csrc" / "cuda"
BUILD_DIR = REPO_ROOT / "build" / "kernel_report"

# ---------------------------------------------------------------------------------------------
# Shapes, architectures, GPUs, thresholds
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Shape:
    """A DANet head problem: PAM is attention(q[B,Nq,E], k[B,Nk,E], v[B,Nk,Ev]); CAM is on X[B,C,N]."""

    batch: int
    nq: int
    nk: int
    e: int
    ev: int
    c: int

    @property
    def label(self) -> str:
        return f"B={self.batch} N={self.nq}"


SHAPES = (Shape(1, 9216, 9216, 64, 512, 512), Shape(1, 32768, 32768, 64, 512, 512))

DTYPES = {  # label -> (C++ storage type, C++ accumulator type, bytes)
    "fp16": ("__half", "float", 2),
    "bf16": ("__nv_bfloat16", "float", 2),
    "fp32": ("float", "float", 4),
    "fp64": ("double", "double", 8),
}


@dataclasses.dataclass(frozen=True)
class Arch:
    """Per-SM limits used for the theoretical occupancy (CUDA C Programming Guide, table of
    compute capabilities; the occupancy calculator's allocation granularities)."""

    sm: int
    regs_per_sm: int = 65536
    reg_unit: int = 256  # registers are allocated per warp in units of 256
    max_warps: int = 64
    max_blocks: int = 32
    smem_per_sm: int = 0  # the largest carveout
    smem_per_block: int = 0  # opt-in maximum for one block
    smem_reserved: int = 1024  # per block, reserved by the system (sm_80 and later)
    smem_unit: int = 128

    @property
    def label(self) -> str:
        return f"sm_{self.sm}"


ARCHS = {
    80: Arch(80, smem_per_sm=164 * 1024, smem_per_block=163 * 1024),
    90: Arch(90, smem_per_sm=228 * 1024, smem_per_block=227 * 1024),
}


@dataclasses.dataclass(frozen=True)
class Gpu:
    """Peak rates used by the time model (NVIDIA's datasheet figures, dense, no sparsity)."""

    name: str
    arch: int
    sms: int
    clock_hz: float  # the clock at which the peak figures below are quoted
    tensor16: float  # fp16 / bf16 tensor-core FLOP/s, fp32 accumulation
    tensor64: float  # fp64 tensor-core (DMMA) FLOP/s
    fp32: float  # FFMA FLOP/s
    fp64: float  # DFMA FLOP/s
    dram: float  # bytes/s

    def describe(self) -> str:
        return (f"{self.name}: {self.sms} SMs x 4 schedulers at {self.clock_hz / 1e9:.2f} GHz; "
                f"fp16/bf16 tensor {self.tensor16 / 1e12:.0f}, fp64 tensor {self.tensor64 / 1e12:.1f}, "
                f"fp32 FMA {self.fp32 / 1e12:.1f}, fp64 FMA {self.fp64 / 1e12:.1f} TFLOP/s; "
                f"DRAM {self.dram / 1e12:.2f} TB/s")


GPUS = (
    # A100 SXM4: 108 SMs x 2048 tensor FLOP/clk x 1.41 GHz = 312 TFLOP/s
    Gpu("A100-SXM4", 80, 108, 1.41e9, 312e12, 19.5e12, 19.5e12, 9.7e12, 1.9e12),
    # H100 SXM5: 989 TFLOP/s dense fp16 = 132 SMs x 4096 FLOP/clk x 1.83 GHz
    Gpu("H100-SXM5", 90, 132, 1.83e9, 989e12, 67e12, 67e12, 34e12, 3.35e12),
)

# Fraction of the tensor-core (fp16/bf16) or FMA (fp32/fp64) peak that the reference reaches:
# FlashAttention-2 on an A100 reports 50-73 % of peak in the forward and somewhat less in the
# backward; cuBLAS GEMMs (the official DANet CAM) reach about 70 %. fp32/fp64 references are a
# register-blocked FFMA/DFMA kernel at the same fractions of the FMA peak.
REFERENCE_EFFICIENCY = {"attention_fwd": 0.60, "attention_bwd": 0.45, "cam_fwd": 0.70, "cam_bwd": 0.70}
REFERENCE_NAME = {"attention_fwd": "FA2-class", "attention_bwd": "FA2-class", "cam_fwd": "cuBLAS-class",
                  "cam_bwd": "cuBLAS-class"}

# The Triton dtypes whose "no kept config spills" check fails --check: those the prune's measured
# table (attnseg/triton/calibration.py) covers (fp32: IEEE dots, the FMA path).
TRITON_NO_SPILL_ENFORCED = ("fp16", "bf16", "fp32")
# Hopper: (kernel, dtype) whose every kept sm_90 config must issue wgmma (HGMMA in SASS); the
# other kernels' counts are printed. fp32-IEEE dots run on the FMA units, no HGMMA expected.
TRITON_HGMMA_ENFORCED = (("_attn_fwd", "fp16"), ("_attn_fwd", "bf16"))

THRESHOLDS = {
    "flop_ratio": {"attention_fwd": 1.15, "attention_bwd": 1.35},  # issued / useful, per op
    "ffma_share": 0.40,  # fp32 kernels with matrix products: FFMA share of the main loop
}

# ---------------------------------------------------------------------------------------------
# Analytic models: what one launch of a kernel does at a shape
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Work:
    """One launch at one shape: thread blocks, FLOPs issued in matrix products (padding and
    recomputation included), compulsory global-memory bytes (each operand read once, each
    result written once), and the model as a formula."""

    blocks: int
    flops: float
    dram_bytes: float
    formula: str


def _up(n: int, tile: int) -> int:
    return math.ceil(n / tile) * tile


def _chunks(n: int, tile: int) -> int:
    return math.ceil(n / tile)


# Useful FLOPs of each op (what FA2 or cuBLAS would issue) and its formula.
USEFUL = {
    "attention_fwd": (lambda s: 2 * s.batch * s.nq * s.nk * (s.e + s.ev), "2·B·Nq·Nk·(E+Ev)"),
    "attention_bwd": (lambda s: 2 * s.batch * s.nq * s.nk * (3 * s.e + 2 * s.ev),
                      "2·B·Nq·Nk·(3E+2Ev): S, dP, dV, dQ, dK"),
    "cam_fwd": (lambda s: 4 * s.batch * s.c * s.c * s.nq, "4·B·C²·N: X Xᵀ, A X"),
    "cam_bwd": (lambda s: 6 * s.batch * s.c * s.c * s.nq, "6·B·C²·N: dY Xᵀ, Aᵀ dY, (dE+dEᵀ) X"),
}


def old_attention_fwd(s: Shape, k: dict, nbytes: int) -> Work:
    # grid (B·ceil(Nq/rows), ceil(Ev/chunk)); every block streams all keys: S over E (padded to
    # the chunk) for its own Ev slice, then P V over the slice.
    rows, cols, chunk = k["rows"], k["cols"], k["chunk"]
    nq, nk = _up(s.nq, rows), _up(s.nk, cols)
    slices = max(1, _chunks(s.ev, chunk))
    flops = s.batch * 2 * nq * nk * (slices * _up(s.e, chunk) + slices * chunk)
    dram = nbytes * s.batch * (s.nq * s.e + s.nk * (s.e + s.ev) + s.nq * s.ev) + 4 * s.batch * s.nq
    return Work(s.batch * _chunks(s.nq, rows) * slices, flops, dram,
                "ceil(Ev/c)·2NqNk·E + 2NqNk·Ev (S recomputed for every c-wide Ev slice), c = chunk")


def flash_attention_fwd(s: Shape, k: dict, nbytes: int) -> Work:
    # grid (B·ceil(Nq/BM), ceil(Ev/EvTile)); each block streams all keys once: S over the padded
    # head dim for its Ev tile, then P V over the tile (flash_attention.cuh).
    rows, cols, head, ev_tile = k["rows"], k["cols"], k["head_dim"], k["ev_tile"]
    nq, nk = _up(s.nq, rows), _up(s.nk, cols)
    slices = max(1, _chunks(s.ev, ev_tile))
    flops = s.batch * 2 * nq * nk * slices * (head + ev_tile)
    dram = nbytes * s.batch * (s.nq * s.e + slices * s.nk * (s.e + s.ev) + s.nq * s.ev) + 4 * s.batch * s.nq
    return Work(s.batch * _chunks(s.nq, rows) * slices, flops, dram,
                "ceil(Ev/t)·2NqNk·(E+t): S once per t-wide Ev tile (t = 256: twice at Ev = 512)")


def old_attention_delta(s: Shape, k: dict, nbytes: int) -> Work:
    return Work(_chunks(s.batch * s.nq, k["threads"] // 32), 0.0,
                nbytes * 2 * s.batch * s.nq * s.ev + 8 * s.batch * s.nq, "memory only: rowsum(dO∘O)")


def old_attention_dq(s: Shape, k: dict, nbytes: int) -> Work:
    # grid (B·ceil(Nq/rows), ceil(E/chunk)); each block: S (over E), dP (over Ev), dQ slice.
    rows, cols, chunk = k["rows"], k["cols"], k["chunk"]
    nq, nk = _up(s.nq, rows), _up(s.nk, cols)
    e_chunks = _chunks(s.e, chunk)
    flops = s.batch * 2 * nq * nk * e_chunks * (_up(s.e, chunk) + _up(s.ev, chunk) + chunk)
    dram = nbytes * s.batch * (2 * s.nq * s.e + s.nk * (s.e + s.ev) + s.nq * s.ev) + 8 * s.batch * s.nq
    return Work(s.batch * _chunks(s.nq, rows) * e_chunks, flops, dram,
                "ceil(E/c)·2NqNk·(E+Ev+c): S and dP recomputed per c-wide E slice of dQ")


def old_attention_dkv(s: Shape, k: dict, nbytes: int) -> Work:
    # grid (B·ceil(Nk/rows), ceil(E/chunk) + ceil(Ev/chunk)); dK blocks: Sᵀ, dPᵀ, dK slice;
    # dV blocks: Sᵀ, dV slice.
    rows, cols, chunk = k["rows"], k["cols"], k["chunk"]
    nq, nk = _up(s.nq, cols), _up(s.nk, rows)
    e_chunks, ev_chunks = _chunks(s.e, chunk), _chunks(s.ev, chunk)
    e_pad, ev_pad = _up(s.e, chunk), _up(s.ev, chunk)
    flops = s.batch * 2 * nq * nk * (e_chunks * (e_pad + ev_pad + chunk) + ev_chunks * (e_pad + chunk))
    dram = nbytes * s.batch * (s.nq * (s.e + s.ev) + 2 * s.nk * (s.e + s.ev)) + 8 * s.batch * s.nq
    return Work(s.batch * _chunks(s.nk, rows) * (e_chunks + ev_chunks), flops, dram,
                "ceil(E/c)·2NqNk·(E+Ev+c) + ceil(Ev/c)·2NqNk·(E+c): Sᵀ per slice, dPᵀ per dK slice")


def flash_attention_bwd_dv(s: Shape, k: dict, nbytes: int) -> Work:
    # grid (B·ceil(Nk/BN), ceil(Ev/EvTile)); each block holds its K tile and streams all queries
    # once: Sᵀ over the padded head dim, then dV += Pᵀ dO over its Ev tile (flash_attention_bwd.cuh).
    rows, cols, head, ev_tile = k["rows"], k["cols"], k["head_dim"], k["ev_tile"]
    nk, nq = _up(s.nk, rows), _up(s.nq, cols)
    slices = max(1, _chunks(s.ev, ev_tile))
    flops = s.batch * 2 * nq * nk * slices * (head + ev_tile)
    dram = nbytes * s.batch * (slices * (s.nk + s.nq) * s.e + s.nq * s.ev + s.nk * s.ev) + 4 * s.batch * s.nq * slices
    return Work(s.batch * _chunks(s.nk, rows) * slices, flops, dram,
                "ceil(Ev/t)·2NqNk·(E+t): Sᵀ once per t-wide Ev tile of dV (t = 256: twice at Ev = 512)")


def flash_attention_bwd_dkdq(s: Shape, k: dict, nbytes: int) -> Work:
    # grid B·ceil(Nk/BN); each block holds K (registers) and V (smem) and streams all queries once:
    # Sᵀ (E deep), dPᵀ (Ev deep), dK += dSᵀ Q (E wide), the dQ partial dS K (E wide). The fp32 dQ
    # accumulator is zeroed and read back once (compulsory); its per-key-block read-modify-write
    # touches one 8 KiB tile per query tile, hot in L2, and is not counted as DRAM traffic.
    rows, cols, head, ev_tile = k["rows"], k["cols"], k["head_dim"], k["ev_tile"]
    nk, nq = _up(s.nk, rows), _up(s.nq, cols)
    flops = s.batch * 2 * nq * nk * (3 * head + ev_tile)
    accum = 4 * s.batch * nq * head
    dram = (nbytes * s.batch * (s.nk * (s.e + s.ev) + s.nq * (s.e + s.ev) + s.nk * s.e) + 8 * s.batch * s.nq
            + 2 * accum)
    return Work(s.batch * _chunks(s.nk, rows), flops, dram,
                "2NqNk·(3E+Ev): Sᵀ, dPᵀ, dK and dQ once per (query tile, key block), all of Ev resident")


def ffma_attention_bwd_dkdq(s: Shape, k: dict, nbytes: int) -> Work:
    # grid B·ceil(Nk/BN); each block holds K and streams all queries once: Sᵀ (E deep), dPᵀ (Ev deep,
    # V and dO in c-wide chunks, V re-read from L2 per query tile: not DRAM traffic), dK and the dQ
    # partial (E wide); the fp32 dQ accumulator as in flash_attention_bwd_dkdq.
    rows, cols, head, chunk = k["rows"], k["cols"], k["head_dim"], k["chunk"]
    nk, nq = _up(s.nk, rows), _up(s.nq, cols)
    flops = s.batch * 2 * nq * nk * (3 * head + _up(s.ev, chunk))
    accum = 4 * s.batch * nq * head
    dram = (nbytes * s.batch * (s.nk * (s.e + s.ev) + s.nq * (s.e + s.ev) + s.nk * s.e) + 8 * s.batch * s.nq
            + 2 * accum)
    return Work(s.batch * _chunks(s.nk, rows), flops, dram,
                "2NqNk·(3E+Ev): Sᵀ, dPᵀ (Ev in c-wide chunks), dK and dQ once per (query tile, key block)")


def flash_attention_bwd_dq_convert(s: Shape, k: dict, nbytes: int) -> Work:
    return Work(_chunks(s.batch * s.nq * s.e, k["threads"]), 0.0,
                4 * s.batch * _up(s.nq, 32) * 64 + nbytes * s.batch * s.nq * s.e,
                "memory only: dq = scale · fp32 accumulator")


def cam_rows(s: Shape, k: dict, nbytes: int) -> Work:
    # reads the C x C Gram matrix (and A in the backward), writes one C x C result: ~3 planes
    return Work(s.batch * s.c, 0.0, 4 * s.batch * s.c * s.c * 3, "memory only: C x C rows")


@dataclasses.dataclass(frozen=True)
class LibraryCall:
    """A product an op hands to a library (cuBLAS through ATen) instead of a kernel of ours: not
    compiled by the report; modelled at the op's reference efficiency (``REFERENCE_EFFICIENCY``).

    flops: shape -> FLOPs of the call; launches: per op call; call: what the launcher calls.
    """

    name: str
    op: str
    call: str
    flops: Callable[[Shape], float]
    formula: str
    launches: int = 1
    impl: str = ""


def _cam_gemm(s: Shape) -> float:
    return 2 * s.batch * s.c * s.c * s.nq


# csrc/cuda/host.h (channel attention) through DeviceLaunch::gemm (launch.cuh).
LIBRARY_CALLS = (
    LibraryCall("cam_gram (E = X Xᵀ)", "cam_fwd", "at::bmm(x, xᵀ, kFloat) (aten::bmm.dtype)", _cam_gemm, "2·B·C²·N"),
    LibraryCall("cam_apply (Y = A X)", "cam_fwd", "at::bmm(A, x, kFloat), A rounded to x's type", _cam_gemm,
                "2·B·C²·N"),
    LibraryCall("cam_grad_attn (dA = dY Xᵀ)", "cam_bwd", "at::bmm(dY, xᵀ, kFloat)", _cam_gemm, "2·B·C²·N"),
    LibraryCall("cam_grad_x (Aᵀ dY, S X)", "cam_bwd", "2 x at::bmm(., ., kFloat), A and 2^-k S rounded to x's type",
                _cam_gemm, "2 x 2·B·C²·N", launches=2),
)


# ---------------------------------------------------------------------------------------------
# The kernel table: one entry a kernel
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CudaKernel:
    """One CUDA kernel template.

    kernel: its template-id, with {T} for the storage type and {A} for the accumulator type.
    constants: C++ constant expressions (same placeholders), evaluated by a host program compiled
      with the header: ``threads`` (block size) and ``smem`` (dynamic shared memory the launcher
      passes) are required; the rest feed ``model``.
    model: (shape, constants, element bytes) -> Work, for each launch of the kernel per op call.
    op: the op (key of ``USEFUL``) it is a launch of; launches: how many times one op call launches it.
    impl: names the implementation when two of one op are in the table (e.g. "old" and "fa2"):
      the op's FLOP ratio and time sum the kernels of one (op, impl).
    products: whether it computes matrix products (then the tensor-core checks apply to fp16/bf16,
      and the FFMA-share check to fp32).
    enforced: whether ``--check`` fails on this kernel's FAILs (and on its op's FLOP ratio).
    dq_accumulation: for the dK/dQ kernels, "atomic" (fp32 atomic reductions: the main loop must
      hold RED/ATOM .ADD.F32), "atomic pairs" (the same, and on sm_90 all of them the vector form
      REDG .ADD.F32x2) or "ordered" (the deterministic path: none).
    variant_of: the entry this one replaces under torch.use_deterministic_algorithms(True):
      compiled and checked like the others, left out of the op's FLOP and time sums (the same work).
    """

    name: str
    header: str
    kernel: str
    dtypes: tuple[str, ...]
    constants: dict
    model: Callable[[Shape, dict, int], Work]
    op: str
    products: bool
    launches: int = 1
    enforced: bool = False
    impl: str = ""
    dq_accumulation: str = ""
    variant_of: str = ""


_ATTN_TILES = {"threads": "AttnTiles<{T}>::kThreads", "smem": "AttnTiles<{T}>::kSmemBytes",
               "rows": "AttnTiles<{T}>::kRows", "cols": "AttnTiles<{T}>::kCols", "chunk": "AttnTiles<{T}>::kChunk"}
_ROWS = {"threads": "kRowThreads", "smem": "0"}
_ALL = ("fp16", "bf16", "fp32", "fp64")

_FLASH_LAYOUTS = (("channel-first", "true"), ("contiguous", "false"))


def _flash_tiles(tiles: str, rows: str, cols: str) -> dict:
    """The constants of a flash kernel's tile struct: launch geometry and the model's tile sizes."""
    return {"threads": f"{tiles}::kThreads", "smem": f"{tiles}::kSmemBytes", "rows": f"{tiles}::{rows}",
            "cols": f"{tiles}::{cols}", "head_dim": f"{tiles}::kHeadDim", "ev_tile": f"{tiles}::kEvTile"}


def _fa2_impl(major: str) -> str:
    return "fa2" if major == "true" else "fa2 contiguous"


_FFMA_TILES = {**_flash_tiles("FfmaTiles<64, 256>", rows="kBlockM", cols="kBlockN"), "head_dim": "64",
               "ev_tile": "256"}


def _ffma_impl(major: str) -> str:
    return "fa2 ffma" if major == "true" else "fa2 ffma contiguous"


_FFMA_DKDQ_TILES = {"threads": "FfmaDkdqTiles::kThreads", "smem": "FfmaDkdqTiles::kSmemBytes",
                    "rows": "FfmaDkdqTiles::kBlockN", "cols": "FfmaDkdqTiles::kBlockQ",
                    "head_dim": "FfmaDkdqTiles::kHeadDim", "chunk": "FfmaDkdqTiles::kChunk"}


KERNELS = (
    CudaKernel("attention_fwd", "attention.cuh", "attention_fwd_kernel<{T}>", _ALL,
               _ATTN_TILES, old_attention_fwd, "attention_fwd", products=True),
    # The flash-attention-2 forward (fp16/bf16, E <= 128) at the DANet instantiation: E = 64, Ev
    # tiles of 256, both shared-memory layouts (channel-first views, contiguous inputs).
    *(CudaKernel(f"flash_attention_fwd[{layout}]", "flash_attention.cuh",
                 f"flash_attention_fwd_kernel<{{T}}, 64, 256, {major}>", ("fp16", "bf16"),
                 _flash_tiles(f"FlashFwdTiles<64, 256, {major}>", rows="kBlockM", cols="kBlockN"),
                 flash_attention_fwd, "attention_fwd", products=True, enforced=True, impl=_fa2_impl(major))
      for layout, major in _FLASH_LAYOUTS),
    # The flash-structured fp32 forward on CUDA cores (ffma_attention.cuh) at the DANet instantiation:
    # E = 64, Ev tiles of 256, both load layouts (the smem layout is the same).
    *(CudaKernel(f"ffma_attention_fwd[{layout}]", "ffma_attention.cuh",
                 f"ffma_attention_kernel<64, 256, {major}, {major}, false>", ("fp32",), _FFMA_TILES,
                 flash_attention_fwd, "attention_fwd", products=True, enforced=True, impl=_ffma_impl(major))
      for layout, major in _FLASH_LAYOUTS),
    CudaKernel("attention_bwd_delta", "attention.cuh", "attention_bwd_delta_kernel<{T}>", _ALL,
               {**_ATTN_TILES, "smem": "0"}, old_attention_delta, "attention_bwd", products=False),
    CudaKernel("attention_bwd_dq", "attention.cuh", "attention_bwd_dq_kernel<{T}>", _ALL,
               _ATTN_TILES, old_attention_dq, "attention_bwd", products=True),
    CudaKernel("attention_bwd_dkv", "attention.cuh", "attention_bwd_dkv_kernel<{T}>", _ALL,
               _ATTN_TILES, old_attention_dkv, "attention_bwd", products=True),
    # The flash-attention-2 backward (fp16/bf16, E <= 64) at the DANet instantiation: E = 64, the dV
    # kernel with Ev tiles of 256, the dK/dQ kernel with all of Ev = 512 resident, both layouts; the
    # dK/dQ kernel with its default atomic dQ accumulation and, as a variant, the ordered one that
    # runs under torch.use_deterministic_algorithms(True). The delta kernel above (memory only)
    # also runs before them.
    *(kernel
      for layout, major in _FLASH_LAYOUTS
      for kernel in (
          CudaKernel(f"flash_attention_bwd_dv[{layout}]", "flash_attention_bwd.cuh",
                     f"flash_attention_bwd_dv_kernel<{{T}}, 64, 256, {major}>", ("fp16", "bf16"),
                     _flash_tiles(f"FlashBwdDvTiles<64, 256, {major}>", rows="kBlockN", cols="kBlockQ"),
                     flash_attention_bwd_dv, "attention_bwd", products=True, enforced=True, impl=_fa2_impl(major)),
          CudaKernel(f"flash_attention_bwd_dkdq[{layout}]", "flash_attention_bwd.cuh",
                     f"flash_attention_bwd_dkdq_kernel<{{T}}, 64, 512, {major}, false>", ("fp16", "bf16"),
                     _flash_tiles(f"FlashBwdDkdqTiles<64, 512, {major}>", rows="kBlockN", cols="kBlockQ"),
                     flash_attention_bwd_dkdq, "attention_bwd", products=True, enforced=True, impl=_fa2_impl(major),
                     dq_accumulation="atomic pairs"),
          CudaKernel(f"flash_attention_bwd_dkdq_ordered[{layout}]", "flash_attention_bwd.cuh",
                     f"flash_attention_bwd_dkdq_kernel<{{T}}, 64, 512, {major}, true>", ("fp16", "bf16"),
                     _flash_tiles(f"FlashBwdDkdqTiles<64, 512, {major}>", rows="kBlockN", cols="kBlockQ"),
                     flash_attention_bwd_dkdq, "attention_bwd", products=True, enforced=True, impl=_fa2_impl(major),
                     dq_accumulation="ordered", variant_of=f"flash_attention_bwd_dkdq[{layout}]"),
          CudaKernel(f"flash_attention_bwd_dq_convert[{layout}]", "flash_attention_bwd.cuh",
                     "flash_attention_bwd_dq_convert_kernel<{T}>", ("fp16", "bf16"),
                     {"threads": "256", "smem": "0"}, flash_attention_bwd_dq_convert, "attention_bwd",
                     products=False, enforced=True, impl=_fa2_impl(major)),
      )),
    # The fp32 backward (ffma_attention.cuh) at the DANet instantiation: dV from the FFMA kernel (K
    # resident, Q and dO streamed; channel-first Q with a contiguous dO, as PAM passes them), dK and
    # dQ from the FFMA dK/dQ kernel (channel-first Q, K, V; contiguous dO) with the atomic dQ
    # accumulation (the ordered one as its deterministic variant), then the dQ conversion.
    CudaKernel("ffma_attention_bwd_dv[channel-first-q]", "ffma_attention.cuh",
               "ffma_attention_kernel<64, 256, true, false, true>", ("fp32",), _FFMA_TILES,
               flash_attention_bwd_dv, "attention_bwd", products=True, enforced=True, impl="fa2 ffma"),
    *(CudaKernel(f"ffma_attention_bwd_dkdq{suffix}[channel-first-q]", "ffma_attention.cuh",
                 f"ffma_attention_bwd_dkdq_kernel<true, false, true, {ordered}>", ("fp32",), _FFMA_DKDQ_TILES,
                 ffma_attention_bwd_dkdq, "attention_bwd", products=True, enforced=True, impl="fa2 ffma",
                 dq_accumulation=accumulation, variant_of=variant_of)
      for suffix, ordered, accumulation, variant_of in (
          ("", "false", "atomic", ""),
          ("_ordered", "true", "ordered", "ffma_attention_bwd_dkdq[channel-first-q]"))),
    CudaKernel("flash_attention_bwd_dq_convert[fp32]", "flash_attention_bwd.cuh",
               "flash_attention_bwd_dq_convert_kernel<{T}>", ("fp32",), {"threads": "256", "smem": "0"},
               flash_attention_bwd_dq_convert, "attention_bwd", products=False, enforced=True, impl="fa2 ffma"),
    CudaKernel("cam_softmax_fwd", "channel_attention.cuh", "cam_softmax_fwd_kernel<{A}>", _ALL,
               _ROWS, cam_rows, "cam_fwd", products=False),
    CudaKernel("cam_softmax_bwd", "channel_attention.cuh", "cam_softmax_bwd_kernel<{A}>", _ALL,
               _ROWS, cam_rows, "cam_bwd", products=False),
    CudaKernel("cam_symmetrize", "channel_attention.cuh", "cam_symmetrize_kernel<{A}>", _ALL,
               _ROWS, cam_rows, "cam_bwd", products=False),
)
# A new kernel is one entry; e.g. a flash-attention-2 forward with its tiles as header constants:
#   CudaKernel("flash_fwd", "flash_attention.cuh", "flash_fwd_kernel<{T}, 64>", ("fp16", "bf16"),
#              {"threads": "FlashFwd<{T}, 64>::kThreads", "smem": "FlashFwd<{T}, 64>::kSmemBytes",
#               "rows": "FlashFwd<{T}, 64>::kBlockM", "cols": "FlashFwd<{T}, 64>::kBlockN", ...},
#              flash_fwd_model, "attention_fwd", products=True, enforced=True, impl="fa2")
# with flash_fwd_model(shape, constants, element bytes) -> Work like old_attention_fwd above.
NAMESPACE = "attnseg::cuda"

# ---------------------------------------------------------------------------------------------
# SASS: parse, find loops, classify
# ---------------------------------------------------------------------------------------------

# opcodes may hold a lowercase x before a digit (REDG.E.ADD.F32x2, HGMMA.64x128x16.F32)
_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*(?:x[0-9][A-Z0-9_.]*)*)\s*([^;]*);")
_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)")

CLASSES = ("tensor", "fma", "fp", "ldst", "int", "control", "other")
CLASS_TITLES = {"tensor": "tensor core", "fma": "FMA", "fp": "other fp", "ldst": "load/store",
                "int": "int/address", "control": "control/sync", "other": "other"}
_OPCODE_CLASS = {}
for _cls, _names in {
    "tensor": "HMMA DMMA IMMA BMMA HGMMA IGMMA QGMMA BGMMA UTCHMMA UTCQMMA",
    "fma": "FFMA DFMA HFMA2 FFMA2",
    "fp": "FADD FMUL DADD DMUL HADD2 HMUL2 FMNMX DMNMX HMNMX2 FSETP DSETP HSETP2 FSEL FSET MUFU F2F F2FP F2I I2F "
          "I2FP F2IP FRND DSET FCHK HSET2 FSWZADD",
    "ldst": "LDG STG LDS STS LDSM STSM LDGSTS LDGDEPBAR DEPBAR LD ST LDL STL LDC ATOM ATOMG ATOMS RED REDG "
            "UBLKCP UTMALDG UTMASTG SYNCS ULDC",
    "int": "IMAD IADD3 IADD LEA SHF SHL SHR LOP3 LOP ISETP IMNMX IABS SEL MOV PRMT SGXT POPC FLO IMUL BMSK "
           "BREV P2R R2P PLOP3 VIADD VIMNMX IDP IMNMX UIADD3 UIMAD ULEA USHF ULOP3 UISETP UMOV USEL UPRMT "
           "USGXT UFLO UPOPC UBMSK UBREV UP2UR UR2UP R2UR IMAD.WIDE UIMNMX CS2R ULOP UPLOP3 VOTEU",
    "control": "BRA BRX JMP JMX CALL RET EXIT BAR BSSY BSYNC WARPSYNC SHFL VOTE NOP YIELD BPT MEMBAR ERRBAR "
               "CCTL WARPGROUP ELECT ACQBULK",
}.items():
    for _name in _names.split():
        _OPCODE_CLASS[_name] = _cls

# 64-bit address arithmetic: the .X (carry) half of an add/shift pair, and wide multiplies
_WIDE_ADDRESS = re.compile(r"^(IMAD\.WIDE|IADD3\.X|LEA\.HI\.X|IMAD\.X|SHF\.L\.U64|SHF\.R\.U64|UIADD3\.X|ULEA\.HI\.X)")


@dataclasses.dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str  # with modifiers, e.g. HMMA.16816.F32
    operands: str
    guarded: bool = False  # has a guard predicate (@P0 / @!P0)

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]

    @property
    def branch_target(self) -> int | None:
        # CALL too: nvcc leaves some loops through `@P0 CALL.REL.NOINC <exit>` (a call that never returns)
        if self.base not in ("BRA", "JMP", "CALL"):
            return None
        found = re.findall(r"0x([0-9a-f]+)", self.operands)
        return int(found[-1], 16) if found else None


def parse_sass(text: str) -> dict[str, list[Instruction]]:
    """cuobjdump -sass output -> {mangled function name: instructions in address order}."""
    functions: dict[str, list[Instruction]] = {}
    current = None
    for line in text.splitlines():
        m = _FUNCTION.match(line)
        if m:
            current = functions.setdefault(m.group(1), [])
            continue
        m = _INSTRUCTION.match(line)
        if m and current is not None:
            current.append(Instruction(int(m.group(1), 16), m.group(3), m.group(4).strip(), m.group(2) is not None))
    return functions


def classify(opcode: str) -> str:
    base = opcode.split(".")[0]
    return _OPCODE_CLASS.get(base, "other")


@dataclasses.dataclass(frozen=True)
class Loop:
    """A natural loop of the control-flow graph: a backward branch whose target dominates it."""

    start: int  # loop header (the branch target)
    end: int  # address of the backward branch
    instructions: tuple[Instruction, ...]  # the loop's basic blocks, in address order
    blocks: int

    def count(self, cls: str) -> int:
        return sum(1 for i in self.instructions if classify(i.opcode) == cls)

    @property
    def label(self) -> str:
        return f"0x{self.start:04x}-0x{self.end:04x}"


def _unconditional(ins: Instruction) -> bool:
    """A branch or exit that never falls through: no guard predicate, no predicate operand, no .DIV."""
    return ins.guarded is False and ins.base in ("BRA", "JMP", "EXIT", "RET", "BRX", "JMX") and \
        ".DIV" not in ins.opcode and not re.match(r"^!?U?P[T0-9]", ins.operands)


def basic_blocks(code: list[Instruction]) -> tuple[list[list[Instruction]], dict[int, list[int]]]:
    """Split the code into basic blocks; returns (blocks, successors by block index)."""
    if not code:
        return [], {}
    leaders = {code[0].address}
    for k, ins in enumerate(code):
        target = ins.branch_target
        if target is not None:
            leaders.add(target)
        if (target is not None or ins.base in ("EXIT", "RET", "BRX", "JMX")) and k + 1 < len(code):
            leaders.add(code[k + 1].address)
    blocks: list[list[Instruction]] = []
    for ins in code:
        if ins.address in leaders or not blocks:
            blocks.append([])
        blocks[-1].append(ins)
    index = {b[0].address: n for n, b in enumerate(blocks)}
    successors: dict[int, list[int]] = {}
    for n, block in enumerate(blocks):
        last = block[-1]
        succ = []
        target = last.branch_target
        if target is not None and target in index:
            succ.append(index[target])
        if not _unconditional(last) and n + 1 < len(blocks):
            succ.append(n + 1)
        successors[n] = succ
    return blocks, successors


def find_loops(code: list[Instruction]) -> list[Loop]:
    """The natural loops: every CFG edge to a block that dominates its source (a back edge),
    with the blocks that reach the back edge without passing the header."""
    blocks, successors = basic_blocks(code)
    if not blocks:
        return []
    count = len(blocks)
    predecessors: dict[int, list[int]] = {n: [] for n in range(count)}
    for n, succ in successors.items():
        for m in succ:
            predecessors[m].append(n)
    everything = set(range(count))
    dominators = [everything] * count
    dominators[0] = {0}
    changed = True
    while changed:
        changed = False
        for n in range(1, count):
            preds = [dominators[p] for p in predecessors[n]]
            new = (set.intersection(*preds) if preds else set()) | {n}
            if new != dominators[n]:
                dominators[n], changed = new, True
    loops = []
    for n, succ in successors.items():
        for header in succ:
            if header not in dominators[n]:
                continue
            body, stack = {header, n}, ([n] if n != header else [])
            while stack:
                for p in predecessors[stack.pop()]:
                    if p not in body:
                        body.add(p)
                        stack.append(p)
            instructions = tuple(i for b in sorted(body) for i in blocks[b])
            if len(instructions) == 1:  # the `BRA .` that pads the end of every kernel
                continue
            loops.append(Loop(blocks[header][0].address, blocks[n][-1].address, instructions, len(body)))
    return loops


def _weight(loop: Loop) -> tuple[int, int]:
    return loop.count("tensor"), loop.count("fma")


def main_loop(code: list[Instruction]) -> Loop | None:
    """The loop with the most tensor-core instructions, then the most FMA, then the smallest (the
    innermost of equals): for the new kernels the key loop, with everything inside it unrolled.
    Without tensor/FMA instructions in any loop: the largest loop."""
    loops = find_loops(code)
    if not loops:
        return None
    if not any(sum(_weight(lp)) for lp in loops):
        return max(loops, key=lambda lp: len(lp.instructions))
    return max(loops, key=lambda lp: (*_weight(lp), -len(lp.instructions)))


def hot_inner_loop(loop: Loop, code: list[Instruction]) -> Loop | None:
    """The loop nested in ``loop`` with the densest tensor-core (else FMA) work (None if none has
    any): it runs several times per main-loop iteration, so the main loop's static mix undercounts it."""
    unit = "tensor" if loop.count("tensor") else "fma"
    inside = {i.address for i in loop.instructions}
    inner = [lp for lp in find_loops(code) if lp.start in inside and lp.start != loop.start and lp.count(unit)]
    return max(inner, key=lambda lp: (lp.count(unit) / len(lp.instructions), lp.count(unit)), default=None)


def nested_loops(loop: Loop, code: list[Instruction]) -> int:
    inside = {i.address for i in loop.instructions}
    return sum(1 for lp in find_loops(code) if lp.start in inside and lp.start != loop.start)


def load_widths(instructions) -> dict[str, int]:
    """Global loads (LDG and cp.async LDGSTS) by access width in bits."""
    widths: dict[str, int] = {}
    for i in instructions:
        if i.base not in ("LDG", "LDGSTS"):
            continue
        mods = i.opcode.split(".")[1:]
        bits = next((int(m) for m in mods if m in ("64", "128")), None)
        if bits is None:
            bits = next((int(m[1:]) for m in mods if m in ("U8", "S8", "U16", "S16")), 32)
        key = f"{i.base}.{bits}"
        widths[key] = widths.get(key, 0) + 1
    return dict(sorted(widths.items()))


def flops_per_instruction(opcode: str) -> int:
    """FLOPs one warp-wide instruction performs: an m·n·k MMA 2mnk, a (paired) FMA 2 per lane."""
    base = opcode.split(".")[0]
    if base in ("HMMA", "DMMA", "IMMA"):
        shape = next((m for m in opcode.split(".")[1:] if m.isdigit()), "16816")
        # 16816 -> m16 n8 k16, 1688 -> 16 8 8, 884 -> 8 8 4, 1684 -> 16 8 4
        m = 16 if shape.startswith("16") else 8
        rest = shape[2:] if m == 16 else shape[1:]
        n, k = int(rest[0]), int(rest[1:])
        return 2 * m * n * k
    if base == "HFMA2":
        return 128
    return 64  # FFMA / DFMA: 32 lanes x 2


# ---------------------------------------------------------------------------------------------
# Compiling (cached by source hash)
# ---------------------------------------------------------------------------------------------

# setup.py's nvcc flags (without the warnings-as-errors, which are the build's business)
NVCC_FLAGS = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]


def tool(name: str) -> str | None:
    sys.path.insert(0, str(REPO_ROOT))  # the checkout's Python files, as for the Triton sweep
    from attnseg.triton.offline import nvidia_tool

    return nvidia_tool(name)


def _sources_hash() -> str:
    digest = hashlib.sha256()
    for path in sorted(CUDA_DIR.glob("*.cuh")) + sorted((REPO_ROOT / "csrc" / "common").glob("*.h")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _nvcc_version(nvcc: str) -> str:
    return subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]


def _fill(template: str, dtype: str) -> str:
    storage, acc, _ = DTYPES[dtype]
    return template.replace("{T}", storage).replace("{A}", acc)


def translation_unit(entry: CudaKernel, dtype: str) -> str:
    """Includes only the kernel's header and instantiates the kernel (taking its address does)."""
    kernel = _fill(entry.kernel, dtype)
    return (f"// kernel report\n#include \"{entry.header}\"\n"
            f"void* attnseg_kernel_report_instance = reinterpret_cast<void*>(&{NAMESPACE}::{kernel});\n")


@dataclasses.dataclass
class Compiled:
    entry: CudaKernel
    dtype: str
    arch: int
    ok: bool
    log: str = ""
    function: str = ""
    registers: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    static_smem: int = 0
    code: list = dataclasses.field(default_factory=list)
    cached: bool = False


def _parse_ptxas(log: str) -> dict[str, dict]:
    """ptxas -v output -> {mangled name: resources}."""
    found: dict[str, dict] = {}
    current = None
    for line in log.splitlines():
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            current = found.setdefault(m.group(1), {})
            continue
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            current = found.setdefault(m.group(1), {})
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["registers"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            current["static_smem"] = int(s.group(1)) if s else 0
    return found


def _demangle(names: list[str]) -> dict[str, str]:
    filt = shutil.which("c++filt") or tool("cu++filt")
    if not filt or not names:
        return {n: n for n in names}
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def compile_unit(source: str, arch: int, nvcc: str, cuobjdump: str, key_salt: str) -> tuple[dict, bool]:
    """nvcc + ``cuobjdump -sass`` of one translation unit for sm_<arch>, cached by its hash:
    ({ok, log (ptxas -v), sass}, whether it came from the cache)."""
    flags = NVCC_FLAGS + [f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v", "-cubin"]
    key = hashlib.sha256("\n".join([key_salt, source, " ".join(flags)]).encode()).hexdigest()[:20]
    folder = BUILD_DIR / "cuda" / key
    result_file = folder / "result.json"
    if result_file.exists():
        return json.loads(result_file.read_text()), True
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "unit.cu").write_text(source)
    proc = subprocess.run([nvcc, *flags, f"-I{CUDA_DIR}", "-o", "unit.cubin", "unit.cu"], cwd=folder,
                          capture_output=True, text=True)
    saved = {"ok": proc.returncode == 0, "log": proc.stdout + proc.stderr, "sass": ""}
    if saved["ok"]:
        saved["sass"] = subprocess.run([cuobjdump, "-sass", str(folder / "unit.cubin")], capture_output=True,
                                       text=True, check=True).stdout
    result_file.write_text(json.dumps(saved))
    return saved, False


def read_compiled(entry: CudaKernel, dtype: str, arch: int, saved: dict, cached: bool) -> Compiled:
    """The entry's kernel in a compiled unit: its ptxas resources and SASS."""
    result = Compiled(entry, dtype, arch, ok=False, log=saved["log"], cached=cached)
    if not saved["ok"]:
        return result
    functions = parse_sass(saved["sass"])
    resources = _parse_ptxas(saved["log"])
    demangled = _demangle(list(functions))
    wanted = re.sub(r"\s+", "", f"{NAMESPACE}::{_fill(entry.kernel, dtype)}(")
    matches = [n for n, d in demangled.items() if wanted in re.sub(r"\s+", "", d)]
    if len(matches) != 1 and len(functions) == 1:
        matches = list(functions)
    if len(matches) != 1:
        result.log += f"\nkernel report: cannot tell which of {sorted(demangled.values())} is {wanted}"
        return result
    name = matches[0]
    res = resources.get(name, {})
    result.ok = True
    result.function = demangled[name]
    result.code = functions[name]
    for field in ("registers", "stack", "spill_stores", "spill_loads", "static_smem"):
        setattr(result, field, res.get(field, 0))
    return result


def compile_kernel(entry: CudaKernel, dtype: str, arch: int, nvcc: str, cuobjdump: str, key_salt: str) -> Compiled:
    saved, cached = compile_unit(translation_unit(entry, dtype), arch, nvcc, cuobjdump, key_salt)
    return read_compiled(entry, dtype, arch, saved, cached)


def compile_all(work: list[tuple[CudaKernel, str, int]], nvcc: str, cuobjdump: str, key_salt: str,
                pool) -> list[Compiled]:
    """Compile (entry, dtype, arch) triples in the pool; identical units (the same instantiation
    under two names, or one accumulator type for several dtypes) are compiled once."""
    futures = {}
    for entry, dtype, arch in work:
        unit = (translation_unit(entry, dtype), arch)
        if unit not in futures:
            futures[unit] = pool.submit(compile_unit, *unit, nvcc, cuobjdump, key_salt)
    results = []
    for entry, dtype, arch in work:
        saved, cached = futures[(translation_unit(entry, dtype), arch)].result()
        results.append(read_compiled(entry, dtype, arch, saved, cached))
    return results


def probe_constants(entries, dtypes, nvcc: str, key_salt: str) -> dict[tuple[str, str], dict[str, int]]:
    """Evaluates every entry's ``constants`` with the compiler: a host program that includes the
    headers and prints them. {(entry name, dtype): {constant: value}}."""
    headers = sorted({e.header for e in entries})
    lines = ["#include <cstdio>", *(f'#include "{h}"' for h in headers), f"using namespace {NAMESPACE};",
             "int main() {"]
    for e in entries:
        for dtype in dtypes:
            for name, expr in e.constants.items():
                lines.append(f'  std::printf("%s %s %s %lld\\n", "{e.name}", "{dtype}", "{name}", '
                             f"static_cast<long long>({_fill(expr, dtype)}));")
    lines += ["  return 0;", "}"]
    source = "\n".join(lines) + "\n"
    key = hashlib.sha256((key_salt + source).encode()).hexdigest()[:20]
    folder = BUILD_DIR / "probe" / key
    output_file = folder / "constants.txt"
    if not output_file.exists():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "probe.cu").write_text(source)
        proc = subprocess.run([nvcc, "-std=c++20", "--expt-relaxed-constexpr", f"-I{CUDA_DIR}",
                               "-gencode=arch=compute_80,code=sm_80", "-o", "probe", "probe.cu"], cwd=folder,
                               capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"kernel report: the constants of KERNELS do not compile ({folder / 'probe.cu'}):\n"
                             + proc.stderr[-4000:])
        output = subprocess.run([str(folder / "probe")], check=True, capture_output=True, text=True).stdout
        output_file.write_text(output)
    constants: dict[tuple[str, str], dict[str, int]] = {}
    for line in output_file.read_text().splitlines():
        name, dtype, constant, value = line.split()
        constants.setdefault((name, dtype), {})[constant] = int(value)
    return constants


# ---------------------------------------------------------------------------------------------
# Occupancy, checks, time model
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Occupancy:
    blocks: int
    warps: int
    limiter: str


def occupancy(arch: Arch, threads: int, registers: int, smem: int) -> Occupancy:
    warps_per_block = math.ceil(threads / 32)
    per_warp_regs = _up(max(registers, 1) * 32, arch.reg_unit)
    limits = {
        "warps": arch.max_warps // warps_per_block,
        "blocks": arch.max_blocks,
        "registers": (arch.regs_per_sm // per_warp_regs) // warps_per_block,
    }
    block_smem = _up(smem + arch.smem_reserved, arch.smem_unit)
    limits["smem"] = arch.smem_per_sm // block_smem if smem <= arch.smem_per_block else 0
    limiter = min(limits, key=lambda k: limits[k])
    blocks = limits[limiter]
    return Occupancy(blocks, blocks * warps_per_block, limiter)


@dataclasses.dataclass
class Row:
    """One (kernel, dtype, arch) of the report, with everything derived from the compile."""

    compiled: Compiled
    constants: dict
    occupancy: Occupancy | None = None
    loop: Loop | None = None
    inner_loops: int = 0
    hot_inner: Loop | None = None
    counts: dict = dataclasses.field(default_factory=dict)
    checks: dict = dataclasses.field(default_factory=dict)  # name -> (passed, shown value)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def share(self, cls: str) -> float:
        return self.counts.get(cls, 0) / self.total if self.total else 0.0


def analyse(compiled: Compiled, constants: dict) -> Row:
    row = Row(compiled, constants)
    if not compiled.ok:
        row.checks["compiles"] = (False, "compile failed")
        return row
    smem = compiled.static_smem + constants["smem"]
    row.occupancy = occupancy(ARCHS[compiled.arch], constants["threads"], compiled.registers, smem)
    row.loop = main_loop(compiled.code)
    if row.loop is not None:
        row.inner_loops = nested_loops(row.loop, compiled.code)
        row.hot_inner = hot_inner_loop(row.loop, compiled.code)
        row.counts = {cls: row.loop.count(cls) for cls in CLASSES}
    entry, dtype = compiled.entry, compiled.dtype
    clean = compiled.stack == 0 and compiled.spill_stores == 0 and compiled.spill_loads == 0
    row.checks["no stack/spill"] = (clean, f"{compiled.stack}/{compiled.spill_stores}/{compiled.spill_loads}")
    body = set(i.base for i in row.loop.instructions) if row.loop else set()
    if entry.products and dtype in ("fp16", "bf16"):
        for name, opcodes in (("HMMA", {"HMMA", "HGMMA"}), ("LDSM", {"LDSM"}), ("LDGSTS", {"LDGSTS", "UTMALDG"})):
            row.checks[name] = (bool(body & opcodes), "yes" if body & opcodes else "no")
    if entry.products and dtype == "fp32":
        share = row.share("fma")
        row.checks["FFMA share"] = (share >= THRESHOLDS["ffma_share"], f"{share:.0%}")
    if entry.dq_accumulation:
        row.checks["dQ RED"] = _dq_reduction_check(entry.dq_accumulation, compiled.arch,
                                                   row.loop.instructions if row.loop else ())
    return row


def fp32_reductions(instructions) -> list[Instruction]:
    """The fp32 atomic adds among `instructions`: RED / REDG / ATOM / ATOMG with .ADD.F32 (F32x2:
    sm_90's vector form)."""
    return [i for i in instructions if i.base in ("RED", "REDG", "ATOM", "ATOMG") and ".ADD.F32" in i.opcode]


def _dq_reduction_check(accumulation: str, arch: int, instructions) -> tuple[bool, str]:
    """The dK/dQ kernels' dQ path in the main loop: "atomic" needs fp32 atomic reductions there,
    "atomic pairs" too and, on sm_90, only the vector form (red.global.add.v2.f32: F32x2);
    "ordered" none (plain loads and stores behind the counters). Shown: the count, and how many
    are vector ones."""
    reds = fp32_reductions(instructions)
    vector = sum(1 for i in reds if "F32x2" in i.opcode or "F32x4" in i.opcode)
    shown = f"{len(reds)}" + (f" ({vector} x2)" if vector else "")
    if accumulation == "ordered":
        return not reds, shown
    pairs_ok = accumulation != "atomic pairs" or arch < 90 or vector == len(reds)
    return bool(reds) and pairs_ok, shown


def _peak(gpu: Gpu, dtype: str, tensor: bool) -> float:
    if tensor:
        return gpu.tensor64 if dtype == "fp64" else gpu.tensor16
    return gpu.fp64 if dtype == "fp64" else gpu.fp32


@dataclasses.dataclass(frozen=True)
class Timing:
    seconds: float
    bound: str
    parts: dict  # bound name -> seconds
    approximate: bool  # the main loop has inner loops: its static mix is not its dynamic mix

    @property
    def text(self) -> str:
        return f"{'~' if self.approximate else ''}{_ms(self.seconds)} ({self.bound})"


def modelled_time(row: Row, work: Work, gpu: Gpu) -> Timing:
    """T = max(compute, issue, memory), the first two on the busiest SM:
      compute = issued FLOPs / (peak of the main loop's unit: tensor if it issues MMA, else FMA);
      issue   = warp instructions / (SMs x 4 schedulers x clock), warp instructions = issued
                FLOPs / FLOPs per MMA (or FMA) instruction x (main-loop instructions / main-loop MMA
                (or FMA) instructions): the main loop's static mix taken as the dynamic mix;
      memory  = compulsory DRAM bytes / bandwidth (every operand read once: a lower bound).
    Balance: the busiest SM runs ceil(blocks / SMs) blocks, each SM at its full rate whatever its
    occupancy (latency hiding is not modelled); waves = blocks / (SMs x resident blocks per SM)
    are printed beside it."""
    per_sm = math.ceil(work.blocks / gpu.sms) if work.blocks else 1
    fill = work.blocks / (gpu.sms * per_sm) if work.blocks else 1.0
    parts = {"memory": work.dram_bytes / gpu.dram}
    if work.flops and row.loop is not None:
        tensor = row.counts.get("tensor", 0) > 0
        unit = "tensor" if tensor else "fma"
        per_loop = row.counts.get(unit, 0)
        parts["compute"] = work.flops / (_peak(gpu, row.compiled.dtype, tensor) * fill)
        if per_loop:
            # the unit's most frequent opcode (nvcc also emits HFMA2.MMA with zero operands as a move)
            opcode = collections.Counter(i.opcode for i in row.loop.instructions
                                         if classify(i.opcode) == unit).most_common(1)[0][0]
            warp_instructions = work.flops / flops_per_instruction(opcode) * (row.total / per_loop)
            parts["issue"] = warp_instructions / (gpu.sms * 4 * gpu.clock_hz * fill)
    bound = max(parts, key=parts.get)
    return Timing(parts[bound], bound, parts, bool(work.flops) and row.inner_loops > 0)


def reference_time(op: str, shape: Shape, dtype: str, gpu: Gpu) -> float:
    useful = USEFUL[op][0](shape)
    return useful / (REFERENCE_EFFICIENCY[op] * _peak(gpu, dtype, dtype != "fp32"))


# ---------------------------------------------------------------------------------------------
# Triton
# ---------------------------------------------------------------------------------------------


def _triton_hash() -> str:
    import triton

    digest = hashlib.sha256(triton.__version__.encode())
    for path in sorted((REPO_ROOT / "attnseg" / "triton").glob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:20]


def _torch_dtype(name: str):
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def triton_sweep(arch: int, dtype: str, n: int, kept_only: bool, kernels: frozenset | None = None) -> list[dict]:
    """Compile the autotune configs of every Triton kernel launch at DANet sizes for sm_<arch>
    (only the kernels named in ``kernels``, when given). Runs in a worker process (imports torch
    and triton)."""
    import triton

    sys.path.insert(0, str(REPO_ROOT))
    os.environ.setdefault("ATTNSEG_QUIET", "1")
    from attnseg.triton import offline

    cache_file = BUILD_DIR / "triton" / f"{_triton_hash()}-sm{arch}-{dtype}-{n}.json"
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    torch_dtype = _torch_dtype(dtype)
    rows, seen = [], set()
    for kernel, args, kwargs in offline.danet_launches(torch_dtype, n=n, batch=1):
        if kernels is not None and kernel.__name__ not in kernels:
            continue
        mode = ", ".join(f"{k}={v}" for k, v in sorted(kwargs.items()) if isinstance(v, bool))
        if (kernel.__name__, mode) in seen:
            continue
        seen.add((kernel.__name__, mode))
        configs = kernel.configs or [triton.Config({}, num_warps=4, num_stages=2)]
        kept = offline.kept_configs(kernel, args, kwargs, arch)
        for config in configs:
            is_kept = any(config is k or (config.kwargs == k.kwargs and config.num_warps == k.num_warps and
                                          config.num_stages == k.num_stages) for k in kept)
            if kept_only and not is_kept:
                continue
            key = f"{kernel.__name__}|{mode}|{sorted(config.kwargs.items())}|{config.num_warps}|{config.num_stages}"
            # sm_90: count wgmma (HGMMA in SASS) too, for the kept configs only (cuobjdump -sass costs time)
            wants_sass = arch >= 90 and is_kept
            cached = key in cache and (not wants_sass or "hgmma" in cache[key] or "error" in cache[key])
            if not cached:
                try:
                    compiled = offline.compile_config(kernel, args, kwargs, config, arch)
                    regs, stack = offline.resource_usage(compiled)
                    cache[key] = {"registers": regs, "stack": stack, "shared": compiled.metadata.shared}
                    if wants_sass:
                        cache[key]["hgmma"] = offline.count_opcode(offline.sass(compiled), "HGMMA")
                except Exception as exc:  # a config that does not compile is reported, not fatal
                    cache[key] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}
                cache_file.parent.mkdir(parents=True, exist_ok=True)
                cache_file.write_text(json.dumps(cache))
            rows.append({"kernel": kernel.__name__, "mode": mode, "blocks": dict(config.kwargs),
                         "warps": config.num_warps, "stages": config.num_stages, "kept": is_kept,
                         "total": len(configs), "kept_count": len(kept), "shared_limit": offline.SHARED_MEMORY[arch],
                         "cached": cached,
                         **cache[key]})
    return rows


# The Triton kernels whose launches the prune reads from attnseg/triton/calibration.py, with the
# launch's key there (kernel, mode flags, tile widths) built from a sweep row at the DANet shape.
# The sweep runs at torch's defaults (allow_tf32 off: fp32 dots are IEEE).
def _calibration_key(row: dict, dtype: str) -> tuple | None:
    sys.path.insert(0, str(REPO_ROOT))
    from attnseg.triton import pow2
    from attnseg.triton.attention import _bwd_ev_tile, _dq_ev_tile

    flags = dict(part.split("=") for part in row["mode"].split(", ")) if row["mode"] else {}
    block_e, (block_ev, _) = pow2(SHAPES[0].e), _bwd_ev_tile(SHAPES[0].ev)
    if row["kernel"] == "_attn_fwd":
        return ("_attn_fwd", block_e)
    if row["kernel"] == "_attn_bwd_dkdv":
        return ("_attn_bwd_dkdv", flags["COMPUTE_DK"] == "True", flags["COMPUTE_DV"] == "True", block_e, block_ev)
    if row["kernel"] == "_attn_bwd_dq":
        return ("_attn_bwd_dq", flags["EV_SINGLE"] == "True", block_e, _dq_ev_tile(SHAPES[0].ev, _torch_dtype(dtype))[0])
    if row["kernel"] == "_cam_nt_partial":
        return ("_cam_nt_partial", flags["SYMMETRIC"] == "True")
    if row["kernel"] == "_cam_apply":
        return ("_cam_apply",)
    if row["kernel"] == "_cam_grad_x":
        return ("_cam_grad_x",)
    return None


def write_triton_calibration(path: Path, triton_rows: dict, kernels: frozenset | None = None) -> None:
    """attnseg/triton/calibration.py from a ``--triton-all`` sweep: per (arch, dtype, launch key),
    every config that compiled without stack/spills, with its shared memory. A sweep of some
    ``kernels`` only replaces their entries for the swept (arch, dtype) pairs in the table at
    ``path`` and keeps the rest."""
    fresh: dict[tuple, dict] = {}
    for (arch, dtype), rows in sorted(triton_rows.items()):
        for r in rows:
            key = _calibration_key(r, dtype)
            if key is None:
                continue
            clean = fresh.setdefault((arch, dtype, *key), {})
            if "error" not in r and r.get("stack", 0) == 0:
                clean[(tuple(sorted(r["blocks"].items())), r["warps"], r["stages"])] = r["shared"]
    table = fresh
    if kernels is not None and path.exists():
        import runpy

        # the swept kernels' new entries take the place of their old ones; the rest stay in order
        group = lambda key: key[:3]  # noqa: E731  (arch, dtype, kernel)
        replaced = {group(key) for key in fresh} | {(a, d, k) for a, d in triton_rows for k in kernels}
        table, placed = {}, set()
        for key, clean in runpy.run_path(str(path))["CLEAN_CONFIGS"].items():
            if group(key) not in replaced:
                table[key] = clean
            elif group(key) not in placed:
                placed.add(group(key))
                table.update((k, v) for k, v in fresh.items() if group(k) == group(key))
        table.update((k, v) for k, v in fresh.items() if group(k) not in placed)
    lines = [f"    {key!r}: {{" + "".join(f"\n        {sig!r}: {shared}," for sig, shared in sorted(clean.items()))
             + "\n    }," for key, clean in table.items()]
    # the specialisation classes of each kernel's integer arguments in the swept launches
    import torch

    from attnseg.triton import offline
    from attnseg.triton.calibration import int_class

    classes: dict[str, dict] = {}
    for kernel, args, kwargs in offline.danet_launches(torch.float16, n=SHAPES[0].nq, batch=1):
        named = {**dict(zip(kernel.compiled_jit_function().arg_names, args)), **kwargs}
        classes[kernel.__name__] = {k: int_class(v) for k, v in named.items() if type(v) is int}
    int_lines = [f"    {name!r}: {dict(sorted(c.items()))!r}," for name, c in sorted(classes.items())]
    dtypes = ", ".join(sorted({key[1] for key in table} | {dtype for _, dtype in triton_rows}))
    archs = ", ".join(f"sm_{arch}" for arch in sorted({key[0] for key in table} | {arch for arch, _ in triton_rows}))
    path.write_text(CALIBRATION_HEADER.format(triton=_triton_version(), shape=SHAPES[0].label, dtypes=dtypes,
                                              archs=archs)
                    + "INT_CLASSES = {\n" + "\n".join(int_lines) + "\n}\n\n"
                    + "CLEAN_CONFIGS = {\n" + "\n".join(lines) + "\n}\n")


def _triton_kernel_names() -> list[str]:
    import runpy

    return list(runpy.run_path(str(REPO_ROOT / "attnseg" / "triton" / "calibration.py"))["INT_CLASSES"])


def _triton_version() -> str:
    import triton

    return triton.__version__


CALIBRATION_HEADER = '''"""Autotune configs of the Triton kernels that compile without spilling, measured.

Generated by ``python benchmarks/kernel_report.py --triton-all --triton-dtypes DTYPES
--write-triton-calibration attnseg/triton/calibration.py`` (triton {triton}; swept: {dtypes} on
{archs}): every config of every autotuned kernel launch at the DANet shape ({shape}, E = 64,
Ev = 512, C = 512, channel-first q/k/v), compiled offline (``attnseg.triton.offline``), registers and stack
read from the cubins. A dtype or architecture not swept has no entries. Keys: (arch, dtype,
kernel, mode flags..., BLOCK_E[, BLOCK_EV]); values: {{(sorted block sizes, num_warps,
num_stages): shared memory bytes}} of the configs with no stack and no spills.

The prune (``attnseg.triton.make_prune``) keeps exactly these configs, where their shared memory
fits the device, for a launch with the same key on sm_8x (sm_80 table) or sm_9x and newer (sm_90
table), at most 16 (the largest tiles first, to bound autotuning time); other launches (other
widths or modes, fp32 with TF32 allowed, fp64, older GPUs, a dtype not swept) use its estimates.
A launch is covered only where each integer argument specialises as in the swept launch
(``INT_CLASSES``: equal to 1, divisible by 16, or other): another layout (contiguous q/k/v) or an
unaligned N (9409) compiles to other code and uses the estimates. Regenerate after changing a
kernel or its config list.
"""

import torch


def dtype_name(dtype: torch.dtype, precision: str) -> str | None:
    """The table's name for a launch's operand dtype and fp32 dot precision ("fp32": IEEE only)."""
    if dtype == torch.float32:
        return "fp32" if precision == "ieee" else None
    return {{torch.float16: "fp16", torch.bfloat16: "bf16"}}.get(dtype)


def int_class(value: int) -> str:
    """How Triton specialises an integer argument: "1", "16" (divisible by 16) or "other"."""
    return "1" if value == 1 else "16" if value % 16 == 0 else "other"


# INT_CLASSES: kernel -> {{integer argument: its class in the swept launches}}.

'''

# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def table(header, rows) -> str:
    """A GitHub Markdown table (also readable as plain text)."""
    cells = [list(map(str, header))] + [list(map(str, r)) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells[1:])])


def _kib(n: int) -> str:
    return f"{n / 1024:.1f}K" if n >= 1024 else f"{n}B" if n else "0"


def _inner_label(loop: Loop | None) -> str:
    if loop is None:
        return "-"
    unit = "tensor" if loop.count("tensor") else "fma"
    return f"{loop.label}: {len(loop.instructions)} instr, {CLASS_TITLES[unit]} {loop.count(unit) / len(loop.instructions):.0%}"


def _verdicts(checks: dict) -> str:
    return "; ".join(f"{name} {value} {'PASS' if ok else 'FAIL'}" for name, (ok, value) in checks.items())


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}" if seconds < 10 else f"{seconds:.0f} s"


def report(args) -> tuple[str, bool]:
    started = time.time()
    out: list[str] = []
    say = out.append
    archs = [int(a) for a in args.arch.split(",")]
    dtypes = ["fp16", "fp32"] if args.quick else list(DTYPES)
    shapes = SHAPES[:1] if args.quick else SHAPES
    failures: list[str] = []

    nvcc = shutil.which("nvcc")
    cuobjdump = tool("cuobjdump")
    say("# Static kernel report\n")
    say(f"Generated by `python benchmarks/kernel_report.py{' ' + ' '.join(args.argv) if args.argv else ''}`; "
        "no GPU involved: ptxas resource usage, SASS read by cuobjdump, an analytic model.\n")
    rows: list[Row] = []
    triton_rows: dict[tuple[int, str], list[dict]] = {}
    triton_dtypes = ["fp16"] if args.quick else args.triton_dtypes.split(",")
    triton_kernels = frozenset(args.triton_kernels.split(",")) if args.triton_kernels else None
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs) as triton_pool:
        triton_jobs = {}
        if not args.no_triton:
            for arch in archs:
                for dtype in triton_dtypes:
                    triton_jobs[(arch, dtype)] = triton_pool.submit(triton_sweep, arch, dtype, SHAPES[0].nq,
                                                                    not args.triton_all or args.quick,
                                                                    triton_kernels)
        if nvcc is None or cuobjdump is None:
            say(f"CUDA kernels: not compiled (nvcc: {nvcc}, cuobjdump: {cuobjdump}).\n")
            failures.append("no nvcc/cuobjdump")
        else:
            salt = _sources_hash() + _nvcc_version(nvcc)
            say(f"nvcc: {_nvcc_version(nvcc)}; flags: `{' '.join(NVCC_FLAGS)} -gencode arch=compute_XX,code=sm_XX "
                f"-Xptxas -v`; SASS: `cuobjdump -sass` ({'Triton wheel' if 'triton' in cuobjdump else cuobjdump}).\n")
            progress(f"kernel report: compiling {len(KERNELS)} CUDA kernels x {len(dtypes)} dtypes x {len(archs)} "
                     f"archs ({args.jobs} jobs; cached in {BUILD_DIR.relative_to(REPO_ROOT)})")
            with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
                constants_job = pool.submit(probe_constants, KERNELS, dtypes, nvcc, salt)
                compiled = compile_all([(e, d, a) for a in archs for e in KERNELS for d in dtypes if d in e.dtypes],
                                       nvcc, cuobjdump, salt, pool)
                constants = constants_job.result()
            rows = [analyse(c, constants[(c.entry.name, c.dtype)]) for c in compiled]
            units = len({(translation_unit(c.entry, c.dtype), c.arch) for c in compiled})
            cached = len({(translation_unit(c.entry, c.dtype), c.arch) for c in compiled if c.cached})
            say(f"{len(compiled)} kernel rows from {units} nvcc compiles ({cached} of them cached in "
                "build/kernel_report/).\n")
            _cuda_sections(say, rows, archs, dtypes, shapes, failures)
        if triton_jobs:
            progress(f"kernel report: waiting for the Triton sweeps ({len(triton_jobs)}: "
                     f"{'kept configs' if not args.triton_all or args.quick else 'every config'}, ~1.5 s per "
                     "uncached config)")
        triton_errors = []
        for (arch, dtype), job in triton_jobs.items():
            try:
                triton_rows[(arch, dtype)] = job.result()
            except Exception as exc:  # no triton, or a Triton that cannot compile for NVIDIA offline
                triton_errors.append((dtype, f"sm_{arch} {dtype}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"))
                continue
            progress(f"kernel report: Triton sm_{arch} {dtype}: {len(triton_rows[(arch, dtype)])} configs")
    if triton_kernels is not None and triton_rows:
        unknown = triton_kernels - {r["kernel"] for rows_ in triton_rows.values() for r in rows_}
        if unknown:
            progress(f"kernel report: --triton-kernels: no launch of {', '.join(sorted(unknown))}; the kernels are "
                     f"{', '.join(sorted(_triton_kernel_names()))}")
            return 2
    if triton_rows and args.write_triton_calibration:
        write_triton_calibration(Path(args.write_triton_calibration), triton_rows, triton_kernels)
        progress(f"kernel report: wrote {args.write_triton_calibration}")
    if triton_rows:
        _triton_section(say, triton_rows, failures, detail=args.triton_detail)
        fresh = sum(not r["cached"] for rows_ in triton_rows.values() for r in rows_)
        say(f"\n{sum(map(len, triton_rows.values()))} Triton configs ({fresh} compiled in this run, the rest cached "
            "in build/kernel_report/triton).")
    if triton_errors:
        say("\nTriton configs not compiled: " + "; ".join(text for _, text in triton_errors))
        failures.extend(f"Triton {text}" for dtype, text in triton_errors if dtype in TRITON_NO_SPILL_ENFORCED)
    elapsed = time.time() - started
    say(f"\nReport generated in {elapsed:.0f} s on {os.cpu_count()} cores.")
    if failures:
        say("\n**Enforced rows below threshold:** " + "; ".join(failures))
    else:
        say("\nEvery enforced row meets its thresholds.")
    return "\n".join(out) + "\n", not failures


def _entries(rows: list[Row], op: str | None = None) -> list[CudaKernel]:
    """The table entries the rows come from (of one op), in table order, each once."""
    seen: dict[int, CudaKernel] = {}
    for r in rows:
        if op is None or r.compiled.entry.op == op:
            seen.setdefault(id(r.compiled.entry), r.compiled.entry)
    return list(seen.values())


def _cuda_sections(say, rows: list[Row], archs, dtypes, shapes, failures) -> None:
    enforced = [e.name for e in _entries(rows) if e.enforced]
    say("## CUDA kernels\n")
    say("Enforced kernels (their FAILs, and their op's FLOP ratio, fail `--check`): "
        + (", ".join(enforced) if enforced else "none") + ".\n")
    say("Occupancy limits: " + "; ".join(
        f"{a.label}: {a.regs_per_sm // 1024}K registers (per warp in units of {a.reg_unit}), {a.max_warps} warps, "
        f"{a.max_blocks} blocks, {a.smem_per_sm // 1024} KiB shared memory per SM, {a.smem_per_block // 1024} KiB "
        f"per block, {a.smem_reserved} B reserved per block" for a in (ARCHS[x] for x in archs)) + ".\n")
    say("### Resources and main loop\n")
    say("Main loop: the natural loops of each kernel's control-flow graph (a backward branch to a block that "
        "dominates it); the main loop is the one with the most tensor-core instructions (then FMA), or a loop nested "
        "in it that holds at least half of them (`main_loop()`). Counts are static over the loop's basic blocks: "
        "inner loops (`+N inner`) and unrolled remainder copies are counted once each. "
        "Shares: tensor core (HMMA/DMMA/HGMMA), FMA (FFMA/DFMA/HFMA2), other fp, load/store (LDG/STG/LDS/STS/LDSM/"
        "LDGSTS/...), int/address (IMAD/IADD3/LEA/SHF/LOP3/ISETP/MOV/...; `64b` = its 64-bit address share: "
        "IMAD.WIDE, IADD3.X, LEA.HI.X, ...), control/sync (BRA/BAR/SHFL/...). Checks: no stack/spill "
        "(stack/spill-st/spill-ld bytes) for every kernel; HMMA, LDSM, LDGSTS in the main loop for "
        "fp16/bf16 kernels with matrix products; FFMA share >= 40 % for fp32 ones; `dQ RED` for the dK/dQ "
        "kernels: the fp32 atomic reductions (RED/ATOM .ADD.F32) in the main loop, with how many are sm_90's "
        "vector form (`x2`: REDG .ADD.F32x2, red.global.add.v2.f32): the default (atomic) dQ path needs them, "
        "and the flash kernel (adjacent cell pairs) only vector ones on sm_90 (the FFMA kernel's cells are not "
        "adjacent: scalar); the `_ordered` variant, which runs under "
        "torch.use_deterministic_algorithms(True), must have none (it waits for the previous key block and "
        "adds with plain loads and stores). Variants are left out of the op's FLOP and time sums below.\n")
    for r in rows:
        c = r.compiled
        if c.entry.enforced:
            failures.extend(f"{c.entry.name} {c.dtype} {ARCHS[c.arch].label}: {name} {value}"
                            for name, (ok, value) in r.checks.items() if not ok)
    # one line per compiled unit: the same instantiation under several names or dtypes is shown once
    groups: dict[tuple[str, int], list[Row]] = {}
    for r in rows:
        groups.setdefault((translation_unit(r.compiled.entry, r.compiled.dtype), r.compiled.arch), []).append(r)

    def names(group: list[Row]) -> tuple[str, str]:
        entries = list(dict.fromkeys(r.compiled.entry.name + (" [enforced]" if r.compiled.entry.enforced else "")
                                     for r in group))
        return " = ".join(entries), ",".join(dict.fromkeys(r.compiled.dtype for r in group))

    header = ["kernel", "dtype", "arch", "regs", "smem st+dyn", "occupancy", "main loop", "hot inner loop", "instr",
              "tensor", "FMA", "fp", "ld/st", "int (64b)", "ctrl", "LDSM", "LDGSTS", "global loads", "checks"]
    body = []
    for group in groups.values():
        r, c = group[0], group[0].compiled
        label, dtype_label = names(group)
        if not c.ok:
            body.append([label, dtype_label, ARCHS[c.arch].label] + ["-"] * 15 + ["compile FAILED"])
            continue
        occ, loop = r.occupancy, r.loop
        all_ops = {i.base for i in c.code}
        in_loop = {i.base for i in loop.instructions} if loop else set()
        wide = sum(1 for i in loop.instructions if _WIDE_ADDRESS.match(i.opcode)) if loop else 0
        loop_label = (f"{loop.label}" + (f" (+{r.inner_loops} inner)" if r.inner_loops else "")) if loop else "none"
        body.append([
            label, dtype_label, ARCHS[c.arch].label, c.registers,
            f"{_kib(c.static_smem)}+{_kib(r.constants['smem'])}",
            f"{occ.blocks} blk / {occ.warps} w ({occ.limiter})",
            loop_label, _inner_label(r.hot_inner), r.total,
            *(f"{r.share(cls):.0%}" for cls in ("tensor", "fma", "fp", "ldst")),
            f"{r.share('int'):.0%} ({wide / r.total if r.total else 0:.0%})", f"{r.share('control'):.0%}",
            *("loop" if op in in_loop else "yes" if op in all_ops else "no" for op in ("LDSM", "LDGSTS")),
            ", ".join(f"{k}x{v}" for k, v in load_widths(c.code).items()) or "-",
            _verdicts(r.checks)])
    say(table(header, body))
    say("\nHot inner loop: the loop nested in the main loop with the most tensor/FMA instructions, with its own "
        "share (it runs several times per main-loop iteration). `loop`: in the main loop; `yes`: elsewhere in "
        "the kernel only. Global loads: LDG / LDGSTS by width in "
        "bits (16 = one fp16 element a thread; 128 = 16-byte vector loads), over the whole kernel.\n")
    say("Raw main-loop counts (tensor / FMA / other fp / load-store / int / control / other, static over the loop's "
        "basic blocks):\n")
    say(table(["kernel", "dtype", "arch", "loop", "blocks", "counts"],
              [[*names(g)[:2], ARCHS[g[0].compiled.arch].label, g[0].loop.label if g[0].loop else "-",
                g[0].loop.blocks if g[0].loop else "-", " / ".join(str(g[0].counts.get(c, 0)) for c in CLASSES)]
               for g in groups.values() if g[0].compiled.ok]))

    say("\n### Library calls\n")
    say("Products the launchers hand to cuBLAS through ATen (`DeviceLaunch::gemm`, csrc/cuda/launch.cuh): "
        "not our kernels, so not compiled or read here. fp16/bf16 run on tensor cores with fp32 accumulation "
        "and an fp32 result (`aten::bmm.dtype`); fp32 and fp64 in their own type. In the time model below "
        "they count at the op's reference efficiency (cuBLAS-class), bound `library`.\n")
    say(table(["call", "op", "launcher calls", "FLOPs", "per op call"],
              [[lib.name, lib.op + (f" ({lib.impl})" if lib.impl else ""), lib.call, lib.formula, lib.launches]
               for lib in LIBRARY_CALLS]))

    # ---- FLOP model and time per op
    say("\n### FLOP model and modelled time at the DANet shape\n")
    say("Shapes: " + "; ".join(f"{s.label}: Nq = Nk = {s.nq}, E = {s.e}, Ev = {s.ev}, CAM C = {s.c}" for s in shapes)
        + ".\n")
    for op, (_, formula) in USEFUL.items():
        models = [f"{e.name}: {e.model(shapes[0], next(r.constants for r in rows if r.compiled.entry is e), 2).formula}"
                  for e in _entries(rows, op)]
        models += [f"{lib.name}: library call, {lib.formula}" for lib in LIBRARY_CALLS if lib.op == op]
        if models:
            say(f"- `{op}` useful FLOPs = {formula}; kernels: " + "; ".join(models))
    say("\nTime model (per kernel launch, summed per op): " + " ".join(modelled_time.__doc__.split()) + "\n")
    for gpu in (g for g in GPUS if g.arch in archs):
        say(f"- {gpu.describe()}")
    say("- reference: useful FLOPs / (efficiency x peak): " + ", ".join(
        f"{op} {REFERENCE_NAME[op]} at {eff:.0%}" for op, eff in REFERENCE_EFFICIENCY.items())
        + " (fp16/bf16/fp64 on tensor cores, fp32 on FMA units: no TF32).\n")
    header = ["op", "dtype", "shape", "issued GFLOP", "useful GFLOP", "issued/useful", "limit"]
    gpus = [g for g in GPUS if g.arch in archs]
    for g in gpus:
        header += [f"{g.name} ms (bound)", f"{g.name} ref ms", "x ref"]
    body = []
    kernel_body = []
    for op, impl in dict.fromkeys((e.op, e.impl) for e in _entries(rows)):
        entries = [e for e in _entries(rows, op) if e.impl == impl and not e.variant_of]
        op_enforced = any(e.enforced for e in entries)
        op_label = op + (f" ({impl})" if impl else "") + (" [enforced]" if op_enforced else "")
        # only the dtypes this implementation has kernels for (the flash forward: fp16/bf16)
        impl_dtypes = {d for e in entries for d in e.dtypes}
        for dtype in [d for d in dtypes if d != "fp64" and d in impl_dtypes]:
            for shape in shapes:
                nbytes = DTYPES[dtype][2]
                by_arch = {}
                issued = None
                for g in gpus:
                    total, bounds, lower = 0.0, {}, False  # bound -> seconds under it
                    issued_here = 0.0
                    for e in entries:
                        row = next((r for r in rows if r.compiled.entry is e and r.compiled.dtype == dtype
                                    and r.compiled.arch == g.arch), None)
                        if row is None or not row.compiled.ok:
                            total = math.nan
                            continue
                        work = e.model(shape, row.constants, nbytes)
                        timing = modelled_time(row, work, g)
                        total += e.launches * timing.seconds
                        issued_here += e.launches * work.flops
                        bounds[timing.bound] = bounds.get(timing.bound, 0.0) + e.launches * timing.seconds
                        lower |= timing.approximate
                        if shape == shapes[0]:
                            parts = (_ms(timing.parts[k]) if k in timing.parts else "-"
                                     for k in ("compute", "issue", "memory"))
                            waves = work.blocks / (g.sms * max(row.occupancy.blocks, 1))
                            kernel_body.append([e.name, dtype, shape.label, g.name, work.blocks,
                                                f"{work.flops / 1e9:.0f}", row.occupancy.blocks, f"{waves:.1f}",
                                                *parts, timing.text])
                    for lib in LIBRARY_CALLS:  # cuBLAS calls: modelled at the reference efficiency
                        if (lib.op, lib.impl) == (op, impl):
                            flops = lib.launches * lib.flops(shape)
                            total += flops / (REFERENCE_EFFICIENCY[op] * _peak(g, dtype, dtype != "fp32"))
                            issued_here += flops
                            bounds["library"] = bounds.get("library", 0.0) + flops / (
                                REFERENCE_EFFICIENCY[op] * _peak(g, dtype, dtype != "fp32"))
                    by_arch[g.name] = (total, max(bounds, key=bounds.get) if bounds else "-", lower)
                    issued = issued_here
                useful = USEFUL[op][0](shape)
                ratio = issued / useful if issued else math.nan
                limit = THRESHOLDS["flop_ratio"].get(op)
                verdict = "-" if limit is None else ("PASS" if ratio <= limit else "FAIL")
                if limit is not None and op_enforced and verdict == "FAIL":
                    failures.append(f"{op_label} {dtype} {shape.label}: issued/useful {ratio:.2f} > {limit}")
                cells = [op_label, dtype, shape.label, f"{issued / 1e9:.0f}",
                         f"{useful / 1e9:.0f}", f"{ratio:.2f}",
                         "-" if limit is None else f"<= {limit} {verdict}"]
                for g in gpus:
                    t, bound, lower = by_arch[g.name]
                    ref = reference_time(op, shape, dtype, g)
                    mark = "~" if lower else ""
                    cells += [f"{mark}{_ms(t)} ({bound})", _ms(ref), f"{mark}{t / ref:.1f}"]
                body.append(cells)
    say(table(header, body))
    say("\n`~`: rough: the main loop holds inner loops (load loops, k loops, unrolled remainders) that run "
        "several times per iteration, so its static mix (inner loops counted once) is not the dynamic mix the "
        "issue bound assumes; the error can go either way (e.g. nvcc leaves the CAM GEMM's k loop rolled on "
        "sm_90 but unrolls it on sm_80: a main-loop FFMA share of 6 % against 31 %, which inflates the H100 "
        "estimate). Barrier, dependency and memory latency are not "
        "modelled at all: the old kernels, with 6 barriers and shared-memory round trips a tile, are slower "
        "than these numbers. A main loop without inner loops (the new kernels' design) has no `~`.\n")
    say("Per kernel launch (ms; the largest bound is the modelled time):\n")
    say(table(["kernel", "dtype", "shape", "GPU", "blocks", "issued GFLOP", "blocks/SM", "waves", "compute", "issue",
               "memory", "modelled"], kernel_body))


def _triton_section(say, triton_rows, failures, detail: bool) -> None:
    say("\n## Triton kernels (autotune configs compiled offline)\n")
    say("Every autotune config of every Triton kernel launch at DANet sizes (B = 1, N = "
        f"{SHAPES[0].nq}, E = 64, Ev = 512, C = 512, channel-first q/k/v views), compiled for the architecture by "
        "`attnseg.triton.offline`; `kept` is the kernel's prune filter's verdict on that architecture. "
        f"Check: no kept config spills (stack > 0), "
        f"enforced for {', '.join(TRITON_NO_SPILL_ENFORCED)} (the dtypes of the prune's measured table), printed "
        "for the others; `clean dropped` "
        "counts configs the prune drops although they compile without spills and fit the shared memory (needs "
        "`--triton-all`).\n")
    summary, detail_rows = [], []
    for (arch, dtype), rows in triton_rows.items():
        modes = {}
        for r in rows:
            modes.setdefault((r["kernel"], r["mode"]), []).append(r)
        for (kernel, mode), configs in modes.items():
            def spills(c):
                return c.get("stack", 0) > 0 or "error" in c

            kept = [c for c in configs if c["kept"]]
            bad = [c for c in kept if spills(c)]
            clean_dropped = [c for c in configs if not c["kept"] and not spills(c)
                             and c["shared"] <= c["shared_limit"]]
            compiled_all = len(configs) == configs[0]["total"]
            verdict = "FAIL" if bad else "PASS"
            if bad and dtype in TRITON_NO_SPILL_ENFORCED:
                failures.append(f"Triton {kernel} ({mode}) {dtype} sm_{arch}: kept configs spill: "
                                + ", ".join(_config_label(c) for c in bad))
            best = max(kept, key=lambda c: math.prod(c["blocks"].values()) if c["blocks"] else 0, default=None)
            summary.append([f"{kernel} {('(' + mode + ')') if mode else ''}", dtype, f"sm_{arch}",
                            f"{len(kept)} of {configs[0]['total']}",
                            len(clean_dropped) if compiled_all else "n/a (kept only)",
                            ", ".join(_config_label(c) for c in bad) or "none",
                            _config_label(best) if best else "-", verdict])
            for c in configs:
                if detail or c["kept"]:
                    detail_rows.append([kernel, mode, dtype, f"sm_{arch}", _config_label(c, resources=False),
                                        "kept" if c["kept"] else "dropped",
                                        c.get("registers", "-"), c.get("stack", "-"), c.get("shared", "-"),
                                        "spills" if spills(c) else "clean"])
    say(table(["kernel (mode)", "dtype", "arch", "kept", "clean dropped", "kept that spill", "largest kept",
               "no kept spill (enforced: " + ", ".join(TRITON_NO_SPILL_ENFORCED) + ")"], summary))
    _triton_hgmma_section(say, triton_rows, failures)
    say(f"\n{'Every config compiled' if detail else 'Kept configs (`--triton-detail`: every compiled one)'}; "
        "config = block sizes in the kernel's order (e.g. BLOCK_M x BLOCK_N x BLOCK_EV), warps, stages:\n")
    say(table(["kernel", "mode", "dtype", "arch", "config", "prune", "regs", "stack B", "shared B", ""], detail_rows))


def triton_hgmma_rows(triton_rows) -> list[tuple[str, str, str, list[dict], list[dict], bool]]:
    """Per sm_90 (kernel, mode, dtype): (kernel, mode, dtype, kept configs, those without HGMMA,
    enforced), for the kept configs whose SASS was read."""
    out = []
    for (arch, dtype), rows in triton_rows.items():
        if arch < 90:
            continue
        modes: dict[tuple[str, str], list[dict]] = {}
        for r in rows:
            if r["kept"] and "hgmma" in r:
                modes.setdefault((r["kernel"], r["mode"]), []).append(r)
        for (kernel, mode), kept in modes.items():
            without = [c for c in kept if c["hgmma"] == 0]
            out.append((kernel, mode, dtype, kept, without, (kernel, dtype) in TRITON_HGMMA_ENFORCED))
    return out


def _triton_hgmma_section(say, triton_rows, failures) -> None:
    rows = triton_hgmma_rows(triton_rows)
    if not rows:
        return
    say("\nHopper (sm_90): wgmma in the kept configs' SASS (HGMMA instructions; `mma.sync` compiles to HMMA). "
        "Enforced: every kept config of " + ", ".join(f"{k} {d}" for k, d in TRITON_HGMMA_ENFORCED)
        + " issues HGMMA.\n")
    summary = []
    for kernel, mode, dtype, kept, without, enforced in rows:
        # printed rows: what the SASS holds (kernels without dots, BLOCK_N = 32 tiles: mma.sync)
        verdict = ("FAIL" if without else "PASS") + " [enforced]" if enforced else (
            "some without" if without and len(without) < len(kept) else "none" if without else "all")
        if without and enforced:
            failures.append(f"Triton {kernel} {dtype} sm_90: kept configs without HGMMA: "
                            + ", ".join(_config_label(c, resources=False) for c in without))
        summary.append([f"{kernel} {('(' + mode + ')') if mode else ''}", dtype,
                        f"{len(kept) - len(without)} of {len(kept)}",
                        ", ".join(f"{_config_label(c, resources=False)}: {c['hgmma']}" for c in kept[:3]),
                        verdict])
    say(table(["kernel (mode)", "dtype", "kept with HGMMA", "HGMMA count (first kept)", "HGMMA"], summary))


def _config_label(c: dict, resources: bool = True) -> str:
    blocks = "x".join(str(v) for v in c["blocks"].values()) or "default"
    label = f"{blocks} w{c['warps']} s{c['stages']}"
    if resources and "registers" in c:
        label += f" ({c['registers']} regs, {c['stack']} B stack)"
    return label


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="80,90", help="comma-separated SM versions (default 80,90)")
    parser.add_argument("--quick", action="store_true",
                        help="fp16 and fp32 only, N = 9216 only, Triton fp16 kept configs only")
    parser.add_argument("--check", action="store_true", help="exit 1 when an enforced row misses a threshold")
    parser.add_argument("--markdown", metavar="FILE", help="also write the report to FILE")
    parser.add_argument("--no-triton", action="store_true", help="skip the Triton configs")
    parser.add_argument("--triton-all", action="store_true",
                        help="compile every Triton config, also those the prune drops (slow: ~1.5 s each)")
    parser.add_argument("--triton-dtypes", default="fp16,fp32", help="dtypes of the Triton sweep (fp16,bf16,fp32)")
    parser.add_argument("--triton-kernels", metavar="NAMES",
                        help="comma-separated Triton kernels to sweep (e.g. _attn_bwd_dq; default: all); with "
                             "--write-triton-calibration, only their entries of the table are replaced")
    parser.add_argument("--triton-detail", action="store_true", help="list every Triton config, not only kept ones")
    parser.add_argument("--write-triton-calibration", metavar="FILE",
                        help="with --triton-all: write the clean configs of the attention kernels, the table the "
                             "prune reads (attnseg/triton/calibration.py)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel nvcc jobs")
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    if args.write_triton_calibration and (not args.triton_all or args.quick or args.no_triton):
        parser.error("--write-triton-calibration needs --triton-all (every config compiled), without --quick")
    for a in args.arch.split(","):
        if int(a) not in ARCHS:
            parser.error(f"--arch {a}: known architectures are {sorted(ARCHS)}")
    text, ok = report(args)
    print(text, end="")
    if args.markdown:
        Path(args.markdown).write_text(text)
    return 0 if ok or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
