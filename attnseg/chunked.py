"""The query-chunked backend: every product a library GEMM through torch, on any device.

Attention ``softmax(q kᵀ · scale) v`` is computed a chunk of queries at a time ("Self-attention
Does Not Need O(n²) Memory", Rabe & Staats, 2021): per chunk of ``c`` query rows,

    forward    S = q_c kᵀ · scale;  lse_c = logsumexp(S);  P = exp(S − lse_c);  out_c = P v
    backward   S, P recomputed from the saved lse;  dV += Pᵀ dO_c;  dP = dO_c vᵀ;
               dS = P ∘ (dP − delta_c), delta = rowsum(dO ∘ out) − grad_lse;
               dQ_c = dS k · scale;  dK += dSᵀ q_c · scale

so only a c × Nk slice of the map exists at any time (O(B · c · Nk) memory beyond the inputs,
outputs and gradients). Every matrix product is ``torch.bmm`` / ``baddbmm``: cuBLAS on CUDA,
MKL or oneDNN on the CPU, whatever library torch has on another device. Nothing here needs
tuning; the only choice is the chunk, taken from a memory budget (:func:`chunk_rows`): the
largest number of query rows whose temporaries fit it, so a whole map that fits is one chunk.

Numerics: for float32 and float64 everything stays in the input dtype (as the official math).
For float16 and bfloat16 the GEMMs take the input dtype and accumulate in fp32 (the library's
own accumulation), S is converted to fp32 for the softmax and its statistics (the lse is fp32),
P and dS are rounded to the input dtype only as GEMM operands (the official math keeps P in the
input dtype too), and dK, dV accumulate over chunks in fp32. There are no atomics: every
reduction runs in a fixed order, so results are bitwise repeatable for a given chunk size.

Channel attention (CAM) needs no chunking: its map is C × C. :func:`channel_attention` is the
math through library GEMMs with the Gram matrix and its softmax in fp32 for every input dtype
(a Gram matrix of post-ReLU features overflows fp16 at DANet's sizes), differentiated by
torch's autograd.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _ops

__all__ = [
    "BYTES_PER_MAP_ELEMENT",
    "attention_bwd",
    "attention_fwd",
    "channel_attention",
    "chunk_rows",
]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return _ops._lse_dtype(dtype)  # fp64 for fp64, else fp32


def bytes_per_map_element(dtype: torch.dtype, backward: bool) -> int:
    """Bytes that each element of a chunk's c × Nk slice of the map costs at the chunk's peak.

    fp32 / fp64 forward: S, turned into P in place (1 element). Backward: P and dP, dS written
    over dP (2). fp16 / bf16 forward: the fp32 S turned into P in place and a GEMM operand in
    the input dtype (S from the CPU's GEMM, then P): 4 + 2 = 6. Backward: the fp32 P, the
    operand (P, then dS) and dP: 4 + 2 + 2 = 8.
    """
    size = torch.empty((), dtype=dtype).element_size()
    if dtype in (torch.float32, torch.float64):
        return size * (2 if backward else 1)
    return 8 if backward else 6


BYTES_PER_MAP_ELEMENT = {
    (dtype, backward): bytes_per_map_element(dtype, backward)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    for backward in (False, True)
}


def chunk_rows(batch: int, nq: int, nk: int, dtype: torch.dtype, budget_bytes: int, max_chunks: int,
               backward: bool) -> int:
    """Query rows per chunk: the most whose temporaries (``batch · rows · nk`` map elements at
    :func:`bytes_per_map_element` each) fit ``budget_bytes``, raised where needed so that there
    are at most ``max_chunks`` chunks (0: no limit); at least 1, at most ``nq``.

    One row over the budget still runs (a budget smaller than one row of the map is exceeded by
    that row, never refused).
    """
    per_row = max(1, batch) * nk * BYTES_PER_MAP_ELEMENT[(dtype, backward)]
    rows = budget_bytes // per_row
    if max_chunks > 0:
        rows = max(rows, -(-nq // max_chunks))
    return max(1, min(nq, rows))


def _check_inputs(fn: str, q, k, v) -> None:
    _ops.check_attention_inputs(fn, q, k, v)
    torch._check(q.is_floating_point(), lambda: f"{fn}: q must be floating point, got {q.dtype}")


_HALF = (torch.float16, torch.bfloat16)


class _Workspace:
    """A chunk's map-sized buffers, allocated once per call and reused by every chunk, so that the
    peak is the budget and not what the allocator makes of a fresh tensor a chunk."""

    def __init__(self, batch: int, rows: int, nk: int, device: torch.device):
        self.batch, self.rows, self.nk, self.device = batch, rows, nk, device
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, dtype: torch.dtype, rows: int) -> torch.Tensor:
        """Buffer ``name`` as a contiguous [B, rows, Nk] tensor (rows <= the chunk's rows)."""
        buffer = self._buffers.get(name)
        if buffer is None:
            buffer = torch.empty(self.batch * self.rows * self.nk, dtype=dtype, device=self.device)
            self._buffers[name] = buffer
        return buffer[: self.batch * rows * self.nk].view(self.batch, rows, self.nk)


def _logits(work: _Workspace, q_c: torch.Tensor, k_t: torch.Tensor, scale: float) -> torch.Tensor:
    """S = q_c kᵀ · scale into the workspace's "s", [B, c, Nk], in the softmax's dtype (fp32 for
    half inputs; on the CPU the GEMM rounds S to the input dtype first, as the official math's
    logits are)."""
    dtype, c = q_c.dtype, q_c.shape[1]
    s = work.get("s", _acc_dtype(dtype), c)
    if dtype not in _HALF:
        torch.bmm(q_c, k_t, out=s)
    elif q_c.device.type == "cuda":  # cuBLAS writes its fp32 accumulator directly
        torch.bmm(q_c, k_t, out_dtype=torch.float32, out=s)
    else:
        s.copy_(torch.bmm(q_c, k_t, out=work.get("operand", dtype, c)))
    return s if scale == 1.0 else s.mul_(scale)


def _operand(work: _Workspace, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` (fp32 for half inputs) as a GEMM operand of the inputs' dtype (workspace "operand")."""
    return t if t.dtype == dtype else work.get("operand", dtype, t.shape[1]).copy_(t)


def _add_product(acc: torch.Tensor, first: bool, a: torch.Tensor, b: torch.Tensor, alpha: float) -> None:
    """acc (+)= alpha · (a @ b): written by the first chunk, added to by the others; acc is fp32
    for half inputs (the product's own accumulation rounded once per chunk on the CPU)."""
    if acc.dtype == a.dtype:
        if first:
            torch.bmm(a, b, out=acc)
            if alpha != 1.0:
                acc.mul_(alpha)
        else:
            acc.baddbmm_(a, b, alpha=alpha)
        return
    if a.device.type == "cuda":
        product = torch.bmm(a, b, out_dtype=torch.float32)  # cuBLAS writes its fp32 accumulator
    else:
        product = torch.bmm(a, b)
    if first:
        acc.copy_(product)
        if alpha != 1.0:
            acc.mul_(alpha)
    else:
        acc.add_(product, alpha=alpha)


@torch.library.custom_op("attnseg::chunked_attention_fwd", mutates_args=())
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, budget_bytes: int,
                  max_chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked attention forward. q [B,Nq,E], k [B,Nk,E], v [B,Nk,Ev] (any strides) ->
    out [B,Nq,Ev] (contiguous, q's dtype), lse [B,Nq] (fp32; fp64 for fp64 inputs)."""
    _check_inputs("chunked_attention_fwd", q, k, v)
    b, nq, _ = q.shape
    nk = k.shape[1]
    out = torch.empty((b, nq, v.shape[2]), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, nq), dtype=_acc_dtype(q.dtype), device=q.device)
    if b == 0:
        return out, lse
    k_t = k.transpose(1, 2)  # a view: bmm reads either major order without a copy
    rows = chunk_rows(b, nq, nk, q.dtype, budget_bytes, max_chunks, backward=False)
    work = _Workspace(b, rows, nk, q.device)
    for start in range(0, nq, rows):
        stop = min(nq, start + rows)
        p = _logits(work, q[:, start:stop], k_t, scale)
        # safe softmax in place (no map-sized temporary): P = exp(S − m) / l, lse = m + log l
        m = p.amax(dim=-1, keepdim=True)
        p.sub_(m).exp_()
        l = p.sum(dim=-1, keepdim=True)
        p.div_(l)
        torch.bmm(_operand(work, p, q.dtype), v, out=out[:, start:stop])  # out_c = P v
        torch.add(m, l.log_(), out=lse[:, start:stop].unsqueeze(-1))
    return out, lse


@attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, scale, budget_bytes, max_chunks):
    b, nq, _ = q.shape
    return q.new_empty((b, nq, v.shape[-1])), q.new_empty((b, nq), dtype=_acc_dtype(q.dtype))


@torch.library.custom_op("attnseg::chunked_attention_bwd", mutates_args=())
def attention_bwd(grad_out: torch.Tensor, grad_lse: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor,
                  v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, scale: float, budget_bytes: int,
                  max_chunks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chunked attention backward: (dq, dk, dv) in the layouts of q, k and v (``empty_like``).

    ``grad_lse`` (the gradient reaching ``lse``, or None) enters as delta = rowsum(dO∘O) − grad_lse.
    """
    _check_inputs("chunked_attention_bwd", q, k, v)
    b, nq, _ = q.shape
    nk = k.shape[1]
    dq = torch.empty_like(q)
    if b == 0:
        return dq, torch.empty_like(k), torch.empty_like(v)
    dtype, acc = q.dtype, _acc_dtype(q.dtype)
    grad_out = grad_out.to(dtype)
    # delta = rowsum(dO ∘ O) − grad_lse, [B, Nq, 1] in the accumulation dtype
    delta = torch.linalg.vecdot(grad_out.to(acc), out.to(acc)).unsqueeze(-1)
    if grad_lse is not None:
        delta.sub_(grad_lse.to(acc).unsqueeze(-1))
    lse = lse.to(acc).unsqueeze(-1)
    k_t, v_t = k.transpose(1, 2), v.transpose(1, 2)
    rows = chunk_rows(b, nq, nk, dtype, budget_bytes, max_chunks, backward=True)
    one_chunk = rows >= nq
    # dK, dV: in k's and v's layouts, or fp32 accumulators for half inputs over several chunks
    dk = torch.empty_like(k) if dtype not in _HALF or one_chunk else torch.empty(k.shape, dtype=acc, device=k.device)
    dv = torch.empty_like(v) if dtype not in _HALF or one_chunk else torch.empty(v.shape, dtype=acc, device=v.device)
    work = _Workspace(b, rows, nk, q.device)
    for start in range(0, nq, rows):
        stop = min(nq, start + rows)
        first = start == 0
        q_c, do_c = q[:, start:stop], grad_out[:, start:stop]
        p = _logits(work, q_c, k_t, scale).sub_(lse[:, start:stop]).exp_()  # P, recomputed
        p_op = _operand(work, p, dtype)
        _add_product(dv, first, p_op.transpose(1, 2), do_c, 1.0)  # dV += Pᵀ dO_c
        dp = torch.bmm(do_c, v_t, out=work.get("dp", dtype, stop - start))  # dP = dO_c vᵀ
        # dS = P ∘ (dP − delta): over dP for fp32 / fp64; over the fp32 P for half inputs, its
        # P ∘ delta term from the rounded P (as the official math's softmax backward has it)
        if p.dtype == dtype:
            ds_op = dp.sub_(delta[:, start:stop]).mul_(p)
        else:
            ds_op = _operand(work, p.mul_(dp).addcmul_(p_op, delta[:, start:stop], value=-1.0), dtype)
        dq_c = torch.bmm(ds_op, k, out=dq[:, start:stop])  # dQ_c = dS k · scale
        if scale != 1.0:
            dq_c.mul_(scale)
        _add_product(dk, first, ds_op.transpose(1, 2), q_c, scale)  # dK += dSᵀ q_c · scale
    return dq, _in_layout_of(dk, k), _in_layout_of(dv, v)


def _in_layout_of(acc: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``acc`` as a tensor of ``like``'s dtype and strides (``acc`` itself where it is one)."""
    if acc.dtype == like.dtype and acc.stride() == like.stride():
        return acc
    return torch.empty_like(like).copy_(acc)


@attention_bwd.register_fake
def _attention_bwd_fake(grad_out, grad_lse, q, k, v, out, lse, scale, budget_bytes, max_chunks):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


_ops.register_attention_autograd("attnseg::chunked_attention_fwd", torch.ops.attnseg.chunked_attention_bwd)

attention_fwd = torch.ops.attnseg.chunked_attention_fwd
attention_bwd = torch.ops.attnseg.chunked_attention_bwd


def channel_attention(x: torch.Tensor, official: bool) -> torch.Tensor:
    """A X of CAM for x [B, C, N] (any strides), through library GEMMs, differentiable by autograd.

    E = X Xᵀ and the softmax over its rows are computed in fp32 (fp64 for fp64 inputs) whatever
    x's dtype; A X takes A rounded to x's dtype and returns x's dtype. ``official``:
    A = softmax(rowmax(E) − E) = softmax(−E) (the official code); else A = softmax(E) (the paper).
    Memory: the B × C × C map in fp32 (and, for fp16 / bf16 inputs, an fp32 copy of x).
    """
    acc = _acc_dtype(x.dtype)
    xa = x.to(acc)
    energy = torch.bmm(xa, xa.transpose(1, 2))
    # softmax(rowmax(E) − E) equals softmax(−E): softmax is invariant to a per-row shift
    attn = torch.softmax(energy.neg() if official else energy, dim=-1)
    return torch.bmm(attn.to(x.dtype), x)
