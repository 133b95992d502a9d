"""Fused attention in Triton: softmax(q kᵀ · scale) v with Ev ≠ E, forward and backward.

    attnseg::triton_attention_fwd(q[B,Nq,E], k[B,Nk,E], v[B,Nk,Ev], scale) -> (out[B,Nq,Ev], lse[B,Nq])
    attnseg::triton_attention_bwd(grad_out, grad_lse?, q, k, v, out, lse, scale) -> (dq, dk, dv)

Any strides on the inputs (``conv(x).flatten(2).transpose(1, 2)`` reaches the kernels without
a copy); out, dq, dk, dv are contiguous in the inputs' dtype; lse is fp32 (fp64 for fp64).

Kernels (one program per tile, each output element written by exactly one program; no atomics,
so results are bitwise reproducible for a given autotune config; two processes whose autotuning
picked different block sizes may differ in the last bits):

* ``_attn_fwd``, grid (Nq / BLOCK_M, Ev / BLOCK_EV · splits, B): one block of queries and one slice
  of the value width. It streams blocks of keys with an online softmax (running row max ``m``,
  running row sum ``l``, rescaled accumulator) and writes its slice of ``out``; the Ev-slice-0
  program also writes ``lse = m + log l``. Splitting Ev across programs keeps the BLOCK_M×BLOCK_EV
  accumulator in registers at Ev = 512; the price is recomputing q kᵀ (E wide, cheap next to
  P v) once per slice. Where that grid is under two waves of the GPU's SMs (:func:`kv_splits`),
  the keys are split too (SPLIT_KV): each program streams one split and writes its normalised
  partial output and lse to an fp32 workspace.
* ``_attn_fwd_combine``, grid (Nq / BLOCK_M, Ev / BLOCK_EV, B): merges the key splits,
  ``out = Σ w_s out_s / Σ w_s``, ``lse = m + log Σ w_s``, ``w_s = exp(lse_s − m)``, ``m = max lse_s``.
* ``_attn_bwd_delta``, grid (Nq / BLOCK_M, B): ``delta = rowsum(dO ∘ O) − grad_lse``.
* ``_attn_bwd_dkdv``, grid (Nk / BLOCK_N, ·, B): one block of keys; loops over query blocks,
  recomputes ``P = exp(S − lse)`` and accumulates ``dV += Pᵀ dO`` and ``dK += dSᵀ Q``,
  ``dS = P ∘ (dP − delta)``, ``dP = dO Vᵀ``. For Ev up to ``_DKDV_FUSED_EV`` (512, DANet's width;
  128 on launches the calibration does not cover) the same program does both from one dO tile of
  the full Ev width, so S and P are computed once per (key block, query block) pair; its dV
  accumulator is one BLOCK_N x Ev fp32 tile (BLOCK_N = 32 or 64 at 8 warps). Wider Ev takes the
  split path: a dV launch splits Ev across programs and a dK launch loops over Ev for dP.
* ``_attn_bwd_dq``, grid (Nq / BLOCK_M, B): one block of queries; loops over key blocks,
  ``dQ += dS K``. Its dO tile (BLOCK_M × Ev) is loaded once, before the key loop, and stays
  on chip (shared memory or registers, as Triton lays out a loop-invariant dot operand) for Ev
  up to ``_DQ_RESIDENT_EV`` (512 in fp16/bf16 on the calibrated layouts: DANet's width; 128
  in fp32/fp64, whose FMA dots spill at 512, and on other layouts); wider Ev loops over
  128-wide slices of dO and V per key block.

The softmax runs in the natural base in fp32 (fp64 for fp64 inputs). fp16/bf16 operands go
to ``tl.dot`` as they are (P and dS are cast to the input dtype, as in FlashAttention) with
fp32 accumulation; fp32 operands use IEEE precision unless
``torch.backends.cuda.matmul.allow_tf32`` is set. Triton passes Python floats as fp32, so the
scale goes in as an fp32 pair (hi + lo) that fp64 kernels add back up to full precision.
"""

import inspect
import struct
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from . import (LazyKernel, check_dtype, configs, dot_precision, interpreting, launch, make_prune, pow2,
               specialises_as_calibrated)
from .. import _ops
from .calibration import dtype_name

__all__ = ["attention_bwd", "attention_fwd", "kv_splits", "multiprocessor_count"]


# ---------------------------------------------------------------------------------------------
# Kernels (plain functions: LazyKernel decorates them on first use, see attnseg.triton)
# ---------------------------------------------------------------------------------------------


