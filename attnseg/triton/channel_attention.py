"""DANet channel attention (CAM) in Triton, forward and backward.

    attnseg::triton_channel_attention_fwd(x[B,C,N], official) -> (y[B,C,N], attn[B,C,C])
    attnseg::triton_channel_attention_bwd(grad_y, x, attn, official) -> grad_x[B,C,N]

y = A X (no gamma, no residual: functional.py adds those); E = X Xᵀ accumulated in fp32
(fp64 for fp64 inputs; never in half precision: post-ReLU Gram matrices overflow fp16);
official: A = softmax(rowmax(E) − E), computed as softmax(−E), which is the same thing and
stable; paper: A = softmax(E). attn is fp32 (fp64 for fp64), kept for the backward.

Forward, three kernels:

* ``_cam_nt_partial``, grid (C / BLOCK_C, C / BLOCK_C, B · splits): the Gram matrix reduced over
  N, which is split into fixed-length chunks, one per program along axis 2; each program
  writes its partial C×C tile to a [splits, B, C, C] buffer. The chunk length depends on N only,
  not on the autotuned tile sizes. E is symmetric: only tiles on or above the diagonal are
  computed, and off-diagonal ones are also written mirrored.
* ``_cam_softmax_fwd``, grid (C / BLOCK_R, B): sums the partials in split order (fixed, so
  deterministic; no atomics anywhere), then the row softmax with an online max/sum over column
  chunks, written to attn.
* ``_cam_apply``, grid (C / BLOCK_I, N / BLOCK_N, B): y = A X, A cast to x's dtype for ``tl.dot``
  (A is in [0, 1]), fp32 accumulation.

Backward, with dY = grad_y:

* ``_cam_nt_partial`` again for dA = dY Xᵀ (not symmetric: every tile).
* ``_cam_softmax_bwd``: dE_sm = A ∘ (dA − rowsum(dA ∘ A)); official: dE = −dE_sm; paper: dE = dE_sm.
* ``_cam_grad_x``: dX = Aᵀ dY + (dE + dEᵀ) X. dE is not bounded like A is, so for fp16/bf16
  inputs that product runs on fp32 operands with TF32 inputs (same mantissa as fp16, fp32 range).
"""

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from . import LazyKernel, check_dtype, configs, dot_precision, interpreting, launch, make_prune, pow2
from .. import _ops

__all__ = ["channel_attention_bwd", "channel_attention_fwd"]


# ---------------------------------------------------------------------------------------------
# Kernels (plain functions: LazyKernel decorates them on first use, see attnseg.triton)
# ---------------------------------------------------------------------------------------------


