"""Causal self-attention core: softmax(q k^T / sqrt(head_dim) + causal mask) v, per head,
with grouped-query attention (each key/value head serves heads / kv_heads query heads).

Legend: q_BTD is (batch, seq, heads * head_dim); k_BTK and v_BTK are (batch, seq,
kv_heads * head_dim). The CPU path is torch's fused scaled_dot_product_attention, which
keeps no seq x seq matrix for backward (only its inputs, output and a logsumexp per row).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _heads(x: torch.Tensor, n: int) -> torch.Tensor:
    B, T, D = x.shape
    return x.view(B, T, n, D // n).transpose(1, 2)  # (B, n, T, hd), a view


def attention(q_BTD: torch.Tensor, k_BTK: torch.Tensor, v_BTK: torch.Tensor, heads: int, kv_heads: int) -> torch.Tensor:
    B, T, D = q_BTD.shape
    q, k, v = _heads(q_BTD, heads), _heads(k_BTK, kv_heads), _heads(v_BTK, kv_heads)
    if kv_heads != heads:  # repeat each key/value head for its group of query heads
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, hd)
    return o.transpose(1, 2).reshape(B, T, D)


def attention_ref(q_BTD, k_BTK, v_BTK, heads: int, kv_heads: int) -> torch.Tensor:
    """The textbook formula with an explicit (T, T) score matrix."""
    B, T, D = q_BTD.shape
    q, k, v = _heads(q_BTD, heads), _heads(k_BTK, kv_heads), _heads(v_BTK, kv_heads)
    k = k.repeat_interleave(heads // kv_heads, dim=1)
    v = v.repeat_interleave(heads // kv_heads, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D // heads)  # (B, H, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    p = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    return (p @ v).transpose(1, 2).reshape(B, T, D)