def _attn_fwd(
    Q, K, V, Out, Lse,
    stride_qb, stride_qm, stride_qe,
    stride_kb, stride_kn, stride_ke,
    stride_vb, stride_vn, stride_ve,
    stride_ob, stride_om, stride_oe,
    stride_lb, stride_lm,
    stride_os, stride_ls,  # SPLIT_KV: from one key split's partial (out, lse) to the next's; else 0
    NQ, NK, E, EV,
    SPLIT_LEN,  # SPLIT_KV: keys per split (a multiple of every BLOCK_N); else 0
    scale_hi, scale_lo,  # scale = scale_hi + scale_lo (fp32 pair; the lo part matters in fp64)
    TUNE_NQ, TUNE_NK,  # autotune key only: Nq, Nk rounded up to a power of two
    SPLIT_KV: tl.constexpr,  # program axis 1 also picks a split of the keys; Out, Lse: fp32 workspace
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    IS_FP64: tl.constexpr = Q.dtype.element_ty == tl.float64
    ACC: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(2).to(tl.int64)
    if SPLIT_KV:  # axis 1 = (key split, Ev slice), Ev slice fastest
        ev_slices = tl.cdiv(EV, BLOCK_EV)
        pid_ev = tl.program_id(1) % ev_slices
        pid_s = tl.program_id(1) // ev_slices
        key_lo = pid_s * SPLIT_LEN
        key_hi = tl.minimum(key_lo + SPLIT_LEN, NK)
        Out += pid_s.to(tl.int64) * stride_os
        Lse += pid_s.to(tl.int64) * stride_ls
    else:
        pid_ev = tl.program_id(1)
        key_lo = 0
        key_hi = NK
    Q += pid_b * stride_qb
    K += pid_b * stride_kb
    V += pid_b * stride_vb
    Out += pid_b * stride_ob
    Lse += pid_b * stride_lb

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = pid_ev * BLOCK_EV + tl.arange(0, BLOCK_EV)
    mask_m = offs_m < NQ
    mask_e = offs_e < E
    mask_ev = offs_ev < EV

    q = tl.load(Q + offs_m[:, None] * stride_qm + offs_e[None, :] * stride_qe,
                mask=mask_m[:, None] & mask_e[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), ACC)  # running row max of the scaled logits
    l_i = tl.zeros([BLOCK_M], ACC)  # running row sum of exp(logit - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_EV], ACC)
    for start_n in range(key_lo, key_hi, BLOCK_N):
        mask_n = (start_n + offs_n) < key_hi
        kt = tl.load(K + offs_e[:, None] * stride_ke + (start_n + offs_n)[None, :] * stride_kn,
                     mask=mask_e[:, None] & mask_n[None, :], other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION, out_dtype=ACC)
        if IS_FP64:
            s = s * scale_hi + s * scale_lo
        else:
            s = s * scale_hi
        s = tl.where(mask_n[None, :], s, float("-inf"))
        # Online softmax: raise the row max, rescale what was accumulated under the old one.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row whose logits so far are all -inf keeps l = 0 (no NaN from -inf - -inf)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + (start_n + offs_n)[:, None] * stride_vn + offs_ev[None, :] * stride_ve,
                    mask=mask_n[:, None] & mask_ev[None, :], other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    tl.store(Out + offs_m[:, None] * stride_om + offs_ev[None, :] * stride_oe,
             acc.to(Out.dtype.element_ty), mask=mask_m[:, None] & mask_ev[None, :])
    # Every Ev slice computes the same lse; slice 0 writes it.
    # logsumexp of a row holding +inf is +inf (as torch.logsumexp), not inf + log(NaN)
    lse = tl.where(m_i == float("inf"), m_i, m_i + tl.log(l_i))
    tl.store(Lse + offs_m * stride_lm, lse, mask=mask_m & (pid_ev == 0))


def _attn_fwd_combine(
    OutPart, LsePart, Out, Lse,
    stride_ps, stride_pb, stride_pm, stride_pe,
    stride_qs, stride_qb, stride_qm,  # LsePart
    stride_ob, stride_om, stride_oe,
    stride_lb, stride_lm,
    NQ, EV, SPLITS,
    BLOCK_M: tl.constexpr, BLOCK_EV: tl.constexpr,
):
    # Split-KV combine: out = Σ_s w_s out_s / Σ_s w_s, lse = m + log Σ_s w_s, w_s = exp(lse_s − m),
    # m = max_s lse_s; out_s is split s's softmax-normalised partial output (fp32 workspace).
    ACC: tl.constexpr = LsePart.dtype.element_ty
    pid_m = tl.program_id(0)
    pid_ev = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_ev = pid_ev * BLOCK_EV + tl.arange(0, BLOCK_EV)
    mask_m = offs_m < NQ
    mask = mask_m[:, None] & (offs_ev < EV)[None, :]
    LsePart += pid_b * stride_qb + offs_m * stride_qm
    OutPart += pid_b * stride_pb + offs_m[:, None] * stride_pm + offs_ev[None, :] * stride_pe

    m = tl.full([BLOCK_M], float("-inf"), ACC)
    for s in range(0, SPLITS):
        m = tl.maximum(m, tl.load(LsePart + s * stride_qs, mask=mask_m, other=0.0))
    # m = +inf: a split held a +inf logit (its out_s is NaN, so is the sum; lse = +inf as unsplit).
    # m = -inf: every split's row was all -inf (0 / 0 = NaN, lse = -inf, as unsplit).
    m_safe = tl.where((m == float("inf")) | (m == float("-inf")), 0.0, m)
    acc = tl.zeros([BLOCK_M, BLOCK_EV], ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    for s in range(0, SPLITS):
        lse_s = tl.load(LsePart + s * stride_qs, mask=mask_m, other=0.0)  # rows past Nq: l = splits
        out_s = tl.load(OutPart + s * stride_ps, mask=mask, other=0.0)
        # an all -inf split weighs 0 (its out_s is 0 / 0); a NaN lse_s keeps its NaN
        w = tl.where(lse_s == float("-inf"), 0.0, tl.exp(lse_s - m_safe))
        acc += tl.where((lse_s == float("-inf"))[:, None], 0.0, w[:, None] * out_s)
        l_i += w
    acc = acc / l_i[:, None]
    tl.store(Out + pid_b * stride_ob + offs_m[:, None] * stride_om + offs_ev[None, :] * stride_oe,
             acc.to(Out.dtype.element_ty), mask=mask)
    lse = tl.where(m == float("inf"), m, m_safe + tl.log(l_i))
    tl.store(Lse + pid_b * stride_lb + offs_m * stride_lm, lse, mask=mask_m & (pid_ev == 0))


def _attn_bwd_delta(
    Out, dOut, GradLse, Delta,
    stride_ob, stride_om, stride_oe,
    stride_dob, stride_dom, stride_doe,
    stride_glb, stride_glm,
    stride_db, stride_dm,
    NQ, EV,
    HAS_GRAD_LSE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_EV: tl.constexpr,
):
    # delta = rowsum(dO ∘ O) − grad_lse: the row term of the softmax backward.
    ACC: tl.constexpr = Delta.dtype.element_ty
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_ev = tl.arange(0, BLOCK_EV)
    mask_m = offs_m < NQ
    Out += pid_b * stride_ob
    dOut += pid_b * stride_dob
    delta = tl.zeros([BLOCK_M], ACC)
    for start_ev in range(0, EV, BLOCK_EV):
        mask = mask_m[:, None] & ((start_ev + offs_ev) < EV)[None, :]
        o = tl.load(Out + offs_m[:, None] * stride_om + (start_ev + offs_ev)[None, :] * stride_oe,
                    mask=mask, other=0.0)
        do = tl.load(dOut + offs_m[:, None] * stride_dom + (start_ev + offs_ev)[None, :] * stride_doe,
                     mask=mask, other=0.0)
        delta += tl.sum(o.to(ACC) * do.to(ACC), 1)
    if HAS_GRAD_LSE:
        grad_lse = tl.load(GradLse + pid_b * stride_glb + offs_m * stride_glm, mask=mask_m, other=0.0)
        delta -= grad_lse.to(ACC)
    tl.store(Delta + pid_b * stride_db + offs_m * stride_dm, delta, mask=mask_m)


def _attn_bwd_dkdv(
    Q, K, V, dOut, Lse, Delta, dK, dV,
    stride_qb, stride_qm, stride_qe,
    stride_kb, stride_kn, stride_ke,
    stride_vb, stride_vn, stride_ve,
    stride_dob, stride_dom, stride_doe,
    stride_lb, stride_lm,  # shared by Lse and Delta
    stride_dkb, stride_dkn, stride_dke,
    stride_dvb, stride_dvn, stride_dve,
    NQ, NK, E, EV,
    scale_hi, scale_lo,
    TUNE_NQ, TUNE_NK,
    COMPUTE_DK: tl.constexpr, COMPUTE_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # Works on transposed tiles (keys along rows): Sᵀ = K Qᵀ, Pᵀ = exp(Sᵀ − lse).
    # COMPUTE_DK and COMPUTE_DV together (the fused path, Ev up to _DKDV_FUSED_EV): BLOCK_EV covers
    # all of Ev, V stays resident, each query block's dO tile serves both dV += Pᵀ dO and
    # dPᵀ = V dOᵀ, so Sᵀ and Pᵀ are computed once per (key block, query block) pair. The dV
    # accumulator is one BLOCK_N x BLOCK_EV fp32 tile (BLOCK_N = 32 or 64 rows at Ev = 512).
    # COMPUTE_DV alone: program axis 1 picks an Ev slice. COMPUTE_DK alone: dP loops over Ev.
    IS_FP64: tl.constexpr = Q.dtype.element_ty == tl.float64
    ACC: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
    pid_n = tl.program_id(0)
    pid_ev = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    Q += pid_b * stride_qb
    K += pid_b * stride_kb
    V += pid_b * stride_vb
    dOut += pid_b * stride_dob
    Lse += pid_b * stride_lb
    Delta += pid_b * stride_lb

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = pid_ev * BLOCK_EV + tl.arange(0, BLOCK_EV)
    mask_n = offs_n < NK
    mask_e = offs_e < E
    mask_ev = offs_ev < EV

    k = tl.load(K + offs_n[:, None] * stride_kn + offs_e[None, :] * stride_ke,
                mask=mask_n[:, None] & mask_e[None, :], other=0.0)
    if COMPUTE_DK and COMPUTE_DV:
        v = tl.load(V + offs_n[:, None] * stride_vn + offs_ev[None, :] * stride_ve,
                    mask=mask_n[:, None] & mask_ev[None, :], other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_E], ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_EV], ACC)
    for start_m in range(0, NQ, BLOCK_M):
        rows = start_m + offs_m
        mask_m = rows < NQ
        qt = tl.load(Q + offs_e[:, None] * stride_qe + rows[None, :] * stride_qm,
                     mask=mask_e[:, None] & mask_m[None, :], other=0.0)
        st = tl.dot(k, qt, input_precision=DOT_PRECISION, out_dtype=ACC)
        if IS_FP64:
            st = st * scale_hi + st * scale_lo
        else:
            st = st * scale_hi
        # Queries past Nq and keys past Nk (S = 0 there, so exp(−lse), which can overflow fp16)
        # are zeroed explicitly. lse = +inf: the row held a +inf logit, its softmax is NaN.
        lse = tl.load(Lse + rows * stride_lm, mask=mask_m, other=0.0)
        pt = tl.where(lse[None, :] == float("inf"), float("nan"), tl.exp(st - lse[None, :]))
        pt = tl.where(mask_n[:, None] & mask_m[None, :], pt, 0.0)
        if COMPUTE_DV:
            do = tl.load(dOut + rows[:, None] * stride_dom + offs_ev[None, :] * stride_doe,
                         mask=mask_m[:, None] & mask_ev[None, :], other=0.0)
            dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        if COMPUTE_DK:
            if COMPUTE_DV:
                dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION, out_dtype=ACC)
            else:
                dpt = tl.zeros([BLOCK_N, BLOCK_M], ACC)
                for start_ev in range(0, EV, BLOCK_EV):
                    cols = start_ev + tl.arange(0, BLOCK_EV)
                    v_c = tl.load(V + offs_n[:, None] * stride_vn + cols[None, :] * stride_ve,
                                  mask=mask_n[:, None] & (cols < EV)[None, :], other=0.0)
                    dot_c = tl.load(dOut + cols[:, None] * stride_doe + rows[None, :] * stride_dom,
                                    mask=(cols < EV)[:, None] & mask_m[None, :], other=0.0)
                    dpt = tl.dot(v_c, dot_c, dpt, input_precision=DOT_PRECISION)
            delta = tl.load(Delta + rows * stride_lm, mask=mask_m, other=0.0)
            dst = pt * (dpt - delta[None, :])
            dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=DOT_PRECISION)

    if COMPUTE_DK:
        if IS_FP64:
            dk = dk * scale_hi + dk * scale_lo
        else:
            dk = dk * scale_hi
        tl.store(dK + pid_b * stride_dkb + offs_n[:, None] * stride_dkn + offs_e[None, :] * stride_dke,
                 dk.to(dK.dtype.element_ty), mask=mask_n[:, None] & mask_e[None, :])
    if COMPUTE_DV:
        tl.store(dV + pid_b * stride_dvb + offs_n[:, None] * stride_dvn + offs_ev[None, :] * stride_dve,
                 dv.to(dV.dtype.element_ty), mask=mask_n[:, None] & mask_ev[None, :])