def _cam_nt_partial(
    A, Bm, Partial,
    stride_ab, stride_ac, stride_an,
    stride_bb, stride_bc, stride_bn,
    stride_ps, stride_pb, stride_pi, stride_pj,
    C, N, SPLIT_LEN, SPLITS,
    TUNE_N,  # autotune key only: N rounded up to a power of two
    SYMMETRIC: tl.constexpr,  # A is Bm: compute tiles on or above the diagonal, mirror them
    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # Partial[s, b] = A[b, :, chunk s] · Bm[b, :, chunk s]ᵀ for the N-chunk s of SPLIT_LEN columns.
    IS_FP64: tl.constexpr = A.dtype.element_ty == tl.float64
    ACC: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
    tile_i = tl.program_id(0)
    tile_j = tl.program_id(1)
    pid_bs = tl.program_id(2)
    pid_b = (pid_bs // SPLITS).to(tl.int64)
    split = pid_bs % SPLITS
    if SYMMETRIC:
        active = tile_i <= tile_j
    else:
        active = tile_i >= 0
    if active:
        A += pid_b * stride_ab
        Bm += pid_b * stride_bb
        Partial += split.to(tl.int64) * stride_ps + pid_b * stride_pb
        offs_i = tile_i * BLOCK_C + tl.arange(0, BLOCK_C)
        offs_j = tile_j * BLOCK_C + tl.arange(0, BLOCK_C)
        offs_k = tl.arange(0, BLOCK_K)
        mask_i = offs_i < C
        mask_j = offs_j < C
        n_start = split * SPLIT_LEN
        n_end = tl.minimum(n_start + SPLIT_LEN, N)
        a_ptrs = A + offs_i[:, None] * stride_ac + (n_start + offs_k)[None, :] * stride_an
        bt_ptrs = Bm + (n_start + offs_k)[:, None] * stride_bn + offs_j[None, :] * stride_bc
        acc = tl.zeros([BLOCK_C, BLOCK_C], ACC)
        for start_k in range(n_start, n_end, BLOCK_K):
            mask_k = (start_k + offs_k) < n_end  # the chunk's end, not N: chunks must not overlap
            a = tl.load(a_ptrs, mask=mask_i[:, None] & mask_k[None, :], other=0.0)
            bt = tl.load(bt_ptrs, mask=mask_k[:, None] & mask_j[None, :], other=0.0)
            acc = tl.dot(a, bt, acc, input_precision=DOT_PRECISION)
            a_ptrs += BLOCK_K * stride_an
            bt_ptrs += BLOCK_K * stride_bn
        mask = mask_i[:, None] & mask_j[None, :]
        tl.store(Partial + offs_i[:, None] * stride_pi + offs_j[None, :] * stride_pj, acc, mask=mask)
        if SYMMETRIC:
            # The mirrored tile (j, i); a diagonal tile is written once.
            tl.store(Partial + offs_i[:, None] * stride_pj + offs_j[None, :] * stride_pi, acc,
                     mask=mask & (tile_i != tile_j))


def _cam_softmax_fwd(
    Partial, Attn,
    stride_ps, stride_pb, stride_pi, stride_pj,
    stride_ab, stride_ai, stride_aj,
    C, SPLITS,
    OFFICIAL: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_CC: tl.constexpr,
):
    # Pass 1: E = Σ_s Partial[s] (fixed order), logits = ∓E into Attn, online row max / sum.
    # Pass 2: Attn = exp(logits − max) / sum.
    ACC: tl.constexpr = Attn.dtype.element_ty
    pid_r = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    Partial += pid_b * stride_pb
    Attn += pid_b * stride_ab
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.arange(0, BLOCK_CC)
    mask_r = rows < C
    m_i = tl.full([BLOCK_R], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_R], ACC)
    for start_c in range(0, C, BLOCK_CC):
        cols = start_c + offs_c
        mask = mask_r[:, None] & (cols < C)[None, :]
        energy = tl.zeros([BLOCK_R, BLOCK_CC], ACC)
        for s in range(0, SPLITS):
            energy += tl.load(Partial + s * stride_ps + rows[:, None] * stride_pi + cols[None, :] * stride_pj,
                              mask=mask, other=0.0)
        # official: softmax(rowmax(E) − E) = softmax(−E) (softmax ignores a per-row shift)
        logits = -energy if OFFICIAL else energy
        logits = tl.where((cols < C)[None, :], logits, float("-inf"))
        tl.store(Attn + rows[:, None] * stride_ai + cols[None, :] * stride_aj, logits, mask=mask)
        m_new = tl.maximum(m_i, tl.max(logits, 1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), 1)
        m_i = m_new
    tl.debug_barrier()  # pass 2 reads what other threads of this program stored in pass 1
    for start_c in range(0, C, BLOCK_CC):
        cols = start_c + offs_c
        mask = mask_r[:, None] & (cols < C)[None, :]
        ptrs = Attn + rows[:, None] * stride_ai + cols[None, :] * stride_aj
        logits = tl.load(ptrs, mask=mask, other=float("-inf"))
        tl.store(ptrs, tl.exp(logits - m_i[:, None]) / l_i[:, None], mask=mask)


def _cam_apply(
    Attn, X, Y,
    stride_ab, stride_ai, stride_aj,
    stride_xb, stride_xc, stride_xn,
    stride_yb, stride_yc, stride_yn,
    C, N,
    TUNE_N,
    BLOCK_I: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # Y[i, n] = Σ_j A[i, j] X[j, n]
    IS_FP64: tl.constexpr = X.dtype.element_ty == tl.float64
    ACC: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
    pid_i = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    Attn += pid_b * stride_ab
    X += pid_b * stride_xb
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, BLOCK_J)
    mask_i = offs_i < C
    mask_n = offs_n < N
    a_ptrs = Attn + offs_i[:, None] * stride_ai + offs_j[None, :] * stride_aj
    x_ptrs = X + offs_j[:, None] * stride_xc + offs_n[None, :] * stride_xn
    acc = tl.zeros([BLOCK_I, BLOCK_N], ACC)
    for start_j in range(0, C, BLOCK_J):
        js = start_j + offs_j
        mask_j = js < C
        a = tl.load(a_ptrs, mask=mask_i[:, None] & mask_j[None, :], other=0.0)
        x = tl.load(x_ptrs, mask=mask_j[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a.to(x.dtype), x, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_J * stride_aj
        x_ptrs += BLOCK_J * stride_xc
    tl.store(Y + pid_b * stride_yb + offs_i[:, None] * stride_yc + offs_n[None, :] * stride_yn,
             acc.to(Y.dtype.element_ty), mask=mask_i[:, None] & mask_n[None, :])


def _cam_softmax_bwd(
    Partial, Attn, GradE,
    stride_ps, stride_pb, stride_pi, stride_pj,
    stride_ab, stride_ai, stride_aj,  # shared by Attn and GradE
    C, SPLITS,
    OFFICIAL: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_CC: tl.constexpr,
):
    # Pass 1: dA = Σ_s Partial[s] into GradE, and the row term rowsum(dA ∘ A).
    # Pass 2: dE = ±A ∘ (dA − rowsum(dA ∘ A)) (minus for the official softmax(−E)).
    ACC: tl.constexpr = Attn.dtype.element_ty
    pid_r = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    Partial += pid_b * stride_pb
    Attn += pid_b * stride_ab
    GradE += pid_b * stride_ab
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.arange(0, BLOCK_CC)
    mask_r = rows < C
    row_dot = tl.zeros([BLOCK_R], ACC)
    for start_c in range(0, C, BLOCK_CC):
        cols = start_c + offs_c
        mask = mask_r[:, None] & (cols < C)[None, :]
        grad_attn = tl.zeros([BLOCK_R, BLOCK_CC], ACC)
        for s in range(0, SPLITS):
            grad_attn += tl.load(Partial + s * stride_ps + rows[:, None] * stride_pi + cols[None, :] * stride_pj,
                                 mask=mask, other=0.0)
        offs = rows[:, None] * stride_ai + cols[None, :] * stride_aj
        attn = tl.load(Attn + offs, mask=mask, other=0.0)
        tl.store(GradE + offs, grad_attn, mask=mask)
        row_dot += tl.sum(grad_attn * attn, 1)
    tl.debug_barrier()  # pass 2 reads what other threads of this program stored in pass 1
    for start_c in range(0, C, BLOCK_CC):
        cols = start_c + offs_c
        mask = mask_r[:, None] & (cols < C)[None, :]
        offs = rows[:, None] * stride_ai + cols[None, :] * stride_aj
        attn = tl.load(Attn + offs, mask=mask, other=0.0)
        grad_attn = tl.load(GradE + offs, mask=mask, other=0.0)
        grad_energy = attn * (grad_attn - row_dot[:, None])
        if OFFICIAL:
            grad_energy = -grad_energy
        tl.store(GradE + offs, grad_energy, mask=mask)


def _cam_grad_x(
    Attn, GradE, dY, X, dX,
    stride_ab, stride_ai, stride_aj,  # shared by Attn and GradE
    stride_dyb, stride_dyc, stride_dyn,
    stride_xb, stride_xc, stride_xn,
    stride_dxb, stride_dxc, stride_dxn,
    C, N,
    TUNE_N,
    BLOCK_I: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    GRAD_E_PRECISION: tl.constexpr,  # for (dE + dEᵀ) X, run on fp32 operands
):
    # dX[i, n] = Σ_j A[j, i] dY[j, n] + (dE[i, j] + dE[j, i]) X[j, n]
    IS_FP64: tl.constexpr = X.dtype.element_ty == tl.float64
    ACC: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
    pid_i = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    Attn += pid_b * stride_ab
    GradE += pid_b * stride_ab
    dY += pid_b * stride_dyb
    X += pid_b * stride_xb
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, BLOCK_J)
    mask_i = offs_i < C
    mask_n = offs_n < N
    acc = tl.zeros([BLOCK_I, BLOCK_N], ACC)
    for start_j in range(0, C, BLOCK_J):
        js = start_j + offs_j
        mask_j = js < C
        mask_ij = mask_i[:, None] & mask_j[None, :]
        mask_jn = mask_j[:, None] & mask_n[None, :]
        offs_ij = offs_i[:, None] * stride_ai + js[None, :] * stride_aj
        offs_ji = offs_i[:, None] * stride_aj + js[None, :] * stride_ai
        attn_t = tl.load(Attn + offs_ji, mask=mask_ij, other=0.0)
        grad_sym = tl.load(GradE + offs_ij, mask=mask_ij, other=0.0) + tl.load(GradE + offs_ji, mask=mask_ij, other=0.0)
        dy = tl.load(dY + js[:, None] * stride_dyc + offs_n[None, :] * stride_dyn, mask=mask_jn, other=0.0)
        x = tl.load(X + js[:, None] * stride_xc + offs_n[None, :] * stride_xn, mask=mask_jn, other=0.0)
        acc = tl.dot(attn_t.to(dy.dtype), dy, acc, input_precision=DOT_PRECISION)
        acc = tl.dot(grad_sym, x.to(grad_sym.dtype), acc, input_precision=GRAD_E_PRECISION)
    tl.store(dX + pid_b * stride_dxb + offs_i[:, None] * stride_dxc + offs_n[None, :] * stride_dxn,
             acc.to(dX.dtype.element_ty), mask=mask_i[:, None] & mask_n[None, :])


# ---------------------------------------------------------------------------------------------
# Autotuning: configs for A100 / H100, pruned to what fits the device and the problem.
# ---------------------------------------------------------------------------------------------


def _caps_nt(args):
    return {"BLOCK_C": pow2(args["C"]), "BLOCK_K": pow2(args["SPLIT_LEN"])}


def _shared_nt(block, stages, args):
    return args["A"].element_size() * stages * 2 * block["BLOCK_C"] * block["BLOCK_K"]


def _live_nt(block, args):
    return block["BLOCK_C"] * (block["BLOCK_C"] + 2 * block["BLOCK_K"])


def _caps_rows_by_cols(args):
    return {"BLOCK_I": pow2(args["C"]), "BLOCK_J": pow2(args["C"]), "BLOCK_N": pow2(args["N"])}


def _shared_apply(block, stages, args):
    # A tile (fp32, cast in registers) and X tile per stage.
    i, n, j = block["BLOCK_I"], block["BLOCK_N"], block["BLOCK_J"]
    return stages * (4 * i * j + args["X"].element_size() * j * n)


def _live_apply(block, args):
    i, n, j = block["BLOCK_I"], block["BLOCK_N"], block["BLOCK_J"]
    return i * n + i * j + j * n


def _shared_grad_x(block, stages, args):
    # Aᵀ and dE + dEᵀ tiles (fp32), dY and X (X upcast to fp32) per stage.
    i, n, j = block["BLOCK_I"], block["BLOCK_N"], block["BLOCK_J"]
    return stages * (8 * i * j + (args["X"].element_size() + 4) * j * n)


def _live_grad_x(block, args):
    i, n, j = block["BLOCK_I"], block["BLOCK_N"], block["BLOCK_J"]
    return i * n + 3 * i * j + 2 * j * n


_nt_partial_kernel = LazyKernel(
    _cam_nt_partial,
    configs=configs(BLOCK_C=[64, 128], BLOCK_K=[32, 64], num_warps=[4, 8], num_stages=[2, 3, 4])
    + configs(BLOCK_C=[32, 64], BLOCK_K=[16], num_warps=[8], num_stages=[2]),  # fp32-IEEE / fp64
    interpreter_config=triton.Config({"BLOCK_C": 32, "BLOCK_K": 32}),
    key=["C", "TUNE_N", "SPLIT_LEN", "SYMMETRIC"],
    prune=make_prune(_shared_nt, _live_nt, budget=150, caps=_caps_nt, operand="A",
                     calibration=lambda a: ("_cam_nt_partial", bool(a["SYMMETRIC"]))),
)
_apply_kernel = LazyKernel(
    _cam_apply,
    configs=configs(BLOCK_I=[64, 128], BLOCK_N=[64, 128], BLOCK_J=[32, 64], num_warps=[4, 8], num_stages=[2, 3])
    + configs(BLOCK_I=[32, 64], BLOCK_N=[32, 64], BLOCK_J=[16], num_warps=[8], num_stages=[2]),  # fp32-IEEE / fp64
    interpreter_config=triton.Config({"BLOCK_I": 32, "BLOCK_N": 64, "BLOCK_J": 32}),
    key=["C", "TUNE_N"],
    prune=make_prune(_shared_apply, _live_apply, budget=150, caps=_caps_rows_by_cols, operand="X",
                     calibration=lambda a: ("_cam_apply",)),
)
_grad_x_kernel = LazyKernel(
    _cam_grad_x,
    configs=configs(BLOCK_I=[64, 128], BLOCK_N=[64, 128], BLOCK_J=[32, 64], num_warps=[4, 8], num_stages=[2, 3])
    + configs(BLOCK_I=[32, 64], BLOCK_N=[32, 64], BLOCK_J=[16], num_warps=[8], num_stages=[2]),  # fp32-IEEE / fp64
    interpreter_config=triton.Config({"BLOCK_I": 32, "BLOCK_N": 64, "BLOCK_J": 32}),
    key=["C", "TUNE_N"],
    prune=make_prune(_shared_grad_x, _live_grad_x, budget=230, caps=_caps_rows_by_cols, operand="X",
                     calibration=lambda a: ("_cam_grad_x",)),  # GRAD_E_PRECISION follows dtype, DOT_PRECISION
)
_softmax_fwd_kernel = LazyKernel(_cam_softmax_fwd)
_softmax_bwd_kernel = LazyKernel(_cam_softmax_bwd)


def _split_len(n: int) -> int:
    """Length of the N-chunks of the reductions over N: a function of N only (not of the config)."""
    if interpreting():
        return 64  # several chunks at test sizes
    splits = min(32, triton.cdiv(n, 2048))
    return triton.cdiv(triton.cdiv(n, splits), 256) * 256


def _row_blocks(c: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_CC) for the row-softmax kernels: about 4096 elements a tile on a GPU."""
    if interpreting():
        return 16, 32
    block_cc = min(triton.next_power_of_2(c), 512)
    return min(triton.next_power_of_2(c), 4096 // block_cc), block_cc


def _nt_partials(a: torch.Tensor, b: torch.Tensor, symmetric: bool) -> torch.Tensor:
    """[splits, B, C, C] partial sums of a bᵀ over chunks of N, in fp32 (fp64 for fp64)."""
    batch, c, n = a.shape
    split_len = _split_len(n)
    splits = triton.cdiv(n, split_len)
    partial = torch.empty((splits, batch, c, c), dtype=_ops._lse_dtype(a.dtype), device=a.device)

    def grid(meta):
        tiles = triton.cdiv(c, meta["BLOCK_C"])
        return (tiles, tiles, batch * splits)

    launch(
        _nt_partial_kernel, grid,
        a, b, partial, *a.stride(), *b.stride(), *partial.stride(),
        c, n, split_len, splits, pow2(n),
        SYMMETRIC=symmetric, DOT_PRECISION=dot_precision(a.dtype),
    )
    return partial


def _check_x(fn: str, x: torch.Tensor) -> None:
    torch._check(x.dim() == 3, lambda: f"{fn}: x must be 3-D [B, C, N], got shape {tuple(x.shape)}")
    check_dtype(fn, x.dtype)


@triton_op("attnseg::triton_channel_attention_fwd", mutates_args=())
def channel_attention_fwd(x: torch.Tensor, official: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """CAM forward. x [B,C,N] (any strides) -> y = A X [B,C,N] contiguous, attn A [B,C,C] fp32 (fp64)."""
    _check_x("triton_channel_attention_fwd", x)
    batch, c, n = x.shape
    if batch == 0:  # an empty batch: nothing to launch (a grid may not have a zero dimension)
        return x.new_empty((0, c, n)), x.new_empty((0, c, c), dtype=_ops._lse_dtype(x.dtype))
    partial = _nt_partials(x, x, symmetric=True)
    splits = partial.shape[0]
    attn = torch.empty((batch, c, c), dtype=partial.dtype, device=x.device)
    block_r, block_cc = _row_blocks(c)
    launch(
        _softmax_fwd_kernel, (triton.cdiv(c, block_r), batch),
        partial, attn, *partial.stride(), *attn.stride(), c, splits,
        OFFICIAL=official, BLOCK_R=block_r, BLOCK_CC=block_cc,
    )
    y = torch.empty((batch, c, n), dtype=x.dtype, device=x.device)

    def grid(meta):
        return (triton.cdiv(c, meta["BLOCK_I"]), triton.cdiv(n, meta["BLOCK_N"]), batch)

    launch(
        _apply_kernel, grid,
        attn, x, y, *attn.stride(), *x.stride(), *y.stride(), c, n, pow2(n),
        DOT_PRECISION=dot_precision(x.dtype),
    )
    return y, attn


@triton_op("attnseg::triton_channel_attention_bwd", mutates_args=())
def channel_attention_bwd(grad_y: torch.Tensor, x: torch.Tensor, attn: torch.Tensor, official: bool) -> torch.Tensor:
    """CAM backward: grad_x [B,C,N] contiguous in x's dtype, from grad_y [B,C,N] and attn [B,C,C]."""
    _check_x("triton_channel_attention_bwd", x)
    batch, c, n = x.shape
    if batch == 0:
        return x.new_empty((0, c, n))
    grad_y = grad_y.to(x.dtype)  # no-op from autograd; tl.dot needs matching operand dtypes
    attn = attn.to(_ops._lse_dtype(x.dtype)).contiguous()  # shares its strides with grad_energy
    partial = _nt_partials(grad_y, x, symmetric=False)
    splits = partial.shape[0]
    grad_energy = torch.empty_like(attn)
    block_r, block_cc = _row_blocks(c)
    launch(
        _softmax_bwd_kernel, (triton.cdiv(c, block_r), batch),
        partial, attn, grad_energy, *partial.stride(), *attn.stride(), c, splits,
        OFFICIAL=official, BLOCK_R=block_r, BLOCK_CC=block_cc,
    )
    grad_x = torch.empty((batch, c, n), dtype=x.dtype, device=x.device)
    precision = dot_precision(x.dtype)
    if x.dtype in (torch.float16, torch.bfloat16):
        grad_e_precision = "tf32"  # fp16/bf16 X is exact in TF32; dE keeps fp32 range
    else:
        grad_e_precision = precision

    def grid(meta):
        return (triton.cdiv(c, meta["BLOCK_I"]), triton.cdiv(n, meta["BLOCK_N"]), batch)

    launch(
        _grad_x_kernel, grid,
        attn, grad_energy, grad_y, x, grad_x,
        *attn.stride(), *grad_y.stride(), *x.stride(), *grad_x.stride(), c, n, pow2(n),
        DOT_PRECISION=precision, GRAD_E_PRECISION=grad_e_precision,
    )
    return grad_x


_ops.register_channel_autograd("attnseg::triton_channel_attention_fwd", torch.ops.attnseg.triton_channel_attention_bwd)

channel_attention_fwd = torch.ops.attnseg.triton_channel_attention_fwd
channel_attention_bwd = torch.ops.attnseg.triton_channel_attention_bwd
