"""Pure-PyTorch references: the ground truth for tests and benchmarks.

These follow the official DANet code (junfu1115/DANet, ``encoding/nn/da_att.py``)
operation for operation, materialising the full attention maps. Nothing else in
attnseg re-implements them: tests and benchmarks import from here.
"""

from __future__ import annotations

import torch

__all__ = [
    "attention",
    "attention_with_lse",
    "position_attention",
    "channel_attention",
]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """softmax(q kᵀ · scale) v, materialising the Nq×Nk map.

    q: [B, Nq, E], k: [B, Nk, E], v: [B, Nk, Ev] -> [B, Nq, Ev].
    """
    energy = torch.bmm(q, k.transpose(1, 2))
    if scale != 1.0:
        energy = energy * scale
    return torch.bmm(torch.softmax(energy, dim=-1), v)


def attention_with_lse(q, k, v, scale: float = 1.0):
    """Like :func:`attention`, also returning the row logsumexp of the scaled logits [B, Nq]."""
    energy = torch.bmm(q, k.transpose(1, 2)) * scale
    return torch.bmm(torch.softmax(energy, dim=-1), v), torch.logsumexp(energy, dim=-1)


def position_attention(x, query, key, value, gamma):
    """PAM exactly as the official ``PAM_Module.forward`` after its three 1×1 convolutions.

    x: [B, C, H, W]; query, key: [B, E, H, W] (the query_conv / key_conv outputs);
    value: [B, C, H, W]; gamma: [1]. Returns gamma · (value attended by softmax(qᵀk)) + x.
    """
    b, c, h, w = x.shape
    # the official code's view(b, -1, h * w), with the sizes spelled out so that b = 0 works
    proj_query = query.reshape(b, query.shape[1], h * w).permute(0, 2, 1)
    proj_key = key.reshape(b, key.shape[1], h * w)
    energy = torch.bmm(proj_query, proj_key)
    attention_map = torch.softmax(energy, dim=-1)
    proj_value = value.reshape(b, value.shape[1], h * w)
    out = torch.bmm(proj_value, attention_map.permute(0, 2, 1))
    out = out.view(b, c, h, w)
    return gamma * out + x


def channel_attention_product(x, variant: str = "official"):
    """A X of CAM, without gamma and residual, for x: [B, C, N] (the official code's steps).

    official: A = softmax(rowmax(E) − E); paper: A = softmax(E); E = X Xᵀ over the N pixels.
    """
    if variant not in ("official", "paper"):
        raise ValueError(f"variant must be 'official' or 'paper', got {variant!r}")
    proj_query = x
    proj_key = x.permute(0, 2, 1)
    energy = torch.bmm(proj_query, proj_key)
    if variant == "official":
        energy = torch.max(energy, -1, keepdim=True)[0].expand_as(energy) - energy
    attention_map = torch.softmax(energy, dim=-1)
    return torch.bmm(attention_map, x)


def channel_attention(x, gamma, variant: str = "official"):
    """CAM as the official ``CAM_Module.forward`` ("official") or as the paper writes it ("paper").

    official: A = softmax(rowmax(E) − E); paper: A = softmax(E); E = X Xᵀ over the N = H·W pixels.
    x: [B, C, H, W]; gamma: [1]. Returns gamma · (A X) + x.
    """
    b, c, h, w = x.shape
    out = channel_attention_product(x.reshape(b, c, h * w), variant).view(b, c, h, w)
    return gamma * out + x