def _attn_bwd_dq(
    Q, K, V, dOut, Lse, Delta, dQ,
    stride_qb, stride_qm, stride_qe,
    stride_kb, stride_kn, stride_ke,
    stride_vb, stride_vn, stride_ve,
    stride_dob, stride_dom, stride_doe,
    stride_lb, stride_lm,
    stride_dqb, stride_dqm, stride_dqe,
    NQ, NK, E, EV,
    scale_hi, scale_lo,
    TUNE_NQ, TUNE_NK,
    EV_SINGLE: tl.constexpr,  # Ev fits one BLOCK_EV tile: the dO tile is loaded once, before the loop
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    IS_FP64: tl.constexpr = Q.dtype.element_ty == tl.float64
    ACC: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    Q += pid_b * stride_qb
    K += pid_b * stride_kb
    V += pid_b * stride_vb
    dOut += pid_b * stride_dob

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    mask_m = offs_m < NQ
    mask_e = offs_e < E

    q = tl.load(Q + offs_m[:, None] * stride_qm + offs_e[None, :] * stride_qe,
                mask=mask_m[:, None] & mask_e[None, :], other=0.0)
    lse = tl.load(Lse + pid_b * stride_lb + offs_m * stride_lm, mask=mask_m, other=0.0)
    delta = tl.load(Delta + pid_b * stride_lb + offs_m * stride_lm, mask=mask_m, other=0.0)
    if EV_SINGLE:
        do = tl.load(dOut + offs_m[:, None] * stride_dom + offs_ev[None, :] * stride_doe,
                     mask=mask_m[:, None] & (offs_ev < EV)[None, :], other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_E], ACC)
    for start_n in range(0, NK, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < NK
        kt = tl.load(K + offs_e[:, None] * stride_ke + cols[None, :] * stride_kn,
                     mask=mask_e[:, None] & mask_n[None, :], other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION, out_dtype=ACC)
        if IS_FP64:
            s = s * scale_hi + s * scale_lo
        else:
            s = s * scale_hi
        p = tl.where(lse[:, None] == float("inf"), float("nan"), tl.exp(s - lse[:, None]))
        p = tl.where(mask_n[None, :], p, 0.0)
        if EV_SINGLE:
            vt = tl.load(V + offs_ev[:, None] * stride_ve + cols[None, :] * stride_vn,
                         mask=(offs_ev < EV)[:, None] & mask_n[None, :], other=0.0)
            dp = tl.dot(do, vt, input_precision=DOT_PRECISION, out_dtype=ACC)
        else:
            dp = tl.zeros([BLOCK_M, BLOCK_N], ACC)
            for start_ev in range(0, EV, BLOCK_EV):
                evs = start_ev + offs_ev
                do_c = tl.load(dOut + offs_m[:, None] * stride_dom + evs[None, :] * stride_doe,
                               mask=mask_m[:, None] & (evs < EV)[None, :], other=0.0)
                vt_c = tl.load(V + evs[:, None] * stride_ve + cols[None, :] * stride_vn,
                               mask=(evs < EV)[:, None] & mask_n[None, :], other=0.0)
                dp = tl.dot(do_c, vt_c, dp, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=DOT_PRECISION)

    if IS_FP64:
        dq = dq * scale_hi + dq * scale_lo
    else:
        dq = dq * scale_hi
    tl.store(dQ + pid_b * stride_dqb + offs_m[:, None] * stride_dqm + offs_e[None, :] * stride_dqe,
             dq.to(dQ.dtype.element_ty), mask=mask_m[:, None] & mask_e[None, :])


# ---------------------------------------------------------------------------------------------
# Autotuning: configs for A100 / H100, pruned to what fits the device and the problem.
# ---------------------------------------------------------------------------------------------


def _caps_fwd(args):
    return {"BLOCK_M": pow2(args["NQ"]), "BLOCK_N": pow2(args["NK"]), "BLOCK_EV": pow2(args["EV"])}


def _caps_bwd(args):
    return {"BLOCK_M": pow2(args["NQ"]), "BLOCK_N": pow2(args["NK"])}


def _shared_fwd(block, stages, args):
    # Q, P, and the pipelined Kᵀ and V tiles, in the input dtype.
    m, n, e, ev = block["BLOCK_M"], block["BLOCK_N"], args["BLOCK_E"], block["BLOCK_EV"]
    return args["Q"].element_size() * (m * e + m * n + stages * n * (e + ev))


def _live_fwd(block, args):
    # Accumulator, S/P, and the Kᵀ / V tiles (one address a lane each when rows are unaligned).
    m, n, e, ev = block["BLOCK_M"], block["BLOCK_N"], args["BLOCK_E"], block["BLOCK_EV"]
    return m * ev + m * n + n * (e + ev)


def _shared_bwd(rows: str, cols: str, streamed_ev: int):
    def shared(block, stages, args):
        # Resident row-side tiles, plus per stage the streamed E-wide tile and ``streamed_ev``
        # Ev-wide ones (dK/dV: Qᵀ, dO and dOᵀ; dQ: Kᵀ and Vᵀ).
        r, c, e, ev = block[rows], block[cols], args["BLOCK_E"], args["BLOCK_EV"]
        return args["Q"].element_size() * (r * (e + ev) + r * c + stages * c * (e + streamed_ev * ev))

    return shared


def _live_bwd(rows: str, cols: str):
    def live(block, args):
        # The row side's dK|dQ and dV|dO tiles, S, P and dP/dS, and the streamed tiles.
        r, c, e, ev = block[rows], block[cols], args["BLOCK_E"], args["BLOCK_EV"]
        return r * (e + ev) + 3 * r * c + c * (e + ev)

    return live


_TUNE_KEY = ["TUNE_NQ", "TUNE_NK", "E", "EV"]
# The fused dK/dV path at Ev = 512 holds a BLOCK_N x 512 fp32 dV accumulator: BLOCK_N = 32 or 64 at
# 8 warps (64 or 128 registers a thread for dV alone), BLOCK_M = 16 or 32 queries a step.
_DKDV_FUSED_CONFIGS = configs(BLOCK_M=[16, 32], BLOCK_N=[32, 64], num_warps=[8], num_stages=[2, 3]) + configs(
    BLOCK_M=[16], BLOCK_N=[16], num_warps=[8], num_stages=[2])  # fp32-IEEE at Ev = 512

_fwd_kernel = LazyKernel(
    _attn_fwd,
    configs=configs(BLOCK_M=[64, 128], BLOCK_N=[32, 64], BLOCK_EV=[64, 128, 256], num_warps=[4, 8], num_stages=[2, 3])
    + configs(BLOCK_M=[64, 128], BLOCK_N=[64], BLOCK_EV=[64, 128, 256], num_warps=[4, 8], num_stages=[4])
    + configs(BLOCK_M=[64, 128], BLOCK_N=[128], BLOCK_EV=[64, 128], num_warps=[4, 8], num_stages=[2, 3])
    + configs(BLOCK_M=[32, 64], BLOCK_N=[32], BLOCK_EV=[32, 64], num_warps=[8], num_stages=[2]),  # fp32-IEEE / fp64
    interpreter_config=triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_EV": 64}),
    key=_TUNE_KEY + ["SPLIT_KV"],
    prune=make_prune(_shared_fwd, _live_fwd, budget=144, caps=_caps_fwd, operand="Q",
                     calibration=lambda a: ("_attn_fwd", a["BLOCK_E"])),
)
_combine_kernel = LazyKernel(_attn_fwd_combine)
_delta_kernel = LazyKernel(_attn_bwd_delta)
_dkdv_kernel = LazyKernel(
    _attn_bwd_dkdv,
    configs=configs(BLOCK_M=[32, 64], BLOCK_N=[64, 128], num_warps=[4, 8], num_stages=[2, 3, 4])
    + configs(BLOCK_M=[16, 32], BLOCK_N=[32], num_warps=[8], num_stages=[2])  # fp32-IEEE / fp64
    + _DKDV_FUSED_CONFIGS,
    interpreter_config=triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}),
    key=_TUNE_KEY + ["COMPUTE_DK", "COMPUTE_DV", "BLOCK_EV"],
    prune=make_prune(_shared_bwd("BLOCK_N", "BLOCK_M", 2), _live_bwd("BLOCK_N", "BLOCK_M"),
                     budget=300, caps=_caps_bwd, operand="Q",
                     calibration=lambda a: ("_attn_bwd_dkdv", bool(a["COMPUTE_DK"]), bool(a["COMPUTE_DV"]),
                                            a["BLOCK_E"], a["BLOCK_EV"])),
)
_dq_kernel = LazyKernel(
    _attn_bwd_dq,
    configs=configs(BLOCK_M=[64, 128], BLOCK_N=[32, 64], num_warps=[4, 8], num_stages=[2, 3])
    + configs(BLOCK_M=[64, 128], BLOCK_N=[128], num_warps=[4, 8], num_stages=[2, 3])
    + configs(BLOCK_M=[32], BLOCK_N=[16, 32], num_warps=[8], num_stages=[2]),  # fp32-IEEE / fp64
    interpreter_config=triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}),
    key=_TUNE_KEY + ["EV_SINGLE", "BLOCK_EV"],
    prune=make_prune(_shared_bwd("BLOCK_M", "BLOCK_N", 1), _live_bwd("BLOCK_M", "BLOCK_N"),
                     budget=300, caps=_caps_bwd, operand="Q",
                     calibration=lambda a: ("_attn_bwd_dq", bool(a["EV_SINGLE"]), a["BLOCK_E"], a["BLOCK_EV"])),
)


# Widest Ev the fused dK/dV path takes (one BLOCK_N x Ev fp32 dV accumulator; DANet's width) on
# launches that specialise as the calibrated one, where its configs were measured to compile clean
# (fp16/bf16: BLOCK_N = 32 on sm_80, 32 or 64 on sm_90; fp32-IEEE: BLOCK_N = 16 or 32 with
# BLOCK_M = 16). Elsewhere (unaligned strides, fp64, TF32) up to _DKDV_SLICE_EV, whose estimates
# were fitted. Wider Ev goes to the split path: a dK launch whose dP loops over Ev slices and a dV
# launch with an Ev slice per program, each recomputing P; its registers stay bounded at any Ev.
_DKDV_FUSED_EV = 512
_DKDV_SLICE_EV = 128  # the split path's Ev slice, and the fused limit where not calibrated
# Widest Ev whose dO tile the dQ kernel keeps resident: 512 (DANet's width) for tensor-core dtypes
# on launches that specialise as the calibrated one (attnseg/triton/calibration.py), where the
# kept configs were measured to compile clean. Elsewhere 128, as the dK/dV kernel: fp32/fp64 dots
# run as FMA with the tile in registers (at 512 every fp32 config spills, 10-34 KiB of stack on
# sm_80), and unaligned strides (N = 9409) need an address a lane per element (480 B of spill on
# sm_90 in bf16).
_DQ_RESIDENT_EV = {torch.float16: 512, torch.bfloat16: 512}


_DQ_ARG_NAMES = tuple(inspect.signature(_attn_bwd_dq).parameters)
_DKDV_ARG_NAMES = tuple(inspect.signature(_attn_bwd_dkdv).parameters)


def _bwd_ev_tile(ev: int, calibrated: bool = True) -> tuple[int, bool]:
    """(BLOCK_EV, whether the fused dK/dV path runs) for the dK/dV kernel: Ev up to
    ``_DKDV_FUSED_EV`` in one tile where the launch specialises as the calibrated one
    (``calibrated``; always under the interpreter, which has no registers), up to
    ``_DKDV_SLICE_EV`` elsewhere; wider Ev in ``_DKDV_SLICE_EV``-wide slices (64 under the
    interpreter, so that small tests reach several slices)."""
    limit = _DKDV_FUSED_EV if calibrated or interpreting() else _DKDV_SLICE_EV
    if ev <= limit:
        return pow2(ev), True
    return (64 if interpreting() else _DKDV_SLICE_EV), False


def _dq_ev_tile(ev: int, dtype: torch.dtype, calibrated: bool = True) -> tuple[int, bool]:
    """(BLOCK_EV, whether the dO tile stays resident) for the dQ kernel: Ev up to
    ``_DQ_RESIDENT_EV`` (``calibrated``: the launch specialises as the calibrated one; otherwise
    up to the dK/dV kernel's tile) in one tile, loaded once per program; wider Ev in the dK/dV
    kernel's slices, of dO and V reloaded per key block."""
    if interpreting():  # tests: Ev = 96 resident (dK/dV sliced), Ev = 512 sliced
        limit = 128
    else:
        limit = _DQ_RESIDENT_EV.get(dtype, _DKDV_SLICE_EV) if calibrated else _DKDV_SLICE_EV
    if ev <= limit:
        return pow2(ev), True
    return (64 if interpreting() else _DKDV_SLICE_EV), False


# Split-KV forward: where the forward's programs (query blocks x Ev slices x batch) are fewer than
# _FILL_WAVES waves of the GPU's SMs, the keys are split too. Counted at the reference tile (128
# queries, 128 Ev columns: FA2's query tile, the middle of the Ev slices the configs offer), since
# the split is decided before autotuning picks the block sizes.
_FILL_WAVES = 2
_FILL_TILE = 128
_MIN_SPLIT_KEYS = 256  # keys per split at least (two BLOCK_N = 128 tiles), a multiple of every BLOCK_N
_MAX_KV_SPLITS = 16


def multiprocessor_count(device: torch.device) -> Optional[int]:
    """The SMs of a CUDA ``device``; None on the CPU and under the interpreter (treated as large:
    no split-KV)."""
    device = torch.device(device)
    if device.type != "cuda" or interpreting():
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


def kv_splits(batch: int, nq: int, nk: int, ev: int, sms: Optional[int]) -> tuple[int, int]:
    """(splits, keys per split) of the keys for the forward: 1 where the unsplit grid,
    ``batch · ceil(nq / 128) · ceil(ev / 128)`` programs, reaches ``_FILL_WAVES`` waves of
    ``sms`` SMs (or ``sms`` is None); otherwise enough splits to reach them, at most
    ``_MAX_KV_SPLITS`` and no fewer than ``_MIN_SPLIT_KEYS`` keys each (the last split ragged).

    B = 1, N = 9,216, Ev = 512 on 132 SMs: 72 · 4 = 288 programs >= 264, no split."""
    if sms is None or sms <= 0:
        return 1, nk
    programs = batch * triton.cdiv(nq, _FILL_TILE) * triton.cdiv(ev, _FILL_TILE)
    target = _FILL_WAVES * sms
    if programs >= target:
        return 1, nk
    splits = min(triton.cdiv(target, programs), triton.cdiv(nk, _MIN_SPLIT_KEYS), _MAX_KV_SPLITS)
    if splits <= 1:
        return 1, nk
    split_len = triton.cdiv(triton.cdiv(nk, splits), _MIN_SPLIT_KEYS) * _MIN_SPLIT_KEYS
    return triton.cdiv(nk, split_len), split_len


# ---------------------------------------------------------------------------------------------
# Ops
# ---------------------------------------------------------------------------------------------


def _to_fp32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


def _scale_pair(scale: float) -> tuple[float, float]:
    """scale as hi + lo, both exactly representable in fp32 (Triton passes floats as fp32)."""
    hi = _to_fp32(scale)
    return hi, _to_fp32(scale - hi)


def _check_inputs(fn: str, q, k, v) -> None:
    # functional.py validates user input; these guard direct calls of the op.
    _ops.check_attention_inputs(fn, q, k, v)
    check_dtype(fn, q.dtype)


@triton_op("attnseg::triton_attention_fwd", mutates_args=())
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused attention forward. q [B,Nq,E], k [B,Nk,E], v [B,Nk,Ev] -> out [B,Nq,Ev], lse [B,Nq]."""
    _check_inputs("triton_attention_fwd", q, k, v)
    b, nq, e = q.shape
    nk, ev = k.shape[1], v.shape[2]
    out = torch.empty((b, nq, ev), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, nq), dtype=_ops._lse_dtype(q.dtype), device=q.device)
    if b == 0:  # an empty batch: nothing to launch (a grid may not have a zero dimension)
        return out, lse
    scale_hi, scale_lo = _scale_pair(scale)
    splits, split_len = kv_splits(b, nq, nk, ev, multiprocessor_count(q.device))
    if splits > 1:  # partial (out, lse) per key split in an fp32 workspace, then the combine kernel
        out_part = torch.empty((splits, b, nq, ev), dtype=lse.dtype, device=q.device)
        lse_part = torch.empty((splits, b, nq), dtype=lse.dtype, device=q.device)
        dest, dest_lse = out_part, lse_part
        split_strides = (out_part.stride(0), lse_part.stride(0))
        dest_strides = (*out_part.stride()[1:], *lse_part.stride()[1:])
    else:
        dest, dest_lse = out, lse
        split_strides = (0, 0)
        dest_strides = (*out.stride(), *lse.stride())

    def grid(meta):
        return (triton.cdiv(nq, meta["BLOCK_M"]), triton.cdiv(ev, meta["BLOCK_EV"]) * splits, b)

    launch(
        _fwd_kernel, grid,
        q, k, v, dest, dest_lse,
        *q.stride(), *k.stride(), *v.stride(), *dest_strides, *split_strides,
        nq, nk, e, ev, split_len if splits > 1 else 0, scale_hi, scale_lo, pow2(nq), pow2(nk),
        SPLIT_KV=splits > 1, BLOCK_E=pow2(e), DOT_PRECISION=dot_precision(q.dtype),
    )
    if splits > 1:
        block_m, block_ev = 32, min(pow2(ev), 128)
        launch(
            _combine_kernel, (triton.cdiv(nq, block_m), triton.cdiv(ev, block_ev), b),
            out_part, lse_part, out, lse,
            *out_part.stride(), *lse_part.stride(), *out.stride(), *lse.stride(),
            nq, ev, splits,
            BLOCK_M=block_m, BLOCK_EV=block_ev,
        )
    return out, lse


@triton_op("attnseg::triton_attention_bwd", mutates_args=())
def attention_bwd(
    grad_out: torch.Tensor,
    grad_lse: Optional[torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused attention backward: (dq, dk, dv), each contiguous in its input's shape and dtype.

    ``grad_lse`` (the gradient reaching ``lse``, or None) enters as delta = rowsum(dO∘O) − grad_lse.
    """
    _check_inputs("triton_attention_bwd", q, k, v)
    b, nq, e = q.shape
    nk, ev = k.shape[1], v.shape[2]
    acc_dtype = _ops._lse_dtype(q.dtype)
    dq = torch.empty((b, nq, e), dtype=q.dtype, device=q.device)
    dk = torch.empty((b, nk, e), dtype=k.dtype, device=k.device)
    dv = torch.empty((b, nk, ev), dtype=v.dtype, device=v.device)
    delta = torch.empty((b, nq), dtype=acc_dtype, device=q.device)
    if b == 0:
        return dq, dk, dv
    grad_out = grad_out.to(q.dtype)  # no-op from autograd; tl.dot needs matching operand dtypes
    lse = lse.to(acc_dtype)
    scale_hi, scale_lo = _scale_pair(scale)
    block_e = pow2(e)
    precision = dot_precision(q.dtype)
    sizes = (nq, nk, e, ev, scale_hi, scale_lo, pow2(nq), pow2(nk))

    # 1. delta = rowsum(dO ∘ O) − grad_lse
    has_grad_lse = grad_lse is not None
    grad_lse_arg = grad_lse if has_grad_lse else delta  # placeholder pointer, never read
    block_m_delta = 16 if interpreting() else 64
    launch(
        _delta_kernel, (triton.cdiv(nq, block_m_delta), b),
        out, grad_out, grad_lse_arg, delta,
        *out.stride(), *grad_out.stride(), *grad_lse_arg.stride(), *delta.stride(),
        nq, ev,
        HAS_GRAD_LSE=has_grad_lse, BLOCK_M=block_m_delta, BLOCK_EV=min(pow2(ev), 128),
    )

    # 2. dK, dV per key block: one launch (fused) or a dK and a dV launch (split, Ev too wide)
    common = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *lse.stride())
    dkdv_args = (q, k, v, grad_out, lse, delta, dk, dv, *common, *dk.stride(), *dv.stride(), *sizes)
    calibrated = (dtype_name(q.dtype, precision) is not None
                  and specialises_as_calibrated("_attn_bwd_dkdv", dict(zip(_DKDV_ARG_NAMES, dkdv_args))))
    block_ev, ev_single = _bwd_ev_tile(ev, calibrated)
    if ev_single:
        modes = [(True, True, 1)]
    else:
        modes = [(True, False, 1), (False, True, triton.cdiv(ev, block_ev))]
    for compute_dk, compute_dv, ev_programs in modes:
        def grid_dkdv(meta, ev_programs=ev_programs):
            return (triton.cdiv(nk, meta["BLOCK_N"]), ev_programs, b)

        launch(
            _dkdv_kernel, grid_dkdv, *dkdv_args,
            COMPUTE_DK=compute_dk, COMPUTE_DV=compute_dv,
            BLOCK_E=block_e, BLOCK_EV=block_ev, DOT_PRECISION=precision,
        )

    # 3. dQ per query block
    def grid_dq(meta):
        return (triton.cdiv(nq, meta["BLOCK_M"]), b)

    dq_args = (q, k, v, grad_out, lse, delta, dq, *common, *dq.stride(), *sizes)
    named = dict(zip(_DQ_ARG_NAMES, dq_args))
    dq_block_ev, dq_resident = _dq_ev_tile(ev, q.dtype, specialises_as_calibrated("_attn_bwd_dq", named))
    launch(
        _dq_kernel, grid_dq, *dq_args,
        EV_SINGLE=dq_resident, BLOCK_E=block_e, BLOCK_EV=dq_block_ev, DOT_PRECISION=precision,
    )
    return dq, dk, dv


_ops.register_attention_autograd("attnseg::triton_attention_fwd", torch.ops.attnseg.triton_attention_bwd)

attention_fwd = torch.ops.attnseg.triton_attention_fwd
attention_bwd = torch.ops.attnseg.triton_attention_bwd
